"""Ledger compaction: every published per-run event file folded into one generation of hash buckets.

The write path stays as it is (one directory per asset, version and run, published atomically), so a
busy ledger is thousands of small files and a lookup of one row has to scan all of them. `compact`
rewrites them into a *generation*::

    ledger/compacted/<generation>/events/NNN.parquet    events, bucketed by row_id, sorted by row_id
    ledger/compacted/<generation>/related/NNN.parquet   one copy of an event per id in its related_ids,
                                                        bucketed and sorted by that id (column related_id)
    ledger/compacted/<generation>/manifest.json         buckets, counts, and the run directories folded in
    ledger/compacted/CURRENT                            {"generation": ...}: the pointer readers follow

A key's bucket is `bucket_of` (the first 32 bits of its md5, modulo the bucket count: the same on every
machine and in DuckDB, see `bucket_sql`), and files are written in small row groups whose min/max
statistics let DuckDB read one row group of one file for one row. `Ledger.trace` then reads one
events bucket, one related bucket and the run files published after the generation.

Consistency. A generation is staged beside its final name, renamed into place, and only then does
``CURRENT`` move to it, so readers see the old generation or the new one, never a mix. The manifest
records every folded run directory with a fingerprint of its files (names, sizes, modification
stamps). Per-run files stay where they are (they remain the source of truth); readers skip a run
directory whose fingerprint matches the generation's. A run directory that changed after it was
folded (a retried run replaces its own events) or vanished is *stale*: its folded events are
filtered out of the generation and its current files, if any, are read directly, so compaction never
changes what a query returns. Compacting again folds the remainder (and the stale runs' current
files) into a new generation; the previous generation is kept for readers that are mid-query.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tulu_pipeline.provenance.ledger import Ledger
from tulu_pipeline.provenance.ledger_layout import (
    COMPACTED_DIR,
    DEFAULT_BUCKETS,
    EVENT_SCHEMA,
    HASH_NAME,
    POINTER,
    ROW_GROUP_ROWS,
    RUN_KEY_SQL,
    RunDir,
    bucket_of,
    bucket_sql,
    current_generation,
    empty_events_sql,
    ledger_layout,
    list_run_dirs,
    sql_list,
    sql_str,
)
from tulu_pipeline.process_memory import peak_rss_mb
from tulu_pipeline.storage import TMP_MARKER, Store

# ---------------------------------------------------------------------------------------------
# compaction
# ---------------------------------------------------------------------------------------------
def _columns_sql() -> str:
    return ", ".join(f.name for f in EVENT_SCHEMA)


def _empty_sql(with_related: bool) -> str:
    sql = empty_events_sql()
    return f"SELECT *, CAST(NULL AS VARCHAR) AS related_id FROM ({sql})" if with_related else sql


def compact(store: Store, buckets: int = DEFAULT_BUCKETS, row_group_rows: int = ROW_GROUP_ROWS,
            memory_limit: str = "512MB", keep_previous: int = 1) -> dict[str, Any]:
    """Fold every published run file (and the current generation) into a new generation.

    Returns a summary (generation, events, related entries, runs folded, seconds). When nothing was
    published or changed since the current generation, nothing is written and ``changed`` is False.
    Memory is bounded by DuckDB's ``memory_limit`` (it spills to a local temporary directory).
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    started = time.perf_counter()
    previous = current_generation(store)
    runs = list_run_dirs(store)
    prev_rel, prev_manifest = previous if previous else (None, None)
    prev_folded: dict[str, Any] = prev_manifest["folded"] if prev_manifest else {}
    stale_dirs = {d for d, e in prev_folded.items() if d not in runs or runs[d].fingerprint != e["fingerprint"]}
    kept_folded = {d: e for d, e in prev_folded.items() if d not in stale_dirs}
    to_fold = {d: r for d, r in runs.items() if d not in kept_folded}
    if previous and not to_fold and not stale_dirs:
        return {"changed": False, "generation": prev_manifest["generation"], "events": prev_manifest["events"],
                "runs_folded": len(prev_folded), "seconds": round(time.perf_counter() - started, 3)}
    if not previous and not runs:
        return {"changed": False, "generation": None, "events": 0, "runs_folded": 0, "seconds": 0.0}

    stale_keys = sorted({k for d in stale_dirs for k in prev_folded[d]["run_keys"]})
    name = f"g{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}"
    final_rel = posixpath.join(COMPACTED_DIR, name)
    staging_rel = f"{final_rel}{TMP_MARKER}{uuid.uuid4().hex}"
    reader = Ledger(store)
    try:
        counts, folded_entries = _write_generation(store, reader, staging_rel, buckets, row_group_rows, memory_limit,
                                                   prev_rel, prev_manifest, stale_keys, kept_folded, to_fold, name)
        store.fs.mv(store.path(staging_rel), store.path(final_rel), recursive=True)
    except BaseException:
        if store.fs.exists(store.path(staging_rel)):
            store.fs.rm(store.path(staging_rel), recursive=True)
        raise
    store.write_json(POINTER, {"generation": name})
    removed = _remove_old_generations(store, name, keep_previous)
    return {"changed": True, "generation": name, "events": counts["events"], "related": counts["related"],
            "runs_folded": len(folded_entries), "runs_new": len(to_fold), "runs_stale": len(stale_dirs),
            "buckets": buckets, "generations_removed": removed,
            "seconds": round(time.perf_counter() - started, 3), "peak_rss_mb": peak_rss_mb()}


def _write_generation(store: Store, reader, staging_rel: str, buckets: int, row_group_rows: int, memory_limit: str,
                      prev_rel: str | None, prev_manifest: dict | None, stale_keys: list[str],
                      kept_folded: dict[str, Any], to_fold: dict[str, RunDir], name: str):
    """Stage a generation at ``staging_rel``; returns the event counts and the folded-run entries."""
    columns = _columns_sql()
    with tempfile.TemporaryDirectory(prefix="tulu-ledger-compact-") as tmp:
        spill = Path(tmp)
        con = reader._connect()
        try:
            con.execute(f"SET memory_limit = {sql_str(memory_limit)}")
            con.execute(f"SET temp_directory = {sql_str(str(spill / 'duckdb'))}")
            con.execute("SET preserve_insertion_order = false")
            inputs: list[str] = []
            if prev_rel is not None:
                prev_files = [store.uri(posixpath.join(prev_rel, "events", f"{b:03d}.parquet"))
                              for b in range(int(prev_manifest["buckets"]))]
                where = f" WHERE {RUN_KEY_SQL} NOT IN (SELECT unnest({sql_list(stale_keys)}::VARCHAR[]))" \
                    if stale_keys else ""
                inputs.append(f"SELECT {columns} FROM read_parquet({sql_list(prev_files)}){where}")
            fold_files = [store.uri(f) for r in to_fold.values() for f in r.files]
            folded_entries: dict[str, Any] = dict(kept_folded)
            if fold_files:
                source = f"read_parquet({sql_list(fold_files)}, union_by_name=true, filename=true)"
                described = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
                unknown = sorted(described - {f.name for f in EVENT_SCHEMA} - {"filename"})
                if unknown:
                    raise ValueError(f"ledger event files carry columns {unknown} that EVENT_SCHEMA does not know; "
                                     "add them to EVENT_SCHEMA before compacting")
                by_file: dict[str, set[str]] = defaultdict(set)
                per_file: dict[str, int] = defaultdict(int)
                for filename, key, n in con.execute(
                        f"SELECT filename, {RUN_KEY_SQL}, count(*) FROM {source} GROUP BY ALL").fetchall():
                    by_file[filename].add(key)
                    per_file[filename] += n
                uri_to_dir = {store.uri(f): d for d, r in to_fold.items() for f in r.files}
                keys_by_dir: dict[str, set[str]] = defaultdict(set)
                events_by_dir: dict[str, int] = defaultdict(int)
                for filename, keys in by_file.items():
                    dir_rel = uri_to_dir.get(filename) or uri_to_dir.get(_strip_local(filename))
                    if dir_rel is None:
                        raise RuntimeError(f"compaction read {filename!r}, which is not one of the listed run files")
                    keys_by_dir[dir_rel] |= keys
                    events_by_dir[dir_rel] += per_file[filename]
                for dir_rel, run in to_fold.items():
                    folded_entries[dir_rel] = {"fingerprint": run.fingerprint, "run_keys": sorted(keys_by_dir[dir_rel]),
                                               "files": len(run.files), "events": events_by_dir[dir_rel]}
                inputs.append(f"SELECT {columns} FROM read_parquet({sql_list(fold_files)}, union_by_name=true)")
            input_sql = " UNION ALL BY NAME ".join(f"({sql})" for sql in inputs) if inputs else _empty_sql(False)
            _check_bucket_function(con, buckets)

            # pass 1: partition by bucket into local spill files (DuckDB bounds the memory)
            con.execute(f"CREATE TEMP VIEW compaction_input AS SELECT {columns} FROM ({input_sql})")
            con.execute(f"COPY (SELECT *, {bucket_sql('row_id', buckets)} AS bucket FROM compaction_input) "
                        f"TO {sql_str(str(spill / 'events'))} (FORMAT parquet, PARTITION_BY (bucket))")
            con.execute(f"COPY (SELECT *, {bucket_sql('related_id', buckets)} AS bucket FROM "
                        f"(SELECT *, unnest(list_distinct(related_ids)) AS related_id FROM compaction_input "
                        f"WHERE len(related_ids) > 0)) "
                        f"TO {sql_str(str(spill / 'related'))} (FORMAT parquet, PARTITION_BY (bucket))")

            # pass 2: one sorted file per bucket, small row groups with min/max statistics
            out = Path(store.path(staging_rel)) if store.is_local else spill / "out"
            counts = {"events": 0, "related": 0}
            for kind, key in (("events", "row_id"), ("related", "related_id")):
                (out / kind).mkdir(parents=True, exist_ok=True)
                for b in range(buckets):
                    part_dir = spill / kind / f"bucket={b}"
                    if part_dir.exists():
                        select = (f"SELECT * FROM read_parquet({sql_str(str(part_dir / '*.parquet'))}, "
                                  f"hive_partitioning=false) ORDER BY {key}, ts, asset_key, seq, run_id, event")
                    else:
                        select = _empty_sql(kind == "related")
                    target = out / kind / f"{b:03d}.parquet"
                    con.execute(f"COPY ({select}) TO {sql_str(str(target))} "
                                f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {int(row_group_rows)})")
                    counts[kind] += con.execute(
                        f"SELECT count(*) FROM read_parquet({sql_str(str(target))})").fetchone()[0]
        finally:
            con.close()

        manifest = {
            "generation": name, "created": datetime.now(timezone.utc).isoformat(), "buckets": buckets,
            "hash": HASH_NAME, "row_group_rows": row_group_rows, "events": counts["events"],
            "related": counts["related"], "previous": prev_manifest["generation"] if prev_manifest else None,
            "folded": dict(sorted(folded_entries.items())),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if not store.is_local:  # upload the staged generation next to its final name
            store.fs.put(str(out) + "/", store.path(staging_rel) + "/", recursive=True)
    return counts, folded_entries


def _strip_local(path: str) -> str:
    return path.removeprefix("file://")


def _check_bucket_function(con, buckets: int) -> None:
    """DuckDB must bucket exactly as `bucket_of` does, or lookups would read the wrong file."""
    probes = ["", "a", "gsm8k_train-0123456789abcdef01234567", "sft-ckpt", "é✓🙂", "x'y"]
    got = con.execute("SELECT " + ", ".join(bucket_sql(sql_str(p), buckets) for p in probes)).fetchone()
    expected = tuple(bucket_of(p, buckets) for p in probes)
    if tuple(got) != expected:
        raise RuntimeError(f"DuckDB's md5 bucketing disagrees with bucket_of: {got} != {expected}")


def _remove_old_generations(store: Store, current: str, keep_previous: int) -> list[str]:
    """Delete generations older than the ``keep_previous`` most recent before ``current``."""
    names = sorted(n for n in store.listdir(COMPACTED_DIR) if n.startswith("g") and TMP_MARKER not in n)
    older = [n for n in names if n < current]
    doomed = older[:max(0, len(older) - keep_previous)]
    for name in doomed:
        store.fs.rm(store.path(COMPACTED_DIR, name), recursive=True)
    return doomed


def compaction_status(store: Store) -> dict[str, Any]:
    """The current generation and what a reader would still read from per-run files."""
    layout = ledger_layout(store)
    runs = list_run_dirs(store)
    if layout is None:
        return {"compacted": False, "run_dirs": len(runs), "run_files": sum(len(r.files) for r in runs.values())}
    gen = layout.generation
    return {"compacted": True, "generation": gen["generation"], "created": gen["created"], "buckets": gen["buckets"],
            "events": gen["events"], "related": gen["related"], "runs_folded": len(gen["folded"]),
            "run_dirs": len(runs), "remainder_files": len(layout.remainder), "stale_runs": len(layout.stale_keys)}
