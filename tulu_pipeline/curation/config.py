"""One typed configuration for the curation stages, with defaults that run on the bundled data."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tulu_pipeline.curation.decontaminate import DecontamConfig
from tulu_pipeline.curation.dedup import DedupConfig
from tulu_pipeline.curation.normalize import NormalizeConfig
from tulu_pipeline.hashing import json_hash

# Earlier sources win exact and near-duplicate ties: curated, verifiable sources first.
DEFAULT_SOURCE_PRIORITY = ["gsm8k_train", "math_train", "code_alpaca", "self_instruct_seed",
                           "fine_grained_rlhf_qa", "hh_rlhf_harmless"]


class EvalSelection(BaseModel):
    """Which registered evaluation benchmarks the training prompts are decontaminated against."""

    model_config = ConfigDict(extra="forbid")
    suites: list[Literal["dev", "unseen"]] = Field(default_factory=lambda: ["dev", "unseen"])
    benchmarks: list[str] | None = None  # None: every benchmark of the selected suites


class RaySettings(BaseModel):
    """Where and how the Ray executor runs (ignored by the local executor)."""

    model_config = ConfigDict(extra="forbid")
    # None: $RAY_ADDRESS when set, else a local Ray started for the run (and stopped after it).
    address: str | None = None
    shard_rows: int = Field(default=50_000, ge=1)  # rows per task: bounds a worker's memory
    num_cpus: int | None = None  # CPUs of a Ray started locally (None: all)
    object_store_memory: int | None = None  # bytes, for a Ray started locally (None: Ray's default)
    max_retries: int = Field(default=3, ge=0)  # re-runs of a task whose worker died
    # Reducers of dedup's shuffles through files (and the fewest bucket reducers): one per partition_rows
    # rows of the pool, at most shuffle_partitions (and the shards). Each reads its slice of every shard's
    # file, so shards × partitions reads in all: keep the most near the cluster's CPU count.
    shuffle_partitions: int = Field(default=256, ge=1)
    partition_rows: int = Field(default=50_000, ge=1)
    # Bounds a dedup bucket reducer's memory (~55 bytes of Arrow per band record, so ~220 MB by default).
    max_band_records_per_reducer: int = Field(default=4_000_000, ge=1)
    # An eval index larger than this (`EvalIndex.table_bytes`) is split by n-gram hash into parts held by
    # actors, and each shard's texts are joined with the parts; below it every worker reads the whole index.
    eval_index_max_bytes: int = Field(default=1 << 30, ge=1)
    eval_index_shards: int | None = Field(default=None, ge=1)  # parts when split (None: bytes / max, rounded up)


class CurationConfig(BaseModel):
    """Normalization, deduplication and decontamination settings for one curation run."""

    model_config = ConfigDict(extra="forbid")
    train_sources: list[str] | None = None  # None: every registry source with role "train"
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    dedup: DedupConfig = Field(default_factory=lambda: DedupConfig(source_priority=DEFAULT_SOURCE_PRIORITY))
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    evals: EvalSelection = Field(default_factory=EvalSelection)
    flag_share: float = Field(default=0.02, gt=0, le=1)  # Tülu flags a benchmark above 2% of items hit
    # "ray": the same steps as Ray tasks (tulu_pipeline.curation.ray_executor); same outputs.
    executor: Literal["local", "ray"] = "local"
    ray: RaySettings = Field(default_factory=RaySettings)

    def digest(self) -> str:
        """Hash of what decides the outputs; where they are computed (executor, Ray settings) is left out."""
        payload = self.model_dump(mode="json", exclude={"executor", "ray"})
        return json_hash(payload)
