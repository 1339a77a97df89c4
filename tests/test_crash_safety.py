"""Crash safety: curation and mixing killed with SIGKILL at random points, then rerun, end exactly where an
uninterrupted run ends: same datasets, same ledger events (once each), no temporary files left behind.
(Training's kill -9 resume is in test_sft.py.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_driver import STEPS

from tulu_pipeline.provenance.ledger import Ledger
from tulu_pipeline.storage import TMP_MARKER, Store

pytestmark = pytest.mark.integration  # subprocesses killed with SIGKILL

DRIVER = Path(__file__).with_name("reliability_driver.py")
DATASETS = ["raw/gsm8k_train", "raw/code_alpaca", "raw/self_instruct_seed", "normalized_prompts",
            "deduplicated_prompts", "decontaminated_prompts", "decontamination_quarantine", "sft_mix"]
KILLS = 3


def _run(home: Path, run_id: str, kill_at: str | None = None, delay_s: float = 0.0) -> int:
    """Run the driver; with `kill_at`, SIGKILL it `delay_s` after it prints ``step <kill_at>``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(home), run_id], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    if kill_at is None:
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-2000:]
        return 0
    try:
        for line in proc.stdout:  # blocks until the driver reaches the step (or exits)
            if line.strip() == f"step {kill_at}":
                time.sleep(delay_s)  # somewhere inside the step: mid-write, mid-ledger, mid-publish
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _state(home: Path) -> dict:
    store = Store(str(home))
    datasets = {}
    for name in DATASETS:
        version = store.latest_version(name)
        datasets[name] = (version, list(store.iter_rows(name, version)))
    events = Ledger(store).query(
        "SELECT row_id, event, asset_key, asset_version, decision, reason, related_ids, details, seq "
        "FROM events ORDER BY asset_key, asset_version, seq")
    return {"datasets": datasets, "events": events,
            "mix": store.read_json(f"data/sft_mix/{datasets['sft_mix'][0]}/mix.json")["train_row_ids_hash"]}


def _leftovers(home: Path) -> list[str]:
    temporaries = [p for p in home.rglob(f"*{TMP_MARKER}*")]
    staging = [p for p in (home / "ledger" / "_staging").rglob("*.parquet")] if (home / "ledger").exists() else []
    return sorted(str(p.relative_to(home)) for p in temporaries + staging)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("reference") / "home"
    _run(home, "run-reference")
    return _state(home)


def test_killed_runs_then_a_rerun_match_an_uninterrupted_run(reference, tmp_path):
    expected = reference
    home = tmp_path / "home"
    rng = random.Random(20261126)
    killed = 0
    for attempt in range(KILLS):
        # kill points spread over the run (seeded: decontamination, ingestion, normalization), each a moment
        # into a step, found from the driver's output rather than a clock, so every kill lands mid-run
        kill_at = rng.choice(STEPS[:-1])
        code = _run(home, f"run-killed-{attempt}", kill_at=kill_at, delay_s=rng.uniform(0.0, 0.3))
        killed += code == -signal.SIGKILL
    assert killed == KILLS, "every kill lands before the run ends"
    _run(home, "run-final")
    assert _leftovers(home) == []
    got = _state(home)
    assert got["mix"] == expected["mix"]
    for name in DATASETS:
        assert got["datasets"][name] == expected["datasets"][name], name
    assert got["events"] == expected["events"]  # each decision once: no duplicates from the killed runs
    runs = {r["run_id"] for r in Ledger(Store(str(home))).query("SELECT DISTINCT run_id FROM events")}
    assert runs <= {"run-final"} | {f"run-killed-{i}" for i in range(KILLS)}


def test_two_runs_at_once_give_one_consistent_result(reference, tmp_path):
    expected = reference
    home = tmp_path / "home"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(DRIVER), str(home), f"run-{i}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate()
        assert proc.returncode == 0, err.decode()[-2000:]
    got = _state(home)
    assert got["datasets"] == expected["datasets"] and got["events"] == expected["events"]
    assert _leftovers(home) == []
