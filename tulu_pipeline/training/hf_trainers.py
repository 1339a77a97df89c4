"""The transformers `Trainer` subclasses the SFT and DPO runs train with, and their callbacks.

Importing this module imports torch, transformers and TRL: the trainers' modules import it when a run starts,
so that importing them (plans, jobs, the Dagster code location) stays cheap.

- `TuluSFTTrainer` (TRL's `SFTTrainer`): open-instruct's ``sum`` loss reduction, packing statistics and
  checkpoints completed with the run's counters (see `tulu_pipeline.training.sft`).
- `TuluDPOTrainer` (`transformers.Trainer`): the loss is `preference_loss` on precomputed reference log-probs
  (see `tulu_pipeline.training.dpo`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # before TRL is imported: training never talks to the Hub

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402
from trl import SFTTrainer  # noqa: E402

from tulu_pipeline.progress import Reporter  # noqa: E402
from tulu_pipeline.templates.chat_template import IGNORE_INDEX  # noqa: E402
from tulu_pipeline.training.batching import INFO_KEYS  # noqa: E402
from tulu_pipeline.training.checkpointing import mark_complete, prune_checkpoints  # noqa: E402
from tulu_pipeline.training.dpo_config import DPOTrainingConfig  # noqa: E402
from tulu_pipeline.training.dpo_losses import preference_loss  # noqa: E402
from tulu_pipeline.training.dpo_reference import sequence_logps  # noqa: E402
from tulu_pipeline.training.run import all_reduce_sums  # noqa: E402

# DPO metrics averaged over each logging interval.
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


# ---------------------------------------------------------------------------------------------
# FSDP on CPU ranks
# ---------------------------------------------------------------------------------------------
class CPUFSDPMixin:
    """The Trainer's FSDP2 on CPU ranks (gloo) as on GPUs.

    accelerate turns its FSDP plugin on only for accelerator devices; on CPU it silently trains DDP (full
    replicas) instead. When the arguments ask for FSDP (`sharding.trainer_fsdp_arguments`) and accelerate chose
    multi-CPU DDP, this switches its state to FSDP with the same plugin, so ``fully_shard`` per decoder layer and
    the sharded (DCP) checkpoints are the same code on a CPU test as on a GPU node.
    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is None or self.is_fsdp_enabled:
            return
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU:
            return
        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)  # what accelerate does for its GPU FSDP
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True


# ---------------------------------------------------------------------------------------------
# SFT
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


class TuluSFTTrainer(CPUFSDPMixin, SFTTrainer):
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
        if "loss" in logs:
            # every rank logs at the same steps: the line is the whole run's (as one process would log it), not
            # rank 0's share of the batch
            nll, trained, real = all_reduce_sums(
                [progress.interval_nll, progress.interval_trained_tokens, progress.interval_real_tokens])
            progress.interval_nll, progress.interval_trained_tokens = nll, int(trained)
            progress.interval_real_tokens = int(real)
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
            prune_checkpoints(Path(self.args.output_dir))
        self.reporter.log(f"checkpoint saved at step {self.state.global_step} ({seconds:.1f}s)")

class SFTReportingCallback(TrainerCallback):
    """Forwards each training log line to the reporter; optionally slows steps down (tests)."""

    def __init__(self, reporter: Reporter, progress: TrainingProgress, step_delay_s: float = 0.0):
        self.reporter = reporter
        self.progress = progress
        self.delay = step_delay_s

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


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------
class TuluDPOTrainer(CPUFSDPMixin, Trainer):
    """Trainer whose loss is `preference_loss` on precomputed reference log-probs."""

    # compute_loss returns a per-micro-batch mean: let the Trainer divide it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, dpo: DPOTrainingConfig, times_seen: list[int], reporter: Reporter,
                 **kwargs: Any):
        self.dpo = dpo
        self.times_seen = times_seen
        self.reporter = reporter
        self.interval: dict[str, list[float]] = {key: [] for key in METRIC_KEYS}
        super().__init__(*args, **kwargs)
        # transformers < 5.19 ignores loss_is_scaled_for_ga and takes a loss as already scaled when the model
        # accepts loss kwargs (Llama does); compute_loss never passes them, so say so (TRL's _BaseTrainer).
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop("example_index", None)
        ref_chosen = inputs.pop("ref_chosen_logps", None)
        ref_rejected = inputs.pop("ref_rejected_logps", None)
        sums, counts = sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        n = sums.size(0) // 2
        result = preference_loss(
            self.dpo.loss_type, sums[:n], sums[n:], counts[:n].to(sums.dtype), counts[n:].to(sums.dtype),
            None if ref_chosen is None else ref_chosen.to(sums), None if ref_rejected is None else ref_rejected.to(sums),
            beta=self.dpo.beta, gamma=self.dpo.gamma)
        if model.training:
            for key, value in zip(METRIC_KEYS, (result.chosen_rewards.mean(), result.rejected_rewards.mean(),
                                                result.margins.mean(), result.accuracy)):
                self.interval[key].append(float(value))
            if index is not None:
                for i in index.tolist():
                    self.times_seen[i] += 1
        return (result.loss, {"losses": result.losses}) if return_outputs else result.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.interval[METRIC_KEYS[0]]:
            for key, values in self.interval.items():
                logs[key] = sum(values) / len(values)
                values.clear()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        if self.state.max_steps and self.state.global_step >= self.state.max_steps:
            return  # the final model is published right after; a checkpoint of it would be waste
        super()._save_checkpoint(model, trial)
        checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.is_world_process_zero():  # one writer per run directory under torchrun
            mark_complete(checkpoint, {"step": self.state.global_step, "times_seen": self.times_seen})
            prune_checkpoints(Path(self.args.output_dir))
        self.reporter.log(f"checkpoint saved at step {self.state.global_step}")

class DPOReportingCallback(TrainerCallback):
    """Forwards each training log line to the reporter; optionally slows steps down (tests)."""

    def __init__(self, reporter: Reporter, step_delay_s: float = 0.0):
        self.reporter = reporter
        self.delay = step_delay_s

    def on_step_end(self, args, state, control, **kwargs):
        if self.delay > 0:
            time.sleep(self.delay)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        keys = ("loss", "learning_rate", "grad_norm", "epoch", *METRIC_KEYS)
        self.reporter.log_metrics(state.global_step, {k: float(logs[k]) for k in keys
                                                      if isinstance(logs.get(k), int | float)})
