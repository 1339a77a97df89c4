"""`tulu trace` latency on a 10M-event ledger: per-run files (baseline) against a compacted ledger.

A synthetic ledger shaped like the real one is written straight into ``ledger/events/<asset>/<version>/
<run>/part-00000.parquet`` (the `LedgerWriter` layout and schema): N training rows from the registry's
training sources, each ``ingested`` → ``normalized`` (a quarter changed; a few dropped) → dedup ``kept``
or ``dropped_duplicate`` (2%, naming the kept row) → decontamination ``kept`` or ``quarantined`` (0.5%,
with matches naming eval rows) → ``included_in_mix`` (half of the clean rows, 1% held out) →
``trained_on`` a checkpoint; plus the eval rows' ``ingested`` events. Every stage runs in shards of
about 10k rows, so the ledger is about a thousand run directories, with row ids in processing order
(random with respect to their value), as the writer leaves them.

Measured, for the same row ids (trained rows, a held-out row, a duplicate and the row it duplicates, a
quarantined row, the eval row it overlapped, an unknown id), on a warm page cache:

- ``Ledger.trace`` in-process (median of ``--repeat`` calls per id, then the median over ids) and the
  ``tulu trace`` command as a fresh process (python start-up and imports included);
- uncompacted (the baseline), then after ``compact`` (time and peak RSS, in a child process), then
  with runs published after compaction (read from their own files beside the generation);
- the traces must be identical before and after compaction (the script fails otherwise).

    .venv/bin/python benchmarks/trace.py [--rows 2000000] [--shards 200] [--out benchmarks/results/trace.json]

About 2.5 minutes on 2 cores for the default 10M events (``--rows 200000`` for a quick run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tulu_pipeline.data.registry import registry  # noqa: E402
from tulu_pipeline.provenance.ledger import Ledger, path_safe  # noqa: E402
from tulu_pipeline.provenance.ledger_layout import EVENT_SCHEMA, EVENTS_DIR  # noqa: E402
from tulu_pipeline.storage import Store  # noqa: E402

WEIGHTS = {"gsm8k_train": 0.3, "math_train": 0.3, "code_alpaca": 0.15, "self_instruct_seed": 0.05,
           "hh_rlhf_harmless": 0.1, "fine_grained_rlhf_qa": 0.1}
EVAL_SOURCES = ["gsm8k_test", "math_test", "mbpp", "humaneval", "alpaca_eval", "ifeval"]
CHANGES = [["whitespace"], ["newlines", "whitespace"], ["zero_width"], ["exotic_whitespace", "whitespace"]]


class LedgerBuilder:
    """Writes run directories of events in the writer's layout, one Parquet part per run."""

    def __init__(self, store: Store, start: datetime):
        self.store, self.ts, self.runs, self.events = store, start, 0, 0

    def run(self, stage: str, asset_key: str, version: str, row_ids: list[str], event: str | list[str],
            decision: str | list[str | None] | None, reason: list[str | None] | None = None,
            related: list[list[str]] | None = None, details: list[str | None] | str | None = None) -> None:
        n = len(row_ids)
        self.runs += 1
        self.ts += timedelta(seconds=7)
        run_id = f"{self.runs:08x}-5eed-4c0d-9a1b-{hashlib.md5(str(self.runs).encode()).hexdigest()[:12]}"

        def column(value, type_=pa.string()):
            if isinstance(value, list):
                return pa.array(value, type_)
            return pa.array([value] * n, type_)

        table = pa.table({
            "row_id": pa.array(row_ids, pa.string()), "event": column(event), "stage": column(stage),
            "asset_key": column(asset_key), "asset_version": column(version), "run_id": column(run_id),
            "seq": pa.array(np.arange(n, dtype=np.int64)), "ts": pa.array([self.ts] * n, pa.timestamp("us", tz="UTC")),
            "decision": column(decision), "reason": column(reason),
            "related_ids": pa.array(related if related is not None else [[]] * n, pa.list_(pa.string())),
            "details": column(details),
        }, schema=EVENT_SCHEMA)
        target = self.store.path(EVENTS_DIR, path_safe(asset_key), path_safe(version), path_safe(run_id))
        os.makedirs(target, exist_ok=True)
        pq.write_table(table, os.path.join(target, "part-00000.parquet"))
        self.events += n


def _ids(rng: np.random.Generator, prefix: str, n: int) -> list[str]:
    raw = rng.bytes(12 * n)
    return [f"{prefix}-{raw[i * 12:(i + 1) * 12].hex()}" for i in range(n)]


def generate(store: Store, rows: int, shards: int, seed: int = 0) -> dict:
    """Write the synthetic ledger; returns the row ids chosen for measurement and counts."""
    rng = np.random.default_rng(seed)
    specs = {s.id: s for s in registry()}
    builder = LedgerBuilder(store, datetime(2025, 1, 1, tzinfo=timezone.utc))

    # eval rows: ingested only (targets of decontamination matches)
    eval_rows: list[tuple[str, str, str]] = []  # (row id, benchmark, eval id)
    for source in EVAL_SOURCES:
        spec = specs[source]
        ids = _ids(rng, source, min(spec.rows, 2000))
        details = [json.dumps({"eval_id": f"{source}:{i}", "file": spec.path, "file_sha256": spec.sha256,
                               "license": spec.license, "line": i + 1, "source": source,
                               "source_key": f"{spec.path}:{i + 1}"}, sort_keys=True) for i in range(len(ids))]
        builder.run("sources", f"raw/{source}", "e" + spec.sha256[:15], ids, "ingested", "ingested", details=details)
        eval_rows += [(row_id, spec.benchmark, f"{source}:{i}") for i, row_id in enumerate(ids)]

    sources = list(WEIGHTS)
    # rows of a source are contiguous (ingestion reads one file at a time)
    source_of = np.sort(rng.choice(len(sources), size=rows, p=np.array(list(WEIGHTS.values()))))
    row_ids = [None] * rows
    line_of = np.zeros(rows, dtype=np.int64)
    for k, source in enumerate(sources):
        where = np.flatnonzero(source_of == k)
        for i, row_id in zip(where, _ids(rng, source, len(where))):
            row_ids[i] = row_id
        line_of[where] = np.arange(1, len(where) + 1)
    normalized = rng.random(rows)
    dup = rng.random(rows) < 0.02
    contaminated = rng.random(rows) < 0.005
    in_mix = rng.random(rows) < 0.5
    heldout = rng.random(rows) < 0.01
    checkpoint = "sft-" + hashlib.sha256(b"bench").hexdigest()[:16]
    versions = {name: hashlib.sha256(name.encode()).hexdigest()[:16] for name in
                ("normalized_prompts", "deduplicated_prompts", "decontaminated_prompts", "sft_mix", "sft_checkpoint")}
    picks: dict[str, str] = {}
    trained_seen: list[str] = []

    bounds = np.linspace(0, rows, shards + 1).astype(int)
    for shard in range(shards):
        lo, hi = bounds[shard], bounds[shard + 1]
        idx = range(lo, hi)
        ids = [row_ids[i] for i in idx]
        # ingestion: one run per shard of a source file
        for k in np.unique(source_of[lo:hi]):
            spec = specs[sources[k]]
            part = [i for i in idx if source_of[i] == k]
            details = [json.dumps({"eval_id": None, "file": spec.path, "file_sha256": spec.sha256,
                                   "license": spec.license, "line": int(line_of[i]), "source": spec.id,
                                   "source_key": f"{spec.path}:{int(line_of[i])}"}, sort_keys=True) for i in part]
            builder.run("sources", f"raw/{spec.id}", "s" + spec.sha256[:15], [row_ids[i] for i in part], "ingested",
                        "ingested", details=details)
        # normalization: 25% changed, 0.1% dropped
        events, decisions, reasons, details = [], [], [], []
        for i in idx:
            if normalized[i] < 0.001:
                events.append("quarantined"), decisions.append("dropped"), details.append(None)
                reasons.append("empty: messages[1] (assistant) is empty after normalization")
            elif normalized[i] < 0.25:
                events.append("normalized"), decisions.append("changed"), reasons.append(None)
                details.append(json.dumps({"changes": CHANGES[i % len(CHANGES)]}))
            else:
                events.append("normalized"), decisions.append("unchanged"), reasons.append(None), details.append(None)
        builder.run("curation", "normalized_prompts", versions["normalized_prompts"], ids, events, decisions,
                    reason=reasons, details=details)
        survivors = [i for i in idx if normalized[i] >= 0.001]
        # dedup: 2% dropped as a duplicate of an earlier kept row of the shard
        kept = [i for i in survivors if not dup[i]]
        events, decisions, reasons, related, details, s_ids = [], [], [], [], [], []
        for i in survivors:
            s_ids.append(row_ids[i])
            if dup[i] and kept:
                original = row_ids[kept[(i * 7919) % len(kept)]]
                events.append("dropped_duplicate"), decisions.append("near"), related.append([original])
                reasons.append(f"near duplicate of {original} (estimated jaccard 0.912)")
                details.append(json.dumps({"jaccard": 0.912}))
                picks.setdefault("dropped_duplicate", row_ids[i])
                picks.setdefault("duplicated_original", original)
            else:
                events.append("kept"), decisions.append("unique"), reasons.append(None), related.append([])
                details.append(None)
        builder.run("curation", "deduplicated_prompts", versions["deduplicated_prompts"], s_ids, events, decisions,
                    reason=reasons, related=related, details=details)
        # decontamination: 0.5% quarantined with a match naming an eval row
        events, decisions, reasons, related, details, k_ids = [], [], [], [], [], []
        for i in kept:
            k_ids.append(row_ids[i])
            if contaminated[i]:
                eval_row, benchmark, eval_id = eval_rows[(i * 104729) % len(eval_rows)]
                match = {"benchmark": benchmark, "eval_id": eval_id, "eval_row_id": eval_row, "item_ngrams": 40,
                         "matched_ngrams": 31, "score": 0.775, "source": eval_row.rsplit("-", 1)[0],
                         "span": "Natalia sold clips to 48 of her friends in April, and then she sold half as many"}
                events.append("quarantined"), decisions.append("contaminated"), related.append([eval_row])
                reasons.append(f"{benchmark}:{eval_id} coverage 0.78")
                details.append(json.dumps({"matches": [match], "ngram": 8, "threshold": 0.5}, sort_keys=True))
                picks.setdefault("quarantined", row_ids[i])
                picks.setdefault("eval_item", eval_row)
            else:
                events.append("kept"), decisions.append("clean"), reasons.append(None), related.append([])
                details.append(None)
        builder.run("decontamination", "decontaminated_prompts", versions["decontaminated_prompts"], k_ids, events,
                    decisions, reason=reasons, related=related, details=details)
        clean = [i for i in kept if not contaminated[i]]
        mixed = [i for i in clean if in_mix[i]]
        if shard % 2 == 0:
            pending = mixed
            continue
        mixed = pending + mixed  # the mix and the training run cover two shards each
        m_ids = [row_ids[i] for i in mixed]
        split = ["heldout" if heldout[i] else "train" for i in mixed]
        mix_details = json.dumps({"mix": "bench_mix", "mix_hash": versions["sft_mix"]}, sort_keys=True)
        builder.run("sft", "sft_mix", versions["sft_mix"], m_ids, "included_in_mix", split, details=mix_details)
        train_details = json.dumps({"checkpoint": checkpoint, "epochs": 2, "mix_hash": versions["sft_mix"]},
                                   sort_keys=True)
        builder.run("sft", "sft_checkpoint", versions["sft_checkpoint"], m_ids,
                    ["evaluated" if s == "heldout" else "trained_on" for s in split],
                    ["heldout_loss" if s == "heldout" else "trained" for s in split],
                    related=[[checkpoint]] * len(m_ids), details=train_details)
        trained_seen.append(next(row_ids[i] for i, s in zip(mixed, split) if s == "train"))
        picks.setdefault("heldout", next((row_ids[i] for i, s in zip(mixed, split) if s == "heldout"), None))
    for n, k in enumerate(np.linspace(0, len(trained_seen) - 1, 3).astype(int)):
        picks[f"trained_{n}"] = trained_seen[k]
    picks["unknown"] = "gsm8k_train-000000000000000000000000"
    return {"events": builder.events, "run_dirs": builder.runs, "rows": rows, "checkpoint": checkpoint,
            "picks": picks, "builder": builder, "versions": versions}


def add_runs_after_compaction(generated: dict, runs: int = 10, rows_per_run: int = 10_000) -> int:
    """A second checkpoint trained on the same mix rows, published after compaction (runs of its own)."""
    builder, picks = generated["builder"], generated["picks"]
    before = builder.events
    ids = [picks[k] for k in sorted(picks) if k.startswith("trained")]
    rng = np.random.default_rng(1)
    second = "sft-" + hashlib.sha256(b"bench-2").hexdigest()[:16]
    for r in range(runs):
        batch = (ids if r == 0 else []) + _ids(rng, "gsm8k_train", rows_per_run - (len(ids) if r == 0 else 0))
        builder.run("sft", "sft_checkpoint", "second", batch, "trained_on", "trained", related=[[second]] * len(batch),
                    details=json.dumps({"checkpoint": second, "epochs": 1}))
    return builder.events - before


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def time_library(store: Store, ids: list[str], repeat: int) -> tuple[dict, dict]:
    ledger = Ledger(store)
    per_id, traces = {}, {}
    for row_id in ids:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            traces[row_id] = ledger.trace(row_id)
            times.append(time.perf_counter() - start)
        per_id[row_id] = statistics.median(times)
    return per_id, traces


def time_cli(home: str, ids: list[str], repeat: int) -> dict:
    per_id = {}
    for row_id in ids:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "tulu_pipeline.cli", "--home", home, "trace", row_id],
                                  cwd=REPO, capture_output=True)
            times.append(time.perf_counter() - start)
            if done.returncode not in (0, 1):
                raise RuntimeError(done.stderr.decode())
        per_id[row_id] = statistics.median(times)
    return per_id


def stats(per_id: dict) -> dict:
    values = list(per_id.values())
    return {"median_s": round(statistics.median(values), 4), "max_s": round(max(values), 4),
            "min_s": round(min(values), 4)}


def compact_in_child(home: str, buckets: int, memory_limit: str) -> dict:
    # The child reports its own peak (VmHWM): RUSAGE_CHILDREN's ru_maxrss is the largest of every child so far,
    # and a child spawned by vfork starts with this process's peak.
    code = ("import json, sys; from tulu_pipeline.storage import Store; "
            "from tulu_pipeline.provenance.compaction import compact; "
            "from tulu_pipeline.process_memory import peak_rss_mb; "
            f"result = compact(Store({home!r}), buckets={buckets}, memory_limit={memory_limit!r}); "
            "result['child_peak_rss_mb'] = round(peak_rss_mb() or 0.0, 1); print(json.dumps(result))")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, check=True)
    wall = time.perf_counter() - start
    result = json.loads(done.stdout)
    result["wall_s"] = round(wall, 2)
    return result


def du_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="training rows (about 5 events each)")
    parser.add_argument("--shards", type=int, default=200, help="runs per curation stage")
    parser.add_argument("--buckets", type=int, default=64)
    parser.add_argument("--memory-limit", default="512MB")
    parser.add_argument("--repeat", type=int, default=3, help="library calls per row id")
    parser.add_argument("--cli-repeat", type=int, default=2, help="tulu trace processes per row id")
    parser.add_argument("--home", help="where to build the ledger (default: a temporary directory, removed after)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "trace.json"))
    args = parser.parse_args()

    tmp = None if args.home else tempfile.mkdtemp(prefix="tulu-trace-bench-")
    home = args.home or tmp
    try:
        store = Store(home)
        start = time.perf_counter()
        generated = generate(store, args.rows, args.shards)
        generate_s = time.perf_counter() - start
        picks = generated["picks"]
        ids = [picks[k] for k in sorted(picks)]
        print(f"generated {generated['events']:,} events in {generated['run_dirs']} run directories "
              f"({du_mb(Path(home) / 'ledger'):,} MB) in {generate_s:.0f}s", flush=True)
        count_start = time.perf_counter()
        counted = Ledger(store).query("SELECT count(*) AS n FROM events")[0]["n"]
        count_baseline = time.perf_counter() - count_start
        assert counted == generated["events"], (counted, generated["events"])

        base_lib, base_traces = time_library(store, ids, args.repeat)
        print(f"baseline library: {stats(base_lib)}", flush=True)
        base_cli = time_cli(home, ids, args.cli_repeat)
        print(f"baseline cli: {stats(base_cli)}", flush=True)

        compaction = compact_in_child(home, args.buckets, args.memory_limit)
        print(f"compaction: {compaction}", flush=True)
        comp_lib, comp_traces = time_library(store, ids, args.repeat)
        identical = comp_traces == base_traces
        print(f"compacted library: {stats(comp_lib)} identical={identical}", flush=True)
        comp_cli = time_cli(home, ids, args.cli_repeat)
        print(f"compacted cli: {stats(comp_cli)}", flush=True)
        count_start = time.perf_counter()
        assert Ledger(store).query("SELECT count(*) AS n FROM events")[0]["n"] == generated["events"]
        count_compacted = time.perf_counter() - count_start

        added = add_runs_after_compaction(generated)
        rem_lib, rem_traces = time_library(store, ids, args.repeat)
        rem_cli = time_cli(home, ids, args.cli_repeat)
        gained = sum(len(rem_traces[i]["events"]) - len(comp_traces[i]["events"]) for i in ids)
        print(f"compacted + {added:,} events in 10 new runs: library {stats(rem_lib)}, cli {stats(rem_cli)}",
              flush=True)
        if not identical:
            raise SystemExit("traces differ before and after compaction")

        result = {
            "benchmark": "trace",
            "machine": {"python": platform.python_version(), "processor": platform.machine(), "cpus": os.cpu_count()},
            "ledger": {"events": generated["events"], "training_rows": args.rows, "run_dirs": generated["run_dirs"],
                       "per_run_files_mb": du_mb(Path(home) / "ledger" / "events"),
                       "compacted_mb": du_mb(Path(home) / "ledger" / "compacted"), "generate_s": round(generate_s, 1)},
            "row_ids": {k: picks[k] for k in sorted(picks)},
            "events_per_trace": {k: len(base_traces[picks[k]]["events"]) + len(base_traces[picks[k]]["referenced_by"])
                                 for k in sorted(picks)},
            "baseline_uncompacted": {"library": stats(base_lib), "cli_process": stats(base_cli),
                                     "count_all_s": round(count_baseline, 3)},
            "compaction": {k: compaction.get(k) for k in ("events", "related", "buckets", "runs_folded", "seconds",
                                                          "wall_s", "peak_rss_mb", "child_peak_rss_mb")}
            | {"memory_limit": args.memory_limit},
            "compacted": {"library": stats(comp_lib), "cli_process": stats(comp_cli),
                          "count_all_s": round(count_compacted, 3), "traces_identical_to_baseline": identical},
            "compacted_plus_new_runs": {"new_events": added, "new_run_dirs": 10, "library": stats(rem_lib),
                                        "cli_process": stats(rem_cli), "events_gained_by_traces": gained},
            "per_id_library_s": {k: {"baseline": round(base_lib[picks[k]], 4),
                                     "compacted": round(comp_lib[picks[k]], 4)} for k in sorted(picks)},
            "speedup_library_median": round(stats(base_lib)["median_s"] / stats(comp_lib)["median_s"], 1),
            "speedup_cli_median": round(stats(base_cli)["median_s"] / stats(comp_cli)["median_s"], 1),
            "notes": "warm page cache; library = Ledger.trace in-process (median of repeats per id, median over ids); "
                     "cli_process = `python -m tulu_pipeline.cli trace ID` as a fresh process (start-up included). "
                     "The checkpoint id itself is not traced (its trace lists every trained row).",
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(f".json.tmp-{os.getpid()}")
        tmp_out.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp_out, out)
        print(json.dumps({k: result[k] for k in ("baseline_uncompacted", "compaction", "compacted",
                                                 "compacted_plus_new_runs", "speedup_library_median",
                                                 "speedup_cli_median")}, indent=2))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
