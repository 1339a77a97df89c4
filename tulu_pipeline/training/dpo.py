"""Direct preference optimization in Tülu's format: reference log-probs once, then `run_dpo`.

What it does, in order:

1. Encodes each pair (`encode_pairs`): the conversation before the final assistant turn (``prompt``) plus
   ``chosen`` / ``rejected`` as the last assistant turn, through the Tülu chat template
   (`encode_conversation`), with labels on the final response and its EOS only (earlier assistant turns of
   a multi-turn prompt are context). Sequences keep their first ``max_length`` tokens (open-instruct's
   ``preference_tulu_tokenize_and_truncate``); a pair whose chosen or rejected response has no token left is
   left out with its reason (open-instruct's ``preference_tulu_filter``).
2. Reference log-probs (`compute_reference_logprobs`): the summed log-prob of every response and its token
   count under the reference model (the SFT checkpoint), one forward pass per pair, stored by the caller as
   the ``reference_logprobs`` dataset and handed to `run_dpo`, which then never runs the reference model
   (open-instruct's ``dpo_tune_cache`` caches them the same way). Each row records the dtype it was scored in;
   without them, or scored in another dtype than the run trains in, `run_dpo` computes them first from the
   starting weights, which *are* the reference.
3. Fingerprints the run (code version, config, starting weights' sha256, pair contents, the reference
   numbers, the caller's ``pairs_version``); reuses a finished checkpoint with that fingerprint, resumes a
   partial one from ``_checkpoints`` (see `tulu_pipeline.training.checkpointing`), trains, and publishes
   the directory atomically with ``training_manifest.json``, ``loss_curve.png`` and
   ``trained_pair_ids.txt``.
4. Held-out metrics (pairs the caller marks ``heldout``), before (the reference itself) and after: the
   implicit-reward accuracy and mean margin, the DPO loss, and the policy's *length-normalized preference
   accuracy* (mean log-prob per token of chosen > rejected), which needs no reference and so is meaningful
   for the SFT checkpoint too.

Trainer: a `transformers.Trainer` subclass whose ``compute_loss`` is `preference_loss`
(`tulu_pipeline.training.dpo_losses`), not TRL's `DPOTrainer`. Why: TRL 1.16 has ``sigmoid`` and
``sigmoid_norm`` (= ``dpo_norm``) but no SimPO, tokenizes pairs itself (our labels come from the project's
Tülu template, token for token as in SFT), and caches reference log-probs in its own dataset cache rather
than reading them from our ``reference_logprobs`` asset. The Trainer still gives what the SFT stage relies on:
optimizer/scheduler, gradient accumulation, bf16 autocast and resumable checkpoints with RNG and data
position. Each micro-batch concatenates its chosen and rejected sequences in one padded forward pass
(open-instruct's ``concatenated_forward``); the loss is the mean over pairs, averaged over accumulation steps.
Only the response tokens go through the LM head, in chunks of ``LOGPROB_CHUNK_TOKENS`` (`sequence_logps`): the
fp32 logits of a micro-batch never exist whole (with ``[2B, L, V]`` logits the 135M CPU demo's DPO job peaked
at 8.4 GB resident, issue #20).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.models.base_model import weights_sha256
from tulu_pipeline.preference.schema import PAIRS_DATASET  # noqa: F401  (re-exported for the job and plan)
from tulu_pipeline.progress import NullReporter, Reporter
from tulu_pipeline.training.batch_layout import launch_world_size
from tulu_pipeline.training.batching import SFTCollator
from tulu_pipeline.templates.lineage import template_lineage
from tulu_pipeline.templates.chat_template import (
    IGNORE_INDEX,
    apply_tulu_chat_template,
    encode_conversation,
)
from tulu_pipeline.training.checkpointing import (
    library_versions,
    save_final,
    training_device,
    PROGRESS_FILE,
    canonical_json,
    fingerprint,
    mark_complete,
    prepare_run_dir,
    prune_checkpoints,
    publishing,
    read_json,
    remove_stale_siblings,
    row_ids_sha256,
    trainer_arguments,
    write_json_atomic,
)
from tulu_pipeline.training.dpo_config import DPOTrainingConfig
from tulu_pipeline.training.dpo_losses import preference_loss

# Bump when a change to this module changes what a run with the same inputs and config produces.
DPO_CODE_VERSION = "2"
# Bump when the reference log-probs of the same pairs, checkpoint and max_length would change.
REFERENCE_CODE_VERSION = "2"
MANIFEST_FORMAT_VERSION = 1
REFERENCE_DATASET = "reference_logprobs"
LOSS_CURVE_FILE = "loss_curve.png"
TRAINED_PAIRS_FILE = "trained_pair_ids.txt"
# Test knob: sleep this many seconds after every optimizer step (widens the kill window of the resume test).
STEP_DELAY_ENV = "TULU_DPO_STEP_DELAY_S"
KEEP_CHECKPOINTS = 2
NO_RESPONSE_TOKENS = "no response token within max_length"
# Labelled tokens per LM-head call in `sequence_logps`: 1024 x a 128k vocabulary is 0.5 GB of fp32 logits.
LOGPROB_CHUNK_TOKENS = 1024
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def reference_schema():
    """Schema of the ``reference_logprobs`` dataset: one row per pair."""
    import pyarrow as pa

    return pa.schema([
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("chosen_logps", pa.float64()),
        pa.field("rejected_logps", pa.float64()),
        pa.field("chosen_tokens", pa.int64()),
        pa.field("rejected_tokens", pa.int64()),
        pa.field("truncated", pa.bool_()),
        pa.field("dropped_reason", pa.string()),
        pa.field("dtype", pa.string()),  # what the reference ran in (`scoring_dtype`): bfloat16 or float32
    ])


# ---------------------------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------------------------
def encode_response(prompt: Sequence[dict[str, str]], response: str, tokenizer: Any,
                    max_length: int) -> dict[str, Any]:
    """``prompt`` + ``response`` as the final assistant turn; labels on that response (and its EOS) only."""
    full = encode_conversation([*prompt, {"role": "assistant", "content": response}], tokenizer, max_length)
    # Segments are tokenized one by one, so everything before the final response is tokenized the same
    # whatever the response: its length is the prefix of an empty response (whose only token is the EOS).
    empty = encode_conversation([*prompt, {"role": "assistant", "content": ""}], tokenizer)
    prefix = len(empty["input_ids"]) - 1
    if full["input_ids"][:prefix] != empty["input_ids"][: min(prefix, len(full["input_ids"]))]:
        raise ValueError("the prompt tokenizes differently before different responses")
    labels = [IGNORE_INDEX] * min(prefix, len(full["labels"])) + full["labels"][prefix:]
    return {"input_ids": full["input_ids"], "labels": labels,
            "tokens": sum(1 for label in labels if label != IGNORE_INDEX), "truncated": full["truncated"]}


@dataclass
class EncodedPairs:
    """Pairs encoded for scoring or training, and the ones left out (pair_id -> reason)."""

    examples: list[dict[str, Any]] = field(default_factory=list)
    pair_ids: list[str] = field(default_factory=list)
    truncated_pair_ids: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)


def encode_pairs(pairs: Iterable[Mapping[str, Any]], tokenizer: Any, max_length: int) -> EncodedPairs:
    """`encode_response` for chosen and rejected of every pair (``pair_id``, ``prompt``, ``chosen``, ``rejected``)."""
    encoded = EncodedPairs()
    for pair in pairs:
        pair_id = str(pair.get("pair_id"))
        try:
            prompt = list(pair["prompt"])
            if not isinstance(pair["chosen"], str) or not isinstance(pair["rejected"], str):
                raise TypeError("chosen and rejected must be strings")
            chosen = encode_response(prompt, pair["chosen"], tokenizer, max_length)
            rejected = encode_response(prompt, pair["rejected"], tokenizer, max_length)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"preference pair {pair_id}: {exc!r} (expected prompt: list of {{role, content}}, "
                             f"chosen/rejected: str)") from exc
        if chosen["truncated"] or rejected["truncated"]:
            encoded.truncated_pair_ids.append(pair_id)
        if chosen["tokens"] == 0 or rejected["tokens"] == 0:
            encoded.dropped[pair_id] = NO_RESPONSE_TOKENS
            continue
        encoded.examples.append({
            "chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
            "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
            "chosen_tokens": chosen["tokens"], "rejected_tokens": rejected["tokens"],
        })
        encoded.pair_ids.append(pair_id)
    return encoded


def pairs_content_sha256(pairs: Iterable[Mapping[str, Any]]) -> str:
    """sha256 over each pair's id, prompt, chosen and rejected, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(canonical_json([pair.get("pair_id"), pair.get("prompt"), pair.get("chosen"),
                                      pair.get("rejected")]).encode() + b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
@dataclass
class DPOCollator:
    """A micro-batch of pairs: chosen sequences then rejected ones, right-padded, in one batch of 2B rows."""

    pad_token_id: int

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        sequences = [{"input_ids": ex[f"{side}_input_ids"], "labels": ex[f"{side}_labels"]}
                     for side in ("chosen", "rejected") for ex in examples]
        batch = SFTCollator(pad_token_id=self.pad_token_id, packing=False)(sequences)
        batch.pop("real_tokens")
        batch.pop("computed_tokens")
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen_logps"] = torch.tensor([float(ex["ref_chosen_logps"]) for ex in examples])
            batch["ref_rejected_logps"] = torch.tensor([float(ex["ref_rejected_logps"]) for ex in examples])
        if "example_index" in examples[0]:
            batch["example_index"] = torch.tensor([int(ex["example_index"]) for ex in examples])
        return batch


def sequence_logps(model: Any, input_ids: Any, attention_mask: Any, labels: Any,
                   chunk_tokens: int = LOGPROB_CHUNK_TOKENS) -> tuple[Any, Any]:
    """Per sequence: the summed log-prob of the labelled tokens (fp32) and their count.

    Only labelled positions go through the LM head, ``chunk_tokens`` at a time, so at most ``[chunk_tokens, V]``
    fp32 logits exist at once instead of ``[2B, L, V]``; with gradients each chunk is recomputed in backward.
    """
    import torch

    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    head = _output_head(model)
    if head is None:  # logits are more than head(hidden): the full forward pass
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
        picked = torch.gather(logits, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return ((picked - torch.logsumexp(logits, dim=-1)) * mask).sum(-1), mask.sum(-1)

    captured: list[Any] = []

    def keep_last_position(module: Any, args: tuple) -> tuple:
        # The head's input is every position's hidden state: keep it, and let the model's own head call compute
        # the last position only (its logits are not used).
        captured.append(args[0])
        return (args[0][:, -1:], *args[1:])

    hook = head.register_forward_pre_hook(keep_last_position)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        hook.remove()
    rows, cols = mask.nonzero(as_tuple=True)
    hidden = captured[0][:, :-1][rows, cols]  # [labelled tokens, H]
    picked = targets[rows, cols]
    parts = []
    for start in range(0, hidden.size(0), chunk_tokens):
        args = (head, hidden[start : start + chunk_tokens], picked[start : start + chunk_tokens])
        if torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(_token_logps, *args, use_reentrant=False))
        else:
            parts.append(_token_logps(*args))
    token_logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(targets.size(0), dtype=torch.float32, device=targets.device).index_add(0, rows, token_logps)
    return sums, mask.sum(-1)


def _token_logps(head: Any, hidden: Any, targets: Any) -> Any:
    """log_softmax(head(hidden)) at ``targets``, in fp32, without a second vocab-sized tensor."""
    import torch

    logits = head(hidden).float()
    return torch.gather(logits, 1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _output_head(model: Any) -> Any | None:
    """The LM head of a causal LM whose logits are ``head(hidden)``; None for others (final-logit soft-capping)."""
    inner = getattr(model, "module", model)  # DDP / FSDP wrappers hold the model in .module
    if getattr(getattr(inner, "config", None), "final_logit_softcapping", None):
        return None
    try:
        return inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


@dataclass
class PairScores:
    """Summed response log-probs and token counts, one entry per pair (in the order scored)."""

    pair_ids: list[str]
    chosen_logps: list[float]
    rejected_logps: list[float]
    chosen_tokens: list[int]
    rejected_tokens: list[int]

    def tensors(self) -> tuple[Any, Any, Any, Any]:
        import torch

        return (torch.tensor(self.chosen_logps, dtype=torch.float64), torch.tensor(self.rejected_logps, dtype=torch.float64),
                torch.tensor(self.chosen_tokens, dtype=torch.float64), torch.tensor(self.rejected_tokens, dtype=torch.float64))


def score_pairs(model: Any, encoded: EncodedPairs, pad_token_id: int, batch_size: int = 8,
                bf16: bool = False) -> PairScores:
    """`sequence_logps` of every encoded pair's chosen and rejected response (no gradients)."""
    import torch

    collate = DPOCollator(pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = PairScores(list(encoded.pair_ids), [], [], [], [])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast:
        for start in range(0, len(encoded.examples), batch_size):
            chunk = encoded.examples[start : start + batch_size]
            batch = collate(chunk)
            sums, counts = sequence_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                          batch["labels"].to(device))
            n = len(chunk)
            scores.chosen_logps += [float(v) for v in sums[:n]]
            scores.rejected_logps += [float(v) for v in sums[n:]]
            scores.chosen_tokens += [int(v) for v in counts[:n]]
            scores.rejected_tokens += [int(v) for v in counts[n:]]
    model.train(was_training)
    return scores


def scoring_dtype(config: DPOTrainingConfig) -> str:
    """The dtype this machine scores and trains ``config`` in: ``bfloat16`` (autocast) or ``float32``."""
    from tulu_pipeline.training.sft import resolve_bf16

    return "bfloat16" if resolve_bf16(config) else "float32"


def _load_scoring_model(model_dir: Path, config: DPOTrainingConfig) -> Any:
    from tulu_pipeline.training.sft import load_training_model

    return load_training_model(model_dir, config).to(training_device())  # duck-typed: reads attn_implementation only


def tulu_tokenizer(model_dir: str | Path) -> Any:
    """The model directory's tokenizer with Tülu's chat template: what reference scoring and DPO encode with."""
    from transformers import AutoTokenizer

    return apply_tulu_chat_template(AutoTokenizer.from_pretrained(model_dir))


def compute_reference_logprobs(
    pairs: Sequence[Mapping[str, Any]], reference_dir: str | Path, config: DPOTrainingConfig,
    reporter: Reporter | None = None,
) -> list[dict[str, Any]]:
    """Rows of the ``reference_logprobs`` dataset (`reference_schema`) for ``pairs`` under the model in
    ``reference_dir``: summed log-probs and token counts of both responses and the ``dtype`` they were scored in;
    left-out pairs keep a row with their ``dropped_reason`` and null numbers."""
    reporter = reporter or NullReporter()
    reference_dir = Path(reference_dir)
    tokenizer = tulu_tokenizer(reference_dir)
    encoded = encode_pairs(pairs, tokenizer, config.max_length)
    model = _load_scoring_model(reference_dir, config)
    started = time.perf_counter()
    dtype = scoring_dtype(config)
    scores = score_pairs(model, encoded, tokenizer.pad_token_id, config.eval_batch_size, dtype == "bfloat16")
    reporter.log(f"reference log-probs of {len(encoded.pair_ids)} pairs in {time.perf_counter() - started:.1f}s "
                 f"({len(encoded.dropped)} left out: {NO_RESPONSE_TOKENS})")
    del model
    gc.collect()
    by_id = {pid: i for i, pid in enumerate(scores.pair_ids)}
    truncated = set(encoded.truncated_pair_ids)
    rows = []
    for pair in pairs:
        pair_id = str(pair["pair_id"])
        row = {"pair_id": pair_id, "split": pair.get("split"), "truncated": pair_id in truncated,
               "dropped_reason": encoded.dropped.get(pair_id), "chosen_logps": None, "rejected_logps": None,
               "chosen_tokens": None, "rejected_tokens": None, "dtype": dtype}
        if pair_id in by_id:
            i = by_id[pair_id]
            row.update(chosen_logps=scores.chosen_logps[i], rejected_logps=scores.rejected_logps[i],
                       chosen_tokens=scores.chosen_tokens[i], rejected_tokens=scores.rejected_tokens[i])
        rows.append(row)
    return rows


def reference_rows_sha256(rows: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of the reference numbers (pair id, log-probs, token counts), in pair-id order."""
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: str(r["pair_id"])):
        digest.update(canonical_json([row["pair_id"], row.get("chosen_logps"), row.get("rejected_logps"),
                                      row.get("chosen_tokens"), row.get("rejected_tokens")]).encode() + b"\n")
    return digest.hexdigest()


def attach_reference(encoded: EncodedPairs, reference: Mapping[str, Mapping[str, Any]]) -> PairScores:
    """The reference scores of ``encoded``'s pairs, checked against their encoding (same token counts)."""
    scores = PairScores([], [], [], [], [])
    for pair_id, example in zip(encoded.pair_ids, encoded.examples):
        row = reference.get(pair_id)
        if row is None or row.get("chosen_logps") is None:
            raise ValueError(f"reference_logprobs has no numbers for pair {pair_id}; recompute them for these pairs")
        if (row["chosen_tokens"], row["rejected_tokens"]) != (example["chosen_tokens"], example["rejected_tokens"]):
            raise ValueError(
                f"pair {pair_id}: reference_logprobs counted {row['chosen_tokens']}/{row['rejected_tokens']} response "
                f"tokens, this encoding {example['chosen_tokens']}/{example['rejected_tokens']}: they were computed "
                "with another tokenizer or max_length")
        example["ref_chosen_logps"], example["ref_rejected_logps"] = row["chosen_logps"], row["rejected_logps"]
        scores.pair_ids.append(pair_id)
        scores.chosen_logps.append(float(row["chosen_logps"]))
        scores.rejected_logps.append(float(row["rejected_logps"]))
        scores.chosen_tokens.append(int(row["chosen_tokens"]))
        scores.rejected_tokens.append(int(row["rejected_tokens"]))
    return scores


def preference_metrics(policy: PairScores, reference: PairScores, config: DPOTrainingConfig) -> dict[str, Any]:
    """Held-out metrics of ``policy`` against ``reference`` (same pairs, same order).

    ``preference_accuracy``: share of pairs whose chosen response has the higher mean log-prob per token under
    the policy (reference-free); ``reward_accuracy``/``mean_margin``/``loss``: the configured loss's implicit
    rewards (β-scaled, length-normalized for dpo_norm) against the reference.
    """
    if not policy.pair_ids:
        return {"pairs": 0}
    if policy.pair_ids != reference.pair_ids:
        raise ValueError("policy and reference scores are for different pairs")
    chosen, rejected, chosen_n, rejected_n = policy.tensors()
    ref_chosen, ref_rejected, _, _ = reference.tensors()
    result = preference_loss(config.loss_type, chosen, rejected, chosen_n, rejected_n, ref_chosen, ref_rejected,
                             beta=config.beta, gamma=config.gamma)
    return {
        "pairs": len(policy.pair_ids),
        "preference_accuracy": float((chosen / chosen_n > rejected / rejected_n).double().mean()),
        "reward_accuracy": float(result.accuracy),
        "mean_margin": float(result.margins.mean()),
        "loss": float(result.loss),
        "chosen_mean_logp": float((chosen / chosen_n).mean()),
        "rejected_mean_logp": float((rejected / rejected_n).mean()),
    }


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------
def _trainer_classes():
    """TuluDPOTrainer and its callback, built on first use (keeps importing this module cheap)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    from transformers import Trainer, TrainerCallback

    class TuluDPOTrainer(Trainer):
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
            mark_complete(checkpoint, {"step": self.state.global_step, "times_seen": self.times_seen})
            prune_checkpoints(Path(self.args.output_dir), keep=KEEP_CHECKPOINTS)
            self.reporter.log(f"checkpoint saved at step {self.state.global_step}")

    class ReportingCallback(TrainerCallback):
        """Forwards each training log line to the reporter; optionally slows steps down (tests)."""

        def __init__(self, reporter: Reporter):
            self.reporter = reporter
            self.delay = float(os.environ.get(STEP_DELAY_ENV) or 0)

        def on_step_end(self, args, state, control, **kwargs):
            if self.delay > 0:
                time.sleep(self.delay)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            keys = ("loss", "learning_rate", "grad_norm", "epoch", *METRIC_KEYS)
            self.reporter.log_metrics(state.global_step, {k: float(logs[k]) for k in keys
                                                          if isinstance(logs.get(k), int | float)})

    del torch
    return TuluDPOTrainer, ReportingCallback


def dpo_curve_png(curve: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any]) -> bytes:
    """Training loss and reward accuracy per step, with the held-out preference accuracy before and after."""
    from tulu_pipeline.plots import figure_png, pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=100)
    steps = [point["step"] for point in curve]
    left.plot(steps, [point["loss"] for point in curve], color="#4c72b0", label="train loss")
    for name, values, color in (("before", before, "#c44e52"), ("after", after, "#55a868")):
        if values.get("loss") is not None:
            left.axhline(values["loss"], color=color, linestyle="--", label=f"held-out {name} {values['loss']:.3f}")
    left.set_xlabel("optimizer step")
    left.set_ylabel("preference loss (nats/pair)")
    left.legend(loc="upper right", fontsize=8)
    right.plot(steps, [point.get("reward_accuracy", float("nan")) for point in curve], color="#8172b2",
               label="train reward accuracy")
    for name, values, color in (("before", before, "#c44e52"), ("after", after, "#55a868")):
        if values.get("preference_accuracy") is not None:
            right.axhline(values["preference_accuracy"], color=color, linestyle="--",
                          label=f"held-out pref. acc. {name} {values['preference_accuracy']:.2f}")
    right.set_ylim(-0.05, 1.05)
    right.set_xlabel("optimizer step")
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle("DPO training")
    fig.tight_layout()
    return figure_png(fig)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
@dataclass
class DPOResult:
    """A finished DPO run: where the checkpoint is, its metrics and its manifest."""

    checkpoint_dir: Path
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    reused: bool = False

    @property
    def loss_curve_path(self) -> Path:
        return self.checkpoint_dir / LOSS_CURVE_FILE


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
    model_dir, output_dir = Path(model_dir).resolve(), Path(output_dir).resolve()
    manifest_extra = dict(manifest_extra or {})
    clashes = sorted(set(manifest_extra) & {"fingerprint", "metrics", "config"})
    if clashes:
        raise ValueError(f"manifest_extra may not set {clashes}")
    # The config states the global batch; this process trains its share (an indivisible batch stops here).
    layout = config.batch_layout(launch_world_size(), manifest_extra.get("preset"))
    process_config = config.for_world_size(layout.world_size, manifest_extra.get("preset"))

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments

    from tulu_pipeline.training.sft import resolve_bf16

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
    identity = {
        "dpo_code_version": DPO_CODE_VERSION,
        "config": config.model_dump(mode="json"),
        "base_model_sha256": base_sha,
        "train_pairs_sha256": pairs_content_sha256(pairs),
        "heldout_pairs_sha256": pairs_content_sha256(heldout),
        "reference_logprobs_sha256": reference_rows_sha256(
            [reference[pid] for pid in [*train.pair_ids, *held.pair_ids]]),
        "pairs_version": manifest_extra.get("pairs_version"),
    }
    run_fingerprint = fingerprint(identity)
    existing = read_json(output_dir / MANIFEST_FILE)
    if existing is not None and existing.get("fingerprint") == run_fingerprint:
        reporter.log(f"{output_dir} already holds this run (fingerprint {run_fingerprint[:12]}); not retraining")
        return DPOResult(output_dir, dict(existing.get("metrics", {})), existing, reused=True)
    for stale in remove_stale_siblings(output_dir):
        reporter.log(f"removed {stale.name}, left behind by an interrupted run")
    root, resume_from = prepare_run_dir(output_dir, run_fingerprint, identity, reporter.log)
    times_seen = [0] * len(train.examples)
    resumed_from_step = 0
    if resume_from is not None:
        saved = read_json(resume_from / PROGRESS_FILE) or {}
        if len(saved.get("times_seen") or []) == len(times_seen):
            times_seen[:] = [int(n) for n in saved["times_seen"]]
        resumed_from_step = int(saved.get("step", 0))
        reporter.log(f"resuming from {resume_from.name} (step {resumed_from_step})")

    transformers.set_seed(config.seed)
    device = training_device()
    before = preference_metrics(held_reference, held_reference, config)
    reporter.log(f"held-out before (the reference): {json.dumps(before, sort_keys=True)}")
    model = _load_scoring_model(model_dir, config)
    args = TrainingArguments(**trainer_arguments(process_config, root, use_bf16, device))
    trainer_cls, callback_cls = _trainer_classes()
    trainer = trainer_cls(
        model=model, args=args, data_collator=DPOCollator(tokenizer.pad_token_id),
        train_dataset=Dataset.from_list([{**ex, "example_index": i} for i, ex in enumerate(train.examples)]),
        processing_class=tokenizer, callbacks=[callback_cls(reporter)],
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
    curve = [{"step": int(e["step"]), "loss": float(e["loss"]), "learning_rate": float(e.get("learning_rate", 0.0)),
              "reward_accuracy": float(e.get("rewards/accuracies", float("nan"))),
              "reward_margin": float(e.get("rewards/margins", float("nan")))}
             for e in trainer.state.log_history if "loss" in e and "step" in e]

    with publishing(output_dir) as staging:
        save_final(trainer, tokenizer, staging, lora=False)
        del trainer, model
        gc.collect()
        final_model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).to(device)
        after_scores = score_pairs(final_model, held, tokenizer.pad_token_id, config.eval_batch_size, use_bf16)
        del final_model
        after = preference_metrics(after_scores, held_reference, config)
        seen_ids = [pid for pid, n in zip(train.pair_ids, times_seen) if n > 0]
        metrics = {
            "train_loss": curve,
            "initial_loss": curve[0]["loss"] if curve else None,
            "final_loss": curve[-1]["loss"] if curve else None,
            "heldout_before": before,
            "heldout_after": after,
            "steps": steps,
            "train_s": train_seconds,
            "wall_s": time.perf_counter() - wall_start,
            "resumed_from_step": resumed_from_step,
            "train_pairs": len(train.examples),
            "heldout_pairs": len(held.examples),
            "dropped_pairs": len(train.dropped) + len(held.dropped),
            "truncated_pairs": len(train.truncated_pair_ids),
            "trained_pairs_seen": len(seen_ids),
            "pair_passes": sum(times_seen),
        }
        (staging / TRAINED_PAIRS_FILE).write_text("".join(f"{pid}\n" for pid in seen_ids), encoding="utf-8")
        (staging / LOSS_CURVE_FILE).write_bytes(dpo_curve_png(curve, before, after))
        manifest = {
            **manifest_extra,
            "format_version": MANIFEST_FORMAT_VERSION,
            "dpo_code_version": DPO_CODE_VERSION,
            "fingerprint": run_fingerprint,
            "config": config.model_dump(mode="json"),
            "seed": config.seed,
            "chat_template": "tulu",
            "template_lineage": template_lineage(tokenizer),
            "base_model": {"path": str(model_dir), "weights_sha256": base_sha},
            "base_model_sha256": base_sha,
            "reference_logprobs_source": reference_source,
            "reference_logprobs_dtype": dtype,
            "reference_logprobs_sha256": identity["reference_logprobs_sha256"],
            "train_pairs_sha256": identity["train_pairs_sha256"],
            "heldout_pairs_sha256": identity["heldout_pairs_sha256"],
            "train_pair_ids_sha256": row_ids_sha256(train.pair_ids),
            "trained_pair_ids_file": TRAINED_PAIRS_FILE,
            "trained_pair_ids_sha256": row_ids_sha256(seen_ids),
            "heldout_pair_ids": list(held.pair_ids),
            "dropped_pairs": {**train.dropped, **held.dropped},
            "batch": layout.manifest(),
            "versions": library_versions("trl", "peft"),
            "metrics": metrics,
        }
        write_json_atomic(staging / MANIFEST_FILE, manifest)  # last: a directory with it is complete
    reporter.log(f"published {output_dir}: held-out preference accuracy {before.get('preference_accuracy')} -> "
                 f"{after.get('preference_accuracy')}, reward accuracy {after.get('reward_accuracy')}, "
                 f"{steps} steps in {train_seconds:.1f}s")
    return DPOResult(output_dir, metrics, manifest)
