"""The GRPO learner with ``sharding.strategy="fsdp"``: the RLVR job on two CPU ranks under torchrun (gloo), FSDP2.

Every rank samples and scores the same rollouts (the one-process sampling stream) and trains on its share, so
against one unsharded process with the same config the per-step rewards are equal, the losses and KL agree within
``LOSS_ATOL`` (fp32; only the order of the gradient and metric sums differs), each rank holds about half of the
parameters and of AdamW's state, and the published checkpoint (rank 0's, the gathered full weights) is within
``WEIGHT_ATOL`` of the unsharded run's. The policy and the KL reference are both sharded (``beta`` > 0) and
``num_iterations=2`` exercises the old-policy log-probs.

Kill and resume: the sharded job SIGKILLed (agent and both ranks) once its step-2 checkpoint is complete and
relaunched resumes from step 2 and ends with the uninterrupted sharded run's weights and curve, bit for bit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from resume_helpers import kill_9_torchrun_after_first_checkpoint, max_abs_weight_diff
from test_rlvr_support import addition_row, save_warm_addition_model
from test_training_sharded import _assert_half_per_rank, _torchrun_job

from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.progress import NullReporter
from tulu_pipeline.storage import Store
from tulu_pipeline.training.rlvr import STEP_DELAY_ENV
from tulu_pipeline.training.rlvr_config import RLVRTrainingConfig

LOSS_ATOL = 1e-5
WEIGHT_ATOL = 1e-4
PAIRS = [(a, b) for a in range(10) for b in range(10)]
random.Random(1).shuffle(PAIRS)
# 4 steps x 4 prompts x 3 completions, 2 updates per batch, KL reference. Zero-std groups are dropped, so the steps
# train e.g. 9, 3, 3 and 0 rollouts: uneven shares (5 + 4, 2 + 1), a rank padding with a masked micro-batch (3
# against 2 micro-batches of 2) and a step with nothing to train on.
CONFIG = RLVRTrainingConfig(learning_rate=2e-3, max_steps=4, prompts_per_step=4, num_generations=3,
                            micro_batch_size=2, num_iterations=2, max_completion_length=4, beta=0.05,
                            filter_zero_std_groups=True, save_steps=2, seed=4)
SHARDING = {"strategy": "fsdp", "mixed_precision": "fp32"}
MODULE = "tulu_pipeline.training.rlvr_job"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> tuple[Path, dict]:
    """A TULU_HOME with the addition prompts and a warm start model, and the sharded job's parameters."""
    tmp = tmp_path_factory.mktemp("rlvr_home")
    train = [addition_row(a, b) for a, b in PAIRS[:8]]
    heldout = [addition_row(a, b, "heldout") for a, b in PAIRS[8:12]]
    store = Store(str(tmp / "tulu_home"))
    store.write_rows("rlvr_prompts", "v1", train + heldout, ROW_SCHEMA)
    save_warm_addition_model(Path(store.path("models/sft-toy")), PAIRS[:8], steps=120)
    params = {"tulu_home": store.url, "prompts_dataset": "rlvr_prompts", "prompts_version": "v1",
              "heldout_row_ids": [r["row_id"] for r in heldout], "start_model_dir": "models/sft-toy",
              "checkpoint_dir": "models/rlvr-sharded",
              "config": {**CONFIG.model_dump(mode="json"), "sharding": SHARDING}}
    return tmp, params


@pytest.fixture(scope="module")
def sharded(home) -> Path:
    """The uninterrupted 2-rank run; its published checkpoint."""
    tmp, params = home
    _torchrun_job(MODULE, params, tmp / "work-sharded")
    return Path(Store(params["tulu_home"]).path(params["checkpoint_dir"]))


@pytest.mark.integration
@pytest.mark.slow
def test_fsdp_grpo_on_two_ranks_matches_one_unsharded_process(home, sharded):
    from tulu_pipeline.training.rlvr_job import run_job

    _, params = home
    single, _ = run_job({**params, "checkpoint_dir": "models/rlvr-single", "config": CONFIG.model_dump(mode="json")},
                        NullReporter())
    manifest = json.loads((sharded / MANIFEST_FILE).read_text())

    assert manifest["batch"]["world_size"] == 2
    assert manifest["config"]["sharding"] == {**SHARDING, "activation_checkpointing": False, "cpu_offload": False}
    assert "sharding" not in single.manifest["config"]
    assert manifest["fingerprint"] != single.manifest["fingerprint"]  # sharding is part of the run identity
    curve, reference = manifest["metrics"]["reward_per_step"], single.metrics["reward_per_step"]
    assert [p["step"] for p in curve] == [p["step"] for p in reference] == list(range(1, CONFIG.max_steps + 1))
    worst = {"loss": 0.0, "kl": 0.0}
    for mine, theirs in zip(curve, reference):
        # the same rollouts: equal rewards, accuracy and lengths
        for key in ("reward_mean", "reward_std", "accuracy", "unfinished_rate", "completion_tokens_mean",
                    "zero_std_groups_dropped_share"):
            assert mine[key] == theirs[key], (mine["step"], key)
        for key in worst:
            worst[key] = max(worst[key], abs(mine[key] - theirs[key]))
            assert mine[key] == pytest.approx(theirs[key], abs=LOSS_ATOL), (mine["step"], key)
        assert mine["entropy"] == pytest.approx(theirs["entropy"], abs=2e-6)
    assert manifest["metrics"]["heldout_accuracy_before"] == single.metrics["heldout_accuracy_before"]
    assert manifest["metrics"]["trained_rows_seen"] == single.metrics["trained_rows_seen"]
    # the steps exercised what the config is for: uneven shares, a padded micro-batch, an empty step (how many
    # rollouts each step trains depends on the CPU's rounding: 9, 3, 3, 0 on one machine, 9, 6, 3, 0 on another)
    trained = [round(4 * (1 - p["zero_std_groups_dropped_share"])) * 3 for p in curve]
    micro = CONFIG.micro_batch_size
    assert any(n % 2 for n in trained), trained  # one rank gets more rollouts than the other
    assert any(-(-(n - n // 2) // micro) != -(-(n // 2) // micro) for n in trained), trained  # one rank pads
    assert 0 in trained, trained  # a step with nothing to train on

    _assert_half_per_rank(manifest["sharding"])
    assert json.loads((sharded / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    diff = max_abs_weight_diff(sharded, single.checkpoint_dir)
    print(f"max |loss diff| {worst['loss']:.3g}, max |kl diff| {worst['kl']:.3g}, max |w diff| {diff:.3g}, "
          f"param share {manifest['sharding']['param_share']}")
    assert diff < WEIGHT_ATOL


@pytest.mark.integration
@pytest.mark.slow
def test_fsdp_grpo_killed_with_sigkill_resumes_to_the_uninterrupted_run(home, sharded, tmp_path):
    _, params = home
    params = {**params, "checkpoint_dir": "models/rlvr-killed"}
    published = Path(Store(params["tulu_home"]).path(params["checkpoint_dir"]))
    kill_9_torchrun_after_first_checkpoint(MODULE, params, published, tmp_path / "killed", STEP_DELAY_ENV, 1.0)
    _torchrun_job(MODULE, params, tmp_path / "resumed")
    resumed = json.loads((published / MANIFEST_FILE).read_text())
    whole = json.loads((sharded / MANIFEST_FILE).read_text())

    assert resumed["fingerprint"] == whole["fingerprint"]
    assert resumed["metrics"]["resumed_from_step"] == 2
    assert resumed["metrics"]["reward_per_step"] == whole["metrics"]["reward_per_step"]
    diff = max_abs_weight_diff(published, sharded)
    print(f"resumed from step 2; max |w_resumed - w_uninterrupted| = {diff:.3g}")
    assert diff == 0.0


def test_rank_shares_cover_every_rollout_once_with_equal_micro_batch_counts():
    from tulu_pipeline.training.rlvr_rollouts import Rollout
    from tulu_pipeline.training.rlvr_step import _rank_chunks

    rollouts = [Rollout(i, [1], "", True) for i in range(9)]
    per_rank = [_rank_chunks(rollouts, 4, rank, 2) for rank in range(2)]
    assert [[len(c) for c in chunks] for chunks, _ in per_rank] == [[4, 1], [4, 1]]
    assert [active for _, active in per_rank] == [[True, True], [True, False]]  # rank 1 pads with a masked copy
    real = [r.prompt_index for chunks, active in per_rank for c, a in zip(chunks, active) if a for r in c]
    assert real == list(range(9))
    chunks, active = _rank_chunks(rollouts, 4, 0, 1)
    assert [len(c) for c in chunks] == [4, 4, 1] and all(active)


def test_sharded_grpo_refuses_vllm_and_unsharded_multi_process(monkeypatch):
    from tulu_pipeline.training.rlvr import run_rlvr

    with pytest.raises(ValueError, match="use_vllm with sharding.strategy='fsdp'"):
        RLVRTrainingConfig(use_vllm=True, sharding=SHARDING)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NotImplementedError, match="set sharding.strategy='fsdp'"):
        run_rlvr([], [], "/nonexistent", "/tmp/unused", RLVRTrainingConfig(prompts_per_step=2))
