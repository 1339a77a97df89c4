"""preference_prompts: a seeded sample of the decontaminated pool, disjoint from the SFT mix by default.

Rows are ranked per source by sha256 of ``[seed, source, row_id]`` (as the SFT mix does: the outcome
depends only on the set of ids, never on their order) and taken round-robin over the sorted sources, so
a small sample still covers every source. Each selected row gets one ``selected_for_preference``
ledger event (decision ``selected``, details: rank, sample version); this is a new event rather than
``included_in_mix`` so that `tulu audit` never mistakes a preference prompt for an SFT training row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tulu_pipeline.curation.pipeline import require_checks_passed
from tulu_pipeline.mixing.publish import MIX_DATASET, SOURCE_DATASET
from tulu_pipeline.preference.schema import PROMPT_SCHEMA, PROMPTS_DATASET, content_hash, prompt_messages
from tulu_pipeline.provenance.ledger import LedgerWriter
from tulu_pipeline.storage import DatasetInfo, Store

PREFERENCE_CODE_VERSION = "1"
SELECTED_EVENT = "selected_for_preference"

# Sources with their own human preference labels: preference_pairs ingests them as origin "human".
HUMAN_PREFERENCE_SOURCES = ("hh_rlhf_harmless", "fine_grained_rlhf_qa")


class PromptSelectionConfig(BaseModel):
    """How many prompts, from which sources, with which seed."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(16, ge=1, description="prompts to sample (CPU default: the local judge costs 4 forward "
                      "passes per completion)")
    sources: list[str] | None = Field(None, description="None: every source of the pool except the human "
                                      "preference sources, which preference_pairs ingests with their own labels")
    seed: int = 0
    exclude_sft_mix: bool = Field(True, description="leave out every row of the latest sft_mix (held-out rows too)")


@dataclass
class PromptSelection:
    version: str
    dataset: DatasetInfo
    inputs: dict[str, str]
    per_source: dict[str, int]
    available: dict[str, int]
    excluded_sft_rows: int
    samples: list[dict[str, Any]] = field(default_factory=list)


def rank_key(seed: int, *parts: str) -> str:
    return hashlib.sha256(json.dumps([seed, *parts]).encode()).hexdigest()


def round_robin(ranked: dict[str, list[str]], size: int) -> list[str]:
    """Up to ``size`` ids taken one per source in turn (sources sorted, each in its rank order)."""
    queues = {s: list(ids) for s, ids in sorted(ranked.items()) if ids}
    chosen: list[str] = []
    while queues and len(chosen) < size:
        for source in list(queues):
            if len(chosen) >= size:
                break
            chosen.append(queues[source].pop(0))
            if not queues[source]:
                del queues[source]
    return chosen


def sft_mix_row_ids(store: Store) -> tuple[set[str], str | None]:
    version = store.latest_version(MIX_DATASET)
    if version is None:
        return set(), None
    return {r["row_id"] for r in store.iter_rows(MIX_DATASET, version)}, version


def select_preference_prompts(store: Store, config: PromptSelectionConfig, run_id: str) -> PromptSelection:
    """Sample prompts from the latest decontaminated pool (only if its blocking checks passed) and publish
    ``data/preference_prompts/<version>/`` with one ``selected_for_preference`` ledger event per row."""
    source_version = store.latest_version(SOURCE_DATASET)
    if source_version is None:
        raise FileNotFoundError(f"{SOURCE_DATASET} has not been materialized under {store.url}")
    require_checks_passed(store, source_version)
    inputs = {SOURCE_DATASET: source_version}
    excluded: set[str] = set()
    if config.exclude_sft_mix:
        excluded, mix_version = sft_mix_row_ids(store)
        if mix_version is None:
            raise FileNotFoundError(f"{MIX_DATASET} has not been materialized under {store.url}; materialize it "
                                    "first or set exclude_sft_mix: false")
        inputs[MIX_DATASET] = mix_version

    wanted = set(config.sources) if config.sources is not None else None
    keys: dict[str, list[tuple[str, str]]] = {}
    seen_sources: set[str] = set()
    for row in store.iter_rows(SOURCE_DATASET, source_version):
        source = row["source"]
        seen_sources.add(source)
        if (wanted is not None and source not in wanted) or (wanted is None and source in HUMAN_PREFERENCE_SOURCES):
            continue
        if row["row_id"] in excluded or prompt_messages(row["messages"]) is None:
            continue
        keys.setdefault(source, []).append((rank_key(config.seed, source, row["row_id"]), row["row_id"]))
    if wanted is not None:
        missing = sorted(wanted - seen_sources)
        if missing:
            raise ValueError(f"preference prompt sources {missing} are not in {SOURCE_DATASET}@{source_version} "
                             f"(present: {sorted(seen_sources)})")
    ranked = {s: [row_id for _, row_id in sorted(k)] for s, k in keys.items()}
    chosen = round_robin(ranked, config.size)
    rank = {row_id: i for i, row_id in enumerate(chosen)}
    version = content_hash(PREFERENCE_CODE_VERSION, "preference_prompts", config.model_dump(mode="json"), inputs,
                           length=16)

    per_source: dict[str, int] = {}
    first: list[dict[str, Any]] = []

    def rows():
        for row in store.iter_rows(SOURCE_DATASET, source_version):
            if row["row_id"] not in rank:
                continue
            prompt, reference = prompt_messages(row["messages"])
            out = {**row, "messages": prompt, "reference_response": reference}
            per_source[row["source"]] = per_source.get(row["source"], 0) + 1
            if len(first) < 5:
                first.append(out)
            yield out

    with LedgerWriter(store, "preference", PROMPTS_DATASET, version, run_id) as ledger:
        info = store.write_rows(PROMPTS_DATASET, version, rows(), PROMPT_SCHEMA, inputs=inputs)
        for row_id in chosen:
            ledger.record(row_id, SELECTED_EVENT, decision="selected",
                          details={"rank": rank[row_id], "sample": version, "seed": config.seed})
    available = {s: len(ids) for s, ids in ranked.items()}
    return PromptSelection(version, info, inputs, per_source, available, len(excluded), first)
