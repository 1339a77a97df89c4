"""Direct preference optimization in Tülu's format: `run_dpo` (a config plus `TuluDPOTrainer`).

What it does, in order:

1. Encodes each pair (`tulu_pipeline.training.dpo_pairs.encode_pairs`): the prompt plus ``chosen`` /
   ``rejected`` as the final assistant turn through the Tülu template, labels on that response only; a pair with
   no response token within ``max_length`` is left out with its reason.
2. Reference log-probs (`tulu_pipeline.training.dpo_reference`): computed once by the caller as the
   ``reference_logprobs`` dataset and handed to `run_dpo`, which then never runs the reference model. Without
   them, or scored in another dtype than the run trains in, `run_dpo` computes them first from the starting
   weights, which *are* the reference.
3. The lifecycle (`tulu_pipeline.training.run.TrainingRun`): fingerprints the run (code version, config, starting
   weights' sha256, pair contents, the reference numbers, the caller's ``pairs_version``), reuses a finished
   checkpoint with that fingerprint, resumes a partial one, trains, and publishes the directory atomically with
   ``training_manifest.json``, ``loss_curve.png`` and ``trained_pair_ids.txt``.
4. Held-out metrics (pairs the caller marks ``heldout``), before (the reference itself) and after: the
   implicit-reward accuracy and mean margin, the DPO loss, and the policy's *length-normalized preference
   accuracy* (mean log-prob per token of chosen > rejected), which needs no reference and so is meaningful
   for the SFT checkpoint too; and their paired per-pair change (``heldout_effect``: bootstrap interval and sign
   test of after − before on the same pairs).

Trainer: `tulu_pipeline.training.hf_trainers.TuluDPOTrainer`, a `transformers.Trainer` subclass whose
``compute_loss`` is `preference_loss` (`tulu_pipeline.training.dpo_losses`), not TRL's `DPOTrainer`. Why: TRL 1.16
has ``sigmoid`` and ``sigmoid_norm`` (= ``dpo_norm``) but no SimPO, tokenizes pairs itself (our labels come from
the project's Tülu template, token for token as in SFT), and caches reference log-probs in its own dataset cache
rather than reading them from our ``reference_logprobs`` asset. The Trainer still gives what the SFT stage relies
on: optimizer/scheduler, gradient accumulation, bf16 autocast and resumable checkpoints with RNG and data
position. Each micro-batch concatenates its chosen and rejected sequences in one padded forward pass
(open-instruct's ``concatenated_forward``); the loss is the mean over pairs, averaged over accumulation steps.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tulu_pipeline.evaluation.paired import paired_delta
from tulu_pipeline.models.base_model import weights_sha256
from tulu_pipeline.plots import dpo_curve_png
from tulu_pipeline.progress import NullReporter, Reporter
from tulu_pipeline.training.batch_layout import launch_world_size
from tulu_pipeline.training.checkpointing import (
    resolve_bf16,
    row_ids_sha256,
    save_final,
    trainer_arguments,
    training_device,
)
from tulu_pipeline.training.dpo_config import DPOTrainingConfig
from tulu_pipeline.training.dpo_losses import preference_loss
from tulu_pipeline.training.dpo_pairs import (
    NO_RESPONSE_TOKENS,
    DPOCollator,
    encode_pairs,
    pairs_content_sha256,
    tulu_tokenizer,
)
from tulu_pipeline.training.dpo_reference import (
    PairScores,
    attach_reference,
    compute_reference_logprobs,
    load_scoring_model,
    reference_rows_sha256,
    score_pairs,
)
from tulu_pipeline.training.run import TrainingResult, TrainingRun
from tulu_pipeline.training.sharding import (
    gather_unsharded,
    keep_fp32_gradient_reduction,
    shard_report,
    trainer_fsdp_arguments,
)

# Bump when a change to this module changes what a run with the same inputs and config produces.
DPO_CODE_VERSION = "2"
LOSS_CURVE_FILE = "loss_curve.png"
TRAINED_PAIRS_FILE = "trained_pair_ids.txt"
# Test knob: sleep this many seconds after every optimizer step (widens the kill window of the resume test).
STEP_DELAY_ENV = "TULU_DPO_STEP_DELAY_S"
# Per held-out pair values of `preference_scores`, and the aggregate each one's mean is (`heldout_effect`'s keys).
PAIR_VALUES = ("preferred", "reward_correct", "margin")
EFFECT_METRICS = {"preference_accuracy": "preferred", "reward_accuracy": "reward_correct", "margin": "margin"}


@dataclass
class DPOResult(TrainingResult):
    """A finished DPO run: where the checkpoint is, its metrics and its manifest."""

    @property
    def loss_curve_path(self) -> Path:
        return self.checkpoint_dir / LOSS_CURVE_FILE


def preference_metrics(policy: PairScores, reference: PairScores, config: DPOTrainingConfig) -> dict[str, Any]:
    """Held-out metrics of ``policy`` against ``reference`` (same pairs, same order).

    ``preference_accuracy``: share of pairs whose chosen response has the higher mean log-prob per token under
    the policy (reference-free); ``reward_accuracy``/``mean_margin``/``loss``: the configured loss's implicit
    rewards (β-scaled, length-normalized for dpo_norm) against the reference.
    """
    return preference_scores(policy, reference, config)[0]


def preference_scores(policy: PairScores, reference: PairScores, config: DPOTrainingConfig
                      ) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """`preference_metrics` and, per pair (``{pair_id: value}``), the values they average over.

    Per pair: ``preferred`` (1.0 when chosen has the higher mean log-prob per token), ``reward_correct`` (1.0
    when the implicit reward margin is positive) and ``margin`` (that margin). Their means are
    ``preference_accuracy``, ``reward_accuracy`` and ``mean_margin``.
    """
    if not policy.pair_ids:
        return {"pairs": 0}, {key: {} for key in PAIR_VALUES}
    if policy.pair_ids != reference.pair_ids:
        raise ValueError("policy and reference scores are for different pairs")
    chosen, rejected, chosen_n, rejected_n = policy.tensors()
    ref_chosen, ref_rejected, _, _ = reference.tensors()
    result = preference_loss(config.loss_type, chosen, rejected, chosen_n, rejected_n, ref_chosen, ref_rejected,
                             beta=config.beta, gamma=config.gamma)
    preferred = (chosen / chosen_n > rejected / rejected_n).double()
    # `PreferenceLoss.accuracy`'s comparison, averaged in float64 (its float32 mean would differ from the mean of
    # the per-pair values in the last digits)
    correct = (result.chosen_rewards > result.rejected_rewards).double()
    metrics = {
        "pairs": len(policy.pair_ids),
        "preference_accuracy": float(preferred.mean()),
        "reward_accuracy": float(correct.mean()),
        "mean_margin": float(result.margins.mean()),
        "loss": float(result.loss),
        "chosen_mean_logp": float((chosen / chosen_n).mean()),
        "rejected_mean_logp": float((rejected / rejected_n).mean()),
    }
    per_pair = {name: dict(zip(policy.pair_ids, values.tolist()))
                for name, values in zip(PAIR_VALUES, (preferred, correct, result.margins))}
    return metrics, per_pair


def heldout_effect(after: Mapping[str, Mapping[str, float]], before: Mapping[str, Mapping[str, float]],
                   seed: int) -> dict[str, dict[str, Any]]:
    """The paired (after − before) change of each per-pair value of `preference_scores` over the held-out pairs,
    named after the aggregate it moves: `paired_delta` (bootstrap interval, sign test) per metric."""
    return {metric: paired_delta(after[value], before[value], seed=seed) for metric, value in EFFECT_METRICS.items()}


def run_dpo(
    pairs: Sequence[Mapping[str, Any]],
    heldout: Sequence[Mapping[str, Any]],
    model_dir: str | Path,
    output_dir: str | Path,
    config: DPOTrainingConfig | dict[str, Any] | None = None,
    reference_logprobs: Iterable[Mapping[str, Any]] | None = None,
    reporter: Reporter | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> DPOResult:
    """Train the model in ``model_dir`` (the SFT checkpoint, also the reference) on preference ``pairs``.

    ``heldout`` pairs are never trained on; `preference_metrics` are measured on them before and after.
    ``reference_logprobs`` (rows of `reference_schema` covering both lists) are used as given when they were scored
    in the dtype this run trains in (`scoring_dtype`); otherwise, or with None, they are computed first with the
    starting weights. ``manifest_extra`` (e.g. ``pairs_version``, ``reference_checkpoint``)
    is copied into ``training_manifest.json``; its ``pairs_version`` is part of the run fingerprint.
    """
    wall_start = time.perf_counter()
    config = config if isinstance(config, DPOTrainingConfig) else DPOTrainingConfig.model_validate(config or {})
    reporter = reporter if reporter is not None else NullReporter()
    model_dir = Path(model_dir).resolve()
    manifest_extra = dict(manifest_extra or {})
    # The config states the global batch; this process trains its share (an indivisible batch stops here).
    layout = config.batch_layout(launch_world_size(), manifest_extra.get("preset"))
    process_config = config.for_world_size(layout.world_size, manifest_extra.get("preset"))

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments

    from tulu_pipeline.training.hf_trainers import DPOReportingCallback, TuluDPOTrainer

    tokenizer = tulu_tokenizer(model_dir)
    train = encode_pairs(pairs, tokenizer, config.max_length)
    held = encode_pairs(heldout, tokenizer, config.max_length)
    if not train.examples:
        raise ValueError(f"no trainable pairs among {len(pairs)} (each needs a response token within "
                         f"max_length={config.max_length})")
    if train.dropped:
        reporter.log(f"left out {len(train.dropped)} training pairs ({NO_RESPONSE_TOKENS}): "
                     f"{sorted(train.dropped)[:10]}")
    use_bf16 = resolve_bf16(config)

    reference_source = "precomputed"
    dtype = "bfloat16" if use_bf16 else "float32"
    if reference_logprobs is not None:
        reference_logprobs = list(reference_logprobs)
        scored_in = sorted({str(row.get("dtype")) for row in reference_logprobs})
        if scored_in != [dtype]:
            # bf16 and fp32 log-probs of one model differ by far more than a DPO step moves them: the implicit
            # rewards would start away from 0 and train on the numerics, not the preferences
            reporter.log(f"the reference log-probs given were scored in {', '.join(scored_in)}, this run trains in "
                         f"{dtype}: recomputing them")
            reference_logprobs, reference_source = None, "recomputed_for_dtype"
    if reference_logprobs is None:
        # SimPO trains without them, but the held-out "before" metrics are the starting weights' scores anyway
        reporter.log("no reference log-probs given: computing them with the starting weights (the reference)")
        reference_logprobs = compute_reference_logprobs([*pairs, *heldout], model_dir, config, reporter)
        reference_source = "computed_by_run" if reference_source == "precomputed" else reference_source
    reference = {str(row["pair_id"]): row for row in reference_logprobs}
    attach_reference(train, reference)  # sets each training example's ref_* fields
    held_reference = attach_reference(held, reference)

    base_sha = weights_sha256(model_dir)
    run = TrainingRun("dpo", DPO_CODE_VERSION, config, {
        "base_model_sha256": base_sha,
        "train_pairs_sha256": pairs_content_sha256(pairs),
        "heldout_pairs_sha256": pairs_content_sha256(heldout),
        "reference_logprobs_sha256": reference_rows_sha256(
            [reference[pid] for pid in [*train.pair_ids, *held.pair_ids]]),
        "pairs_version": manifest_extra.get("pairs_version"),
    }, output_dir, reporter, manifest_extra)
    if (finished := run.finished()) is not None:
        return DPOResult(**vars(finished))
    resume_from = run.prepare()
    times_seen = [0] * len(train.examples)
    if len(run.saved_progress.get("times_seen") or []) == len(times_seen):
        times_seen[:] = [int(n) for n in run.saved_progress["times_seen"]]

    transformers.set_seed(config.seed)
    device = training_device()
    before, before_pairs = preference_scores(held_reference, held_reference, config)
    reporter.log(f"held-out before (the reference): {json.dumps(before, sort_keys=True)}")
    model = load_scoring_model(model_dir, config)
    args = TrainingArguments(**{**trainer_arguments(process_config, run.root, use_bf16, device),
                                **trainer_fsdp_arguments(config.sharding, model, config.gradient_checkpointing)})
    keep_fp32_gradient_reduction(args)
    trainer = TuluDPOTrainer(
        model=model, args=args, data_collator=DPOCollator(tokenizer.pad_token_id),
        train_dataset=Dataset.from_list([{**ex, "example_index": i} for i, ex in enumerate(train.examples)]),
        processing_class=tokenizer,
        callbacks=[DPOReportingCallback(reporter, float(os.environ.get(STEP_DELAY_ENV) or 0))],
        dpo=config, times_seen=times_seen, reporter=reporter,
    )
    reporter.log(f"DPO ({config.loss_type}, beta {config.beta}) on {len(train.examples)} pairs for "
                 f"{config.num_epochs} epochs, global batch {layout.global_batch_size} pairs = {layout.world_size} processes "
                 f"x {layout.per_device_batch_size} x {layout.gradient_accumulation_steps} accumulation, bf16={use_bf16}, "
                 f"device {device}")
    train_started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    train_seconds = time.perf_counter() - train_started
    steps = int(trainer.state.global_step)
    # collectives: what each rank held, and the full weights gathered to rank 0 for publication
    sharded = config.sharding.strategy == "fsdp"
    shards = shard_report(trainer.model, trainer.optimizer) if sharded else {}
    unsharded = gather_unsharded(trainer.model) if sharded else None
    if not run.is_publisher:  # rank 0 publishes; the other ranks' work is in its weights
        return DPOResult(run.output_dir, {"steps": steps}, {})
    curve = [{"step": int(e["step"]), "loss": float(e["loss"]), "learning_rate": float(e.get("learning_rate", 0.0)),
              "reward_accuracy": float(e.get("rewards/accuracies", float("nan"))),
              "reward_margin": float(e.get("rewards/margins", float("nan")))}
             for e in trainer.state.log_history if "loss" in e and "step" in e]

    with run.publishing() as staging:
        save_final(trainer, tokenizer, staging, lora=False, model=unsharded)
        del trainer, model, unsharded
        gc.collect()
        final_model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).to(device)
        after_scores = score_pairs(final_model, held, tokenizer.pad_token_id, config.eval_batch_size, use_bf16)
        del final_model
        after, after_pairs = preference_scores(after_scores, held_reference, config)
        seen_ids = [pid for pid, n in zip(train.pair_ids, times_seen) if n > 0]
        metrics = {
            "train_loss": curve,
            "initial_loss": curve[0]["loss"] if curve else None,
            "final_loss": curve[-1]["loss"] if curve else None,
            "heldout_before": before,
            "heldout_after": after,
            # paired over the held-out pairs (the same pairs before and after): {metric: paired_delta}
            "heldout_effect": heldout_effect(after_pairs, before_pairs, config.seed),
            "steps": steps,
            "train_s": train_seconds,
            "wall_s": time.perf_counter() - wall_start,
            "resumed_from_step": run.resumed_from_step,
            "train_pairs": len(train.examples),
            "heldout_pairs": len(held.examples),
            "dropped_pairs": len(train.dropped) + len(held.dropped),
            "truncated_pairs": len(train.truncated_pair_ids),
            "trained_pairs_seen": len(seen_ids),
            "pair_passes": sum(times_seen),
        }
        (staging / TRAINED_PAIRS_FILE).write_text("".join(f"{pid}\n" for pid in seen_ids), encoding="utf-8")
        (staging / LOSS_CURVE_FILE).write_bytes(dpo_curve_png(curve, before, after))
        manifest = run.manifest(
            tokenizer=tokenizer, batch=layout.manifest(), metrics=metrics, versions=("trl", "peft"),
            sharding={**config.sharding.model_dump(mode="json"), **shards},
            base_model={"path": str(model_dir), "weights_sha256": base_sha},
            base_model_sha256=base_sha,
            reference_logprobs_source=reference_source,
            reference_logprobs_dtype=dtype,
            reference_logprobs_sha256=run.identity["reference_logprobs_sha256"],
            train_pairs_sha256=run.identity["train_pairs_sha256"],
            heldout_pairs_sha256=run.identity["heldout_pairs_sha256"],
            train_pair_ids_sha256=row_ids_sha256(train.pair_ids),
            trained_pair_ids_file=TRAINED_PAIRS_FILE,
            trained_pair_ids_sha256=row_ids_sha256(seen_ids),
            heldout_pair_ids=list(held.pair_ids),
            dropped_pairs={**train.dropped, **held.dropped},
        )
        run.write_manifest(staging, manifest)
    reporter.log(f"published {run.output_dir}: held-out preference accuracy {before.get('preference_accuracy')} -> "
                 f"{after.get('preference_accuracy')}, reward accuracy {after.get('reward_accuracy')}, "
                 f"{steps} steps in {train_seconds:.1f}s")
    return DPOResult(run.output_dir, metrics, manifest)
