"""Supervised fine-tuning in Tülu's format: `run_sft` (a config plus TRL's SFTTrainer).

What it does, in order:

1. Encodes rows with `encode_conversation` (Tülu chat template, assistant-only labels, keep-start truncation
   at ``max_length``); rows with nothing left to train on are reported and left out.
2. Fingerprints the run (code version, full config, base-model sha256, content hash of the rows, the
   caller's ``mix_hash``) with the shared lifecycle, `tulu_pipeline.training.run.TrainingRun`. If ``output_dir``
   already holds a finished checkpoint with that fingerprint it is returned as is; if
   ``output_dir/_checkpoints`` holds a partial run with it, training resumes from its newest complete
   checkpoint (weights, optimizer, scheduler, RNG, data position); a partial run with another fingerprint is
   discarded.
3. Measures the held-out loss of the base model, trains, saves the final model (LoRA adapters merged in;
   the adapter itself under ``adapter/``), tokenizer with the Tülu template, config, generation config,
   ``loss_curve.png``, ``trained_row_ids.txt`` (the rows that were in at least one micro-batch: fewer than
   given when ``max_steps`` stops early) and ``training_manifest.json``, measures the held-out loss of the
   saved model (loaded back from disk), and publishes the directory atomically (``_checkpoints`` goes with
   the directory it replaces). ``heldout_effect`` pairs the two per held-out row (bootstrap interval and sign
   test of the change in each row's mean NLL per trained token).

Resume: the Trainer's own checkpoint restores weights, optimizer, scheduler and RNG states and skips the
batches already seen; token counters and per-row counts come from ``tulu_progress.json``. On CPU in fp32 a
resumed run ends bit-identical to an uninterrupted one (tests/test_sft.py asserts max |diff| <= 1e-5).

Trainer: `tulu_pipeline.training.hf_trainers.TuluSFTTrainer`, TRL's `SFTTrainer` subclassed for two things
TRL cannot express through its config:

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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tulu_pipeline.evaluation.paired import paired_delta
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.models.base_model import weights_sha256
from tulu_pipeline.progress import NullReporter, Reporter, loss_curve_png
from tulu_pipeline.templates.chat_template import IGNORE_INDEX, apply_tulu_chat_template, encode_rows
from tulu_pipeline.training.batch_layout import launch_world_size
from tulu_pipeline.training.batching import SFTCollator
from tulu_pipeline.training.checkpointing import (
    load_training_model,
    resolve_bf16,
    row_ids_sha256,
    rows_content_sha256,
    save_final,
    trainer_arguments,
    training_device,
)
from tulu_pipeline.training.run import TrainingResult, TrainingRun, all_reduce_counts
from tulu_pipeline.training.sft_config import SFTTrainingConfig
from tulu_pipeline.training.sharding import (
    gather_unsharded,
    keep_fp32_gradient_reduction,
    shard_report,
    trainer_fsdp_arguments,
)

# Bump when a change to this module changes what a run with the same inputs and config produces.
SFT_CODE_VERSION = "1"
LOSS_CURVE_FILE = "loss_curve.png"
# Row ids of the training rows the run actually trained on (in at least one micro-batch), one per line, in
# input order: with max_steps or fractional epochs this is a subset of the rows given.
TRAINED_ROWS_FILE = "trained_row_ids.txt"
# Debugging/test knob: sleep this many seconds after every optimizer step (widens the window in which the
# resume test kills the process; never set in production).
STEP_DELAY_ENV = "TULU_SFT_STEP_DELAY_S"


@dataclass
class SFTResult(TrainingResult):
    """A finished SFT run: where the checkpoint is, its metrics and its manifest."""

    @property
    def loss_curve_path(self) -> Path:
        return self.checkpoint_dir / LOSS_CURVE_FILE


@dataclass
class HeldoutLoss:
    """NLL of held-out examples: ``mean`` per trained token over all of them (None without trained tokens), and
    per example (in the order given) its ``row_losses`` (mean NLL per trained token) and ``row_tokens``."""

    mean: float | None
    row_losses: list[float]
    row_tokens: list[int]

    def by_row(self, row_ids: Sequence[str]) -> dict[str, float]:
        """``{row_id: mean NLL}`` (``row_ids`` parallel to the examples, e.g. `EncodedRows.row_ids`)."""
        if len(row_ids) != len(self.row_losses):
            raise ValueError(f"{len(row_ids)} row ids for {len(self.row_losses)} held-out examples")
        return dict(zip(row_ids, self.row_losses))


def heldout_loss(model: Any, examples: Sequence[dict[str, list[int]]], pad_token_id: int,
                 batch_size: int = 8, bf16: bool = False) -> float | None:
    """Mean NLL per trained (assistant) token of ``examples`` under ``model``; None without examples.

    ``bf16`` runs the forward pass under bf16 autocast, like training (the loss itself is taken in fp32).
    """
    return heldout_losses(model, examples, pad_token_id, batch_size, bf16).mean


def heldout_losses(model: Any, examples: Sequence[dict[str, list[int]]], pad_token_id: int,
                   batch_size: int = 8, bf16: bool = False) -> HeldoutLoss:
    """`heldout_loss` and each example's own mean NLL per trained token, from the same forward passes."""
    import torch

    if not examples:
        return HeldoutLoss(None, [], [])
    collate = SFTCollator(pad_token_id=pad_token_id, packing=False)  # one example per row
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: list[float] = []
    counts: list[int] = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
            targets = batch["labels"][:, 1:].to(device)
            token_losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)  # 0 where ignored
            # per-row sums in float64: the rows' token-weighted mean is then the aggregate to rounding
            sums += token_losses.double().sum(dim=1).tolist()
            counts += (targets != IGNORE_INDEX).sum(dim=1).tolist()
            del logits
    model.train(was_training)
    total, count = math.fsum(sums), sum(counts)
    return HeldoutLoss(total / count if count else None,
                       [s / n if n else math.nan for s, n in zip(sums, counts)], counts)


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
    manifest_extra = dict(manifest_extra or {})
    # The config states the global batch; this process trains its share (an indivisible batch stops here).
    layout = config.batch_layout(launch_world_size(), manifest_extra.get("preset"))
    sharded = config.sharding.strategy == "fsdp"
    if sharded and config.lora is not None:
        raise ValueError("sharding.strategy='fsdp' with lora: LoRA trains a few adapters, shard only full fine-tuning")
    process_config = config.for_world_size(layout.world_size, manifest_extra.get("preset"))

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from tulu_pipeline.training.hf_trainers import SFTReportingCallback, TrainingProgress, TuluSFTTrainer

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
    run = TrainingRun("sft", SFT_CODE_VERSION, config, {
        "base_model_sha256": base_sha,
        "train_rows_sha256": rows_content_sha256(rows),
        "heldout_rows_sha256": rows_content_sha256(heldout),
        "mix_hash": manifest_extra.get("mix_hash"),
    }, output_dir, reporter, manifest_extra)
    if (finished := run.finished()) is not None:
        return SFTResult(**vars(finished))
    resume_from = run.prepare()
    progress = TrainingProgress(times_seen=[0] * len(train.examples))
    progress.restore(run.saved_progress)

    transformers.set_seed(config.seed)
    device = training_device()
    model = load_training_model(base_model_dir, config).to(device)
    use_bf16 = resolve_bf16(config)
    before = heldout_losses(model, held.examples, tokenizer.pad_token_id, config.eval_batch_size, use_bf16)
    heldout_before = before.mean
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
        **{**trainer_arguments(process_config, run.root, use_bf16, device),
           **trainer_fsdp_arguments(config.sharding, model, config.gradient_checkpointing)},
        max_length=None,
        packing=False,
        padding_free=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    keep_fp32_gradient_reduction(args)
    peft_config = None
    if config.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                 target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM")

    trainer = TuluSFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=Dataset.from_list([{**ex, "example_index": i} for i, ex in enumerate(train.examples)]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[SFTReportingCallback(reporter, progress, float(os.environ.get(STEP_DELAY_ENV) or 0))],
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
    # rank 0 publishes what every rank saw (rows, tokens); the other ranks' work is in its weights
    *progress.times_seen, progress.real_tokens, progress.computed_tokens = all_reduce_counts(
        [*progress.times_seen, progress.real_tokens, progress.computed_tokens])
    # collectives: what each rank held, and the full weights gathered to rank 0 for publication
    shards = shard_report(trainer.model, trainer.optimizer) if sharded else {}
    unsharded = gather_unsharded(trainer.model) if sharded else None
    if not run.is_publisher:
        return SFTResult(run.output_dir, {"steps": int(trainer.state.global_step)}, {})
    train_seconds = progress.train_seconds()
    steps = int(trainer.state.global_step)
    curve = [{"step": int(e["step"]), "loss": float(e["token_loss"]), "learning_rate": float(e.get("learning_rate", 0.0))}
             for e in trainer.state.log_history if "token_loss" in e]

    with run.publishing() as staging:
        save_final(trainer, tokenizer, staging, lora=config.lora is not None, model=unsharded)
        del trainer, model, unsharded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        final_model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).to(device)
        after = heldout_losses(final_model, held.examples, tokenizer.pad_token_id, config.eval_batch_size,
                               use_bf16)
        heldout_after = after.mean
        del final_model

        metrics = {
            "train_loss": curve,
            "initial_loss": curve[0]["loss"] if curve else None,
            "final_loss": curve[-1]["loss"] if curve else None,
            "heldout_loss_before": heldout_before,
            "heldout_loss_after": heldout_after,
            # paired over the held-out rows (after − before per row: negative = the loss went down)
            "heldout_effect": {"loss": paired_delta(after.by_row(held.row_ids), before.by_row(held.row_ids),
                                                    seed=config.seed)},
            "tokens": progress.real_tokens,
            "computed_tokens": progress.computed_tokens,
            "tokens_per_s": progress.tokens_per_s(),
            "packing_efficiency": progress.packing_efficiency(),
            "steps": steps,
            "train_s": train_seconds,
            "checkpoint_save_s": progress.save_seconds(),
            "wall_s": time.perf_counter() - wall_start,
            "resumed_from_step": run.resumed_from_step,
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
        manifest = run.manifest(
            tokenizer=tokenizer, batch=layout.manifest(), metrics=metrics, versions=("trl", "peft"),
            sharding={**config.sharding.model_dump(mode="json"), **shards},
            base_model={"path": str(base_model_dir), "weights_sha256": base_sha},
            base_model_sha256=base_sha,
            # the trainable rows given (after dropping rows with nothing to train on), and those trained on
            train_row_ids_sha256=row_ids_sha256(train.row_ids),
            trained_row_ids_file=TRAINED_ROWS_FILE,
            trained_row_ids_sha256=row_ids_sha256(seen_ids),
            train_rows_sha256=run.identity["train_rows_sha256"],
            heldout_rows_sha256=run.identity["heldout_rows_sha256"],
            dropped_row_ids=train.dropped_row_ids,
        )
        run.write_manifest(staging, manifest)
    reporter.log(f"published {run.output_dir}: loss {metrics['initial_loss']:.4f} -> {metrics['final_loss']:.4f}, "
                 f"held-out {_fmt(heldout_before)} -> {_fmt(heldout_after)}, {steps} steps in {train_seconds:.1f}s")
    return SFTResult(run.output_dir, metrics, manifest)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def load_manifest(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The ``training_manifest.json`` of a published checkpoint."""
    return json.loads((Path(checkpoint_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
