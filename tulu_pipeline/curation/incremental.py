"""Incremental decontamination: reuse an earlier version's decisions so that the cost follows what changed.

**What a version records** (`RunRecord`, ``reports/decontamination/<version>/run.json``, beside the
published rows): the decontam settings and `RULE_VERSION`, the input dataset versions, a **fingerprint per
benchmark** (`benchmark_fingerprints`: a hash of the benchmark's eval items, the rule and its settings, the
tokenizer's `RULE_VERSION`), the pool it read (``deduplicated_prompts`` version and row count), and which
route made it and why. The per-row, per-benchmark decisions are the version's quarantine: a row in it
holds every match, each naming its benchmark; a row of the pool not in it matched no benchmark of the
version. Matches are per (row, eval item), so these decisions recombine.

**The routes** (`plan`), deciding by comparing the latest version's record with what is asked now:

- ``incremental``: same settings and rule version, at least one benchmark with an unchanged fingerprint.
  Benchmarks added or changed (a new fingerprint) are scanned against every unchanged pool row, with an
  index of their items alone; a removed or changed benchmark's earlier matches are dropped; rows of the
  pool that are new, or whose messages changed (`pool_changes`, a join in DuckDB), are scanned against the
  whole suite; rows gone from the pool are simply not there. Nothing else is scanned: an unchanged row
  with no added benchmark keeps its earlier matches without its text being read.
- ``full``: anything else (settings or rule version changed, no earlier version or record, the earlier pool
  gone, no benchmark to reuse, most of the pool new). ``full`` is also what ``incremental=False`` runs.

The published result is the same either way (`tests/test_decontam_incremental.py`): rows kept, the
quarantine with every match, and the ledger events (one per row, in pool order, same ``seq``; kept events
name the benchmarks checked, quarantine events the matched ones), all but run ids and timestamps.
`IncrementalStep` builds its output and events from Arrow columns, so an unchanged row costs a few
vectorized operations, not a Python object.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tulu_pipeline.curation.decontaminate import (
    RULE_VERSION, DecontamConfig, DecontamStats, EvalIndex, Match, _sort_matches, checked_details, match_from_dict,
    quarantine_event,
)
from tulu_pipeline.hashing import json_hash
from tulu_pipeline.provenance.ledger import LedgerWriter, details_json
from tulu_pipeline.provenance.ledger_layout import sql_list
from tulu_pipeline.storage import Store

POOL = "deduplicated_prompts"
OUTPUT = "decontaminated_prompts"
QUARANTINE = "decontamination_quarantine"
# Above this share of new or changed pool rows a full rerun costs about the same and is taken.
MAX_RESCAN_SHARE = 0.5


def run_record_path(version: str) -> str:
    return posixpath.join("reports", "decontamination", version, "run.json")


def benchmark_fingerprints(index: EvalIndex, benchmarks: Iterable[str], config: DecontamConfig) -> dict[str, str]:
    """Per benchmark: a hash of its eval items (indexed and skipped, in order), the decontam settings and
    `RULE_VERSION` (the tokenizer and rules). Equal fingerprints: the benchmark's decisions can be reused."""
    digests = {b: hashlib.sha256() for b in benchmarks}
    for item in (*index.items, *index.skipped):
        if item.benchmark in digests:
            digests[item.benchmark].update(json.dumps([item.eval_id, item.source, item.row_id, item.text],
                                                      ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
    settings = config.model_dump()
    return {b: json_hash({"benchmark": b, "items": d.hexdigest(), "decontam": settings, "rule_version": RULE_VERSION})
            for b, d in sorted(digests.items())}


@dataclass
class Plan:
    """Which route a decontamination takes and why; what it reuses and what it scans."""

    route: str  # "incremental" or "full"
    reason: str
    previous_version: str | None = None
    added: list[str] = field(default_factory=list)  # benchmarks new since the previous version
    changed: list[str] = field(default_factory=list)  # benchmarks whose items (fingerprint) changed
    removed: list[str] = field(default_factory=list)  # benchmarks no longer selected
    reused: list[str] = field(default_factory=list)  # benchmarks whose decisions are reused
    rescan: set[str] = field(default_factory=set)  # pool rows new or changed: scanned against every benchmark
    rows_removed: int = 0  # rows of the previous pool gone from this one

    @property
    def scan_benchmarks(self) -> list[str]:
        """Benchmarks every unchanged pool row is scanned against (added and changed)."""
        return sorted(self.added + self.changed)

    def summary(self) -> dict[str, Any]:
        return {"route": self.route, "reason": self.reason, "previous_version": self.previous_version,
                "added_benchmarks": self.added, "changed_benchmarks": self.changed,
                "removed_benchmarks": self.removed, "reused_benchmarks": self.reused,
                "rows_new_or_changed": len(self.rescan), "rows_removed": self.rows_removed}


def run_record(config: DecontamConfig, inputs: dict[str, str], fingerprints: dict[str, str], pool_rows: int,
               plan: Plan) -> dict[str, Any]:
    """What `plan` later reads back from a version (`run_record_path`)."""
    return {"decontam": config.model_dump(), "rule_version": RULE_VERSION, "inputs": inputs,
            "fingerprints": fingerprints, "pool": {"dataset": POOL, "version": inputs[POOL], "rows": pool_rows},
            **plan.summary()}


def plan(store: Store, config: DecontamConfig, fingerprints: dict[str, str], pool_version: str,
         building: str, incremental: bool = True) -> Plan:
    """The route for decontaminating ``POOL@pool_version`` into version ``building``, from the latest version's
    record (see the module docstring)."""
    if not incremental:
        return Plan("full", "incremental off")
    previous = store.latest_version(OUTPUT)
    if previous is None:
        return Plan("full", "no earlier version")
    if previous == building:  # a rerun (or a concurrent run) of this version: its events equal the first run's
        return Plan("full", "a rerun of the same version", previous)
    record = store.read_json(run_record_path(previous)) if store.exists(run_record_path(previous)) else None
    if record is None or "fingerprints" not in record:
        return Plan("full", "the earlier version has no fingerprints", previous)
    if record["decontam"] != config.model_dump() or record.get("rule_version") != RULE_VERSION:
        return Plan("full", "decontam settings or rule version changed", previous)
    before: dict[str, str] = record["fingerprints"]
    reused = sorted(b for b, f in fingerprints.items() if before.get(b) == f)
    if not reused:
        return Plan("full", "no benchmark's decisions to reuse", previous)
    result = Plan("incremental", "", previous, added=sorted(set(fingerprints) - set(before)),
                  changed=sorted(b for b in fingerprints if b in before and before[b] != fingerprints[b]),
                  removed=sorted(set(before) - set(fingerprints)), reused=reused)
    old_pool = record["pool"]["version"]
    if old_pool != pool_version:
        if store.latest_version(POOL) is None or not store.exists(store.dataset_dir(POOL, old_pool), "_dataset.json"):
            return Plan("full", f"the earlier pool {POOL}@{old_pool} is gone", previous)
        result.rescan, result.rows_removed = pool_changes(store, old_pool, pool_version)
        rows = store.dataset_info(POOL, pool_version).rows
        if len(result.rescan) > MAX_RESCAN_SHARE * rows:
            return Plan("full", f"{len(result.rescan)} of {rows} pool rows are new or changed", previous)
    what = [f"{name} {', '.join(bs)}" for name, bs in (("added", result.added), ("changed", result.changed),
                                                       ("removed", result.removed)) if bs]
    if old_pool != pool_version:
        what.append(f"{len(result.rescan)} pool rows new or changed, {result.rows_removed} removed")
    result.reason = "; ".join(what) or "nothing changed"
    return result


def _parquet_files(store: Store, name: str, version: str) -> list[str]:
    info = store.dataset_info(name, version)
    return [store.uri(store.dataset_dir(name, version), part) for part in info.parts]


def pool_changes(store: Store, old: str, new: str) -> tuple[set[str], int]:
    """Row ids of ``POOL@new`` that are new or whose messages differ from ``POOL@old``, and how many rows of
    ``old`` are gone: one join in DuckDB over the two versions' Parquet, no Python object per row."""
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET enable_progress_bar = false")
        con.execute(f"SET threads = {len(os.sched_getaffinity(0))}")  # not more threads than cores it may use
        if not store.is_local:
            con.register_filesystem(store.fs)
        new_files, old_files = sql_list(_parquet_files(store, POOL, new)), sql_list(_parquet_files(store, POOL, old))
        rescan = con.execute(
            f"SELECT n.row_id FROM read_parquet({new_files}) n LEFT JOIN read_parquet({old_files}) o "
            "ON n.row_id = o.row_id WHERE o.row_id IS NULL OR n.messages IS DISTINCT FROM o.messages").fetchnumpy()["row_id"]
        removed = con.execute(f"SELECT count(*) FROM read_parquet({old_files}) o "
                              f"ANTI JOIN read_parquet({new_files}) n ON n.row_id = o.row_id").fetchone()[0]
    finally:
        con.close()
    return set(rescan.tolist()), int(removed)


def previous_matches(store: Store, version: str, keep: Sequence[str], skip: set[str]) -> dict[str, list[Match]]:
    """Row id -> the matches of benchmarks ``keep`` that ``version`` quarantined it for (rows in ``skip``
    are left out: they are scanned again)."""
    keep_set = set(keep)
    out: dict[str, list[Match]] = {}
    for table in store.iter_tables(QUARANTINE, version, columns=["row_id", "matches"]):
        for row_id, matches in zip(table.column("row_id").to_pylist(), table.column("matches").to_pylist()):
            if row_id in skip:
                continue
            kept = [match_from_dict(m) for m in json.loads(matches) if m["benchmark"] in keep_set]
            if kept:
                out[row_id] = kept
    return out


def text_lengths(table: pa.Table) -> np.ndarray:
    """`row_text` length of each row (message contents joined with newlines), from the Arrow columns."""
    messages = table.column("messages").combine_chunks()
    n = len(table)
    if n == 0:
        return np.zeros(0, np.int64)
    flat = pc.list_flatten(messages)
    lengths = pc.utf8_length(pc.struct_field(flat, "content")).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False)
    per_row = np.bincount(parents, weights=lengths, minlength=n).astype(np.int64)
    counts = pc.fill_null(pc.list_value_length(messages), 0).to_numpy(zero_copy_only=False)
    return per_row + np.maximum(counts - 1, 0)


def _roles(include_response: bool) -> list[str]:
    return ["system", "user", "assistant"] if include_response else ["system", "user"]


def arrow_training_texts(messages: pa.Array, include_response: bool) -> list[str]:
    """`training_text` of each row from its Arrow ``messages`` (no Python object per message)."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    n = len(messages)
    flat = messages.flatten()
    keep = pc.is_in(flat.field("role"), value_set=pa.array(_roles(include_response)))
    parents = pc.list_parent_indices(messages).filter(keep).to_numpy(zero_copy_only=False)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(parents, minlength=n), out=offsets[1:])
    kept = pa.ListArray.from_arrays(pa.array(offsets), flat.field("content").filter(keep))
    return pc.binary_join(kept, "\n").to_pylist()


class ArrowTurns(Sequence):
    """`training_turns` of each row of an Arrow ``messages`` column, made when asked for (short items only)."""

    def __init__(self, messages: pa.Array, include_response: bool):
        self.messages, self.roles = messages, set(_roles(include_response))

    def __len__(self) -> int:
        return len(self.messages)

    def _turns(self, k: int) -> list[str]:
        return [m["content"] for m in self.messages[k].as_py() if m["role"] in self.roles]

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self._turns(i) for i in range(*k.indices(len(self)))]
        return self._turns(k)


class IncrementalStep:
    """Decontaminates the pool from an earlier version's decisions (`Plan`): writes nothing itself, but turns
    each Arrow batch of the pool into (clean rows table, quarantine entries) and records its events.

    ``index`` is the whole suite (for new or changed rows and for the events' checked benchmarks),
    ``scan_index`` the added and changed benchmarks' items (None: none), ``earlier`` the reused matches.
    """

    def __init__(self, index: EvalIndex, scan_index: EvalIndex | None, config: DecontamConfig,
                 ledger: LedgerWriter, plan: Plan, earlier: dict[str, list[Match]], samples: int = 5):
        self.index, self.scan_index, self.config, self.ledger = index, scan_index, config, ledger
        self.plan, self.earlier = plan, earlier
        self.checked = checked_details(index.benchmarks)
        self.stats = DecontamStats()
        self.quarantine: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.sample_size = samples
        self.lengths: Counter[int] = Counter()
        self.scan_seconds = 0.0  # CPU seconds spent joining texts and matching them

    def _scan(self, index: EvalIndex, messages: pa.Array) -> list[list[Match]]:
        config, include = self.config, self.config.include_response
        start = time.process_time()
        found = index.match_texts(arrow_training_texts(messages, include), config.threshold, config.rule,
                                  config.short_items, ArrowTurns(messages, include))
        self.scan_seconds += time.process_time() - start
        return found

    def __call__(self, tables: Iterable[pa.Table]) -> Iterable[pa.Table]:
        for table in tables:
            yield self._process(table)

    def _process(self, table: pa.Table) -> pa.Table:
        n = len(table)
        ids = table.column("row_id").to_pylist()
        rescan = self.plan.rescan
        fresh = [k for k, i in enumerate(ids) if i in rescan] if rescan else []
        found: dict[int, list[Match]] = {}
        if fresh:
            for k, matches in zip(fresh, self._scan(self.index, table.column("messages").take(fresh))):
                if matches:
                    found[k] = matches
        fresh_set = set(fresh)
        earlier = self.earlier
        for k, i in enumerate(ids):
            if k not in fresh_set and i in earlier:
                found[k] = list(earlier[i])
        scanned = 0
        if self.scan_index is not None:
            rest = [k for k in range(n) if k not in fresh_set] if fresh else list(range(n))
            scanned = len(rest)
            messages = table.column("messages")
            for k, matches in zip(rest, self._scan(self.scan_index, messages.take(rest) if fresh else messages)):
                if matches:
                    found[k] = _sort_matches(found.get(k, []) + matches)
        bad = sorted(found)
        stats = self.stats
        stats.rows += n
        stats.clean += n - len(bad)
        if fresh:
            stats.scanned["all"] += len(fresh)
        if scanned:
            stats.scanned["changed"] += scanned
        event, decision = ["kept"] * n, ["clean"] * n
        reason: list[str | None] = [None] * n
        related: list[list[str]] = [[]] * n
        details: list[str | None] = [self.checked.json] * n
        checked = self.checked["checked"]
        bad_rows = table.take(bad).to_pylist() if bad else []
        for k, row in zip(bad, bad_rows):
            matches = found[k]
            stats.count_quarantined(row, matches)
            self.quarantine.append({"row": row, "matches": matches})
            event[k], decision[k] = "quarantined", "contaminated"
            reason[k], related[k], info = quarantine_event(matches, self.config, checked)
            details[k] = details_json(info)
        self.ledger.record_columns(table.column("row_id"), event, decision, reason, related, details)
        if not bad:
            clean = table
        else:
            mask = np.ones(n, bool)
            mask[bad] = False
            clean = table.filter(pa.array(mask))
        if len(self.samples) < self.sample_size and len(clean):
            self.samples.extend(clean.slice(0, self.sample_size - len(self.samples)).to_pylist())
        values, counts = np.unique(text_lengths(clean), return_counts=True)
        self.lengths.update(dict(zip(values.tolist(), counts.tolist())))
        return clean
