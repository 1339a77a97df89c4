"""The DAPO / Dr GRPO / Olmo 3 options of the GRPO stage, each with a test that fails when the option is ignored.

Runs are one or two optimizer steps of the toy addition model (tests/test_rlvr_support.py): the same seed and start
model sample the same rollouts, so two runs that differ in one option differ only where that option acts. The loss
formulas themselves are checked against TRL in tests/test_rlvr_trl_parity.py.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from test_rlvr_support import addition_row, save_warm_addition_model

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.progress import NullReporter
from tulu_pipeline.training import rlvr as rlvr_training
from tulu_pipeline.training.rlvr import TRAINING_METRICS_FILE, run_rlvr
from tulu_pipeline.training.rlvr_rollouts import (
    group_advantages,
    has_signal,
    resample_prompt_indices,
    step_prompt_indices,
    verifier_from_module,
)
from tulu_pipeline.training.rlvr_config import RLVR_TRAINING_PRESETS, RLVRTrainingConfig, rlvr_training_config

PAIRS = [(a, b) for a in range(10) for b in range(10)]
random.Random(1).shuffle(PAIRS)
TRAIN = [addition_row(a, b) for a, b in PAIRS[:8]]
HELDOUT = [addition_row(a, b, "heldout") for a, b in PAIRS[8:12]]
BASE = RLVRTrainingConfig(learning_rate=5e-3, max_steps=1, prompts_per_step=4, num_generations=6,
                          micro_batch_size=64, max_completion_length=4, beta=0.0, save_steps=100, seed=3)
STEP_METRICS = {"reward_mean", "reward_std", "zero_std_groups_dropped_share", "unfinished_rate",
                "clip_low_fraction", "clip_high_fraction", "kl", "entropy", "completion_tokens_mean",
                "logprob_mismatch"}


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    return save_warm_addition_model(tmp_path_factory.mktemp("toy") / "sft-toy", PAIRS[:8], steps=150)


_REAL = verifier_from_module()
# Two of the first step's prompts count as solved whatever the answer: their groups have zero reward std.
_SOLVED = {TRAIN[i]["row_id"] for i in step_prompt_indices(1, BASE.prompts_per_step, len(TRAIN), BASE.seed)[:2]}


def SOLVED_TWO(row: dict[str, Any], response: str) -> tuple[float, bool]:
    return (10.0, True) if row["row_id"] in _SOLVED else _REAL(row, response)


def _run(toy_model: Path, tmp_path: Path, name: str, heldout: list | None = None, verifier: Any = None,
         **overrides: Any) -> dict[str, Any]:
    reporter = NullReporter()
    result = run_rlvr(TRAIN, heldout or [], toy_model, tmp_path / name, BASE.model_copy(update=overrides),
                      reporter=reporter, verifier=verifier)
    result.metrics["streamed"] = reporter.history
    return result.metrics


def _step(metrics: dict[str, Any], step: int = 0) -> dict[str, Any]:
    return metrics["streamed"][step]


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def test_presets_carry_their_recipes():
    olmo = RLVR_TRAINING_PRESETS["olmo3_style"]
    assert (olmo.beta, olmo.epsilon_low, olmo.clip_high, olmo.loss_type) == (0.0, 0.2, 0.272, "dapo")
    assert (olmo.advantage_normalization, olmo.filter_zero_std_groups, olmo.active_sampling) == ("centered", True, True)
    assert (olmo.importance_sampling_correction, olmo.importance_sampling_cap) == (True, 2.0)
    assert (olmo.unfinished_penalty, olmo.mask_truncated_completions) == (None, False)
    paper = RLVR_TRAINING_PRESETS["tulu3_8b"]
    assert (paper.beta, paper.clip_high, paper.advantage_normalization, paper.filter_zero_std_groups) == (
        0.05, 0.2, "std", False)
    demo = RLVR_TRAINING_PRESETS["cpu_demo"]
    assert (demo.use_vllm, demo.beta, demo.filter_zero_std_groups, demo.max_completion_length) == (False, 0.0, True, 24)


def test_epsilon_is_accepted_as_trls_name_for_the_lower_clip():
    config = RLVRTrainingConfig.model_validate({"epsilon": 0.3})
    assert (config.epsilon_low, config.clip_high) == (0.3, 0.3)
    assert rlvr_training_config("cpu_demo", epsilon_high=0.28).clip_high == 0.28


def test_inconsistent_options_are_refused():
    with pytest.raises(ValueError, match="alternatives"):
        RLVRTrainingConfig(mask_truncated_completions=True, unfinished_penalty=10.0)
    with pytest.raises(ValueError, match="filter_zero_std_groups"):
        RLVRTrainingConfig(active_sampling=True, filter_zero_std_groups=False)


# ---------------------------------------------------------------------------------------------
# advantages and sampling
# ---------------------------------------------------------------------------------------------
def test_advantage_normalizations():
    rewards = [10.0, 0.0, 0.0, 0.0]
    centered = group_advantages(rewards, "centered")
    assert centered == [7.5, -2.5, -2.5, -2.5]  # r - mean(r): Dr GRPO / open-instruct "centered"
    std = (sum((r - 2.5) ** 2 for r in rewards) / 3) ** 0.5  # unbiased, as TRL's nanstd and open-instruct
    assert group_advantages(rewards, "std") == pytest.approx([a / (std + 1e-4) for a in centered])
    with pytest.raises(ValueError, match="std"):
        group_advantages(rewards, "batch")
    assert not has_signal([10.0, 10.0, 10.0]) and has_signal([10.0, 0.0, 10.0])


def test_resampled_prompts_are_seeded():
    first = resample_prompt_indices(step=3, sampling_round=1, per_step=4, total=10, seed=7)
    assert first == resample_prompt_indices(step=3, sampling_round=1, per_step=4, total=10, seed=7)
    assert first != resample_prompt_indices(step=3, sampling_round=2, per_step=4, total=10, seed=7)
    assert len(set(first)) == 4
    assert sorted(resample_prompt_indices(1, 1, per_step=20, total=5, seed=0)) == list(range(5))


# ---------------------------------------------------------------------------------------------
# the options in a run
# ---------------------------------------------------------------------------------------------
def test_every_step_streams_the_training_metrics_and_the_checkpoint_plots_them(toy_model, tmp_path):
    metrics = _run(toy_model, tmp_path, "metrics", max_steps=2, beta=0.05)
    for step in metrics["streamed"]:
        assert STEP_METRICS <= step.keys(), STEP_METRICS - step.keys()
    assert _step(metrics)["kl"] == 0.0  # the policy starts at the reference...
    assert _step(metrics, 1)["kl"] > 0.0  # ...and leaves it after one update
    # the transformers sampler is the learner itself: its log-probs agree up to float error
    assert all(step["logprob_mismatch"] < 1e-3 for step in metrics["streamed"])
    assert metrics["reference_model"] is True
    assert (tmp_path / "metrics" / TRAINING_METRICS_FILE).read_bytes()[:4] == b"\x89PNG"


def test_beta_zero_loads_no_reference_model(toy_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    loaded = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: loaded.append(args[0]) or original(*args, **kwargs))
    without = _run(toy_model, tmp_path, "beta0")
    loads_without = len(loaded)  # the policy, and the published checkpoint for the held-out measurement
    with_kl = _run(toy_model, tmp_path, "beta", beta=0.05)
    assert without["reference_model"] is False and with_kl["reference_model"] is True
    assert len(loaded) - loads_without == loads_without + 1  # one more: the reference model


def test_centered_advantages_change_the_update(toy_model, tmp_path):
    std = _step(_run(toy_model, tmp_path, "std"))
    centered = _step(_run(toy_model, tmp_path, "centered", advantage_normalization="centered"))
    assert std["reward_mean"] == centered["reward_mean"]  # same rollouts...
    assert std["loss"] != pytest.approx(centered["loss"], abs=1e-6)  # ...different advantages


def test_zero_std_groups_are_dropped(toy_model, tmp_path):
    kept = _step(_run(toy_model, tmp_path, "kept", verifier=SOLVED_TWO))
    filtered = _step(_run(toy_model, tmp_path, "filtered", verifier=SOLVED_TWO, filter_zero_std_groups=True))
    assert kept["reward_mean"] == filtered["reward_mean"]
    assert kept["zero_std_groups"] == filtered["zero_std_groups"] >= 2  # the two always-solved prompts at least
    dropped = filtered["zero_std_groups"]
    assert dropped < BASE.prompts_per_step, "this batch must keep a group with signal"
    assert filtered["zero_std_groups_dropped_share"] == dropped / BASE.prompts_per_step
    assert kept["zero_std_groups_dropped_share"] == 0.0
    assert filtered["trained_rollouts"] == kept["trained_rollouts"] - dropped * BASE.num_generations
    # dapo divides by the tokens trained on: fewer tokens, a larger per-token weight on the rest
    assert filtered["loss_tokens"] < kept["loss_tokens"]
    assert filtered["loss"] != pytest.approx(kept["loss"], abs=1e-6)


def test_active_sampling_refills_the_batch_within_its_bound(toy_model, tmp_path):
    metrics = _step(_run(toy_model, tmp_path, "active", verifier=SOLVED_TWO, filter_zero_std_groups=True,
                         active_sampling=True, max_sampling_rounds=4))
    assert 2 <= metrics["sampling_rounds"] <= 4  # the first round had zero-std groups to replace
    assert metrics["groups_sampled"] > BASE.prompts_per_step
    kept_groups = metrics["trained_rollouts"] // BASE.num_generations
    # more than the first round's at most prompts_per_step - 2 groups with signal, never more than the batch
    assert BASE.prompts_per_step - 2 < kept_groups <= BASE.prompts_per_step
    if kept_groups < BASE.prompts_per_step:  # stopped by the bound, not by a full batch
        assert metrics["sampling_rounds"] == 4


def test_active_sampling_stops_at_its_bound_when_no_group_has_signal(toy_model, tmp_path):
    def always_wrong(row, response):
        return 0.0, False

    metrics = _step(_run(toy_model, tmp_path, "hopeless", verifier=always_wrong, filter_zero_std_groups=True,
                         active_sampling=True, max_sampling_rounds=3, unfinished_penalty=None))
    assert metrics["sampling_rounds"] == 3
    assert metrics["zero_std_groups_dropped_share"] == 1.0
    assert metrics["trained_rollouts"] == 0 and metrics["loss"] == 0.0 and metrics["grad_norm"] is None


def test_truncated_completions_are_masked_instead_of_penalized(toy_model, tmp_path):
    # Two tokens cut off most "<digits><EOS>" answers: the masked run trains on the finished ones only.
    short = dict(max_completion_length=2, unfinished_penalty=None)
    kept = _step(_run(toy_model, tmp_path, "unmasked", **short))
    masked = _step(_run(toy_model, tmp_path, "masked", mask_truncated_completions=True, **short))
    assert kept["reward_mean"] == masked["reward_mean"] and 0 < masked["unfinished_rate"] < 1
    assert masked["loss_tokens"] < kept["loss_tokens"]
    assert masked["loss"] != pytest.approx(kept["loss"], abs=1e-6)


def test_importance_sampling_correction_weights_by_the_capped_ratio(toy_model, tmp_path, monkeypatch):
    plain = _step(_run(toy_model, tmp_path, "plain"))
    # A sampler whose log-probs are 1 nat below the learner's: every weight is exp(1) > cap, so exactly the cap.
    original = rlvr_training.TransformersRollouts.generate

    def shifted(self, *args, **kwargs):
        groups = original(self, *args, **kwargs)
        return [[(out[0], out[1], [lp - 1.0 for lp in out[2]]) for out in group] for group in groups]

    monkeypatch.setattr(rlvr_training.TransformersRollouts, "generate", shifted)
    corrected = _step(_run(toy_model, tmp_path, "corrected", importance_sampling_correction=True,
                           importance_sampling_cap=1.5))
    assert corrected["logprob_mismatch"] == pytest.approx(1.0, abs=1e-3)
    assert corrected["is_weight_mean"] == pytest.approx(1.5)
    assert corrected["loss"] == pytest.approx(1.5 * plain["loss"], rel=1e-4, abs=1e-7)


def test_importance_sampling_needs_sampler_logprobs(toy_model, tmp_path, monkeypatch):
    original = rlvr_training.TransformersRollouts.generate
    monkeypatch.setattr(rlvr_training.TransformersRollouts, "generate", lambda self, *a, **k: [
        [tuple(out[:2]) for out in group] for group in original(self, *a, **k)])
    with pytest.raises(ValueError, match="sampler's log-probs"):
        _run(toy_model, tmp_path, "no-logprobs", importance_sampling_correction=True)


def test_heldout_accuracy_has_a_paired_interval(toy_model, tmp_path):
    metrics = _run(toy_model, tmp_path, "heldout", heldout=HELDOUT)
    before, after = metrics["heldout_before"], metrics["heldout_after"]
    assert len(before["ok_per_row"]) == len(HELDOUT)
    low, high = before["accuracy_ci95"]
    assert low <= before["accuracy"] <= high
    low, high = metrics["heldout_accuracy_change_ci95"]
    assert low <= after["accuracy"] - before["accuracy"] <= high


class _FixedRollouts:
    """Returns scripted completions and records the sampling arguments it was called with."""

    def __init__(self, sampled: list[list[tuple[list[int], bool]]]):
        self.sampled, self.calls = sampled, []

    def generate(self, model, prompts, n, max_new_tokens, seed, temperature=1.0, top_p=1.0, greedy=False,
                 batch_size=8):
        self.calls.append({"n": n, "seed": seed, "greedy": greedy, "temperature": temperature,
                           "max_new_tokens": max_new_tokens})
        if greedy:
            return [[([1], True)] for _ in prompts]
        return [group[:n] for group in self.sampled[: len(prompts)]]


class _Decode:
    def decode(self, ids, skip_special_tokens=True):
        return "right" if ids == [1] else "wrong"


def test_heldout_samples_score_the_training_reward_with_the_unfinished_penalty():
    rows = [addition_row(1, 2, "heldout"), addition_row(3, 4, "heldout")]
    sampled = [[([1], True), ([2], True), ([2], False)],  # right, wrong, unfinished
               [([1], True), ([1], True), ([2], True)]]
    rollouts = _FixedRollouts(sampled)
    config = BASE.model_copy(update={"heldout_samples": 3, "temperature": 0.7, "unfinished_penalty": 10.0})
    verifier = lambda row, text: (10.0, True) if text == "right" else (0.0, False)  # noqa: E731
    result = rlvr_training.heldout_accuracy(None, rollouts, rows, [[0], [0]], _Decode(), verifier, 5, config)
    assert result["sampled_reward_per_row"] == [pytest.approx((10 + 0 - 10) / 3), pytest.approx(20 / 3)]
    assert result["sampled_unfinished_rate"] == pytest.approx(1 / 6)
    assert result["sampled_accuracy"] == pytest.approx(3 / 6)
    greedy, drawn = rollouts.calls
    assert (drawn["n"], drawn["greedy"], drawn["temperature"], drawn["max_new_tokens"]) == (3, False, 0.7, 5)
    # The same seed for both checkpoints: before and after draw from one random stream (a paired comparison).
    rlvr_training.heldout_accuracy(None, rollouts, rows, [[0], [0]], _Decode(), verifier, 5, config)
    assert rollouts.calls[3]["seed"] == drawn["seed"]
    off = rlvr_training.heldout_accuracy(None, _FixedRollouts(sampled), rows, [[0], [0]], _Decode(), verifier, 5,
                                config.model_copy(update={"heldout_samples": 0}))
    assert "sampled_reward" not in off


def test_heldout_sampled_reward_change_has_a_paired_interval(toy_model, tmp_path):
    metrics = _run(toy_model, tmp_path, "heldout-sampled", heldout=HELDOUT, heldout_samples=3)
    before, after = metrics["heldout_before"], metrics["heldout_after"]
    assert len(before["sampled_reward_per_row"]) == len(HELDOUT) and before["samples_per_row"] == 3
    assert metrics["heldout_reward_before"] == pytest.approx(before["sampled_reward"])
    diffs = [a - b for a, b in zip(after["sampled_reward_per_row"], before["sampled_reward_per_row"])]
    assert metrics["heldout_reward_change"] == pytest.approx(sum(diffs) / len(diffs))
    low, high = metrics["heldout_reward_change_ci95"]
    assert low <= metrics["heldout_reward_change"] <= high
    assert RLVR_TRAINING_PRESETS["cpu_demo"].heldout_samples > 0  # the default run reports it


# ---------------------------------------------------------------------------------------------
# several updates per batch of rollouts (num_iterations > 1) and the learning-rate schedule
# ---------------------------------------------------------------------------------------------
def _lr_factors(config: RLVRTrainingConfig) -> list[float]:
    """The lr factor each optimizer update of a run uses, as the run's scheduler applies it."""
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rlvr_training.lr_schedule(config))
    factors = []
    for _ in range(config.max_steps * config.num_iterations):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def test_the_lr_schedule_spans_every_optimizer_update():
    """The scheduler steps once per update, so its horizon is max_steps x num_iterations updates: the tulu3_8b
    preset (4 updates per batch) had reached lr 0 after a quarter of its steps."""
    paper = RLVR_TRAINING_PRESETS["tulu3_8b"]
    assert paper.num_iterations == 4 and paper.lr_scheduler == "linear"
    factors = _lr_factors(paper)
    updates = paper.max_steps * paper.num_iterations
    assert len(factors) == updates and all(f > 0 for f in factors)  # never 0 while training
    assert factors[updates // 4] == pytest.approx(0.75)
    assert factors[-1] == pytest.approx(1 / updates)  # the last update, as transformers' linear schedule
    assert factors == sorted(factors, reverse=True)
    # warmup_steps counts steps like max_steps: 2 steps of 3 updates warm up over 6 updates
    warm = _lr_factors(RLVRTrainingConfig(max_steps=4, num_iterations=3, warmup_steps=2, lr_scheduler="constant"))
    assert warm[:7] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0])
    assert _lr_factors(RLVRTrainingConfig(max_steps=5, lr_scheduler="linear")) == pytest.approx(
        [1.0, 0.8, 0.6, 0.4, 0.2])  # one update per step: as before


def test_several_updates_per_batch_run_the_clipped_ratio_path(toy_model, tmp_path):
    config = dict(max_steps=3, num_iterations=2, lr_scheduler="linear", beta=0.05, learning_rate=2e-2)
    metrics = _run(toy_model, tmp_path, "mu2", **config)
    steps = metrics["streamed"]
    # the lr after each step's two updates: 1 - 2s/6 of the peak, 0 only once the last update is done
    assert [s["learning_rate"] for s in steps] == pytest.approx([2e-2 * f for f in (4 / 6, 2 / 6, 0.0)])
    for step in steps:
        for key in ("loss", "kl", "clip_low_fraction", "clip_high_fraction", "entropy", "grad_norm"):
            assert math.isfinite(step[key]), (key, step)
    # the second update of a batch sees a policy that moved: its ratio leaves 1 and the clip bites somewhere
    assert any(s["clip_low_fraction"] + s["clip_high_fraction"] > 0 for s in steps)
    manifest = json.loads((tmp_path / "mu2" / MANIFEST_FILE).read_text())
    assert manifest["batch"] == {"world_size": 1, "global_batch_size": 24, "per_device_batch_size": 24,
                                 "gradient_accumulation_steps": 1, "unit": "rollouts"}


def test_heldout_before_and_after_are_measured_the_same_way(toy_model, tmp_path, monkeypatch):
    """Training rollouts may come from vLLM (bf16 on a GPU); the held-out accuracy of the start and of the trained
    checkpoint is measured by one engine (transformers), in fp32, greedily: a paired comparison."""
    import torch

    class FakeVLLM(rlvr_training.TransformersRollouts):  # the training sampler: records the calls it gets
        calls: list[bool] = []

        def __init__(self, model_dir, tokenizer, config):
            super().__init__(tokenizer)

        def generate(self, model, *args, greedy=False, **kwargs):
            FakeVLLM.calls.append(greedy)
            return super().generate(model, *args, greedy=greedy, **kwargs)

    measured = []
    original = rlvr_training.heldout_accuracy

    def spy(model, rollouts, *args, **kwargs):
        measured.append((type(rollouts), next(model.parameters()).dtype))
        return original(model, rollouts, *args, **kwargs)

    monkeypatch.setattr(rlvr_training, "VLLMRollouts", FakeVLLM)
    monkeypatch.setattr(rlvr_training, "heldout_accuracy", spy)
    metrics = _run(toy_model, tmp_path, "vllm-heldout", heldout=HELDOUT, use_vllm=True, heldout_samples=2)
    assert FakeVLLM.calls and not any(FakeVLLM.calls)  # vLLM sampled the training rollouts only
    assert measured == [(rlvr_training.TransformersRollouts, torch.float32)] * 2
    assert metrics["heldout_before"]["rows"] == metrics["heldout_after"]["rows"] == len(HELDOUT)
