"""One GRPO optimizer step: per-token log-probs, the clipped-surrogate loss, the update and its metrics.

See `tulu_pipeline.training.rlvr` for the algorithm; `grpo_loss` equals TRL's ``GRPOTrainer._compute_loss`` on
identical tensors (tests/test_rlvr_trl_parity.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tulu_pipeline.rlvr.prompts import row_task
from tulu_pipeline.training.rlvr_config import RLVRTrainingConfig
from tulu_pipeline.training.rlvr_rollouts import (
    Rollout,
    Verifier,
    has_signal,
    mean_or_zero,
    resample_prompt_indices,
    rollout_groups,
    step_prompt_indices,
)

def completion_logprobs(model: Any, prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int,
                        temperature: float = 1.0, with_entropy: bool = False) -> tuple[Any, ...]:
    """Per-token log-probabilities of each completion given its prompt, ``[B, Lc]``, and their mask; with
    ``with_entropy`` also the entropy of each position's distribution (no gradient; for monitoring).

    Logits are divided by ``temperature`` so they are the sampling distribution's probabilities.
    """
    import torch

    device = next(model.parameters()).device
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width, comp_width = max(lengths), max(len(c) for c in completions)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    positions = torch.zeros((len(prompts), comp_width), dtype=torch.long)
    targets = torch.zeros((len(prompts), comp_width), dtype=torch.long)
    mask = torch.zeros((len(prompts), comp_width), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : lengths[i]] = torch.tensor(list(p) + list(c))
        attention[i, : lengths[i]] = 1
        positions[i, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        targets[i, : len(c)] = torch.tensor(list(c))
        mask[i, : len(c)] = 1.0
    positions, targets, mask = positions.to(device), targets.to(device), mask.to(device)
    decoder, head = _decoder_and_head(model)
    if decoder is not None:
        # Only the completion positions go through the LM head: [B, Lc, V] instead of [B, T, V] logits.
        hidden = decoder(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                         use_cache=False).last_hidden_state
        picked = head(torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))))
    else:
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        picked = torch.gather(logits, 1, positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))
    logps = torch.log_softmax(picked.float() / temperature, dim=-1)
    token_logps = torch.gather(logps, 2, targets.unsqueeze(-1)).squeeze(-1) * mask
    if not with_entropy:
        return token_logps, mask
    with torch.no_grad():
        entropy = -(logps.exp() * logps).sum(-1) * mask
    return token_logps, mask, entropy


def _decoder_and_head(model: Any) -> tuple[Any | None, Any | None]:
    """The base transformer and the LM head of a plain causal LM (Llama, Qwen, SmolLM...); (None, None) for
    models whose logits are more than ``lm_head(hidden)`` (e.g. final-logit soft-capping), which take the
    full forward pass."""
    from torch.distributed.fsdp import FSDPModule

    if getattr(model.config, "final_logit_softcapping", None):
        return None, None
    if isinstance(model, FSDPModule):
        # FSDP2 all-gathers the root unit (embeddings, final norm, head) only inside the model's own forward: the
        # decoder or the head called directly would read sharded weights
        return None, None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    if decoder is None or head is None or decoder is model:
        return None, None
    return decoder, head


@dataclass
class LossTerms:
    """One micro-batch's share of the step loss and the sums its metrics are made of (all over loss tokens)."""

    loss: Any  # scalar tensor with grad: this micro-batch's contribution to the step loss
    tokens: float
    kl_sum: float
    clip_low: float  # tokens with ratio < 1 - epsilon_low and a negative advantage
    clip_high: float  # tokens with ratio > 1 + epsilon_high and a positive advantage


def importance_weights(learner_logps: Any, sampler_logps: Any, mask: Any, cap: float) -> Any:
    """Truncated importance sampling weights ``min(exp(learner - sampler), cap)`` per completion token (1 on
    padding): the correction for rollouts sampled by an engine whose log-probs differ from the learner's.

    TRL's ``vllm_importance_sampling_mode="token_truncate"``; open-instruct's ``compute_tis_weights`` with
    ``truncated_importance_sampling_ratio_cap``. Computed without gradient.
    """
    import torch

    with torch.no_grad():
        diff = torch.nan_to_num((learner_logps - sampler_logps) * mask, nan=0.0)
        return torch.clamp(torch.exp(diff), max=cap)


def grpo_loss(logps: Any, old_logps: Any, advantages: Any, mask: Any, config: RLVRTrainingConfig, *,
              num_sequences: int, num_tokens: int, ref_logps: Any | None = None,
              is_weights: Any | None = None) -> LossTerms:
    """The clipped-surrogate (+ ``beta`` * k3 KL) loss of one micro-batch, normalized for the whole step.

    Per token: ``-min(r * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A)`` with ``r = exp(logps - old_logps)``
    (capped at ``delta`` when set), times the importance weight when given, plus ``beta * KL``. Summed over the
    ``mask`` (0 on padding and on masked completions) and divided as ``config.loss_type`` says, where
    ``num_sequences`` / ``num_tokens`` count the completions / loss tokens of the whole step, so the
    micro-batches' losses add up to the step loss. On one micro-batch this is TRL's ``GRPOTrainer._compute_loss``
    (tests/test_rlvr_trl_parity.py).
    """
    import torch

    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - config.epsilon_low, 1 + config.clip_high)
    unclipped = ratio if config.delta is None else torch.clamp(ratio, max=config.delta)
    per_token = -torch.min(unclipped * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = None
    if ref_logps is not None and config.beta > 0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + config.beta * kl
    masked = per_token * mask
    if config.loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(1, num_sequences)
    elif config.loss_type == "dapo":
        loss = masked.sum() / max(1, num_tokens)
    else:  # dr_grpo
        loss = masked.sum() / (max(1, num_sequences) * config.max_completion_length)
    with torch.no_grad():
        low = ((ratio < 1 - config.epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + config.clip_high) & (adv > 0)).float()
        return LossTerms(loss=loss, tokens=float(mask.sum()),
                         kl_sum=float((kl * mask).sum()) if kl is not None else 0.0,
                         clip_low=float((low * mask).sum()), clip_high=float((high * mask).sum()))


def train_step(model: Any, ref_model: Any | None, optimizer: Any, scheduler: Any, rollouts_backend: Any,
                tokenizer: Any, config: RLVRTrainingConfig, step: int, train_rows: Sequence[dict[str, Any]],
                train_prompts: Sequence[list[int]], verifier: Verifier, rank: int = 0,
                world_size: int = 1) -> tuple[dict[str, Any], list[int]]:
    """One optimizer step (``num_iterations`` updates on one batch of rollouts); its metrics and the indices of
    the prompts it trained on (a prompt whose group was dropped for zero reward std is not among them).

    Sharded (FSDP2, ``world_size`` > 1, every rank calls it): every rank samples and scores the step's rollouts
    (the same ones, rank 0's kept: the sampling stream is one process's), then computes the loss on its contiguous
    share of them, scaled by ``world_size`` because FSDP averages the gradients over the ranks; every rank runs the
    same number of micro-batches (a rank with fewer pads with an all-masked one), since each forward and backward
    is a collective. The metrics are summed over the ranks, so every rank returns the run's."""
    import torch

    from tulu_pipeline.training.run import all_reduce_sums
    from tulu_pipeline.training.sharding import clip_grad_norm, reshard

    started = time.perf_counter()
    indices = step_prompt_indices(step, config.prompts_per_step, len(train_rows), config.seed)
    sampled: list[Rollout] = []
    kept: list[list[Rollout]] = []
    generated = dropped = rounds = 0
    # Active sampling (open-instruct's active_sampling): draw more prompts until the batch holds prompts_per_step
    # groups with signal, at most max_sampling_rounds rounds, so a policy that solves (or fails) everything
    # cannot stall the step.
    for sampling_round in range(config.max_sampling_rounds if config.active_sampling else 1):
        if sampling_round:
            indices = resample_prompt_indices(step, sampling_round, config.prompts_per_step - len(kept),
                                              len(train_rows), config.seed)
        rounds += 1
        seed = config.seed * 1_000_003 + step + 7_919 * sampling_round
        groups = rollout_groups(model, rollouts_backend, tokenizer, config, seed, indices, train_rows,
                                train_prompts, verifier)
        for group in _rank_zeros(groups, world_size):
            generated += 1
            sampled.extend(group)
            if config.filter_zero_std_groups and not has_signal([r.reward for r in group]):
                dropped += 1
                continue
            if len(kept) < config.prompts_per_step:
                kept.append(group)
        if len(kept) >= config.prompts_per_step:
            break
    generate_s = time.perf_counter() - started

    rollouts = [r for group in kept for r in group]
    for r in rollouts:
        r.in_loss = r.finished or not config.mask_truncated_completions
    num_tokens = sum(len(r.completion_ids) for r in rollouts if r.in_loss)
    device = next(model.parameters()).device
    chunks, active = _rank_chunks(rollouts, config.micro_batch_size, rank, world_size)

    def forward(policy: Any, chunk: list[Rollout], with_entropy: bool = False) -> tuple[Any, ...]:
        return completion_logprobs(policy, [train_prompts[r.prompt_index] for r in chunk],
                                   [r.completion_ids for r in chunk], tokenizer.pad_token_id, config.temperature,
                                   with_entropy=with_entropy)

    old: list[Any] = []
    ref: list[Any] = []
    with torch.no_grad():
        for chunk in chunks:
            if config.num_iterations > 1:
                model.eval()
                old.append(forward(model, chunk)[0])
            if ref_model is not None:
                ref.append(forward(ref_model, chunk)[0])
    reshard(model)  # FSDP2 keeps the root unit gathered after a forward without backward
    if ref_model is not None:
        reshard(ref_model)
    model.train()
    totals = {"loss": 0.0, "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "tokens": 0.0, "entropy": 0.0,
              "mismatch": 0.0, "mismatch_tokens": 0.0, "is_weight": 0.0}
    is_weights: dict[int, Any] = {}
    grad_norm = None
    for iteration in range(config.num_iterations if num_tokens else 0):
        optimizer.zero_grad(set_to_none=True)
        for k, chunk in enumerate(chunks):
            logps, mask, *entropy = forward(model, chunk, with_entropy=iteration == 0)
            old_logps = old[k] if old else logps.detach()
            loss_mask = mask * torch.tensor([[float(r.in_loss and active[k])] for r in chunk], device=device)
            if iteration == 0:
                sampler = _sampler_logps(chunk, mask)
                if sampler is not None and active[k]:
                    totals["mismatch"] += float(((old_logps - sampler).abs() * mask).sum())
                    totals["mismatch_tokens"] += float(mask.sum())
                if config.importance_sampling_correction:
                    if sampler is None:
                        raise ValueError("importance_sampling_correction needs the sampler's log-probs, and the "
                                         f"{type(rollouts_backend).__name__} backend returned none")
                    is_weights[k] = importance_weights(old_logps, sampler, mask, config.importance_sampling_cap)
                    totals["is_weight"] += float((is_weights[k] * loss_mask).sum())
                totals["entropy"] += float((entropy[0] * loss_mask).sum())
            advantages = torch.tensor([r.advantage for r in chunk], dtype=torch.float32, device=device)
            terms = grpo_loss(logps, old_logps, advantages, loss_mask, config, num_sequences=len(rollouts),
                              num_tokens=num_tokens, ref_logps=ref[k] if ref else None,
                              is_weights=is_weights.get(k))
            (terms.loss * world_size if world_size > 1 else terms.loss).backward()
            totals["loss"] += float(terms.loss.detach())
            for key in ("kl", "clip_low", "clip_high"):
                totals[key] += getattr(terms, key if key != "kl" else "kl_sum")
            totals["tokens"] += terms.tokens
        if config.max_grad_norm is not None:
            grad_norm = clip_grad_norm(model, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
    if not num_tokens:  # nothing to learn from this step: keep the schedule aligned with the step count
        for _ in range(config.num_iterations):
            scheduler.step()
    rollouts_backend.sync(model)
    if world_size > 1:  # each rank summed its share; the step's metrics are over every rollout
        totals = dict(zip(totals, all_reduce_sums(list(totals.values()))))

    by_task: dict[str, list[float]] = {}
    for r in sampled:
        by_task.setdefault(row_task(train_rows[r.prompt_index]), []).append(r.reward)
    rewards = [r.reward for r in sampled]
    updates = max(1, config.num_iterations if num_tokens else 1)
    loss_tokens = max(1.0, totals["tokens"])
    first_tokens = max(1.0, totals["tokens"] / updates)
    metrics = {
        "reward_mean": mean_or_zero(rewards),
        "reward_std": math.sqrt(mean_or_zero([(x - mean_or_zero(rewards)) ** 2 for x in rewards])),
        "verifier_score_mean": mean_or_zero([r.score for r in sampled]),
        "accuracy": mean_or_zero([float(r.ok) for r in sampled]),
        "unfinished_rate": mean_or_zero([float(not r.finished) for r in sampled]),
        "completion_tokens_mean": mean_or_zero([float(len(r.completion_ids)) for r in sampled]),
        "loss": totals["loss"] / updates,
        "kl": totals["kl"] / loss_tokens,
        "clip_low_fraction": totals["clip_low"] / loss_tokens,
        "clip_high_fraction": totals["clip_high"] / loss_tokens,
        # diagnostics rounded to 1e-6: their last bits depend on the kernels' thread count, and a resumed run must
        # record the same curve as an uninterrupted one
        "entropy": round(totals["entropy"] / first_tokens, 6),
        "grad_norm": grad_norm,
        "learning_rate": float(scheduler.get_last_lr()[0]),
        "rollouts": len(sampled),
        "trained_rollouts": len(rollouts),
        "loss_tokens": num_tokens,
        "groups_sampled": generated,
        "zero_std_groups": sum(1 for i in range(0, len(sampled), config.num_generations)
                               if not has_signal([r.reward for r in sampled[i : i + config.num_generations]])),
        "zero_std_groups_dropped_share": dropped / generated,
        "sampling_rounds": rounds,
        "reward_by_task": {task: mean_or_zero(v) for task, v in sorted(by_task.items())},
        "generate_s": generate_s,
        "step_s": time.perf_counter() - started,
        "sample": {"prompt_row_id": train_rows[sampled[0].prompt_index].get("row_id"),
                   "completion": sampled[0].text[:200], "reward": sampled[0].reward},
    }
    if totals["mismatch_tokens"]:
        metrics["logprob_mismatch"] = round(totals["mismatch"] / totals["mismatch_tokens"], 6)
    if config.importance_sampling_correction:
        metrics["is_weight_mean"] = round(totals["is_weight"] / first_tokens, 6)
    return metrics, [group[0].prompt_index for group in kept]


def _rank_zeros(groups: list[list[Rollout]], world_size: int) -> list[list[Rollout]]:
    """Rank 0's rollout groups on every rank (sharded runs): every rank sampled them with the same weights and seed,
    and taking rank 0's guarantees that every rank goes on with the same batch and the same control flow."""
    if world_size <= 1:
        return groups
    import torch.distributed as dist

    box = [groups]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank_chunks(rollouts: list[Rollout], micro_batch_size: int, rank: int,
                 world_size: int) -> tuple[list[list[Rollout]], list[bool]]:
    """This rank's micro-batches of the step's rollouts and whether each is real: a contiguous share of the rollouts
    (sizes differ by at most one), padded to the largest share's count of micro-batches with all-masked copies
    of the first rollout (every rank must run as many collective forwards and backwards)."""
    if world_size <= 1:
        chunks = [rollouts[i : i + micro_batch_size] for i in range(0, len(rollouts), micro_batch_size)]
        return chunks, [True] * len(chunks)
    base, extra = divmod(len(rollouts), world_size)
    start = rank * base + min(rank, extra)
    mine = rollouts[start : start + base + (1 if rank < extra else 0)]
    chunks = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    needed = -(-(base + (1 if extra else 0)) // micro_batch_size)
    active = [True] * len(chunks) + [False] * (needed - len(chunks))
    chunks += [rollouts[:1]] * (needed - len(chunks))
    return chunks, active


def lr_schedule(config: RLVRTrainingConfig) -> Callable[[int], float]:
    """The learning-rate factor of each optimizer update (a `LambdaLR` lambda of the updates done so far).

    The scheduler steps once per update and a step makes ``num_iterations`` of them, so the horizon is
    ``max_steps * num_iterations`` updates; ``warmup_steps`` counts steps like ``max_steps``. Linear: the last
    update runs at 1/updates of the peak and the rate is 0 only after it (transformers' linear schedule).
    """
    updates = config.max_steps * config.num_iterations
    warmup = config.warmup_steps * config.num_iterations

    def factor(done: int) -> float:
        warm = min(1.0, (done + 1) / warmup) if warmup else 1.0
        if config.lr_scheduler == "linear":
            return warm * max(0.0, 1.0 - done / updates)
        return warm

    return factor


def _sampler_logps(chunk: Sequence[Rollout], mask: Any) -> Any | None:
    """The sampler's per-token log-probs of a micro-batch as a ``[B, Lc]`` tensor, or None when any is missing."""
    import torch

    if any(r.sampler_logps is None or len(r.sampler_logps) != len(r.completion_ids) for r in chunk):
        return None
    out = torch.zeros_like(mask)
    for i, r in enumerate(chunk):
        out[i, : len(r.sampler_logps)] = torch.tensor(r.sampler_logps, dtype=out.dtype)
    return out
