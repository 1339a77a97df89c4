"""Training on an object-store TULU_HOME: trainers need local directories, so a job downloads its input model
into a local work directory and uploads the published checkpoint afterwards, ``training_manifest.json`` last
(its presence marks a complete upload). Mount a persistent volume at the work directory to resume across pods.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.progress import Reporter
from tulu_pipeline.storage import Store
from tulu_pipeline.training.checkpointing import CHECKPOINTS_DIR

R = TypeVar("R")


def work_dir(env: str, stage: str, rel: str) -> Path:
    """The local directory for store path ``rel``: under ``$<env>`` (default: the system temp dir)."""
    root = Path(os.environ.get(env) or tempfile.gettempdir()) / f"tulu-{stage}"
    return root / rel.strip("/").replace("/", "__")


def download_model(store: Store, rel: str, target: Path, reporter: Reporter) -> Path:
    """``rel`` copied to ``target`` once (into a sibling, then renamed: never half there); an earlier run's
    resumable ``_checkpoints`` are not part of a model."""
    if not target.is_dir():
        reporter.log(f"downloading {store.uri(rel)} to {target}")
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        store.fs.get(store.path(rel) + "/", str(partial) + "/", recursive=True)
        shutil.rmtree(partial / CHECKPOINTS_DIR, ignore_errors=True)
        os.rename(partial, target)
    return target


def upload_checkpoint(store: Store, local: Path, rel: str, reporter: Reporter | None = None) -> None:
    """Copy a published checkpoint directory to the store, ``training_manifest.json`` last."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for path in [p for p in files if p.name != MANIFEST_FILE] + [local / MANIFEST_FILE]:
        target = store.path(rel, path.relative_to(local).as_posix())
        store.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        store.fs.put_file(str(path), target)
    if reporter is not None:
        reporter.log(f"uploaded the checkpoint to {store.uri(rel)}")


def train_where_stored(store: Store, model_rel: str, checkpoint_rel: str, work_env: str, stage: str,
                       reporter: Reporter, run: Callable[[Path, Path], R], model_name: str = "model") -> R:
    """``run(model_dir, checkpoint_dir)`` in place on a local store; on an object store in the work directory
    (``$<work_env>``: the model downloaded as ``<model_name>``, the result uploaded to ``checkpoint_rel``).
    ``run`` returns a result with a ``checkpoint_dir``."""
    if store.is_local:
        return run(Path(store.path(model_rel)), Path(store.path(checkpoint_rel)))
    work = work_dir(work_env, stage, checkpoint_rel)
    result = run(download_model(store, model_rel, work / model_name, reporter), work / "checkpoint")
    upload_checkpoint(store, result.checkpoint_dir, checkpoint_rel, reporter)  # type: ignore[attr-defined]
    return result
