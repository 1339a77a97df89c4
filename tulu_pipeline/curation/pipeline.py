"""The curation stages over TULU_HOME: each reads the previous stage's published dataset, runs one
library step, publishes its own dataset and quarantine, and writes its ledger events.

Versions are content addresses: a stage's version hashes its code version, its configuration and
the versions of every input dataset, so the same inputs and config always publish to the same path.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import chain
from typing import Any

import pyarrow.compute as pc

from tulu_pipeline.curation.config import CurationConfig
from tulu_pipeline.curation.decontaminate import RULE_VERSION, Decontaminator, EvalIndex, EvalItem, training_turns
from tulu_pipeline.curation.dedup import Deduplicator, dedup_order
from tulu_pipeline.curation.incremental import (
    IncrementalStep, Plan, benchmark_fingerprints, plan, previous_matches, run_record, run_record_path,
)
from tulu_pipeline.curation.normalize import Normalizer
from tulu_pipeline.curation.overlap_check import OverlapChecker
from tulu_pipeline.curation.ray_executor import (
    decontaminate_prompts_ray,
    deduplicate_prompts_ray,
    normalize_prompts_ray,
)
from tulu_pipeline.curation.stages import (
    QUARANTINE_SCHEMA,
    EventSampler,
    StageResult,
    build_eval_index,
    decontamination_version,
    dropped_record,
    eval_specs,
    input_version,
    quarantine_dir,
    quarantine_record,
    stage_version,
    train_specs,
)
from tulu_pipeline.data.ingest import raw_dataset_name
from tulu_pipeline.data.schema import ROW_SCHEMA, row_problems
from tulu_pipeline.provenance.ledger import LedgerWriter
from tulu_pipeline.storage import Store

# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
def run_stage(stage: str, store: Store, config: CurationConfig, run_id: str, **options: Any) -> StageResult:
    """Run curation ``stage`` where ``config.executor`` says: in this process, or on Ray (`ray_executor`).

    The one place the executor is decided. ``options`` go to the stage: ``index`` for decontamination,
    ``incremental`` for the local decontamination (Ray always scans in full), ``progress`` and
    ``shard_hook`` on Ray.
    """
    if config.executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {config.executor!r}")
    if stage not in _LOCAL_STAGES:
        raise ValueError(f"unknown curation stage {stage!r}; expected one of {sorted(_LOCAL_STAGES)}")
    if config.executor == "ray":
        options.pop("incremental", None)
        return _RAY_STAGES[stage](store, config, run_id, **options)
    return _LOCAL_STAGES[stage](store, config, run_id, **options)


def normalize_prompts(store: Store, config: CurationConfig, run_id: str) -> StageResult:
    """normalized_prompts: every training source, normalized; empty or over-long rows quarantined."""
    return run_stage("normalized_prompts", store, config, run_id)


def deduplicate_prompts(store: Store, config: CurationConfig, run_id: str) -> StageResult:
    """deduplicated_prompts: exact and MinHash near duplicates removed, keep-first by source priority."""
    return run_stage("deduplicated_prompts", store, config, run_id)


def decontaminate_prompts(store: Store, config: CurationConfig, run_id: str,
                          index: tuple[EvalIndex, dict[str, str]] | None = None,
                          incremental: bool = True) -> StageResult:
    """decontaminated_prompts: rows overlapping any eval item set aside in decontamination_quarantine.

    With ``incremental`` (local executor), the latest earlier version's decisions are reused where its record
    allows (`curation.incremental.plan`): new or changed rows are scanned against every benchmark, the other
    rows only against added or changed benchmarks, or not at all; the result equals a full rerun's. The
    route taken and why are in ``stats["incremental"]`` and the version's run record.
    """
    return run_stage("decontaminated_prompts", store, config, run_id, index=index, incremental=incremental)


def _normalize_local(store: Store, config: CurationConfig, run_id: str) -> StageResult:
    specs = train_specs(config)
    inputs = {raw_dataset_name(s.id): input_version(store, raw_dataset_name(s.id)) for s in specs}
    version = stage_version("normalized_prompts", config.normalize.model_dump(), inputs)
    sampler = EventSampler()
    with LedgerWriter(store, "curation", "normalized_prompts", version, run_id) as ledger:
        normalizer = Normalizer(config.normalize, ledger)
        rows = chain.from_iterable(store.iter_rows(name, v) for name, v in inputs.items())
        info = store.write_rows("normalized_prompts", version, sampler(normalizer(rows)), ROW_SCHEMA, inputs=inputs)
        quarantine = store.write_jsonl_parts(quarantine_dir("normalized_prompts", version),
                                             (dropped_record(d) for d in normalizer.dropped))
    return StageResult("normalized_prompts", version, info, normalizer.stats, sampler.samples, sampler.lengths,
                       ledger.count, quarantine, len(normalizer.dropped), inputs)


def _deduplicate_local(store: Store, config: CurationConfig, run_id: str) -> StageResult:
    inputs = {"normalized_prompts": input_version(store, "normalized_prompts")}
    version = stage_version("deduplicated_prompts", config.dedup.model_dump(), inputs)
    # The keep-first rule needs a global order (priority, source, row_id): the pool is sorted in memory.
    ordered = dedup_order(store.iter_rows("normalized_prompts", inputs["normalized_prompts"]),
                          config.dedup.source_priority)
    sampler = EventSampler()
    with LedgerWriter(store, "curation", "deduplicated_prompts", version, run_id) as ledger:
        dedup = Deduplicator(config.dedup, ledger)
        info = store.write_rows("deduplicated_prompts", version, sampler(dedup(ordered)), ROW_SCHEMA, inputs=inputs)
        quarantine = store.write_jsonl_parts(quarantine_dir("deduplicated_prompts", version), dedup.dropped)
    return StageResult("deduplicated_prompts", version, info, dedup.stats, sampler.samples, sampler.lengths,
                       ledger.count, quarantine, len(dedup.dropped), inputs)


def _decontaminate_local(store: Store, config: CurationConfig, run_id: str,
                         index: tuple[EvalIndex, dict[str, str]] | None = None,
                         incremental: bool = True) -> StageResult:
    eval_index, eval_inputs = index or build_eval_index(store, config)
    inputs = {"deduplicated_prompts": input_version(store, "deduplicated_prompts"), **eval_inputs}
    version = decontamination_version(config, inputs)
    decontam = config.decontam
    fingerprints = benchmark_fingerprints(eval_index, [s.benchmark for s in eval_specs(config)], decontam)
    start = time.process_time()
    route = plan(store, decontam, fingerprints, inputs["deduplicated_prompts"], version, incremental)
    plan_seconds = time.process_time() - start
    with LedgerWriter(store, "decontamination", "decontaminated_prompts", version, run_id) as ledger:
        if route.route == "incremental":
            step = _incremental_step(store, config, eval_index, route, ledger)
            tables = step(store.iter_tables("deduplicated_prompts", inputs["deduplicated_prompts"]))
            info = store.write_dataset("decontaminated_prompts", version, tables, ROW_SCHEMA, inputs=inputs)
            samples, lengths = step.samples, dict(step.lengths)
        else:
            sampler = EventSampler()
            step = Decontaminator(eval_index, decontam, ledger)
            rows = store.iter_rows("deduplicated_prompts", inputs["deduplicated_prompts"])
            info = store.write_rows("decontaminated_prompts", version, sampler(step(rows)), ROW_SCHEMA, inputs=inputs)
            samples, lengths = sampler.samples, sampler.lengths
        quarantine = store.write_rows("decontamination_quarantine", version,
                                      (quarantine_record(e) for e in step.quarantine), QUARANTINE_SCHEMA)
    pool_rows = step.stats.rows
    store.write_json(run_record_path(version), run_record(decontam, inputs, fingerprints, pool_rows, route))
    scan_seconds = round(step.scan_seconds, 3) if isinstance(step, IncrementalStep) else None
    stats = {**step.stats.as_dict(), "eval_items": len(eval_index.items), "benchmarks": dict(eval_index.benchmarks),
             "incremental": {**route.summary(), "cpu_seconds": {"plan": round(plan_seconds, 3), "scan": scan_seconds}}}
    return StageResult("decontaminated_prompts", version, info, stats, samples, lengths,
                       ledger.count, quarantine.path, quarantine.rows, inputs, plan=route)


def _incremental_step(store: Store, config: CurationConfig, eval_index: EvalIndex, route: Plan,
                      ledger: LedgerWriter) -> IncrementalStep:
    """The step that recombines ``route.previous_version``'s decisions with a scan of what changed."""
    scan = route.scan_benchmarks
    scan_index = EvalIndex.build((i for i in eval_index.items if i.benchmark in scan), ngram=config.decontam.ngram,
                                 min_item_tokens=config.decontam.min_item_tokens) if scan else None
    earlier = previous_matches(store, route.previous_version, route.reused, route.rescan)
    return IncrementalStep(eval_index, scan_index, config.decontam, ledger, route, earlier)


_LOCAL_STAGES = {"normalized_prompts": _normalize_local, "deduplicated_prompts": _deduplicate_local,
                 "decontaminated_prompts": _decontaminate_local}
_RAY_STAGES = {"normalized_prompts": normalize_prompts_ray, "deduplicated_prompts": deduplicate_prompts_ray,
               "decontaminated_prompts": decontaminate_prompts_ray}
STAGES = tuple(_LOCAL_STAGES)


# ---------------------------------------------------------------------------------------------
# checks and report
# ---------------------------------------------------------------------------------------------
def verify_no_eval_overlap(store: Store, version: str, index: EvalIndex, config: CurationConfig,
                           limit: int = 20, route: Plan | None = None) -> list[dict[str, Any]]:
    """Re-check clean rows with the independent implementation (`OverlapChecker`); returns violations.

    Every clean row is re-checked against every item, unless ``route`` is an incremental run whose previous
    version passed its checks: then a row that version kept, unchanged, is re-checked only against the
    added or changed benchmarks (not at all when there are none), since it was already re-checked against
    the items it shares with that version; new or changed rows, and rows that version quarantined, against
    every item.
    """
    decontam = config.decontam

    def checker(items: Sequence[EvalItem]) -> OverlapChecker:
        return OverlapChecker([item.text for item in items], decontam.ngram, decontam.threshold, decontam.rule,
                              decontam.short_items)

    everything = list(index.items)
    partial: tuple[list[EvalItem], set[str]] | None = None  # (items for rows kept before, rows checked in full)
    if route is not None and route.route == "incremental" and _checks_passed(store, route.previous_version):
        quarantined_before = {i for t in store.iter_tables("decontamination_quarantine", route.previous_version,
                                                           columns=["row_id"])
                              for i in t.column("row_id").to_pylist()}
        partial = ([i for i in everything if i.benchmark in set(route.scan_benchmarks)],
                   route.rescan | quarantined_before)
    checks = [(checker(everything), everything)]
    if partial is not None and partial[0]:
        checks.append((checker(partial[0]), partial[0]))
    violations: list[dict[str, Any]] = []
    for table in store.iter_tables("decontaminated_prompts", version):
        if partial is None:
            todo = [(checks[0], table.to_pylist())]
        else:
            ids = table.column("row_id").to_pylist()
            full = [k for k, i in enumerate(ids) if i in partial[1]]
            todo = [(checks[0], table.take(full).to_pylist())]
            if partial[0]:
                done = set(full)
                todo.append((checks[1], table.take([k for k in range(len(ids)) if k not in done]).to_pylist()))
        for (check, items), rows in todo:
            for row in rows:
                found = check.overlaps(training_turns(row, decontam.include_response))
                if found:
                    best = max(found, key=lambda o: o.score)
                    item = items[best.item]
                    violations.append({"row_id": row["row_id"], "benchmark": item.benchmark, "eval_id": item.eval_id,
                                       "rule": decontam.rule, "score": best.score})
                    if len(violations) >= limit:
                        return violations
    return violations


def _checks_passed(store: Store, version: str | None) -> bool:
    if version is None or not store.exists(checks_path(version)):
        return False
    return all(store.read_json(checks_path(version))["checks"].values())


class BlockedByChecksError(RuntimeError):
    """A training stage was asked to read a decontaminated set whose blocking checks did not pass."""


def checks_path(version: str) -> str:
    return posixpath.join("reports", "decontamination", version, "checks.json")


def record_check_results(store: Store, version: str, results: dict[str, bool]) -> None:
    """Persist the blocking checks' verdicts next to the report, so any later reader can refuse."""
    store.write_json(checks_path(version), {"version": version, "checks": results})


def require_checks_passed(store: Store, version: str) -> None:
    """Raise unless every blocking check on ``decontaminated_prompts@version`` passed."""
    if not store.exists(checks_path(version)):
        raise BlockedByChecksError(f"decontaminated_prompts@{version} has no recorded check results; "
                                   "re-materialize decontaminated_prompts")
    failed = sorted(name for name, ok in store.read_json(checks_path(version))["checks"].items() if not ok)
    if failed:
        raise BlockedByChecksError(f"decontaminated_prompts@{version} failed blocking checks {failed}; "
                                   "training stages will not read it")


def schema_violations(store: Store, name: str, version: str, limit: int = 20) -> tuple[list[dict], int]:
    """Rows breaking the row schema (first ``limit``), and the number of duplicated row ids."""
    problems, seen, duplicates = [], set(), 0
    for row in store.iter_rows(name, version):
        found = row_problems(row)
        if found and len(problems) < limit:
            problems.append({"row_id": row.get("row_id"), "problems": found})
        duplicates += row["row_id"] in seen
        seen.add(row["row_id"])
    return problems, duplicates


def decontamination_report(store: Store, version: str, config: CurationConfig,
                           inputs: dict[str, str]) -> dict[str, Any]:
    """Per training source × benchmark: rows removed and the share of the benchmark's items hit.

    ``inputs`` are the dataset versions the decontamination read (`StageResult.inputs`), so the report
    describes that run even when a newer upstream version has been published since.
    """
    items_per_benchmark: Counter[str] = Counter()
    suites: dict[str, str] = {}
    for spec in eval_specs(config):
        name = raw_dataset_name(spec.id)
        items_per_benchmark[spec.benchmark] += store.dataset_info(name, inputs[name]).rows
        suites[spec.benchmark] = spec.suite
    rows_in: Counter[str] = Counter()
    for table in store.iter_tables("deduplicated_prompts", inputs["deduplicated_prompts"], columns=["source"]):
        for pair in pc.value_counts(table.column("source").combine_chunks()).to_pylist():
            rows_in[pair["values"]] += pair["counts"]
    removed: Counter[tuple[str, str]] = Counter()
    items_hit: dict[tuple[str, str], set[str]] = defaultdict(set)
    removed_rows: Counter[str] = Counter()
    for row in store.iter_rows("decontamination_quarantine", version):
        removed_rows[row["source"]] += 1
        for benchmark in {m["benchmark"] for m in json.loads(row["matches"])}:
            removed[(row["source"], benchmark)] += 1
        for match in json.loads(row["matches"]):
            items_hit[(row["source"], match["benchmark"])].add(match["eval_id"])
    cells = []
    for source in sorted(rows_in):
        for benchmark in sorted(items_per_benchmark):
            hit = len(items_hit[(source, benchmark)])
            share = hit / items_per_benchmark[benchmark] if items_per_benchmark[benchmark] else 0.0
            cells.append({"source": source, "benchmark": benchmark, "rows_removed": removed[(source, benchmark)],
                          "items_hit": hit, "share_items_hit": round(share, 6), "flagged": share > config.flag_share})
    benchmark_hits = {b: len(set().union(*(items_hit[(s, b)] for s in rows_in))) for b in items_per_benchmark}
    return {
        "version": version,
        "ngram": config.decontam.ngram,
        "threshold": config.decontam.threshold,
        "rule": config.decontam.rule,
        "rule_version": RULE_VERSION,
        "short_items": config.decontam.short_items,
        "include_response": config.decontam.include_response,
        "flag_share": config.flag_share,
        "sources": {s: {"rows_in": rows_in[s], "rows_removed": removed_rows[s]} for s in sorted(rows_in)},
        "benchmarks": {b: {"suite": suites[b], "items": items_per_benchmark[b], "items_hit": benchmark_hits[b],
                           "share_items_hit": round(benchmark_hits[b] / items_per_benchmark[b], 6)
                           if items_per_benchmark[b] else 0.0}
                       for b in sorted(items_per_benchmark)},
        "cells": cells,
        "flagged": [c for c in cells if c["flagged"]],
        "rows_removed": sum(removed_rows.values()),
        "run": _run_summary(store, version),
    }


def _run_summary(store: Store, version: str) -> dict[str, Any] | None:
    """How ``version`` was made (local runs record it): the route, why, and what it reused from which version."""
    if not store.exists(run_record_path(version)):
        return None
    record = store.read_json(run_record_path(version))
    return {k: record.get(k) for k in ("route", "reason", "previous_version", "added_benchmarks",
                                       "changed_benchmarks", "removed_benchmarks", "rows_new_or_changed")}
