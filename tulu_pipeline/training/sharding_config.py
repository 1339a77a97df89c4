"""How a training run is sharded across its torchrun processes (`tulu_pipeline.training.sharding` applies it).

``strategy="none"`` keeps one full copy of the model per process (today's trainers); ``"fsdp"`` shards parameters,
gradients and optimizer state over the processes with FSDP2 (``torch.distributed.fsdp.fully_shard``), one unit per
decoder layer plus the root. ``mixed_precision`` and ``cpu_offload`` act on FSDP only; ``activation_checkpointing``
works with either strategy.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ShardingConfig(BaseModel):
    """Sharding, precision and memory options of one run; saved with the run's config like every other field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["none", "fsdp"] = Field(
        "none", description="none: a full replica per process; fsdp: FSDP2 parameter/gradient/optimizer sharding")
    mixed_precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="bf16: layers compute in bf16 while master weights, gradient reduction and optimizer "
        "state stay fp32; fp32: everything fp32 (fsdp only)")
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass (memory for compute)")
    cpu_offload: bool = Field(
        False, description="keep sharded parameters, gradients and optimizer state in host memory (fsdp only)")

    @model_validator(mode="after")
    def _offload_needs_fsdp(self) -> ShardingConfig:
        if self.cpu_offload and self.strategy != "fsdp":
            raise ValueError("cpu_offload=True needs strategy='fsdp' (only sharded state can be offloaded)")
        return self


def is_unsharded_default(value: ShardingConfig) -> bool:
    """Whether ``value`` is the default (no sharding): a training config leaves it out of its dump then, so the
    fingerprints and checkpoint ids of runs that predate the field stay what they were."""
    return value == ShardingConfig()
