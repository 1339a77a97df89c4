"""GRPO (RLVR) on a toy task a tiny model can learn: single-digit addition ``a+b=`` scored by the real GSM8K
verifier (``tulu_pipeline.rewards``), starting from a tiny character-level Llama briefly SFT-warmed so that it
answers with a number and EOS but mostly the wrong one.

The acceptance test checks that the stage learns: the mean reward of the last quarter of the steps is clearly
above that of the first quarter. Resume: a run killed with SIGKILL after its first complete checkpoint and re-run
resumes from it and ends with the uninterrupted run's weights (max |diff| <= RESUME_ATOL; bit-identical on CPU).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from resume_helpers import kill_9_after_first_checkpoint, max_abs_weight_diff
from test_rlvr_support import addition_row, save_warm_addition_model

from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.progress import NullReporter
from tulu_pipeline.storage import Store
from tulu_pipeline.training.checkpointing import (
    CHECKPOINTS_DIR,
)
from tulu_pipeline.training.rlvr import REWARD_CURVE_FILE, STEP_DELAY_ENV, TRAINED_ROWS_FILE, run_rlvr
from tulu_pipeline.training.rlvr_rollouts import (
    apply_unfinished_penalty,
    group_advantages,
    prompt_ids,
    step_prompt_indices,
)
from tulu_pipeline.training.rlvr_config import (
    RLVR_TRAINING_PRESETS,
    RLVRTrainingConfig,
    rlvr_training_config,
)

RESUME_ATOL = 1e-5
# per-step log fields that are counts or sampled outcomes: equal after a resume, not only close
EXACT_STEP_FIELDS = ("step", "reward_mean", "reward_std", "accuracy", "unfinished_rate", "completion_tokens_mean",
                     "reward_by_task")
PAIRS = [(a, b) for a in range(10) for b in range(10)]
random.Random(0).shuffle(PAIRS)
TRAIN_PAIRS = PAIRS[:8]
HELDOUT_PAIRS = PAIRS[8:12]
# 30 steps x 8 prompts x 8 completions of at most 4 tokens: ~10 s on one core. (Seeds 3, 4, 5 measured:
# mean reward of the first/last 7 steps 3.6 -> 7.7, 2.9 -> 7.1, 2.4 -> 3.8.)
# lr 2e-3: at 5e-3 the toy's reward peaked at step 5 and fell back on some CPUs (last quarter +0.3 over the first
# on one machine, +1.0 needed), where 2e-3 still rose through the run (+2.9; 1e-3: +2.3)
LEARN = RLVRTrainingConfig(learning_rate=2e-3, max_steps=30, prompts_per_step=8, num_generations=8,
                           micro_batch_size=64, max_completion_length=4, beta=0.0, save_steps=100, seed=4)


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory) -> Path:
    return save_warm_addition_model(tmp_path_factory.mktemp("toy") / "sft-toy", TRAIN_PAIRS, steps=200)


@pytest.fixture(scope="module")
def rows() -> tuple[list[dict], list[dict]]:
    return [addition_row(a, b) for a, b in TRAIN_PAIRS], [addition_row(a, b, "heldout") for a, b in HELDOUT_PAIRS]


@pytest.fixture(scope="module")
def learned(warm_model, rows, tmp_path_factory):
    train, heldout = rows
    reporter = NullReporter()
    out = tmp_path_factory.mktemp("learn") / "rlvr-toy"
    result = run_rlvr(train, heldout, warm_model, out, LEARN, reporter=reporter,
                      manifest_extra={"prompts_version": "toy-v1", "checkpoint_id": "rlvr-toy"})
    return result, reporter


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------
def test_importing_the_rlvr_modules_stays_cheap():
    code = ("import sys, tulu_pipeline.training.rlvr, tulu_pipeline.training.rlvr_job, tulu_pipeline.training.rlvr_plan, "
            "tulu_pipeline.rlvr; print(sorted(m for m in ('torch', 'transformers', 'vllm', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_presets():
    assert rlvr_training_config("cpu_demo") == RLVR_TRAINING_PRESETS["cpu_demo"]
    demo = RLVR_TRAINING_PRESETS["cpu_demo"]
    assert (demo.correct_reward, demo.unfinished_penalty, demo.use_vllm) == (10.0, 10.0, False)
    paper = RLVR_TRAINING_PRESETS["tulu3_8b"]
    assert (paper.learning_rate, paper.beta, paper.max_completion_length, paper.use_vllm) == (3e-7, 0.05, 1024, True)
    assert paper.rollouts_per_step == 64 * 16
    assert rlvr_training_config("cpu_demo", beta=0.0).beta == 0.0
    with pytest.raises(KeyError, match="unknown GRPO preset"):
        rlvr_training_config("nope")
    with pytest.raises(ValueError):
        rlvr_training_config("cpu_demo", num_generations=1)  # a group of one has no baseline


def test_unfinished_penalty_replaces_the_verifier_reward():
    config = RLVRTrainingConfig(unfinished_penalty=10.0)
    assert apply_unfinished_penalty(10.0, finished=False, config=config) == -10.0
    assert apply_unfinished_penalty(0.0, finished=False, config=config) == -10.0
    assert apply_unfinished_penalty(10.0, finished=True, config=config) == 10.0
    assert apply_unfinished_penalty(10.0, finished=False, config=RLVRTrainingConfig(unfinished_penalty=None)) == 10.0


def test_group_advantages():
    assert group_advantages([10.0, 10.0, 10.0]) == [0.0, 0.0, 0.0]
    adv = group_advantages([10.0, 0.0, 0.0, 0.0])
    assert adv[0] > 0 > adv[1] and adv[1] == adv[2] == adv[3]
    assert abs(sum(adv)) < 1e-9
    assert group_advantages([4.0, 0.0], "centered") == [2.0, -2.0]


def test_prompt_order_is_seeded_and_covers_every_prompt_each_epoch():
    first = [step_prompt_indices(s, 3, 6, seed=5) for s in (1, 2)]
    assert sorted(first[0] + first[1]) == list(range(6))
    assert first == [step_prompt_indices(s, 3, 6, seed=5) for s in (1, 2)]
    assert first != [step_prompt_indices(s, 3, 6, seed=6) for s in (1, 2)]


def test_prompt_ids_are_the_tulu_generation_prompt(warm_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(warm_model)
    row = {"row_id": "r", "messages": [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]}
    assert tokenizer.decode(prompt_ids(row, tokenizer)) == "<|user|>\n3+4=\n<|assistant|>\n"


# ---------------------------------------------------------------------------------------------
# the stage learns
# ---------------------------------------------------------------------------------------------
def test_mean_reward_rises_during_training(learned):
    result, reporter = learned
    m = result.metrics
    rewards = [point["reward_mean"] for point in m["reward_per_step"]]
    k = len(rewards) // 4
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    print(f"mean reward first {k} steps {first:.2f} -> last {k} steps {last:.2f}; held-out accuracy "
          f"{m['heldout_accuracy_before']:.2f} -> {m['heldout_accuracy_after']:.2f}")
    assert len(rewards) == LEARN.max_steps
    assert last > first + 1.0, rewards  # at least +10 points of accuracy on a 0/10 reward
    assert (m["reward_first_steps"], m["reward_last_steps"]) == (pytest.approx(first), pytest.approx(last))
    assert [h["step"] for h in reporter.history] == list(range(1, LEARN.max_steps + 1))
    assert all({"reward_mean", "accuracy", "kl", "unfinished_rate", "loss"} <= h.keys() for h in reporter.history)


def test_checkpoint_explains_itself(learned, warm_model, rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = learned
    out = result.checkpoint_dir
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["method"] == "grpo" and manifest["checkpoint_id"] == "rlvr-toy"
    assert manifest["prompts_version"] == "toy-v1"
    assert manifest["config"] == LEARN.model_dump(mode="json")
    assert manifest["start_model"]["path"] == str(warm_model.resolve())
    assert len(manifest["fingerprint"]) == 64
    assert manifest["heldout_row_ids"] == [r["row_id"] for r in rows[1]]
    assert manifest["metrics"]["heldout_accuracy_before"] is not None
    assert (out / REWARD_CURVE_FILE).read_bytes()[:4] == b"\x89PNG"
    assert sorted((out / TRAINED_ROWS_FILE).read_text().split()) == sorted(r["row_id"] for r in rows[0])
    assert not (out / CHECKPOINTS_DIR).exists()
    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template.startswith("{% for message in messages %}")
    again = run_rlvr(rows[0], rows[1], warm_model, out, LEARN,
                     manifest_extra={"prompts_version": "toy-v1", "checkpoint_id": "rlvr-toy"})
    assert again.reused and again.metrics == result.metrics


def test_unfinished_answers_are_penalized(warm_model, rows, tmp_path):
    # One token is never enough for "<digits><EOS>": every completion but an immediate EOS is unfinished, and a
    # single-digit sum cut off before its EOS still verifies. Both runs sample the same rollouts (same seed and
    # start model); only the reward differs.
    short = RLVRTrainingConfig(max_steps=1, prompts_per_step=8, num_generations=8, max_completion_length=1,
                               beta=0.0, seed=3, save_steps=10)
    penalized = run_rlvr(rows[0], [], warm_model, tmp_path / "a", short).metrics["reward_per_step"][0]
    lenient = run_rlvr(rows[0], [], warm_model, tmp_path / "b",
                       short.model_copy(update={"unfinished_penalty": None})).metrics["reward_per_step"][0]
    print(f"unfinished {penalized['unfinished_rate']:.2f}, correct {lenient['accuracy']:.2f}: reward "
          f"{penalized['reward_mean']:.2f} with the penalty, {lenient['reward_mean']:.2f} without")
    assert penalized["unfinished_rate"] == lenient["unfinished_rate"] >= 0.5
    assert penalized["accuracy"] == lenient["accuracy"] > 0  # some cut-off answers were right...
    assert lenient["reward_mean"] == pytest.approx(10.0 * lenient["accuracy"])  # ...and score 10 without it
    # with it every unfinished completion scores -10 (the finished ones are empty answers: 0)
    assert penalized["reward_mean"] == pytest.approx(-10.0 * penalized["unfinished_rate"])


# ---------------------------------------------------------------------------------------------
# resume after kill -9
# ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_resume_after_kill_9_matches_the_uninterrupted_run(warm_model, rows, tmp_path):
    from tulu_pipeline.training.rlvr_job import run_job

    config = LEARN.model_copy(update={"max_steps": 4, "save_steps": 2})
    store = Store(str(tmp_path / "tulu_home"))
    store.write_rows("rlvr_prompts", "v1", rows[0] + rows[1], ROW_SCHEMA)
    shutil.copytree(warm_model, store.path("models/sft-toy"))
    params = {"tulu_home": store.url, "prompts_dataset": "rlvr_prompts", "prompts_version": "v1",
              "heldout_row_ids": [r["row_id"] for r in rows[1]], "start_model_dir": "models/sft-toy",
              "checkpoint_dir": "models/rlvr-killed", "config": config.model_dump(mode="json")}
    uninterrupted = run_job({**params, "checkpoint_dir": "models/rlvr-whole"}, NullReporter())[0]

    kill_9_after_first_checkpoint("tulu_pipeline.training.rlvr_job", params, Path(store.path("models/rlvr-killed")),
                                  tmp_path / "killed", STEP_DELAY_ENV, 0.4)

    reporter = NullReporter()
    resumed, location = run_job(params, reporter)
    assert location == store.uri("models/rlvr-killed")
    assert resumed.resumed_from_step > 0
    assert any("resuming from checkpoint-" in m for m in reporter.messages)
    diff = max_abs_weight_diff(uninterrupted.checkpoint_dir, resumed.checkpoint_dir)
    print(f"resumed from step {resumed.resumed_from_step}; max |w_A - w_B| = {diff:.3g}")
    assert diff <= RESUME_ATOL
    # the reward history spans the whole run, before and after the kill, and matches step for step: rewards and
    # counts exactly, the logged floats (entropy, loss, kl; rounded to 6 decimals) to the weights' tolerance, since
    # the steps before the kill were logged by another process and a last-digit rounding may differ
    history, expected = resumed.metrics["reward_per_step"], uninterrupted.metrics["reward_per_step"]
    assert [h["step"] for h in history] == [e["step"] for e in expected] == list(range(1, config.max_steps + 1))
    for got, want in zip(history, expected):
        assert got.keys() == want.keys()
        assert {k: got[k] for k in EXACT_STEP_FIELDS} == {k: want[k] for k in EXACT_STEP_FIELDS}
        assert got == pytest.approx({k: v for k, v in want.items() if not isinstance(v, dict)} | {
            k: pytest.approx(v, abs=RESUME_ATOL) for k, v in want.items() if isinstance(v, dict)}, abs=RESUME_ATOL)


def test_completion_logprobs_of_a_padded_batch_equal_each_sequence_alone(warm_model):
    import torch
    from transformers import AutoModelForCausalLM

    from tulu_pipeline.training.rlvr_step import completion_logprobs

    model = AutoModelForCausalLM.from_pretrained(warm_model)
    prompts, completions = [[5, 6, 7], [5, 6, 7, 8, 9]], [[10, 11], [12, 13, 14]]
    batched, mask = completion_logprobs(model, prompts, completions, pad_id=0, temperature=0.7)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompts, completions)):
            logps = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float() / 0.7, dim=-1)
            alone = torch.stack([logps[len(p) - 1 + j, token] for j, token in enumerate(c)])
            assert torch.allclose(batched[i, : len(c)], alone, atol=1e-5)
