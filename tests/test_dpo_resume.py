"""The DPO job killed with SIGKILL after its first complete checkpoint, then re-run: it resumes from the newest
complete checkpoint and ends with the weights of an uninterrupted run (max |diff| <= RESUME_ATOL; on CPU in
fp32 they are identical)."""

from __future__ import annotations

from pathlib import Path

import pytest
from resume_helpers import kill_9_after_first_checkpoint, max_abs_weight_diff
from test_dpo_support import TINY_DPO, tiny_home

from tulu_pipeline.progress import NullReporter
from tulu_pipeline.training.dpo import STEP_DELAY_ENV
from tulu_pipeline.training.dpo_plan import dpo_checkpoint_plan, reference_logprobs_plan

pytestmark = pytest.mark.integration  # a trainer process killed with SIGKILL

RESUME_ATOL = 1e-5


def test_kill_9_then_resume_matches_the_uninterrupted_run(tmp_path):
    from tulu_pipeline.training.dpo_job import run_task

    store = tiny_home(tmp_path)
    overrides = {**TINY_DPO, "save_steps": 2}
    reference = reference_logprobs_plan(store, "cpu_demo", overrides)
    run_task(reference.extras, NullReporter())
    plan = dpo_checkpoint_plan(store, "cpu_demo", overrides)
    uninterrupted = {**plan.extras, "checkpoint_dir": "models/dpo-uninterrupted"}
    run_task(uninterrupted, NullReporter())

    kill_9_after_first_checkpoint("tulu_pipeline.training.dpo_job", plan.extras,
                                  Path(store.path(plan.checkpoint_dir)), tmp_path / "killed", STEP_DELAY_ENV, 0.5)

    reporter = NullReporter()
    metadata, _version = run_task(plan.extras, reporter)
    assert metadata["resumed_from_step"] > 0
    assert any("resuming from checkpoint-" in m for m in reporter.messages)
    diff = max_abs_weight_diff(Path(store.path("models/dpo-uninterrupted")), Path(store.path(plan.checkpoint_dir)))
    print(f"resumed from step {metadata['resumed_from_step']}; max |w_A - w_B| = {diff:.3g}")
    assert diff <= RESUME_ATOL
