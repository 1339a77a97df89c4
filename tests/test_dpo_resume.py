"""The DPO job killed with SIGKILL after its first complete checkpoint, then re-run: it resumes from the newest
complete checkpoint and ends with the weights of an uninterrupted run (max |diff| <= RESUME_ATOL; on CPU in
fp32 they are identical)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_dpo_support import TINY_DPO, tiny_home

from tulu_pipeline.training.checkpointing import (
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    PROGRESS_FILE,
)
from tulu_pipeline.training.dpo import STEP_DELAY_ENV
from tulu_pipeline.training.dpo_plan import dpo_checkpoint_plan, reference_logprobs_plan
from tulu_pipeline.training.reporting import NullReporter

RESUME_ATOL = 1e-5


def _load_weights(directory: Path):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_kill_9_then_resume_matches_the_uninterrupted_run(tmp_path):
    from tulu_pipeline.training.dpo_job import run_task

    store = tiny_home(tmp_path)
    overrides = {**TINY_DPO, "save_steps": 2}
    reference = reference_logprobs_plan(store, "cpu_demo", overrides)
    run_task(reference.extras, NullReporter())
    plan = dpo_checkpoint_plan(store, "cpu_demo", overrides)
    uninterrupted = {**plan.extras, "checkpoint_dir": "models/dpo-uninterrupted"}
    run_task(uninterrupted, NullReporter())

    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps(plan.extras))
    checkpoints = Path(store.path(plan.checkpoint_dir)) / CHECKPOINTS_DIR
    env = {**os.environ, STEP_DELAY_ENV: "0.5", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tulu_pipeline.training.dpo_job", "--params", str(params_file)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not list(checkpoints.glob(f"checkpoint-*/{PROGRESS_FILE}")):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (Path(store.path(plan.checkpoint_dir)) / MANIFEST_FILE).exists()

    reporter = NullReporter()
    metadata, _version = run_task(plan.extras, reporter)
    assert metadata["resumed_from_step"] > 0
    assert any("resuming from checkpoint-" in m for m in reporter.messages)
    a = _load_weights(Path(store.path("models/dpo-uninterrupted")))
    b = _load_weights(Path(store.path(plan.checkpoint_dir)))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resumed from step {metadata['resumed_from_step']}; max |w_A - w_B| = {diff:.3g}")
    assert diff <= RESUME_ATOL
