"""Time `make run` from fresh clones and check that their tables agree (issue: the default run in 20 minutes).

Reads the logs of one or more timed runs (each written by ``make run > LOG 2>&1`` followed by a line
``rc=<status> total=<seconds>``), takes every Dagster step's duration from its "Finished execution of step"
line, the set-up time (the log's start to the pipeline's first step) and the run summary printed last,
and writes them as JSON. With two logs, ``tables_identical`` says whether the two summaries are the same text.

    python benchmarks/default_run.py /tmp/run1.log /tmp/run2.log --commit $(git rev-parse --short HEAD) \\
        --out benchmarks/results/default_run.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

STEP = re.compile(r'^(\S+ \S+) \+0000 - dagster - DEBUG - (\S+) - \S+ - \d+ - \S+ - STEP_SUCCESS - '
                  r'Finished execution of step "([^"]+)" in ([0-9.]+(?:ms|s|m[0-9.]*s?|h[0-9m.]*s?))')
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \+0000 - dagster")
END = re.compile(r"^rc=(-?\d+) total=(\d+)$")
SUMMARY = "## Run summary"


def seconds(text: str) -> float:
    """Dagster's step durations: ``357ms``, ``26.83s``, ``1m41s``, ``1h2m3s``."""
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    total = 0.0
    for value, unit in re.findall(r"([0-9.]+)([hms])", text):
        total += float(value) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


def parse(log: Path) -> dict:
    """One run: its status, total and set-up seconds, per-job step seconds and the printed summary."""
    from datetime import datetime

    lines = log.read_text(errors="replace").splitlines()
    steps: dict[str, dict[str, float]] = defaultdict(dict)
    first = None
    for line in lines:
        stamp = STAMP.match(line)
        if stamp and first is None:
            first = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")
        match = STEP.match(line)
        if match:
            job, step = match.group(2), match.group(3)
            steps[job][step] = round(steps[job].get(step, 0.0) + seconds(match.group(4)), 2)
    end = next((END.match(line) for line in reversed(lines) if END.match(line)), None)
    if end is None:
        raise ValueError(f"{log}: no closing 'rc=... total=...' line: the run did not finish")
    at = next((k for k, line in enumerate(lines) if line.startswith(SUMMARY)), None)
    summary = "\n".join(lines[at:-1]).strip() if at is not None else ""
    total = int(end.group(2))
    by_job = {job: {"sum_s": round(sum(found.values()), 1), "steps": dict(sorted(found.items(), key=lambda kv: -kv[1]))}
              for job, found in steps.items()}
    return {"log": str(log), "rc": int(end.group(1)), "total_s": total, "under_20_min": total < 1200,
            "jobs": by_job, "first_dagster_line": first.isoformat() if first else None, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "default_run.json")
    args = parser.parse_args(argv)
    runs = [parse(log) for log in args.logs]
    result = {"what": "make run from fresh clones (git clone, empty .tulu, warm pip cache), each timed end to end "
                      "on an idle 2-core machine", "commit": args.commit, "runs": runs,
              "tables_identical": len({r["summary"] for r in runs}) == 1 if len(runs) > 1 else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    for run in runs:
        print(f"{run['log']}: rc {run['rc']}, {run['total_s']} s, "
              + ", ".join(f"{job} {info['sum_s']} s" for job, info in run["jobs"].items()))
    if len(runs) > 1:
        print("tables identical:", result["tables_identical"])


if __name__ == "__main__":
    main()
