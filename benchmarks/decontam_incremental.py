"""Incremental decontamination against full reruns, end to end through `pipeline.decontaminate_prompts`.

A temporary TULU_HOME holds every bundled benchmark as its raw table and a synthetic pool of ``--rows`` rows
(`decontam.SyntheticRows`: 100-200 + 20-60 Zipf-drawn words, an eval item planted every ``--plant-every``
rows). Measured in one process pinned to one core, CPU and wall seconds of each whole stage run (plan, scan,
writing the rows, quarantine, ledger events and run record):

1. the suite without ``--added`` is decontaminated (a full run: the version to start from);
2. ``--added`` joins the suite: the incremental run, then a full rerun of the same inputs;
3. ``--append`` rows are appended to the pool: the incremental run, then a full rerun.

The suite's eval index is built once, as the asset does, and handed to every run (its build time is reported
apart). The asset's blocking re-check (`OverlapChecker`) is not part of the runs; its per-row cost is timed on
a sample and multiplied by the rows each route re-checks.

Each pair must publish the same rows, quarantine and ledger events (but run ids and timestamps): compared by
count and an order-sensitive hash over each (DuckDB), written as ``equal_to_full_rerun``. Ratios are
incremental over full seconds, measured in the same run. Results go to benchmarks/results/decontam_incremental.json.

    .venv/bin/python benchmarks/decontam_incremental.py [--rows 1000000] [--append 10000] [--quick]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decontam import SyntheticRows  # noqa: E402

from tulu_pipeline.curation.config import CurationConfig, EvalSelection  # noqa: E402
from tulu_pipeline.curation.decontaminate import kernel_available, registry_eval_items  # noqa: E402
from tulu_pipeline.curation.pipeline import decontaminate_prompts  # noqa: E402
from tulu_pipeline.curation.stages import build_eval_index, eval_specs  # noqa: E402
from tulu_pipeline.data.ingest import raw_dataset_name  # noqa: E402
from tulu_pipeline.data.loaders import iter_source_rows  # noqa: E402
from tulu_pipeline.data.schema import ROW_SCHEMA  # noqa: E402
from tulu_pipeline.process_memory import peak_rss_mb  # noqa: E402
from tulu_pipeline.provenance.ledger import Ledger  # noqa: E402
from tulu_pipeline.provenance.ledger_layout import sql_list  # noqa: E402
from tulu_pipeline.storage import Store  # noqa: E402

POOL = "deduplicated_prompts"


def conform(row: dict) -> dict:
    row = {"source_key": row["row_id"], "license": "synthetic", **row}
    return {f.name: row.get(f.name) for f in ROW_SCHEMA}


def publish_evals(store: Store) -> None:
    for spec in eval_specs(CurationConfig()):
        store.write_rows(raw_dataset_name(spec.id), "bundle", (conform(r) for r in iter_source_rows(spec)), ROW_SCHEMA)


def publish_pool(store: Store, version: str, chunks) -> int:
    info = store.write_dataset(POOL, version, ([conform(r) for r in chunk] for chunk in chunks), ROW_SCHEMA,
                               rows_per_part=100_000)
    return info.rows


def signature(store: Store, version: str, run_id: str) -> dict:
    """Counts and order-sensitive hashes of what the version published (events of ``run_id``)."""
    import duckdb

    def files(name: str) -> str:
        info = store.dataset_info(name, version)
        return sql_list([store.uri(store.dataset_dir(name, version), p) for p in info.parts])

    con = duckdb.connect()
    try:
        con.execute("SET enable_progress_bar = false")
        rows = con.execute("SELECT count(*), sum(hash(k, row_id, messages)::HUGEINT)::VARCHAR FROM "
                           f"(SELECT row_number() OVER () AS k, * FROM read_parquet({files('decontaminated_prompts')}))"
                           ).fetchone()
        quarantine = con.execute("SELECT count(*), sum(hash(k, row_id, matches, score)::HUGEINT)::VARCHAR FROM "
                                 "(SELECT row_number() OVER () AS k, * FROM "
                                 f"read_parquet({files('decontamination_quarantine')}))").fetchone()
    finally:
        con.close()
    events = Ledger(store).query(
        "SELECT count(*) AS n, sum(hash(row_id, event, seq, decision, reason, related_ids, details)::HUGEINT)::VARCHAR "
        f"AS h FROM events WHERE asset_version = '{version}' AND run_id = '{run_id}'")[0]
    return {"rows": list(rows), "quarantine": list(quarantine), "events": [events["n"], events["h"]]}


def timed(store: Store, config: CurationConfig, run_id: str, incremental: bool, index=None) -> dict:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = decontaminate_prompts(store, config, run_id, index=index, incremental=incremental)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"[decontam_incremental] {run_id}: {wall:.1f} s wall, {cpu:.1f} s CPU, {result.stats['incremental']}",
          file=sys.stderr, flush=True)
    return {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "route": result.stats["incremental"],
            "scanned": result.stats["scanned"], "rows": result.stats["rows"], "quarantined": result.quarantined,
            "signature": signature(store, result.version, run_id)}


def recheck_cost(store: Store, index, config: CurationConfig, append: dict, add: dict, sample: int = 1000) -> dict:
    """The asset's blocking re-check (`OverlapChecker`, pure Python) per row, timed on a sample of the pool, and
    how many rows each route re-checks: a full run every clean row, an incremental one only what it scanned."""
    from itertools import islice

    from tulu_pipeline.curation.decontaminate import training_turns
    from tulu_pipeline.curation.overlap_check import OverlapChecker

    decontam = config.decontam
    checker = OverlapChecker([i.text for i in index.items], decontam.ngram, decontam.threshold, decontam.rule,
                             decontam.short_items)
    rows = list(islice(store.iter_rows(POOL), sample))
    cpu0 = time.process_time()
    for row in rows:
        checker.overlaps(training_turns(row, decontam.include_response))
    per_row = (time.process_time() - cpu0) / len(rows)
    new_rows = append["route"]["rows_new_or_changed"]
    return {"cpu_ms_per_row": round(per_row * 1e3, 3), "sample_rows": len(rows),
            "append_full_rerun_rows": append["rows"] - append["quarantined"],
            "append_incremental_rows_at_most": new_rows,
            "append_estimated_cpu_s": {"full": round(per_row * (append["rows"] - append["quarantined"]), 1),
                                       "incremental": round(per_row * new_rows, 1)},
            "add_benchmark": "every clean row again, against the added benchmark's items only: the same "
                             "per-row tokenization, so about the full re-check's cost"}


def compare(name: str, incremental: dict, full: dict) -> dict:
    return {"incremental": incremental, "full_rerun": full,
            "equal_to_full_rerun": incremental["signature"] == full["signature"],
            "cpu_ratio_incremental_over_full": round(incremental["cpu_s"] / full["cpu_s"], 3),
            "wall_ratio_incremental_over_full": round(incremental["wall_s"] / full["wall_s"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--append", type=int, default=10_000)
    parser.add_argument("--added", default="mbpp", help="the benchmark added to the suite")
    parser.add_argument("--plant-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20k rows, 200 appended")
    parser.add_argument("--home", help="TULU_HOME to use (default: a temporary directory, removed after)")
    parser.add_argument("--core", type=int, default=None, help="CPU to pin to (default: the last allowed one)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decontam_incremental.json"))
    args = parser.parse_args()
    if args.quick:
        args.rows, args.append = 20_000, 200
    core = args.core if args.core is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    home = Path(args.home or tempfile.mkdtemp(prefix="decontam-incremental-"))
    try:
        store = Store(str(home))
        t0 = time.perf_counter()
        publish_evals(store)
        stream = SyntheticRows(args.seed, args.rows + args.append, registry_eval_items(), args.plant_every)
        appended: list[dict] = []

        def head():  # the first --rows rows are the pool (streamed); the rest are kept to append later
            taken = 0
            for chunk in stream.chunks():
                need = max(0, args.rows - taken)
                taken += len(chunk)
                appended.extend(chunk[need:])
                if chunk[:need]:
                    yield chunk[:need]

        pool_rows = publish_pool(store, "pool-1", head())
        setup_s = time.perf_counter() - t0
        benchmarks = sorted({s.benchmark for s in eval_specs(CurationConfig())})
        if args.added not in benchmarks:
            raise SystemExit(f"--added {args.added!r} is not a bundled benchmark: {benchmarks}")
        before = CurationConfig(evals=EvalSelection(benchmarks=[b for b in benchmarks if b != args.added]))
        everything = CurationConfig(evals=EvalSelection(benchmarks=benchmarks))

        # The asset builds the suite's index before the stage (its checks use it too): built once here, timed apart.
        cpu0 = time.process_time()
        index = build_eval_index(store, everything)
        index_s = time.process_time() - cpu0
        start = timed(store, before, "start", incremental=False)
        add_inc = timed(store, everything, "add-incremental", incremental=True, index=index)
        add_full = timed(store, everything, "add-full", incremental=False, index=index)
        grown_rows = store.write_dataset(POOL, "pool-2", [*store.iter_tables(POOL, "pool-1"),
                                                         [conform(r) for r in appended]], ROW_SCHEMA).rows
        append_inc = timed(store, everything, "append-incremental", incremental=True, index=index)
        append_full = timed(store, everything, "append-full", incremental=False, index=index)
        recheck = recheck_cost(store, index[0], everything, append_inc, add_inc)
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)

    result = {
        "benchmark": "decontam_incremental",
        "pool_rows": pool_rows, "appended_rows": grown_rows - pool_rows, "added_benchmark": args.added,
        "benchmarks": benchmarks, "plant_every": args.plant_every, "seed": args.seed,
        "rows": "synthetic: user 100-200 Zipf words (+ a planted eval item every plant_every rows), "
                "assistant 20-60 words; about 1.1 KB of text per row",
        "what_is_timed": "pipeline.decontaminate_prompts end to end (plan, scan, rows, quarantine, ledger events, "
                         "run record), one process pinned to one core; the full rerun of the same inputs right after",
        "machine": {"python": platform.python_version(), "cpus_available": os.cpu_count(), "pinned_core": core,
                    "c_kernel": kernel_available(), "load_average": os.getloadavg()},
        "setup_s": round(setup_s, 1),
        "eval_index_build_cpu_s": round(index_s, 2),
        "no_eval_overlap_recheck": recheck,
        "start_full_run": start,
        "add_one_benchmark": compare("add", add_inc, add_full),
        "append_rows": compare("append", append_inc, append_full),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps({k: {kk: v[kk] for kk in ("equal_to_full_rerun", "cpu_ratio_incremental_over_full",
                                               "wall_ratio_incremental_over_full")}
                      for k, v in result.items() if k in ("add_one_benchmark", "append_rows")}, indent=2))


if __name__ == "__main__":
    main()
