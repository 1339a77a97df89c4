"""Ingest one registered source: verify, normalize to the row schema, publish, and log each row."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tulu_pipeline.data.loaders import BadRecord, iter_located_rows
from tulu_pipeline.data.registry import SourceSpec
from tulu_pipeline.data.schema import ROW_SCHEMA, make_row_id, row_text, split_source_key
from tulu_pipeline.hashing import json_hash
from tulu_pipeline.provenance.ledger import LedgerWriter
from tulu_pipeline.storage import DatasetInfo, Store

# Bump when loading or mapping code changes what rows a file yields: it is part of every raw version.
LOADER_VERSION = "1"


def source_version(spec: SourceSpec) -> str:
    """Data version of a raw source: the file's content hash, the mapping and the loader version."""
    return json_hash(
        {"loader": LOADER_VERSION, "sha256": spec.sha256, "mapping": spec.mapping.model_dump(), "records": spec.records})


def raw_dataset_name(source_id: str) -> str:
    return f"raw/{source_id}"


@dataclass
class IngestResult:
    """What one ingestion produced, for metadata and checks."""

    spec: SourceSpec
    dataset: DatasetInfo
    version: str
    ledger_events: int
    quarantined: list[BadRecord] = field(default_factory=list)
    quarantine_path: str | None = None
    text_lengths: list[int] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    duplicate_row_ids: int = 0


def ingest_source(
    spec: SourceSpec,
    store: Store,
    run_id: str,
    root: Path | None = None,
    on_error: Literal["raise", "quarantine"] = "raise",
    batch_size: int = 5_000,
    sample_size: int = 5,
) -> IngestResult:
    """Publish ``data/raw/<id>/<version>/`` and one ``ingested`` ledger event per row.

    With ``on_error="quarantine"`` bad records are written to ``quarantine/raw/<id>/<version>.jsonl``
    with their reason (and a ``quarantined`` ledger event) instead of stopping the ingestion.
    """
    version = source_version(spec)
    asset_key = raw_dataset_name(spec.id)
    bad: list[BadRecord] = []
    lengths: list[int] = []
    samples: list[dict] = []
    seen: set[str] = set()
    duplicates = 0

    with LedgerWriter(store, "sources", asset_key, version, run_id) as ledger:

        def batches():
            nonlocal duplicates
            batch: list[dict] = []
            rows = iter_located_rows(spec, root, on_bad=bad.append if on_error == "quarantine" else None)
            for row, line in rows:
                if row["row_id"] in seen:
                    duplicates += 1
                seen.add(row["row_id"])
                ledger.record(
                    row["row_id"], "ingested", decision="ingested",
                    details={"source": spec.id, **split_source_key(row["source_key"]), "line": line,
                             "file_sha256": spec.sha256,
                             "source_key": row["source_key"], "license": spec.license, "eval_id": row["eval_id"]},
                )
                lengths.append(len(row_text(row)))
                if len(samples) < sample_size:
                    samples.append(row)
                batch.append(row)
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
            yield batch

        dataset = store.write_dataset(asset_key, version, batches(), ROW_SCHEMA)
        quarantine_path = None
        if bad:
            quarantine_rel = posixpath.join("quarantine", "raw", spec.id, f"{version}.jsonl")
            with store.atomic_open(quarantine_rel, "wb") as handle:
                for record in bad:
                    row_id = make_row_id(spec.id, record.source_key, record.raw)
                    handle.write(json.dumps({
                        "row_id": row_id, "source": spec.id, "source_key": record.source_key,
                        "reason": record.reason, "raw": record.raw.decode("utf-8", "replace"),
                    }, ensure_ascii=False).encode() + b"\n")
                    ledger.record(row_id, "quarantined", decision="quarantined", reason=record.reason,
                                  details={"source": spec.id, "file": spec.path, "source_key": record.source_key,
                                           "line": record.line, "file_sha256": spec.sha256})
            quarantine_path = store.uri(quarantine_rel)
    return IngestResult(spec, dataset, version, ledger.count, bad, quarantine_path, lengths, samples, duplicates)
