"""SFT and DPO with ``sharding.strategy="fsdp"``: two CPU ranks under torchrun (gloo), the Trainer's own FSDP2.

Against one unsharded process on the same global batch (SFT: 8 sequences per step, 4 x 2 accumulation there, 4 per
rank here; DPO: 4 pairs, 2 x 2 there, 2 per rank here) the per-step losses agree within ``LOSS_RTOL`` (fp32; what
differs is only the order of the gradient sums, averaged by the reduce-scatter instead of accumulated), each rank
holds about half of the parameters and of AdamW's state, and the published checkpoint is one ordinary safetensors
model that ``from_pretrained`` loads, with the unsharded run's weights within ``WEIGHT_ATOL``.

Kill and resume of a sharded Trainer run: the 2-rank SFT job SIGKILLed (the torchrun agent and both ranks at once)
once its step-2 checkpoint (DCP shards) is complete, relaunched: it resumes from step 2 and ends with the
uninterrupted sharded run's weights and per-step losses, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_dpo_support import TINY_DPO, tiny_home
from resume_helpers import kill_9_torchrun_after_first_checkpoint, max_abs_weight_diff
from test_sft import MANIFEST_EXTRA, TINY, _job_home, rows, tiny_model  # noqa: F401 (fixtures)

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.progress import NullReporter
from tulu_pipeline.training.sft import STEP_DELAY_ENV, run_sft

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a torchrun launch of two ranks

LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4
STEPS = 3  # a sharded resume checkpoint at step 2 (save_steps), the published model after step 3
# FSDP2 shards every parameter on dim 0; a rank holds half of each, rounded up (the tiny Llama's 4-row k/v
# projections and odd sizes make it not exactly half).
SHARE_TOLERANCE = 0.02


def _torchrun_job(module: str, params: dict, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    params_file = work / "params.json"
    params_file.write_text(json.dumps(params))
    log = work / "torchrun.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", module, "--params", str(params_file)],
                            env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode
    assert rc == 0, f"torchrun {module} failed (rc {rc}):\n{log.read_text()[-4000:]}"


SFT_CONFIG = TINY.model_copy(update={"max_steps": STEPS, "save_steps": 2})
SHARDING = {"strategy": "fsdp", "mixed_precision": "fp32"}


def _sharded_sft_params(tmp: Path, tiny_model: Path, rows) -> tuple[Path, dict]:
    store, params = _job_home(tmp, tiny_model, rows)
    params["config"] = {**SFT_CONFIG.model_dump(mode="json"), "sharding": SHARDING}
    return Path(store.path("models/sft-test")), params


@pytest.fixture(scope="module")
def sharded_sft(tiny_model, rows, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank SFT job; its published checkpoint."""
    tmp = tmp_path_factory.mktemp("sharded_sft")
    published, params = _sharded_sft_params(tmp, tiny_model, rows)
    _torchrun_job("tulu_pipeline.training.sft_job", params, tmp / "work")
    return published


def test_fsdp_sft_on_two_ranks_matches_one_unsharded_process(sharded_sft, tiny_model, rows, tmp_path):
    config, sharding, published = SFT_CONFIG, SHARDING, sharded_sft
    manifest = json.loads((published / MANIFEST_FILE).read_text())

    train, heldout = rows
    single = run_sft(train, heldout, tiny_model, tmp_path / "single", config, reporter=NullReporter(),
                     manifest_extra=MANIFEST_EXTRA)

    assert manifest["batch"]["world_size"] == 2 and manifest["batch"]["global_batch_size"] == 8
    assert manifest["config"]["sharding"] == {**sharding, "activation_checkpointing": False, "cpu_offload": False}
    assert manifest["fingerprint"] != single.manifest["fingerprint"]  # sharding is part of the run identity
    sharded_curve = [(p["step"], p["loss"]) for p in manifest["metrics"]["train_loss"]]
    single_curve = [(p["step"], p["loss"]) for p in single.metrics["train_loss"]]
    assert [s for s, _ in sharded_curve] == [s for s, _ in single_curve] == list(range(1, STEPS + 1))
    for (step, sharded_loss), (_, single_loss) in zip(sharded_curve, single_curve):
        assert sharded_loss == pytest.approx(single_loss, rel=LOSS_RTOL), f"step {step}"
    assert manifest["metrics"]["trained_rows_seen"] == single.metrics["trained_rows_seen"]

    _assert_half_per_rank(manifest["sharding"])
    _assert_published_equals(published, single.checkpoint_dir)


def test_fsdp_sft_killed_with_sigkill_resumes_to_the_uninterrupted_run(sharded_sft, tiny_model, rows, tmp_path):
    published, params = _sharded_sft_params(tmp_path, tiny_model, rows)
    kill_9_torchrun_after_first_checkpoint("tulu_pipeline.training.sft_job", params, published, tmp_path / "killed",
                                           STEP_DELAY_ENV, 1.0)
    _torchrun_job("tulu_pipeline.training.sft_job", params, tmp_path / "resumed")
    resumed = json.loads((published / MANIFEST_FILE).read_text())
    whole = json.loads((sharded_sft / MANIFEST_FILE).read_text())

    assert resumed["fingerprint"] == whole["fingerprint"]
    assert resumed["metrics"]["resumed_from_step"] == 2
    assert resumed["metrics"]["train_loss"] == whole["metrics"]["train_loss"]  # every step, before and after the kill
    diff = max_abs_weight_diff(published, sharded_sft)
    print(f"resumed from step 2; max |w_resumed - w_uninterrupted| = {diff:.3g}")
    assert diff == 0.0


def test_fsdp_dpo_on_two_ranks_matches_one_unsharded_process(tmp_path):
    from tulu_pipeline.training.dpo_job import run_task
    from tulu_pipeline.training.dpo_plan import dpo_checkpoint_plan, reference_logprobs_plan

    store = tiny_home(tmp_path)
    overrides = {**TINY_DPO, "max_steps": STEPS, "save_steps": 2}
    sharded_overrides = {**overrides, "sharding": {"strategy": "fsdp", "mixed_precision": "fp32"}}
    for config in (overrides, sharded_overrides):
        run_task(reference_logprobs_plan(store, "cpu_demo", config).extras, NullReporter())
    single_plan = dpo_checkpoint_plan(store, "cpu_demo", overrides)
    sharded_plan = dpo_checkpoint_plan(store, "cpu_demo", sharded_overrides)
    assert sharded_plan.checkpoint_dir != single_plan.checkpoint_dir  # sharding is part of the checkpoint id
    _torchrun_job("tulu_pipeline.training.dpo_job", sharded_plan.extras, tmp_path / "work")
    run_task(single_plan.extras, NullReporter())
    published = Path(store.path(sharded_plan.checkpoint_dir))
    manifest = json.loads((published / MANIFEST_FILE).read_text())
    single = json.loads((Path(store.path(single_plan.checkpoint_dir)) / MANIFEST_FILE).read_text())

    assert manifest["batch"]["world_size"] == 2 and manifest["batch"]["per_device_batch_size"] == 2
    sharded_curve = [(p["step"], p["loss"]) for p in manifest["metrics"]["train_loss"]]
    single_curve = [(p["step"], p["loss"]) for p in single["metrics"]["train_loss"]]
    assert [s for s, _ in sharded_curve] == [s for s, _ in single_curve] == list(range(1, STEPS + 1))
    for (step, sharded_loss), (_, single_loss) in zip(sharded_curve, single_curve):
        assert sharded_loss == pytest.approx(single_loss, rel=LOSS_RTOL), f"step {step}"
    _assert_half_per_rank(manifest["sharding"])
    _assert_published_equals(published, Path(store.path(single_plan.checkpoint_dir)))


def _assert_half_per_rank(record: dict) -> None:
    assert record["strategy"] == "fsdp" and len(record["param_local_numel"]) == 2
    assert sum(record["param_local_numel"]) >= record["param_numel"]  # every element is held by some rank
    for share in (*record["param_share"], *record["optimizer_state_share"]):
        assert share == pytest.approx(0.5, abs=SHARE_TOLERANCE)
    assert record["optimizer_state_numel"] == 2 * record["param_numel"]  # AdamW: two moments per parameter


def _assert_published_equals(published: Path, unsharded: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    assert json.loads((published / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (published / "model.safetensors").exists()
    weights = AutoModelForCausalLM.from_pretrained(published, dtype=torch.float32).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(unsharded, dtype=torch.float32).state_dict()
    assert weights.keys() == reference.keys()
    diff = max(float((weights[name] - reference[name]).abs().max()) for name in weights)
    assert diff < WEIGHT_ATOL, f"published sharded weights differ from the unsharded run's by {diff}"
