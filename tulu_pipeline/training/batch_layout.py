"""Global batch semantics: a training config states the batch of one optimizer step of the whole run; at launch it
is split over the data-parallel processes, so a preset means the same on one CPU or 64 GPUs.

SFT and DPO configs state it as ``per_device_batch_size * gradient_accumulation_steps`` as one process would run
it; `split_global_batch` gives each of ``world_size`` processes an equal share: the largest micro-batch that
divides the share without exceeding the configured ``per_device_batch_size`` (memory), and accumulation for the
rest. On one process that is the config itself. A batch the world size does not divide is an error before
training starts.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Self

WORLD_SIZE_ENV = "WORLD_SIZE"  # set by torchrun for every rank


@dataclass(frozen=True)
class BatchLayout:
    """One optimizer step as the processes of a run share it (recorded as ``batch`` in the training manifest)."""

    world_size: int
    global_batch_size: int  # per optimizer step, all processes together
    per_device_batch_size: int  # per forward/backward pass of one process
    gradient_accumulation_steps: int
    unit: str  # what the batch counts: sequences, pairs, rollouts

    def manifest(self) -> dict[str, Any]:
        return asdict(self)


class BatchSplitError(ValueError):
    """A global batch that the world size does not divide."""


def launch_world_size() -> int:
    """Data-parallel processes of this run: torchrun's ``WORLD_SIZE``, 1 without it."""
    return int(os.environ.get(WORLD_SIZE_ENV) or 1)


def require_divisible(total: int, world_size: int, *, preset: str | None, what: str) -> int:
    """``total / world_size``, or a `BatchSplitError` naming the preset, the batch, the world size and what divides."""
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    share, rest = divmod(total, world_size)
    if rest == 0 and share > 0:
        return share
    dividing = [n for n in range(1, total + 1) if total % n == 0]
    lower, upper = total - total % world_size, total + world_size - total % world_size
    nearest = " or ".join(str(n) for n in (lower, upper) if n > 0)
    name = f"preset {preset!r}" if preset else "this config"
    raise BatchSplitError(
        f"{name}: the global batch of {what} cannot be split evenly over world size {world_size}; world sizes that "
        f"divide it: {', '.join(map(str, dividing))}; or a global batch that {world_size} divides ({nearest})")


def split_global_batch(global_batch: int, max_per_device: int, world_size: int, *, preset: str | None = None,
                       unit: str = "sequences") -> BatchLayout:
    """Each process's micro-batch and accumulation steps for ``global_batch`` over ``world_size`` processes."""
    share = require_divisible(global_batch, world_size, preset=preset, what=f"{global_batch} {unit}")
    micro = max(n for n in range(1, min(share, max_per_device) + 1) if share % n == 0)
    return BatchLayout(world_size, global_batch, micro, share // micro, unit)


class DataParallelBatch:
    """Global batch semantics for a pydantic config with ``per_device_batch_size`` and
    ``gradient_accumulation_steps`` (SFT and DPO): their product is the batch of the whole run."""

    BATCH_UNIT: ClassVar[str] = "sequences"
    per_device_batch_size: int
    gradient_accumulation_steps: int

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimizer step of this config's process (of the run, before `for_world_size`)."""
        return self.per_device_batch_size * self.gradient_accumulation_steps

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step of the whole run."""
        return self.effective_batch_size

    def batch_layout(self, world_size: int, preset: str | None = None) -> BatchLayout:
        """The global batch split over ``world_size`` processes (`split_global_batch`; an error names ``preset``)."""
        return split_global_batch(self.global_batch_size, self.per_device_batch_size, world_size, preset=preset,
                                  unit=self.BATCH_UNIT)

    def for_world_size(self, world_size: int, preset: str | None = None) -> Self:
        """The config each of ``world_size`` data-parallel processes trains with: the same global batch."""
        layout = self.batch_layout(world_size, preset)
        return self.model_copy(update={"per_device_batch_size": layout.per_device_batch_size,  # type: ignore[attr-defined]
                                       "gradient_accumulation_steps": layout.gradient_accumulation_steps})
