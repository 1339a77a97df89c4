"""Where evaluation results live, and the ledger events they leave.

Per (benchmark, checkpoint):

- ``data/eval/<benchmark>/<checkpoint_id>/<version>/part-*.parquet``: one row per item (`EVAL_SCHEMA`:
  prompt, response, score, reason, details), readable with ``tulu rows eval/<benchmark>/<checkpoint_id>``;
- ``reports/eval/<benchmark>/<checkpoint_id>/<version>/items.jsonl``: the same rows as JSON lines, for people;
- ``reports/eval/<benchmark>/<checkpoint_id>/<version>/summary.json`` and, for the latest run,
  ``reports/eval/<benchmark>/<checkpoint_id>/summary.json``: score, bootstrap CI, per-item scores, config.

The version hashes the config, the item ids, the checkpoint's identity and the eval code version, so the
same evaluation gives the same version. Each item gets an ``evaluated`` ledger event whose ``row_id`` is
the eval item's registry row id (the id decontamination matched training rows against) and whose
``related_ids`` is ``[checkpoint_id]``: `checkpoints_that_saw` answers which checkpoints saw an item.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow as pa

from tulu_pipeline.evaluation.runner import EVAL_CODE_VERSION, EvalResult
from tulu_pipeline.hashing import json_hash
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.models.base_model import INFO_FILE
from tulu_pipeline.provenance.ledger import Ledger, LedgerWriter
from tulu_pipeline.templates.lineage import lineage_hashes
from tulu_pipeline.storage import Store

EVAL_SCHEMA = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("eval_id", pa.string(), nullable=False),
    pa.field("benchmark", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("checkpoint_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),  # JSON chat messages
    pa.field("response", pa.string(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("details", pa.string()),  # JSON
])
REPORTS = "reports/eval"
EVALUATED = "evaluated"


def dataset_name(benchmark: str, checkpoint_id: str) -> str:
    return f"eval/{benchmark}/{checkpoint_id}"


def summary_path(benchmark: str, checkpoint_id: str, version: str | None = None) -> str:
    parts = [REPORTS, benchmark, checkpoint_id] + ([version] if version else [])
    return posixpath.join(*parts, "summary.json")


def checkpoint_identity(store: Store, checkpoint_id: str) -> str:
    """What identifies the weights: the training fingerprint, else the base model's weights hash."""
    for rel in (f"models/{checkpoint_id}/{MANIFEST_FILE}", f"models/{checkpoint_id}/{INFO_FILE}"):
        if store.exists(rel):
            data = store.read_json(rel)
            return str(data.get("fingerprint") or data.get("weights_sha256") or data.get("checkpoint_id") or checkpoint_id)
    return checkpoint_id


def result_version(result: EvalResult, identity: str) -> str:
    return version_of(result.benchmark, result.checkpoint_id, identity, result.summary["config_digest"],
                      result.summary["item_ids_sha256"])


def version_of(benchmark: str, checkpoint_id: str, identity: str, config_digest: str, item_ids_sha256: str) -> str:
    """An evaluation's version: the eval code, the benchmark, the checkpoint and its weights' identity, the
    config and the items. Equal versions are the same evaluation (`pipeline.is_current`)."""
    payload = {"code": EVAL_CODE_VERSION, "benchmark": benchmark, "checkpoint": checkpoint_id,
               "identity": identity, "config": config_digest, "items": item_ids_sha256}
    return json_hash(payload)


def publish_result(store: Store, result: EvalResult, run_id: str, asset_key: str | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the item dataset, the readable JSONL and the summary (with ``extra``, e.g. the contamination
    verdict), and one ``evaluated`` event per item."""
    benchmark, checkpoint_id = result.benchmark, result.checkpoint_id
    identity = checkpoint_identity(store, checkpoint_id)
    version = result_version(result, identity)
    summary = {**result.summary, **(extra or {}), "version": version, "run_id": run_id, "checkpoint_identity": identity}
    info = store.write_rows(dataset_name(benchmark, checkpoint_id), version, result.records, EVAL_SCHEMA)
    base = posixpath.join(REPORTS, benchmark, checkpoint_id, version)
    items_rel = posixpath.join(base, "items.jsonl")
    store.write_jsonl(items_rel, ({**r, "prompt": json.loads(r["prompt"]), "details": json.loads(r["details"])}
                                  for r in result.records))
    summary["items_path"] = store.uri(items_rel)
    summary["dataset_path"] = info.path
    store.write_json(summary_path(benchmark, checkpoint_id, version), summary)
    store.write_json(summary_path(benchmark, checkpoint_id), summary)  # the latest, for the comparison
    with LedgerWriter(store, "evaluation", asset_key or f"eval/{benchmark}", f"{checkpoint_id}-{version}", run_id) as ledger:
        for record in result.records:
            ledger.record(record["item_id"], EVALUATED, decision="scored", reason=record["reason"],
                          related_ids=[checkpoint_id],
                          details={"benchmark": benchmark, "eval_id": record["eval_id"], "checkpoint": checkpoint_id,
                                   "score": record["score"], "eval_version": version,
                                   "template_lineage": lineage_hashes(summary.get("template_lineage"))})
    return summary


def read_summary(store: Store, benchmark: str, checkpoint_id: str) -> dict[str, Any] | None:
    rel = summary_path(benchmark, checkpoint_id)
    return store.read_json(rel) if store.exists(rel) else None


def item_scores(store: Store, benchmark: str, checkpoint_id: str,
                summary: dict[str, Any] | None = None) -> dict[str, float]:
    """``{item_id: score}`` of the evaluation ``summary`` names (default: the latest), from its item dataset."""
    summary = summary if summary is not None else read_summary(store, benchmark, checkpoint_id)
    if summary is None:
        return {}
    return {r["item_id"]: float(r["score"])
            for r in store.iter_rows(dataset_name(benchmark, checkpoint_id), summary.get("version"))}


def saved_responses(store: Store, benchmark: str, checkpoint_id: str, item_ids: list[str],
                    generation_digest: str) -> tuple[list[str], dict[str, Any]] | None:
    """The answers ``checkpoint_id``'s own evaluation of ``benchmark`` gave to ``item_ids`` (in that order)
    under the same prompts and sampling (``generation_digest``, `runner.generation_digest`), with that
    evaluation's summary: the latest published version first, then the others; one that holds every item and
    was made from the checkpoint's current weights (its ``checkpoint_identity``). None when there is none."""
    identity = checkpoint_identity(store, checkpoint_id)
    latest = read_summary(store, benchmark, checkpoint_id)
    versions = [v for v in store.listdir(REPORTS, benchmark, checkpoint_id)
                if store.exists(summary_path(benchmark, checkpoint_id, v))]
    candidates = ([latest] if latest else []) + [store.read_json(summary_path(benchmark, checkpoint_id, v))
                                                 for v in versions if not latest or v != latest.get("version")]
    for summary in candidates:
        if summary.get("generation_digest") != generation_digest or summary.get("checkpoint_identity") != identity:
            continue
        by_id = {r["item_id"]: r["response"]
                 for r in store.iter_rows(dataset_name(benchmark, checkpoint_id), summary["version"])}
        if all(i in by_id for i in item_ids):
            return [by_id[i] for i in item_ids], summary
    return None


def checkpoints_that_saw(store: Store, item_id: str) -> list[str]:
    """The checkpoints evaluated on an eval item (from its ``evaluated`` ledger events)."""
    rows = Ledger(store).query(
        "SELECT DISTINCT unnest(related_ids) AS checkpoint FROM events WHERE event = ? AND stage = 'evaluation' "
        "ORDER BY checkpoint", [EVALUATED], row_ids=[item_id])
    return [r["checkpoint"] for r in rows]
