"""What the curation stages share, whichever executor runs them (`pipeline` locally, `ray_executor` on Ray):
versions, inputs, the stage result, the quarantine schema and records, the eval index of the selected suites."""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any

import pyarrow as pa

from tulu_pipeline.curation.config import CurationConfig
from tulu_pipeline.curation.decontaminate import RULE_VERSION, EvalIndex, eval_items_from_rows
from tulu_pipeline.data.ingest import raw_dataset_name
from tulu_pipeline.data.registry import SourceSpec, get_source, registry
from tulu_pipeline.data.schema import ROW_SCHEMA, row_text
from tulu_pipeline.hashing import json_hash
from tulu_pipeline.storage import DatasetInfo, Store

CURATION_CODE_VERSION = "1"
DECONTAMINATION_CODE_VERSION = RULE_VERSION  # the decontamination assets' code version follows the rule

# Quarantined rows keep their row fields plus the best match and every match (JSON).
QUARANTINE_SCHEMA = pa.schema([
    *ROW_SCHEMA,
    pa.field("benchmark", pa.string()),
    pa.field("matched_eval_id", pa.string()),
    pa.field("score", pa.float64()),
    pa.field("span", pa.string()),
    pa.field("matches", pa.string()),
])


class MissingInputError(RuntimeError):
    """A stage's input dataset has not been materialized yet."""


@dataclass
class StageResult:
    """What one curation stage published, for metadata, checks and the CLI."""

    name: str
    version: str
    dataset: DatasetInfo
    stats: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    # text length → rows of that length: the histogram's input, O(distinct lengths) whatever the rows
    text_lengths: dict[int, int] = field(default_factory=dict)
    ledger_events: int = 0
    quarantine_path: str | None = None
    quarantined: int = 0
    inputs: dict[str, str] = field(default_factory=dict)
    plan: Any = None  # decontamination in this process: its `incremental.Plan` (what the checks may skip)


def stage_version(stage: str, config: Any, inputs: dict[str, str]) -> str:
    return json_hash({"stage": stage, "code": CURATION_CODE_VERSION, "config": config, "inputs": inputs},
                     default=str)


def decontamination_version(config: CurationConfig, inputs: dict[str, str]) -> str:
    """The version of decontaminated_prompts (either executor): its settings, `RULE_VERSION` and inputs."""
    return stage_version("decontaminated_prompts", {"decontam": config.decontam.model_dump(),
                                                    "evals": config.evals.model_dump(), "rule_version": RULE_VERSION},
                         inputs)


def input_version(store: Store, name: str) -> str:
    version = store.latest_version(name)
    if version is None:
        raise MissingInputError(f"{name} has not been materialized under {store.url}; materialize it first")
    return version


def train_specs(config: CurationConfig) -> list[SourceSpec]:
    if config.train_sources is None:
        return [s for s in registry() if s.role == "train"]
    specs = [get_source(source_id) for source_id in config.train_sources]
    not_train = [s.id for s in specs if s.role != "train"]
    if not_train:
        raise ValueError(f"train_sources must be training pools; these are evaluation files: {not_train}")
    return specs


def eval_specs(config: CurationConfig) -> list[SourceSpec]:
    """Every registered eval file of the selected suites (and benchmarks, when named)."""
    specs = [s for s in registry() if s.role == "eval" and s.suite in config.evals.suites]
    if config.evals.benchmarks is not None:
        known = {s.benchmark for s in registry() if s.role == "eval"}
        unknown = sorted(set(config.evals.benchmarks) - known)
        if unknown:
            raise ValueError(f"unknown benchmarks {unknown}; registered: {sorted(known)}")
        specs = [s for s in specs if s.benchmark in config.evals.benchmarks]
    return specs


class EventSampler:
    """Keeps the first few rows and counts rows per text length while rows stream past."""

    def __init__(self, size: int = 5):
        self.size, self.samples = size, []
        self.lengths: dict[int, int] = {}  # a plain dict: StageResult goes through dataclasses.asdict

    def __call__(self, rows):
        for row in rows:
            if len(self.samples) < self.size:
                self.samples.append(row)
            length = len(row_text(row))
            self.lengths[length] = self.lengths.get(length, 0) + 1
            yield row


def dropped_record(dropped: dict[str, Any]) -> dict[str, Any]:
    row = dropped["row"]
    return {"row_id": row.get("row_id") if isinstance(row, dict) else None, "reason": dropped["reason"], "row": row}


def build_eval_index(store: Store, config: CurationConfig,
                     only: set[str] | None = None) -> tuple[EvalIndex, dict[str, str]]:
    """The n-gram index of every selected eval item (of the raw eval datasets named in ``only``)."""
    specs = [s for s in eval_specs(config) if only is None or raw_dataset_name(s.id) in only]
    inputs = {raw_dataset_name(s.id): input_version(store, raw_dataset_name(s.id)) for s in specs}
    items = chain.from_iterable(
        eval_items_from_rows(store.iter_rows(raw_dataset_name(s.id), inputs[raw_dataset_name(s.id)]), s.benchmark)
        for s in specs
    )
    index = EvalIndex.build(items, ngram=config.decontam.ngram, min_item_tokens=config.decontam.min_item_tokens)
    return index, inputs


def quarantine_dir(stage: str, version: str) -> str:
    """Where ``stage`` (normalization, dedup) publishes its dropped rows: JSON-lines parts, read with
    `Store.iter_jsonl_parts` (one part locally, one per shard on Ray)."""
    return posixpath.join("quarantine", stage, version)


def quarantine_record(entry: dict[str, Any]) -> dict[str, Any]:
    best = entry["matches"][0]
    return {
        **entry["row"],
        "benchmark": best.benchmark, "matched_eval_id": best.eval_id, "score": best.score, "span": best.span,
        "matches": json.dumps([asdict(m) for m in entry["matches"]], ensure_ascii=False),
    }
