"""RL with verifiable rewards: `run_rlvr`, a small GRPO loop (config + trainer, like `run_sft`).

One optimizer step:

1. Takes ``prompts_per_step`` prompts in a seeded order (a fresh permutation per pass over the prompts) and samples
   ``num_generations`` completions of each (transformers' ``generate`` on CPU; vLLM colocated on a GPU with
   ``use_vllm``), with a sampling seed derived from the run seed and the step. The backend also reports the
   log-prob its sampling distribution gave each token (for the sampler/learner mismatch and importance sampling).
2. Scores every completion with the verifier (`tulu_pipeline.rewards.verify`: ``correct_reward`` when right, 0
   otherwise); a completion that stopped at ``max_completion_length`` without EOS scores ``-unfinished_penalty``
   (or, with ``mask_truncated_completions``, keeps its score and is left out of the loss: DAPO's overlong
   filtering).
3. Advantages are group-relative: ``(r - mean(group)) / (std(group) + 1e-4)``, or ``r - mean(group)`` with
   ``advantage_normalization="centered"`` (Dr GRPO). A group whose rewards are all equal teaches nothing; with
   ``filter_zero_std_groups`` it is dropped, and with ``active_sampling`` further prompts (a seeded draw per step
   and round) are sampled until ``prompts_per_step`` groups with signal are collected, at most
   ``max_sampling_rounds`` rounds (open-instruct's ``filter_zero_std_samples`` / ``active_sampling``).
4. The loss per completion token (`rlvr_step.grpo_loss`; equal to TRL's ``GRPOTrainer._compute_loss``, tested
   on identical tensors)::

       -min(r * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A) * w + beta * KL_k3(policy || start checkpoint)

   averaged as ``loss_type`` says: ``dapo`` over all loss tokens of the step, ``grpo`` over each completion then
   over completions, ``dr_grpo`` over completions x ``max_completion_length``. ``r`` is against the policy that
   sampled the rollouts (1 with ``num_iterations = 1``; with more, the same rollouts are reused for that many
   updates, GRPO's mu). ``w`` is 1, or with ``importance_sampling_correction`` the truncated importance weight
   ``min(exp(learner - sampler log-prob), cap)`` for samplers whose numerics differ from the learner's (vLLM in
   bf16). ``beta = 0`` loads no reference model.

Every step streams its metrics (reward mean/std, share of zero-std groups dropped, share truncated, clip fractions
low/high, KL, entropy, response length, sampler/learner log-prob mismatch, ...) through the reporter (Pipes under
Dagster), and the checkpoint holds their plot (``training_metrics.png``).

Why not TRL's GRPOTrainer: it is built around accelerate and a Trainer loop whose generation, reward and
resume paths are hard to make exact and fast for a 2-layer toy model on 2 CPU cores (the acceptance test must
show learning in about a minute), and its reward functions see no finish reason, which the unfinished-answer
penalty needs. This loop is the same algorithm (TRL's defaults: k3 KL, clipped ratio, group-normalized
advantages) in a few hundred lines with exact resume. Its vLLM path follows TRL's colocate mode
(``load_weights`` after every optimizer step).

Reuse, resume and publication are the shared lifecycle (`tulu_pipeline.training.run.TrainingRun`);
``_checkpoints/checkpoint-<n>/`` holds the weights, ``grpo_state.pt`` (optimizer and scheduler) and
``tulu_progress.json`` (the reward history, the prompts used so far; written last, so a checkpoint without it
is never resumed from). Prompt order and sampling seeds depend only on the seed and the step, so a resumed run
reproduces the uninterrupted one. The finished directory (weights, tokenizer with the Tülu template,
``reward_curve.png``, ``trained_row_ids.txt``, ``training_manifest.json`` last) is swapped in atomically.

Sharded (``sharding.strategy="fsdp"`` under torchrun; docs/sharding.md): the policy and the reference are FSDP2
sharded over the ranks (`tulu_pipeline.training.sharding`), every rank samples the same rollouts and trains on
its share of them (`rlvr_step.train_step`), a checkpoint's weights and optimizer state are DCP shards
(``checkpoint-<n>/sharded/``, the scheduler beside them), and rank 0 publishes the gathered full weights and
reports; the other ranks train and return.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.models.base_model import weights_sha256
from tulu_pipeline.plots import reward_curve_png, training_metrics_png
from tulu_pipeline.progress import NullReporter, Reporter
from tulu_pipeline.rlvr.prompts import row_task
from tulu_pipeline.templates.chat_template import apply_tulu_chat_template
from tulu_pipeline.training.batch_layout import launch_world_size
from tulu_pipeline.training.checkpointing import (
    mark_complete,
    prune_checkpoints,
    row_ids_sha256,
    rows_content_sha256,
    save_model,
    training_device,
)
from tulu_pipeline.training.rlvr_config import RLVRTrainingConfig
from tulu_pipeline.training.rlvr_heldout import final_metrics, heldout_accuracy, load_policy
from tulu_pipeline.training.rlvr_rollouts import (
    TransformersRollouts,
    Verifier,
    VLLMRollouts,
    prompt_ids,
    verifier_from_module,
)
from tulu_pipeline.training.rlvr_step import lr_schedule, train_step
from tulu_pipeline.training.sharding import (
    apply_sharding,
    close_data_parallel,
    enable_activation_checkpointing,
    gather_unsharded,
    init_data_parallel,
    latest_checkpoint,
    load_sharded_checkpoint,
    reshard,
    save_sharded_checkpoint,
    shard_report,
)
from tulu_pipeline.training.run import TrainingResult, TrainingRun

# Bump when a change to this module changes what a run with the same inputs and config produces.
RLVR_TRAINING_CODE_VERSION = "3"
REWARD_CURVE_FILE = "reward_curve.png"
TRAINING_METRICS_FILE = "training_metrics.png"
TRAINED_ROWS_FILE = "trained_row_ids.txt"
STATE_FILE = "grpo_state.pt"
SHARDED_DIR = "sharded"  # a sharded run's checkpoint-<n>/sharded/step-<n>: DCP shards, the scheduler, RNG states
# Test knob: sleep this many seconds after every optimizer step (widens the kill -9 window; never in production).
STEP_DELAY_ENV = "TULU_GRPO_STEP_DELAY_S"


@dataclass
class RLVRResult(TrainingResult):
    """A finished GRPO run: where the checkpoint is, its metrics and its manifest."""

    @property
    def reward_curve_path(self) -> Path:
        return self.checkpoint_dir / REWARD_CURVE_FILE

    @property
    def training_metrics_path(self) -> Path:
        return self.checkpoint_dir / TRAINING_METRICS_FILE


def run_rlvr(
    prompts: Sequence[dict[str, Any]],
    heldout: Sequence[dict[str, Any]],
    start_model_dir: str | Path,
    output_dir: str | Path,
    config: RLVRTrainingConfig | dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    manifest_extra: dict[str, Any] | None = None,
    verifier: Verifier | None = None,
) -> RLVRResult:
    """Train the model in ``start_model_dir`` with GRPO on ``prompts`` (RLVR rows: ``messages``, ``extra.task``,
    ``ground_truth`` / ``constraints``) and publish it at ``output_dir``.

    ``heldout`` rows are never trained on; their greedy verifier accuracy is measured before and after.
    ``verifier`` defaults to `verifier_from_module` (``tulu_pipeline.rewards``) with ``config.correct_reward``.
    ``manifest_extra`` is copied into ``training_manifest.json``; its ``prompts_version`` is part of the run
    fingerprint. See the module docstring for the algorithm, resume and layout.
    """
    wall_start = time.perf_counter()
    config = config if isinstance(config, RLVRTrainingConfig) else RLVRTrainingConfig.model_validate(config or {})
    reporter = reporter if reporter is not None else NullReporter()
    start_model_dir = Path(start_model_dir).resolve()
    manifest_extra = dict(manifest_extra or {})
    verifier = verifier or verifier_from_module(correct_value=config.correct_reward)
    layout = config.batch_layout(launch_world_size(), manifest_extra.get("preset"))  # before anything loads
    sharded = config.sharding.strategy == "fsdp" and layout.world_size > 1
    if layout.world_size > 1 and not sharded:
        raise NotImplementedError(f"unsharded GRPO trains in one process; this launch has {layout.world_size} "
                                  "(WORLD_SIZE): run the RLVR job without torchrun, or set sharding.strategy='fsdp'")

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    from transformers import AutoTokenizer

    tokenizer = apply_tulu_chat_template(AutoTokenizer.from_pretrained(start_model_dir))
    train_rows, train_prompts, too_long = [], [], []
    for row in prompts:
        row_task(row)  # a row without a known task fails here, naming the row
        ids = prompt_ids(row, tokenizer)
        if len(ids) > config.max_prompt_length:
            too_long.append(row["row_id"])
            continue
        train_rows.append(row)
        train_prompts.append(ids)
    held_rows = [row for row in heldout if len(prompt_ids(row, tokenizer)) <= config.max_prompt_length]
    held_prompts = [prompt_ids(row, tokenizer) for row in held_rows]
    if not train_rows:
        raise ValueError(f"no prompt among {len(prompts)} fits max_prompt_length={config.max_prompt_length}")
    if too_long:
        reporter.log(f"left out {len(too_long)} prompts over max_prompt_length={config.max_prompt_length}: "
                     f"{too_long[:10]}")

    start_sha = weights_sha256(start_model_dir)
    run = TrainingRun("grpo", RLVR_TRAINING_CODE_VERSION, config, {
        "start_model_sha256": start_sha,
        "prompt_rows_sha256": _rlvr_rows_sha256(train_rows),
        "heldout_rows_sha256": _rlvr_rows_sha256(held_rows),
        "prompts_version": manifest_extra.get("prompts_version"),
    }, output_dir, reporter, manifest_extra)
    if (finished := run.finished()) is not None:
        return RLVRResult(**vars(finished))
    resume_from = run.prepare()

    torch.manual_seed(config.seed)
    dp = init_data_parallel() if sharded else None
    device = dp.device if dp is not None else training_device()
    load_device = torch.device("cpu") if config.sharding.cpu_offload else device

    def load_learner(model_dir: Path) -> Any:
        loaded = load_policy(model_dir, load_device)
        if dp is not None:  # fp32 master weights sharded over the ranks; optimizer built after, so sharded too
            return apply_sharding(loaded, config.sharding, dp)
        if config.sharding.activation_checkpointing:
            enable_activation_checkpointing(loaded)
        return loaded

    model = load_learner(start_model_dir)
    ref_model = None
    if config.beta > 0:
        ref_model = load_learner(start_model_dir).eval()
        ref_model.requires_grad_(False)
    if config.use_vllm:
        rollouts_backend: Any = VLLMRollouts(start_model_dir, tokenizer, config)
    else:
        rollouts_backend = TransformersRollouts(tokenizer)
    eval_tokens = config.heldout_max_completion_length or config.max_completion_length

    def measure_heldout(policy: Any) -> dict[str, Any] | None:
        # Both checkpoints, loaded by load_policy (fp32), are scored by transformers whatever sampled the training
        # rollouts (vLLM runs bf16 on a GPU): one engine, dtype and decoding (and, sampled, one random stream).
        return heldout_accuracy(policy, TransformersRollouts(tokenizer), held_rows, held_prompts, tokenizer,
                                verifier, eval_tokens, config)

    before = measure_heldout(model)
    if before is not None:
        reporter.log(f"held-out greedy accuracy of the start checkpoint: {before['accuracy']:.3f} "
                     f"({before['rows']} prompts)" + (f", sampled reward {before['sampled_reward']:.3f} "
                                                     f"({config.heldout_samples} per prompt)"
                                                     if "sampled_reward" in before else ""))

    progress = run.saved_progress
    if resume_from is not None and dp is None:
        del model
        model = load_policy(resume_from, device)  # the policy as it was at that step
        if config.sharding.activation_checkpointing:
            enable_activation_checkpointing(model)
    reshard(model)  # the optimizer must hold the sharded parameters, not a gathered root left by a forward
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    history: list[dict[str, Any]] = []
    used: set[int] = set()
    resumed_from_step, prior_seconds = run.resumed_from_step, 0.0
    if resume_from is not None and dp is not None:  # the sharded weights and optimizer state in place (DCP)
        _, saved = load_sharded_checkpoint(latest_checkpoint(resume_from / SHARDED_DIR), model, optimizer, dp)
        scheduler.load_state_dict(saved["scheduler"])
    elif resume_from is not None:
        saved = torch.load(resume_from / STATE_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    if resume_from is not None:
        history = list(progress.get("history", []))
        used = set(progress.get("used_prompts", []))
        prior_seconds = float(progress.get("train_seconds", 0.0))
        rollouts_backend.sync(model)

    delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
    reporter.log(f"GRPO on {len(train_rows)} prompts ({_task_counts(train_rows)}), {config.max_steps} steps x "
                 f"{config.prompts_per_step} prompts x {config.num_generations} completions, beta={config.beta}, "
                 f"device {device}, generation {'vllm' if config.use_vllm else 'transformers'}")
    session_start = time.perf_counter()
    save_seconds = 0.0
    for step in range(resumed_from_step + 1, config.max_steps + 1):
        metrics, trained_indices = train_step(model, ref_model, optimizer, scheduler, rollouts_backend, tokenizer,
                                               config, step, train_rows, train_prompts, verifier,
                                               rank=dp.rank if dp is not None else 0,
                                               world_size=dp.world_size if dp is not None else 1)
        used.update(trained_indices)
        history.append({"step": step, **metrics})
        if step % config.logging_steps == 0 or step == config.max_steps:
            reporter.log_metrics(step, {k: v for k, v in metrics.items() if k != "sample"})
        if delay > 0:
            time.sleep(delay)
        if step % config.save_steps == 0 and step < config.max_steps:
            saving = time.perf_counter()
            checkpoint = run.root / f"checkpoint-{step}"
            if dp is not None:  # every rank writes its shards; rank 0 completes the checkpoint below
                save_sharded_checkpoint(checkpoint / SHARDED_DIR, step, model, optimizer, dp,
                                        extra={"scheduler": scheduler.state_dict()}, keep=1)
                if not run.is_publisher:
                    continue
            else:
                checkpoint.mkdir(parents=True, exist_ok=True)
                model.save_pretrained(checkpoint, safe_serialization=True)
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                           checkpoint / STATE_FILE)
            train_seconds = prior_seconds + time.perf_counter() - session_start
            mark_complete(checkpoint, {"step": step, "history": history, "used_prompts": sorted(used),
                                       "train_seconds": train_seconds})
            prune_checkpoints(run.root)
            save_seconds += time.perf_counter() - saving
            reporter.log(f"checkpoint saved at step {step}")
    train_seconds = prior_seconds + time.perf_counter() - session_start
    rollouts_backend.close()
    # collectives: what each rank held, and the full weights gathered to rank 0 for publication
    shards = shard_report(model, optimizer) if dp is not None else {}
    unsharded = gather_unsharded(model) if dp is not None else model
    if dp is not None:
        close_data_parallel()  # no collective follows: rank 0 publishes alone
    if not run.is_publisher:
        return RLVRResult(run.output_dir, {"steps": len(history), "resumed_from_step": resumed_from_step}, {})

    with run.publishing() as staging:
        save_model(unsharded, tokenizer, staging)
        del unsharded
        del model, ref_model
        gc.collect()
        final_model = load_policy(staging, device)
        after = measure_heldout(final_model)
        del final_model
        metrics = final_metrics(history, before, after, config)
        metrics.update({
            "steps": len(history), "resumed_from_step": resumed_from_step, "train_s": train_seconds,
            "checkpoint_save_s": save_seconds, "wall_s": time.perf_counter() - wall_start,
            "prompt_rows": len(train_rows), "heldout_rows": len(held_rows), "too_long_rows": len(too_long),
            "reference_model": config.beta > 0,
            "task_counts": _task_counts(train_rows),
        })
        seen_ids = [train_rows[i]["row_id"] for i in sorted(used)]
        metrics["trained_rows_seen"] = len(seen_ids)
        (staging / TRAINED_ROWS_FILE).write_text("".join(f"{r}\n" for r in seen_ids), encoding="utf-8")
        (staging / REWARD_CURVE_FILE).write_bytes(reward_curve_png(
            history, before["accuracy"] if before else None, after["accuracy"] if after else None,
            heldout_reward=((metrics["heldout_reward_before"], metrics["heldout_reward_after"])
                            if "heldout_reward_before" in metrics else None)))
        (staging / TRAINING_METRICS_FILE).write_bytes(training_metrics_png(history))
        manifest = run.manifest(
            tokenizer=tokenizer, batch=layout.manifest(), metrics=metrics,
            method="grpo",
            sharding={**config.sharding.model_dump(mode="json"), **shards},
            start_model={"path": str(start_model_dir), "weights_sha256": start_sha},
            start_model_sha256=start_sha,
            prompt_row_ids_sha256=row_ids_sha256(r["row_id"] for r in train_rows),
            trained_row_ids_file=TRAINED_ROWS_FILE,
            trained_row_ids_sha256=row_ids_sha256(seen_ids),
            heldout_row_ids=[r["row_id"] for r in held_rows],
            prompt_rows_sha256=run.identity["prompt_rows_sha256"],
            heldout_rows_sha256=run.identity["heldout_rows_sha256"],
            too_long_row_ids=too_long,
        )
        run.write_manifest(staging, manifest)
    reporter.log(f"published {run.output_dir}: mean reward {metrics['reward_first_steps']:.3f} (first steps) -> "
                 f"{metrics['reward_last_steps']:.3f} (last steps), held-out greedy accuracy "
                 f"{_fmt(metrics['heldout_accuracy_before'])} -> {_fmt(metrics['heldout_accuracy_after'])}"
                 + (f", held-out sampled reward {metrics['heldout_reward_before']:.3f} -> "
                    f"{metrics['heldout_reward_after']:.3f} (change 95% CI {metrics['heldout_reward_change_ci95']})"
                    if "heldout_reward_before" in metrics else ""))
    return RLVRResult(run.output_dir, metrics, manifest)


def _rlvr_rows_sha256(rows: Sequence[dict[str, Any]]) -> str:
    """Content hash of what the rewards depend on too: messages, ground truth, constraints, task."""
    return rows_content_sha256({"row_id": r["row_id"], "messages": [r["messages"], r.get("ground_truth"),
                                                                     r.get("constraints"), r.get("extra")]}
                               for r in rows)


def _task_counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row_task(row)] = counts.get(row_task(row), 0) + 1
    return dict(sorted(counts.items()))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def load_manifest(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The ``training_manifest.json`` of a published checkpoint."""
    return json.loads((Path(checkpoint_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
