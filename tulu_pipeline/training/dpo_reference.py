"""Reference log-probs for DPO: the summed log-prob of every response under the reference model.

`compute_reference_logprobs` scores every pair once with the reference (the SFT checkpoint), one forward pass
per pair, into rows of the ``reference_logprobs`` dataset (`reference_schema`), which `run_dpo` then reads
instead of running the reference model (open-instruct's ``dpo_tune_cache`` caches them the same way). Each row
records the dtype it was scored in. Only the response tokens go through the LM head, in chunks of
``LOGPROB_CHUNK_TOKENS`` (`sequence_logps`): the fp32 logits of a micro-batch never exist whole (with
``[2B, L, V]`` logits the 135M CPU demo's DPO job peaked at 8.4 GB resident, issue #20).
"""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tulu_pipeline.hashing import canonical_json
from tulu_pipeline.progress import NullReporter, Reporter
from tulu_pipeline.templates.chat_template import IGNORE_INDEX
from tulu_pipeline.training.checkpointing import load_training_model, resolve_bf16, training_device
from tulu_pipeline.training.dpo_config import DPOTrainingConfig
from tulu_pipeline.training.dpo_pairs import NO_RESPONSE_TOKENS, DPOCollator, EncodedPairs, encode_pairs, tulu_tokenizer

# Bump when the reference log-probs of the same pairs, checkpoint and max_length would change.
REFERENCE_CODE_VERSION = "2"
REFERENCE_DATASET = "reference_logprobs"
# Labelled tokens per LM-head call in `sequence_logps`: 1024 x a 128k vocabulary is 0.5 GB of fp32 logits.
LOGPROB_CHUNK_TOKENS = 1024


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
    """The LM head of a causal LM whose logits are ``head(hidden)``; None for others (final-logit soft-capping) and
    for FSDP2-sharded models."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "module", model)  # DDP / FSDP1 wrappers hold the model in .module
    if getattr(getattr(inner, "config", None), "final_logit_softcapping", None):
        return None
    if isinstance(inner, FSDPModule):
        # FSDP2 gathers the head's (root unit's) weight only inside the model's forward: called outside it, and
        # again when backward recomputes a chunk, the head would read a freed shard (a segfault on CPU)
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
    return "bfloat16" if resolve_bf16(config) else "float32"


def load_scoring_model(model_dir: Path, config: DPOTrainingConfig) -> Any:
    """The model at ``model_dir`` as DPO trains and scores it (`load_training_model`), on this process's device."""
    return load_training_model(model_dir, config).to(training_device())


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
    model = load_scoring_model(reference_dir, config)
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
