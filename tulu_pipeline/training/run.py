"""`TrainingRun`: the lifecycle every training method shares (SFT, DPO, GRPO).

A method builds one from its identity (code version, config, the hashes of what it trains on), then:

1. `finished` — ``output_dir`` already holds a checkpoint with this fingerprint: the method returns it as is.
2. `prepare` — rank 0 removes the temporary siblings an interrupted run left behind and prepares
   ``_checkpoints`` (discarding a partial run of other inputs, keeping one of these to resume from); under
   torchrun the other ranks wait for its run record and resume from the same checkpoint.
3. The method trains, checkpointing into `root` (`checkpointing.mark_complete` completes each checkpoint).
4. `publishing` — rank 0 (`is_publisher`) builds the finished directory beside ``output_dir`` and
   `write_manifest` writes ``training_manifest.json`` last, with the fields every method records; the
   directory is swapped in by rename when the block ends.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.progress import Reporter
from tulu_pipeline.templates.lineage import template_lineage
from tulu_pipeline.training.checkpointing import (
    CHECKPOINTS_DIR,
    PROGRESS_FILE,
    RUN_FILE,
    fingerprint,
    latest_complete_checkpoint,
    library_versions,
    prepare_run_dir,
    publishing,
    read_json,
    remove_stale_siblings,
    write_json_atomic,
)

MANIFEST_FORMAT_VERSION = 1
# Keys of the manifest a caller's manifest_extra may not set: the run's own record.
RESERVED_MANIFEST_KEYS = frozenset({"fingerprint", "metrics", "config"})


@dataclass
class TrainingResult:
    """A finished run: where the checkpoint is, its metrics and its manifest."""

    checkpoint_dir: Path
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    reused: bool = False  # True when output_dir already held this exact run and nothing was trained

    @property
    def resumed_from_step(self) -> int:
        return int(self.metrics.get("resumed_from_step", 0))


def process_rank() -> int:
    """This process's rank under torchrun (``RANK``); 0 when launched alone."""
    return int(os.environ.get("RANK", "0"))


def await_run_dir(output_dir: Path, run_fingerprint: str, timeout_s: float = 600.0) -> tuple[Path, Path | None]:
    """A torchrun worker's view of the run directory rank 0 prepares: wait for its run record, then resume from
    the same complete checkpoint."""
    root = output_dir / CHECKPOINTS_DIR
    deadline = time.monotonic() + timeout_s
    while (read_json(root / RUN_FILE) or {}).get("fingerprint") != run_fingerprint:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{root}: rank 0 did not prepare the run directory within {timeout_s:.0f} s")
        time.sleep(0.5)
    return root, latest_complete_checkpoint(root)


def all_reduce_counts(counts: Sequence[int]) -> list[int]:
    """``counts`` summed over every rank of a multi-process run (torchrun), as they are in a single process."""
    return [int(n) for n in _all_reduce(counts, "long")]


def all_reduce_sums(values: Sequence[float]) -> list[float]:
    """``values`` (float64) summed over every rank of a multi-process run; as given in a single process."""
    return [float(v) for v in _all_reduce(values, "float64")]


def _all_reduce(values: Sequence[float], dtype: str) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    import torch

    from tulu_pipeline.training.checkpointing import training_device

    device = training_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor(list(values), dtype=getattr(torch, dtype), device=device)
    dist.all_reduce(total)
    return total.tolist()


@dataclass
class TrainingRun:
    """One run of ``method`` into ``output_dir``, identified by ``inputs`` (hashes of what it trains on and
    starts from) with the method's code version and the full config."""

    method: str  # "sft", "dpo", "grpo": names the code-version key of the identity and the manifest
    code_version: str
    config: Any  # the method's pydantic config
    inputs: dict[str, Any]
    output_dir: Path
    reporter: Reporter
    manifest_extra: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 600.0  # how long a torchrun worker waits for rank 0's run record
    root: Path | None = field(default=None, init=False)  # the _checkpoints directory, once prepared
    resume_from: Path | None = field(default=None, init=False)
    saved_progress: dict[str, Any] = field(default_factory=dict, init=False)  # resume_from's tulu_progress.json

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir).resolve()
        clashes = sorted(set(self.manifest_extra) & RESERVED_MANIFEST_KEYS)
        if clashes:
            raise ValueError(f"manifest_extra may not set {clashes}")
        self.rank = process_rank()
        self.identity = {self.code_version_key: self.code_version, "config": self.config.model_dump(mode="json"),
                         **self.inputs}
        self.fingerprint = fingerprint(self.identity)

    @property
    def code_version_key(self) -> str:
        return f"{self.method}_code_version"

    @property
    def is_publisher(self) -> bool:
        """Rank 0 owns the run directory and publishes; the other ranks' work is in its weights."""
        return self.rank == 0

    @property
    def resumed_from_step(self) -> int:
        return int(self.saved_progress.get("step", 0))

    def finished(self) -> TrainingResult | None:
        """The checkpoint ``output_dir`` already holds when it is this exact run (nothing to train), else None."""
        existing = read_json(self.output_dir / MANIFEST_FILE)
        if existing is None or existing.get("fingerprint") != self.fingerprint:
            return None
        self.reporter.log(f"{self.output_dir} already holds this run (fingerprint {self.fingerprint[:12]}); "
                          "not retraining")
        return TrainingResult(self.output_dir, dict(existing.get("metrics", {})), existing, reused=True)

    def prepare(self) -> Path | None:
        """Set up `root` (see the module docstring) and return the checkpoint to resume from (None: fresh)."""
        if self.is_publisher:
            for stale in remove_stale_siblings(self.output_dir):
                self.reporter.log(f"removed {stale.name}, left behind by an interrupted run")
            self.root, self.resume_from = prepare_run_dir(self.output_dir, self.fingerprint, self.identity,
                                                          self.reporter.log)
        else:
            self.root, self.resume_from = await_run_dir(self.output_dir, self.fingerprint, self.timeout_s)
        if self.resume_from is not None:
            self.saved_progress = read_json(self.resume_from / PROGRESS_FILE) or {}
            self.reporter.log(f"resuming from {self.resume_from.name} (step {self.resumed_from_step})")
        return self.resume_from

    @contextmanager
    def publishing(self) -> Iterator[Path]:
        """`checkpointing.publishing` of ``output_dir``: rank 0 only."""
        if not self.is_publisher:
            raise RuntimeError(f"rank {self.rank} may not publish {self.output_dir}: rank 0 does")
        with publishing(self.output_dir) as staging:
            yield staging

    def manifest(self, *, tokenizer: Any, batch: dict[str, Any], metrics: dict[str, Any],
                 versions: Sequence[str] = (), **method_fields: Any) -> dict[str, Any]:
        """``training_manifest.json``: the caller's ``manifest_extra``, what every run records (format and code
        version, fingerprint, config, seed, chat template and its lineage, batch layout, library versions,
        metrics) and ``method_fields``."""
        return {
            **self.manifest_extra,
            "format_version": MANIFEST_FORMAT_VERSION,
            self.code_version_key: self.code_version,
            "fingerprint": self.fingerprint,
            "config": self.config.model_dump(mode="json"),
            "seed": self.config.seed,
            "chat_template": "tulu",
            "template_lineage": template_lineage(tokenizer),
            "batch": batch,
            "versions": library_versions(*versions),
            **method_fields,
            "metrics": metrics,
        }

    def write_manifest(self, staging: Path, manifest: dict[str, Any]) -> None:
        """Write the manifest into the staging directory: last, so a directory that has one is complete."""
        write_json_atomic(staging / MANIFEST_FILE, manifest)
