"""Supervised fine-tuning in Tülu's format: `run_sft` (a config plus TRL's SFTTrainer).

What it does, in order:

1. Encodes rows with `encode_conversation` (Tülu chat template, assistant-only labels, keep-start truncation
   at ``max_length``); rows with nothing left to train on are reported and left out.
2. Fingerprints the run (code version, full config, base-model sha256, content hash of the rows, the
   caller's ``mix_hash``). If ``output_dir`` already holds a finished checkpoint with that fingerprint it is
   returned as is; if ``output_dir/_checkpoints`` holds a partial run with it, training resumes from its
   newest complete checkpoint (weights, optimizer, scheduler, RNG, data position); a partial run with
   another fingerprint is discarded.
3. Measures the held-out loss of the base model, trains, saves the final model (LoRA adapters merged in;
   the adapter itself under ``adapter/``), tokenizer with the Tülu template, config, generation config,
   ``loss_curve.png``, ``trained_row_ids.txt`` (the rows that were in at least one micro-batch: fewer than
   given when ``max_steps`` stops early) and ``training_manifest.json``, measures the held-out loss of the
   saved model (loaded back from disk), and publishes the directory atomically (``_checkpoints`` goes with
   the directory it replaces).

Resume: the Trainer's own checkpoint restores weights, optimizer, scheduler and RNG states and skips the
batches already seen; token counters and per-row counts come from ``tulu_progress.json``. On CPU in fp32 a
resumed run ends bit-identical to an uninterrupted one (tests/test_sft.py asserts max |diff| <= 1e-5).

Trainer: TRL's `SFTTrainer`, subclassed for two things TRL cannot express through its config:

- Loss reduction. ``mean`` is TRL's own: the token-level NLL summed over the micro-batch and divided by the
  number of trained tokens in the whole optimizer step (``num_items_in_batch``), so every trained token
  weighs the same whatever its micro-batch. ``sum`` is open-instruct's Tülu 3 setting: each micro-batch
  contributes the *sum* of its token losses, divided by the gradient-accumulation steps (what accelerate's
  ``backward`` does in open-instruct), i.e. the step's gradient is the mean over micro-batches of
  per-micro-batch token sums. Implemented by passing the accumulation steps as ``num_items_in_batch`` to TRL's
  loss. Logged ``loss`` is always the per-token mean, so curves of both settings compare; the optimized
  value is logged as ``objective``.
- Batching. TRL's padding-free path relies on flash-attention varlen kernels and flattens a batch into one
  row; here `SFTCollator` packs each micro-batch into rows with per-sequence ``position_ids`` from which
  transformers builds a block-diagonal causal mask for sdpa/eager (CPU) as well — exact, see
  tests/test_sft.py — and counts real versus computed tokens (packing efficiency). TRL's dataset preparation
  is skipped (``skip_prepare_dataset``) because the examples arrive tokenized with their labels.

Training never talks to the Hugging Face Hub (telemetry is disabled before TRL is imported).
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.models.base_model import weights_sha256
from tulu_pipeline.progress import NullReporter, Reporter, loss_curve_png
from tulu_pipeline.training.batch_layout import launch_world_size
from tulu_pipeline.training.batching import INFO_KEYS, SFTCollator
from tulu_pipeline.templates.lineage import template_lineage
from tulu_pipeline.templates.chat_template import (
    IGNORE_INDEX,
    apply_tulu_chat_template,
    encode_rows,
)
from tulu_pipeline.training.checkpointing import (
    library_versions,
    save_final,
    training_device,
    CHECKPOINTS_DIR,
    PROGRESS_FILE,
    RUN_FILE,
    fingerprint,
    latest_complete_checkpoint,
    mark_complete,
    prepare_run_dir,
    prune_checkpoints,
    publishing,
    read_json,
    remove_stale_siblings,
    row_ids_sha256,
    rows_content_sha256,
    trainer_arguments,
    write_json_atomic,
)
from tulu_pipeline.training.sft_config import SFTTrainingConfig

# Bump when a change to this module changes what a run with the same inputs and config produces.
SFT_CODE_VERSION = "1"
MANIFEST_FORMAT_VERSION = 1
LOSS_CURVE_FILE = "loss_curve.png"
# Row ids of the training rows the run actually trained on (in at least one micro-batch), one per line, in
# input order: with max_steps or fractional epochs this is a subset of the rows given.
TRAINED_ROWS_FILE = "trained_row_ids.txt"
# Debugging/test knob: sleep this many seconds after every optimizer step (widens the window in which the
# resume test kills the process; never set in production).
STEP_DELAY_ENV = "TULU_SFT_STEP_DELAY_S"
KEEP_CHECKPOINTS = 2


@dataclass
class SFTResult:
    """A finished SFT run: where the checkpoint is, its metrics and its manifest."""

    checkpoint_dir: Path
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    reused: bool = False  # True when output_dir already held this exact run and nothing was trained

    @property
    def resumed_from_step(self) -> int:
        return int(self.metrics.get("resumed_from_step", 0))

    @property
    def loss_curve_path(self) -> Path:
        return self.checkpoint_dir / LOSS_CURVE_FILE


# ---------------------------------------------------------------------------------------------
# token counters that survive a resume
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainingProgress:
    real_tokens: int = 0
    computed_tokens: int = 0
    prior_train_seconds: float = 0.0
    prior_save_seconds: float = 0.0
    session_start: float | None = None
    session_end: float | None = None
    session_save_seconds: float = 0.0  # writing checkpoints: not training, left out of tokens/s
    # since the last log line
    interval_nll: float = 0.0
    interval_trained_tokens: int = 0
    interval_real_tokens: int = 0
    interval_start: float | None = None
    interval_save_seconds: float = 0.0
    times_seen: list[int] = field(default_factory=list)  # per training example: micro-batches it was in

    def train_seconds(self) -> float:
        end = self.session_end if self.session_end is not None else time.perf_counter()
        running = end - self.session_start if self.session_start is not None else 0.0
        return self.prior_train_seconds + running

    def save_seconds(self) -> float:
        return self.prior_save_seconds + self.session_save_seconds

    def tokens_per_s(self) -> float | None:
        compute = self.train_seconds() - self.save_seconds()
        return self.real_tokens / compute if compute > 0 else None

    def packing_efficiency(self) -> float | None:
        return self.real_tokens / self.computed_tokens if self.computed_tokens else None

    def to_json(self) -> dict[str, Any]:
        return {"real_tokens": self.real_tokens, "computed_tokens": self.computed_tokens,
                "train_seconds": self.train_seconds(), "save_seconds": self.save_seconds(),
                "times_seen": self.times_seen}

    def restore(self, saved: dict[str, Any]) -> None:
        self.real_tokens = int(saved.get("real_tokens", 0))
        self.computed_tokens = int(saved.get("computed_tokens", 0))
        self.prior_train_seconds = float(saved.get("train_seconds", 0.0))
        self.prior_save_seconds = float(saved.get("save_seconds", 0.0))
        times_seen = saved.get("times_seen")
        if isinstance(times_seen, list) and len(times_seen) == len(self.times_seen):
            self.times_seen = [int(n) for n in times_seen]


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------
def _trainer_classes():
    """TuluSFTTrainer and its callback, built on first use (keeps importing this module cheap)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class TuluSFTTrainer(SFTTrainer):
        """SFTTrainer with open-instruct's ``sum`` reduction, packing statistics and marked checkpoints."""

        def __init__(self, *args: Any, loss_reduction: str, progress: TrainingProgress,
                     reporter: Reporter, **kwargs: Any):
            self.loss_reduction = loss_reduction
            self.progress = progress
            self.reporter = reporter
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            info = {key: inputs.pop(key) for key in INFO_KEYS if key in inputs}
            training = self.model.training
            # TRL multiplies the loss by the data-parallel size when it gets num_items_in_batch (a global count)
            dp_size = self.accelerator.num_processes // self.get_tp_size() if self.args.average_tokens_across_devices else 1
            if training and self.loss_reduction == "sum":
                # TRL divides the micro-batch's token-loss sum by num_items_in_batch: passing the accumulation
                # steps (times dp_size, which TRL multiplies back) gives open-instruct's sum reduction.
                num_items_in_batch = torch.tensor(float(self.current_gradient_accumulation_steps * dp_size))
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if training:
                loss = result[0] if return_outputs else result
                trained = int((inputs["labels"][..., 1:] != IGNORE_INDEX).sum())
                if num_items_in_batch is not None:
                    nll = float(loss.detach()) * float(num_items_in_batch) / dp_size
                else:
                    nll = float(loss.detach()) * max(trained, 1)
                progress = self.progress
                progress.interval_nll += nll
                progress.interval_trained_tokens += trained
                if "real_tokens" in info:
                    real = int(info["real_tokens"])
                    progress.real_tokens += real
                    progress.interval_real_tokens += real
                    progress.computed_tokens += int(info["computed_tokens"])
                if "example_index" in info:
                    for index in info["example_index"].tolist():
                        progress.times_seen[index] += 1
            return result

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            progress = self.progress
            if "loss" in logs and progress.interval_trained_tokens:
                now = time.perf_counter()
                elapsed = now - (progress.interval_start or progress.session_start or now)
                elapsed -= progress.interval_save_seconds
                logs["objective"] = logs["loss"]
                logs["token_loss"] = progress.interval_nll / progress.interval_trained_tokens
                logs["tokens_per_s"] = progress.interval_real_tokens / elapsed if elapsed > 0 else 0.0
                logs["tokens"] = progress.real_tokens
                logs["packing_efficiency"] = progress.packing_efficiency() or 0.0
                progress.interval_nll, progress.interval_trained_tokens, progress.interval_real_tokens = 0.0, 0, 0
                progress.interval_start, progress.interval_save_seconds = now, 0.0
            super().log(logs, start_time)

        def _save_checkpoint(self, model, trial):
            if self.state.max_steps and self.state.global_step >= self.state.max_steps:
                return  # the last step: the final model is published right after, a checkpoint would be waste
            started = time.perf_counter()
            super()._save_checkpoint(model, trial)
            checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            seconds = time.perf_counter() - started
            self.progress.session_save_seconds += seconds
            self.progress.interval_save_seconds += seconds
            if self.is_world_process_zero():  # one writer per run directory under torchrun
                mark_complete(checkpoint, {"step": self.state.global_step, **self.progress.to_json()})
                prune_checkpoints(Path(self.args.output_dir), keep=KEEP_CHECKPOINTS)
            self.reporter.log(f"checkpoint saved at step {self.state.global_step} ({seconds:.1f}s)")

    class ReportingCallback(TrainerCallback):
        """Forwards each training log line to the reporter; optionally slows steps down (tests)."""

        def __init__(self, reporter: Reporter, progress: TrainingProgress):
            self.reporter = reporter
            self.progress = progress
            self.delay = float(os.environ.get(STEP_DELAY_ENV) or 0)

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress.session_start = self.progress.interval_start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.progress.session_end = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.delay > 0:
                time.sleep(self.delay)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "token_loss" not in logs:
                return
            metrics = {
                "loss": logs["token_loss"],
                "objective": logs.get("objective"),
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_s": logs.get("tokens_per_s"),
                "tokens": logs.get("tokens"),
                "packing_efficiency": logs.get("packing_efficiency"),
                "epoch": logs.get("epoch"),
            }
            metrics = {k: (float(v) if isinstance(v, int | float) else v) for k, v in metrics.items()}
            self.reporter.log_metrics(state.global_step, metrics)

    return TuluSFTTrainer, ReportingCallback


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _dist():
    """torch.distributed when a multi-process run (torchrun) initialized it, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


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


def _gather_progress(progress: TrainingProgress) -> None:
    """Sum what every rank saw (rows, tokens) so rank 0 publishes the whole run's counts."""
    dist = _dist()
    if dist is None:
        return
    import torch

    device = training_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = torch.tensor([*progress.times_seen, progress.real_tokens, progress.computed_tokens],
                          dtype=torch.long, device=device)
    dist.all_reduce(counts)
    values = counts.tolist()
    progress.times_seen = values[:-2]
    progress.real_tokens, progress.computed_tokens = values[-2], values[-1]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX): there bf16 autocast is ~2x
    faster than fp32; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_bf16(config: SFTTrainingConfig) -> bool:
    """Whether a run with ``config`` trains under bf16 autocast on this machine."""
    import torch

    if config.bf16 != "auto":
        return bool(config.bf16)
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


def _attn_implementation(config: SFTTrainingConfig) -> str:
    if config.attn_implementation != "auto":
        return config.attn_implementation
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def heldout_loss(model: Any, examples: Sequence[dict[str, list[int]]], pad_token_id: int,
                 batch_size: int = 8, bf16: bool = False) -> float | None:
    """Mean NLL per trained (assistant) token of ``examples`` under ``model``; None without examples.

    ``bf16`` runs the forward pass under bf16 autocast, like training (the loss itself is taken in fp32).
    """
    import torch

    if not examples:
        return None
    collate = SFTCollator(pad_token_id=pad_token_id, packing=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
            targets = batch["labels"][:, 1:].to(device)
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(losses)
            count += int((targets != IGNORE_INDEX).sum())
            del logits
    model.train(was_training)
    return total / count if count else None


def load_training_model(model_dir: str | Path, config: SFTTrainingConfig) -> Any:
    """The model to fine-tune: fp32 weights, the configured attention kernel, no KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=_attn_implementation(config))
    # Packed rows rely on transformers deriving sequence boundaries from position_ids, which it does
    # only without a KV cache.
    model.config.use_cache = False
    return model


def _result_from_manifest(output_dir: Path, manifest: dict[str, Any], reused: bool) -> SFTResult:
    return SFTResult(checkpoint_dir=output_dir, metrics=dict(manifest.get("metrics", {})), manifest=manifest,
                     reused=reused)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run_sft(
    rows: Sequence[dict[str, Any]],
    heldout: Sequence[dict[str, Any]],
    base_model_dir: str | Path,
    output_dir: str | Path,
    config: SFTTrainingConfig | dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> SFTResult:
    """Fine-tune the model in ``base_model_dir`` on ``rows`` (schema rows with ``row_id``/``messages``).

    ``heldout`` rows are never trained on; their per-token loss is measured before and after. The result
    is published at ``output_dir`` (see the module docstring for layout, resume and reduction semantics).
    ``manifest_extra`` (e.g. ``mix_hash``, ``row_id_list_hash``, the mix version) is copied into
    ``training_manifest.json``; its ``mix_hash`` is part of the run fingerprint, other keys are not.
    """
    wall_start = time.perf_counter()
    config = config if isinstance(config, SFTTrainingConfig) else SFTTrainingConfig.model_validate(config or {})
    reporter = reporter if reporter is not None else NullReporter()
    base_model_dir = Path(base_model_dir).resolve()
    output_dir = Path(output_dir).resolve()
    manifest_extra = dict(manifest_extra or {})
    # The config states the global batch; this process trains its share (an indivisible batch stops here).
    layout = config.batch_layout(launch_world_size(), manifest_extra.get("preset"))
    process_config = config.for_world_size(layout.world_size, manifest_extra.get("preset"))

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    tokenizer = apply_tulu_chat_template(AutoTokenizer.from_pretrained(base_model_dir))
    train = encode_rows(rows, tokenizer, config.max_length)
    held = encode_rows(heldout, tokenizer, config.max_length)
    if not train.examples:
        raise ValueError(f"no trainable rows among {len(rows)} (each needs an assistant token within "
                         f"max_length={config.max_length})")
    if train.dropped_row_ids:
        reporter.log(f"left out {len(train.dropped_row_ids)} training rows with no assistant token within "
                     f"max_length={config.max_length}: {train.dropped_row_ids[:10]}")
    if train.truncated_row_ids:
        reporter.log(f"truncated {len(train.truncated_row_ids)} training rows to max_length={config.max_length}")

    base_sha = weights_sha256(base_model_dir)
    identity = {
        "sft_code_version": SFT_CODE_VERSION,
        "config": config.model_dump(mode="json"),
        "base_model_sha256": base_sha,
        "train_rows_sha256": rows_content_sha256(rows),
        "heldout_rows_sha256": rows_content_sha256(heldout),
        "mix_hash": manifest_extra.get("mix_hash"),
    }
    run_fingerprint = fingerprint(identity)

    existing = read_json(output_dir / MANIFEST_FILE)
    if existing is not None and existing.get("fingerprint") == run_fingerprint:
        reporter.log(f"{output_dir} already holds this run (fingerprint {run_fingerprint[:12]}); not retraining")
        return _result_from_manifest(output_dir, existing, reused=True)

    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 owns the run directory
        for stale in remove_stale_siblings(output_dir):
            reporter.log(f"removed {stale.name}, left behind by an interrupted run")
        root, resume_from = prepare_run_dir(output_dir, run_fingerprint, identity, reporter.log)
    else:
        root, resume_from = await_run_dir(output_dir, run_fingerprint)
    progress = TrainingProgress(times_seen=[0] * len(train.examples))
    resumed_from_step = 0
    if resume_from is not None:
        saved = read_json(resume_from / PROGRESS_FILE) or {}
        progress.restore(saved)
        resumed_from_step = int(saved.get("step", 0))
        reporter.log(f"resuming from {resume_from.name} (step {resumed_from_step})")

    transformers.set_seed(config.seed)
    device = training_device()
    model = load_training_model(base_model_dir, config).to(device)
    use_bf16 = resolve_bf16(config)
    heldout_before = heldout_loss(model, held.examples, tokenizer.pad_token_id, config.eval_batch_size, use_bf16)
    if heldout_before is not None:
        reporter.log(f"held-out loss of the base model: {heldout_before:.4f} ({len(held.examples)} rows)")

    attn = model.config._attn_implementation
    collator = SFTCollator(
        pad_token_id=tokenizer.pad_token_id,
        packing=config.packing,
        # flash-attention reads packed boundaries only from a single row; dense-mask kernels get rows
        # capped at max_length so attention cost stays bounded.
        max_row_tokens=None if attn.startswith("flash") else config.max_length,
    )
    args = SFTConfig(
        **trainer_arguments(process_config, root, use_bf16, device),
        max_length=None,
        packing=False,
        padding_free=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    peft_config = None
    if config.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                 target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM")

    trainer_cls, callback_cls = _trainer_classes()
    trainer = trainer_cls(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=Dataset.from_list([{**ex, "example_index": i} for i, ex in enumerate(train.examples)]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback_cls(reporter, progress)],
        loss_reduction=config.loss_reduction,
        progress=progress,
        reporter=reporter,
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    reporter.log(f"training {len(train.examples)} rows ({train.num_tokens} tokens, {train.num_trained_tokens} "
                 f"trained) for {config.num_epochs} epochs, global batch {layout.global_batch_size} = {layout.world_size} "
                 f"processes x {layout.per_device_batch_size} x {layout.gradient_accumulation_steps} accumulation, "
                 f"{trainable} trainable parameters, attention {attn}, bf16={use_bf16}, device {device}")
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    _gather_progress(progress)
    if not trainer.is_world_process_zero():  # rank 0 publishes; the other ranks' work is in its weights
        return SFTResult(checkpoint_dir=output_dir, metrics={"steps": int(trainer.state.global_step)}, manifest={})
    train_seconds = progress.train_seconds()
    steps = int(trainer.state.global_step)
    curve = [{"step": int(e["step"]), "loss": float(e["token_loss"]), "learning_rate": float(e.get("learning_rate", 0.0))}
             for e in trainer.state.log_history if "token_loss" in e]

    with publishing(output_dir) as staging:
        save_final(trainer, tokenizer, staging, lora=config.lora is not None)
        del trainer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        final_model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).to(device)
        heldout_after = heldout_loss(final_model, held.examples, tokenizer.pad_token_id, config.eval_batch_size,
                                     use_bf16)
        del final_model

        metrics = {
            "train_loss": curve,
            "initial_loss": curve[0]["loss"] if curve else None,
            "final_loss": curve[-1]["loss"] if curve else None,
            "heldout_loss_before": heldout_before,
            "heldout_loss_after": heldout_after,
            "tokens": progress.real_tokens,
            "computed_tokens": progress.computed_tokens,
            "tokens_per_s": progress.tokens_per_s(),
            "packing_efficiency": progress.packing_efficiency(),
            "steps": steps,
            "train_s": train_seconds,
            "checkpoint_save_s": progress.save_seconds(),
            "wall_s": time.perf_counter() - wall_start,
            "resumed_from_step": resumed_from_step,
            "train_rows": len(train.examples),
            "heldout_rows": len(held.examples),
            "dropped_rows": len(train.dropped_row_ids),
            "truncated_rows": len(train.truncated_row_ids),
            "trained_tokens_per_epoch": train.num_trained_tokens,
        }
        seen_ids = [row_id for row_id, n in zip(train.row_ids, progress.times_seen) if n > 0]
        metrics["trained_rows_seen"] = len(seen_ids)
        metrics["row_passes"] = sum(progress.times_seen)
        (staging / TRAINED_ROWS_FILE).write_text("".join(f"{row_id}\n" for row_id in seen_ids), encoding="utf-8")
        (staging / LOSS_CURVE_FILE).write_bytes(loss_curve_png(curve, heldout_before, heldout_after))
        clashes = sorted(set(manifest_extra) & {"fingerprint", "metrics", "config"})
        if clashes:
            raise ValueError(f"manifest_extra may not set {clashes}")
        manifest = {
            **manifest_extra,
            "format_version": MANIFEST_FORMAT_VERSION,
            "sft_code_version": SFT_CODE_VERSION,
            "fingerprint": run_fingerprint,
            "config": config.model_dump(mode="json"),
            "seed": config.seed,
            "chat_template": "tulu",
            "template_lineage": template_lineage(tokenizer),
            "base_model": {"path": str(base_model_dir), "weights_sha256": base_sha},
            "base_model_sha256": base_sha,
            # the trainable rows given (after dropping rows with nothing to train on), and those trained on
            "train_row_ids_sha256": row_ids_sha256(train.row_ids),
            "trained_row_ids_file": TRAINED_ROWS_FILE,
            "trained_row_ids_sha256": row_ids_sha256(seen_ids),
            "train_rows_sha256": identity["train_rows_sha256"],
            "heldout_rows_sha256": identity["heldout_rows_sha256"],
            "dropped_row_ids": train.dropped_row_ids,
            "batch": layout.manifest(),
            "versions": library_versions("trl", "peft"),
            "metrics": metrics,
        }
        write_json_atomic(staging / MANIFEST_FILE, manifest)  # last: a directory with it is complete
    reporter.log(f"published {output_dir}: loss {metrics['initial_loss']:.4f} -> {metrics['final_loss']:.4f}, "
                 f"held-out {_fmt(heldout_before)} -> {_fmt(heldout_after)}, {steps} steps in {train_seconds:.1f}s")
    return SFTResult(checkpoint_dir=output_dir, metrics=metrics, manifest=manifest)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def load_manifest(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The ``training_manifest.json`` of a published checkpoint."""
    return json.loads((Path(checkpoint_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
