"""Publish an SFT mix from the decontaminated pool: sample, write, count tokens, log each row."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from tulu_pipeline.curation.pipeline import require_checks_passed
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.mixing.config import MixConfig
from tulu_pipeline.mixing.sample import (
    MixSample, eligible_ids_by_source, mix_hash, record_mix_events, row_ids_hash, sample_mix,
)
from tulu_pipeline.provenance.ledger import LedgerWriter
from tulu_pipeline.templates.lineage import lineage_hashes, template_lineage
from tulu_pipeline.storage import DatasetInfo, Store

SOURCE_DATASET = "decontaminated_prompts"
MIX_DATASET = "sft_mix"


def mix_info_path(version: str) -> str:
    """Sidecar with the mix config, the held-out ids and the row-id hashes of a published mix."""
    return posixpath.join("data", MIX_DATASET, version, "mix.json")


@dataclass
class MixResult:
    mix: MixConfig
    version: str
    dataset: DatasetInfo
    sample: MixSample
    inputs: dict[str, str]
    rows_per_source: dict[str, int]
    tokens_per_source: dict[str, int] = field(default_factory=dict)
    token_lengths: list[int] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    template_lineage: dict[str, Any] | None = None  # what the token counts were tokenized with

    @property
    def heldout_ids(self) -> list[str]:
        return self.sample.heldout


def _load_tokenizer(tokenizer_dir: str):
    from pathlib import Path

    from transformers import AutoTokenizer

    from tulu_pipeline.templates.chat_template import apply_tulu_chat_template

    if not Path(tokenizer_dir, "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer there; materialize base_model first")
    return apply_tulu_chat_template(AutoTokenizer.from_pretrained(tokenizer_dir))


def build_sft_mix(store: Store, mix: MixConfig, run_id: str, tokenizer_dir: str | None = None) -> MixResult:
    """Sample ``mix`` from the latest decontaminated pool (only if its blocking checks passed) and
    publish ``data/sft_mix/<mix hash>/`` with one ``included_in_mix`` ledger event per row."""
    source_version = store.latest_version(SOURCE_DATASET)
    if source_version is None:
        raise FileNotFoundError(f"{SOURCE_DATASET} has not been materialized under {store.url}")
    require_checks_passed(store, source_version)
    inputs = {SOURCE_DATASET: source_version}
    wanted = set(mix.sources)
    available = eligible_ids_by_source(r for r in store.iter_rows(SOURCE_DATASET, source_version) if r["source"] in wanted)
    sample = sample_mix(available, mix)
    version = mix_hash(mix, inputs)
    chosen = set(sample.train_ids) | set(sample.heldout)

    tokenizer = _load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    lineage = template_lineage(tokenizer) if tokenizer is not None else None
    tokens: dict[str, int] = {}
    lengths: list[int] = []
    first_rows: list[dict[str, Any]] = []

    def selected_rows():
        from tulu_pipeline.templates.chat_template import encode_conversation

        for row in store.iter_rows(SOURCE_DATASET, source_version):
            if row["row_id"] not in chosen:
                continue
            if tokenizer is not None:
                n = len(encode_conversation(row["messages"], tokenizer, max_length=1 << 20)["input_ids"])
                tokens[row["source"]] = tokens.get(row["source"], 0) + n
                lengths.append(n)
            if len(first_rows) < 5:
                first_rows.append(row)
            yield row

    with LedgerWriter(store, "sft", MIX_DATASET, version, run_id) as ledger:
        info = store.write_rows(MIX_DATASET, version, selected_rows(), ROW_SCHEMA, inputs=inputs)
        record_mix_events(sample, ledger, mix.name, version, lineage_hashes(lineage))
    store.write_json(mix_info_path(version), {
        "mix": mix.canonical(), "mix_hash": version, "inputs": inputs, "counts": sample.counts,
        "heldout_row_ids": sample.heldout, "train_row_ids_hash": row_ids_hash(sample.train_ids),
        "heldout_row_ids_hash": row_ids_hash(sample.heldout), "template_lineage": lineage,
    })
    rows_per_source = {s: c["sampled"] for s, c in sample.counts.items()}
    return MixResult(mix, version, info, sample, inputs, rows_per_source, tokens, lengths, first_rows, lineage)
