"""Resumable runs and atomic publication of a finished checkpoint.

While a run trains, ``<output_dir>/_checkpoints/`` holds:

- ``run.json``: the run's fingerprint (code version, full config, base-model sha256, content hash of the
  training and held-out rows, the caller's mix hash) and what it was computed from;
- ``checkpoint-<step>/``: transformers' Trainer checkpoints (weights, optimizer, scheduler, RNG states,
  trainer state with the log history; the data position is the step, from which the Trainer skips the
  batches already seen), each completed by ``tulu_progress.json`` (token counters, training seconds),
  written last and atomically. A checkpoint without it was cut short (e.g. kill -9 while saving) and is
  never resumed from.

A later run with the same ``output_dir`` and the same fingerprint resumes from the newest complete
checkpoint; a different fingerprint means different inputs, so the partial run is discarded (and says so).
The finished checkpoint is built in a temporary sibling directory and swapped in for ``output_dir`` by
rename, which also removes ``_checkpoints``. `tulu_pipeline.training.run.TrainingRun` drives these steps for
every trainer; the helpers at the end load and save the models they train (dtype, attention kernel, bf16).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tulu_pipeline.hashing import canonical_json, sha256_text
from tulu_pipeline.storage import swap_directory

CHECKPOINTS_DIR = "_checkpoints"
RUN_FILE = "run.json"
PROGRESS_FILE = "tulu_progress.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def row_ids_sha256(row_ids: Iterable[str]) -> str:
    """sha256 of the row ids in order, newline-joined."""
    return sha256_text("\n".join(row_ids))


def rows_content_sha256(rows: Iterable[dict[str, Any]]) -> str:
    """sha256 over each row's id and messages, in order: changes whenever what is trained on changes."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(canonical_json([row.get("row_id"), row.get("messages")]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    return sha256_text(canonical_json(parts))


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temporary sibling, fsync it, rename it into place (parent folders are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def list_checkpoints(root: Path) -> list[tuple[int, Path, bool]]:
    """``(step, path, complete)`` of every checkpoint directory under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = checkpoint_step(path)
        if step is not None:
            found.append((step, path, read_json(path / PROGRESS_FILE) is not None))
    return sorted(found)


def latest_complete_checkpoint(root: Path) -> Path | None:
    complete = [path for _step, path, ok in list_checkpoints(root) if ok]
    return complete[-1] if complete else None


def mark_complete(checkpoint_dir: Path, progress: dict[str, Any]) -> None:
    """Record the run's counters in a finished Trainer checkpoint; from now on it can be resumed from."""
    write_json_atomic(checkpoint_dir / PROGRESS_FILE, progress)


def prune_checkpoints(root: Path, keep: int = 2) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and incomplete ones older than them."""
    entries = list_checkpoints(root)
    complete = [step for step, _path, ok in entries if ok]
    kept = set(complete[-keep:])
    newest = complete[-1] if complete else None
    for step, path, ok in entries:
        stale_partial = not ok and newest is not None and step <= newest
        if (ok and step not in kept) or stale_partial:
            shutil.rmtree(path, ignore_errors=True)


def prepare_run_dir(
    output_dir: Path, run_fingerprint: str, description: dict[str, Any], log: Callable[[str], None]
) -> tuple[Path, Path | None]:
    """The ``_checkpoints`` directory for this run and the checkpoint to resume from (None: start fresh)."""
    root = output_dir / CHECKPOINTS_DIR
    recorded = read_json(root / RUN_FILE)
    if root.exists() and (recorded is None or recorded.get("fingerprint") != run_fingerprint):
        reason = "has no run record" if recorded is None else "was for different inputs or config"
        log(f"discarding the partial run in {root}: it {reason} (fingerprint "
            f"{(recorded or {}).get('fingerprint', '-')[:12]} != {run_fingerprint[:12]}); starting fresh")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    if recorded is None or recorded.get("fingerprint") != run_fingerprint:
        write_json_atomic(root / RUN_FILE, {"fingerprint": run_fingerprint, **description})
        return root, None
    for step, path, ok in list_checkpoints(root):
        if not ok:
            log(f"ignoring incomplete checkpoint {path.name} (interrupted while saving)")
            shutil.rmtree(path, ignore_errors=True)
    return root, latest_complete_checkpoint(root)


def remove_stale_siblings(output_dir: Path) -> list[Path]:
    """Delete temporary siblings a killed run left behind (``.<name>.tmp-*``, ``.<name>.old-*``).

    Assumes one writer per ``output_dir`` (Dagster runs one materialization of an asset at a time).
    """
    if not output_dir.parent.is_dir():
        return []
    stale = [p for p in output_dir.parent.iterdir()
             if p.name.startswith((f".{output_dir.name}.tmp-", f".{output_dir.name}.old-"))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def new_publish_dir(output_dir: Path) -> Path:
    """An empty temporary sibling of ``output_dir`` (same filesystem, so the final rename is atomic)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))


def publish_dir(new: Path, output_dir: Path) -> None:
    """Swap the finished ``new`` directory in for ``output_dir`` (which may hold ``_checkpoints``)."""
    new.chmod(0o755)
    swap_directory(new, output_dir)


@contextmanager
def publishing(output_dir: Path) -> Iterator[Path]:
    """A staging directory beside ``output_dir``, swapped in for it when the block ends cleanly and removed
    when it raises: write the manifest last inside the block, so a published directory is always complete."""
    staging = new_publish_dir(output_dir)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir(staging, output_dir)


def trainer_arguments(config: Any, output_dir: Path, bf16: bool, device: Any) -> dict[str, Any]:
    """The `transformers.TrainingArguments` every trainer here shares: its config's optimizer and schedule
    fields, resumable step checkpoints in ``output_dir`` (pruned by the trainers once complete), no
    evaluation or reporting integrations, deterministic single-process data loading."""
    return dict(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm or 0.0,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        fp16=False,
        activation_checkpointing=config.gradient_checkpointing,
        use_cpu=device.type == "cpu",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=None,  # pruned after each checkpoint is marked complete
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def training_device() -> Any:
    """This process's device: under torchrun each rank takes the GPU of its LOCAL_RANK; CPU without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def library_versions(*packages: str) -> dict[str, str]:
    """Python, torch and transformers versions, and those of ``packages`` (for a checkpoint's manifest)."""
    import importlib

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", *packages):
        versions[name] = importlib.import_module(name).__version__
    return versions


def save_final(trainer: Any, tokenizer: Any, target: Path, lora: bool, model: Any | None = None) -> None:
    """Save a transformers Trainer's model (LoRA merged, its adapter kept in ``adapter/``) and tokenizer, with
    generation set up to stop at the tokenizer's EOS. ``model``: the one to save instead (a sharded run's
    `sharding.gather_unsharded` model)."""
    model = model if model is not None else trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        model.save_pretrained(target / "adapter")  # the adapter alone, for reference
        model = model.merge_and_unload()
    save_model(model, tokenizer, target)


def save_model(model: Any, tokenizer: Any, target: Path) -> None:
    """Save a finished model (KV cache back on, generation stopping at the tokenizer's EOS) and its tokenizer."""
    model.config.use_cache = True
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX): there bf16 autocast is ~2x
    faster than fp32; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_bf16(config: Any) -> bool:
    """Whether a run with ``config`` (its ``bf16``: True, False or "auto") trains under bf16 autocast here; with
    FSDP sharding, whether ``sharding.mixed_precision`` is bf16."""
    import torch

    sharding = getattr(config, "sharding", None)
    if sharding is not None and sharding.strategy == "fsdp":
        # FSDP's mixed-precision policy is the one switch: a bf16 setting that contradicts it is an error
        wanted = sharding.mixed_precision == "bf16"
        if config.bf16 != "auto" and bool(config.bf16) != wanted:
            raise ValueError(f"bf16={config.bf16} contradicts sharding.mixed_precision={sharding.mixed_precision!r}; "
                             "with strategy 'fsdp' set bf16='auto' or make the two agree")
        return wanted
    if config.bf16 != "auto":
        return bool(config.bf16)
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


def attn_implementation(config: Any) -> str:
    """The attention kernel of ``config.attn_implementation``: "auto" is flash-attention 2 on a GPU that has
    it, sdpa elsewhere."""
    if config.attn_implementation != "auto":
        return config.attn_implementation
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_training_model(model_dir: str | Path, config: Any) -> Any:
    """The model to fine-tune: fp32 weights, the configured attention kernel, no KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn_implementation(config))
    # Packed rows rely on transformers deriving sequence boundaries from position_ids, which it does
    # only without a KV cache.
    model.config.use_cache = False
    return model
