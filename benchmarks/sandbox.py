"""How long the evaluation sandbox takes to end hostile programs, against a well-behaved one in the same run.

The timing that tests/test_sandbox.py used to assert (`wall_s <= wall limit + 2 s`, flaky on a loaded machine) is
measured here instead; the test keeps the behaviour (each program fails, no process is left behind) and
pytest-timeout bounds it. Baseline: `print(1)` under the same limits (start-up and teardown of one sandbox).

    .venv/bin/python benchmarks/sandbox.py [--repeat 3] [--out benchmarks/results/sandbox.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from tulu_pipeline.evaluation.sandbox import SandboxLimits, run_python
from tulu_pipeline.training.checkpointing import write_json_atomic

LIMITS = SandboxLimits(wall_s=6.0, cpu_s=2, memory_mb=256, max_processes=8)
PROGRAMS = {
    "well_behaved": "print(1)\n",
    "infinite_loop": "while True:\n    pass\n",
    "sleep_forever": "import time\ntime.sleep(3600)\n",
    "unbounded_allocation": "blocks = []\nwhile True:\n    blocks.append(bytearray(50_000_000))\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "huge_output_file": "with open('big.bin', 'wb') as f:\n    while True:\n        f.write(b'x' * 1_000_000)\n",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sandbox.json"))
    args = parser.parse_args()
    measured = {}
    for name, code in PROGRAMS.items():
        runs = [run_python(code, LIMITS) for _ in range(args.repeat)]
        walls = [r.wall_s for r in runs]
        measured[name] = {"statuses": sorted({r.status for r in runs}), "median_wall_s": statistics.median(walls),
                          "max_wall_s": max(walls)}
    baseline = measured["well_behaved"]["median_wall_s"]
    for name, entry in measured.items():
        entry["ratio_to_well_behaved"] = round(entry["median_wall_s"] / baseline, 2)
        entry["max_over_wall_limit_s"] = round(entry["max_wall_s"] - LIMITS.wall_s, 3)
    result = {
        "benchmark": "sandbox",
        "limits": {"wall_s": LIMITS.wall_s, "cpu_s": LIMITS.cpu_s, "memory_mb": LIMITS.memory_mb,
                   "max_processes": LIMITS.max_processes},
        "repeat": args.repeat,
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "programs": measured,
    }
    write_json_atomic(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
