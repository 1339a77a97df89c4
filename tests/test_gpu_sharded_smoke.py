"""benchmarks/gpu_sharded.py in its CPU smoke mode: the GPU benchmark's whole code path (torchrun, FSDP2, SFT and DPO
with and without activation checkpointing, the JSON report) on a tiny model, so the one GPU call cannot fail on a
typo, nor on an import the GPU image lacks (pydantic, trl, datasets, dagster-pipes are blocked here)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # a torchrun subprocess

REPO = Path(__file__).resolve().parent.parent


def test_cpu_smoke_mode_reports_every_mode(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               str(REPO / "benchmarks" / "gpu_sharded.py"), "--device", "cpu", "--tiny", "--warmup", "1",
               "--steps", "1",
               "--micro-batch", "4", "--seq", "64", "--out", str(out)]
    # The GPU image lacks these: make importing them fail here too (sitecustomize runs at every interpreter start).
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor name in ('pydantic', 'trl', 'datasets', 'dagster_pipes', 'dagster'):\n"
        "    sys.modules[name] = None\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(blocker)}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    modes = {(m["method"], m["activation_checkpointing"]): m for m in report["modes"]}
    assert set(modes) == {("sft", False), ("sft", True), ("dpo", False), ("dpo", True)}
    for mode in modes.values():
        assert mode["tokens_per_s"] > 0 and math.isfinite(mode["loss_last"])
        assert mode["mfu"] == pytest.approx(mode["model_flops_per_token"] * mode["tokens_per_s"] / 989e12)
        assert mode["mfu_with_attention"] > mode["mfu"]
    n = modes[("sft", False)]["parameters"]
    assert modes[("sft", False)]["model_flops_per_token"] == 6 * n  # policy fwd + bwd
    assert modes[("dpo", False)]["model_flops_per_token"] == 8 * n  # plus the reference's forward
    assert modes[("dpo", False)]["loss_first"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at start
