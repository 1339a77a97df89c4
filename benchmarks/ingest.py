"""Ingestion throughput: the full raw-source path against plain JSON parsing of the same files.

Baseline (same run, same files): read each line-based training file and `json.loads` every line.
Measured: `iter_source_rows` (sha256 verification, parsing, mapping, row ids, schema validation) and
`ingest_source` (plus Parquet publication and ledger events). Results are ratios to the baseline.

    .venv/bin/python benchmarks/ingest.py [--repeat 3] [--out benchmarks/results/ingest.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import tempfile
import time
from pathlib import Path

from tulu_pipeline.data.ingest import ingest_source
from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import registry
from tulu_pipeline.settings import data_dir
from tulu_pipeline.storage import Store
from tulu_pipeline.training.checkpointing import write_json_atomic

SOURCES = ["gsm8k_train", "math_train", "hh_rlhf_harmless", "math_test", "gsm8k_test"]


def baseline(specs, root: Path) -> int:
    rows = 0
    for spec in specs:
        opener = gzip.open if spec.format == "jsonl.gz" else open
        with opener(root / spec.path, "rb") as handle:
            for line in handle:
                if line.strip():
                    json.loads(line)
                    rows += 1
    return rows


def load_rows(specs, root: Path) -> int:
    return sum(1 for spec in specs for _ in iter_source_rows(spec, root))


def ingest(specs, root: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        return sum(ingest_source(spec, store, "bench", root=root).dataset.rows for spec in specs)


def best_of(fn, repeat: int, *args) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        rows = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ingest.json"))
    args = parser.parse_args()
    root = data_dir()
    specs = [s for s in registry() if s.id in SOURCES]
    base_s, rows = best_of(baseline, args.repeat, specs, root)
    load_s, load_rows_n = best_of(load_rows, args.repeat, specs, root)
    ingest_s, ingest_rows_n = best_of(ingest, args.repeat, specs, root)
    assert rows == load_rows_n == ingest_rows_n
    result = {
        "benchmark": "ingest",
        "sources": SOURCES,
        "rows": rows,
        "repeat": args.repeat,
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "baseline_json_loads": {"seconds": round(base_s, 4), "rows_per_s": round(rows / base_s)},
        "iter_source_rows": {"seconds": round(load_s, 4), "rows_per_s": round(rows / load_s),
                             "slowdown_vs_baseline": round(load_s / base_s, 2)},
        "ingest_source": {"seconds": round(ingest_s, 4), "rows_per_s": round(rows / ingest_s),
                          "slowdown_vs_baseline": round(ingest_s / base_s, 2)},
    }
    write_json_atomic(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
