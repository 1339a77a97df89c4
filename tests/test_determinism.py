"""Determinism across processes: two fresh Python processes with different PYTHONHASHSEED values compute the
seeded outputs of generation, evaluation and the IFEval verifier (tests/determinism_probe.py) and must agree.

Repeating a call inside one process cannot catch what differs between processes: set or dict order under hash
randomization, a seed drawn from the clock or the PID, state left by an earlier call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_sft_support import save_tiny_model

PROBE = Path(__file__).with_name("determinism_probe.py")
REPO = PROBE.parent.parent
HASH_SEEDS = ("0", "4242")


@pytest.mark.integration
def test_seeded_outputs_agree_across_fresh_processes_with_different_hash_seeds(tmp_path, bundle):
    model = save_tiny_model(tmp_path / "tiny")
    procs = []
    for seed in HASH_SEEDS:  # both at once: each spends most of its time importing torch
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(PROBE), str(model), str(bundle)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for seed, proc in zip(HASH_SEEDS, procs):
        out, err = proc.communicate()
        assert proc.returncode == 0, f"PYTHONHASHSEED={seed}: {err[-3000:]}"
        outputs.append(json.loads(out))
    first, second = outputs
    for part in ("generation", "evaluation", "ifeval"):
        assert first[part] == second[part], f"{part} differs between PYTHONHASHSEED={HASH_SEEDS[0]} and {HASH_SEEDS[1]}"
    # the probe measured something: real samples, a real interval, constraints of 1 to 3 instructions
    assert all(len(texts) == 2 for texts in first["generation"]["sampled"])
    low, high = first["evaluation"]["bootstrap_ci"]
    assert low < high and len(first["evaluation"]["gsm8k_sample"]) == 8
    assert {len(c["instruction_id_list"]) for c in first["ifeval"]["constraints"]} == {1, 2, 3}
