"""RL with verifiable rewards: `run_grpo`, a small GRPO loop (config + trainer, like `run_sft`).

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
4. The loss per completion token (`grpo_loss`; equal to TRL's ``GRPOTrainer._compute_loss``, tested on identical
   tensors)::

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
advantages) in ~300 lines with exact resume. Its vLLM path follows TRL's colocate mode (``load_weights`` after
every optimizer step).

Resume and publication follow `run_sft` (tulu_pipeline/training/checkpointing.py): ``_checkpoints/checkpoint-<n>/``
holds the weights, ``grpo_state.pt`` (optimizer and scheduler) and ``tulu_progress.json`` (the reward history,
the prompts used so far; written last, so a checkpoint without it is never resumed from). Prompt order and
sampling seeds depend only on the seed and the step, so a resumed run reproduces the uninterrupted one. The
finished directory (weights, tokenizer with the Tülu template, ``reward_curve.png``, ``trained_row_ids.txt``,
``training_manifest.json`` last) is swapped in atomically.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.progress import NullReporter, Reporter
from tulu_pipeline.vllm_runtime import engine_env
from tulu_pipeline.models.base_model import weights_sha256
from tulu_pipeline.rlvr.prompts import row_task
from tulu_pipeline.templates.lineage import template_lineage
from tulu_pipeline.training.batch_layout import launch_world_size
from tulu_pipeline.templates.chat_template import (
    apply_tulu_chat_template,
    encode_conversation,
)
from tulu_pipeline.training.checkpointing import (
    library_versions,
    training_device,
    PROGRESS_FILE,
    fingerprint,
    mark_complete,
    prepare_run_dir,
    prune_checkpoints,
    publishing,
    read_json,
    remove_stale_siblings,
    row_ids_sha256,
    rows_content_sha256,
    write_json_atomic,
)
from tulu_pipeline.training.grpo_config import GRPOTrainingConfig

# Bump when a change to this module changes what a run with the same inputs and config produces.
GRPO_CODE_VERSION = "3"
MANIFEST_FORMAT_VERSION = 1
REWARD_CURVE_FILE = "reward_curve.png"
TRAINING_METRICS_FILE = "training_metrics.png"
TRAINED_ROWS_FILE = "trained_row_ids.txt"
STATE_FILE = "grpo_state.pt"
# Test knob: sleep this many seconds after every optimizer step (widens the kill -9 window; never in production).
STEP_DELAY_ENV = "TULU_GRPO_STEP_DELAY_S"
KEEP_CHECKPOINTS = 2
# Per-step metrics kept in the manifest and plotted (every metric is also streamed each logging step).
STEP_CURVE_KEYS = ("step", "reward_mean", "reward_std", "accuracy", "unfinished_rate", "zero_std_groups_dropped_share",
                   "clip_low_fraction", "clip_high_fraction", "kl", "entropy", "completion_tokens_mean",
                   "logprob_mismatch", "is_weight_mean", "loss", "reward_by_task")
DEFAULT_VERIFIER_MODULE = "tulu_pipeline.rewards"

# (row, response text) -> (score, ok): the verifier's reward (correct_reward when right) and its verdict.
Verifier = Callable[[dict[str, Any], str], tuple[float, bool]]


def verifier_from_module(module: str = DEFAULT_VERIFIER_MODULE, correct_value: float = 10.0) -> Verifier:
    """A `Verifier` over ``<module>.verify(task, response, ground_truth=, constraints=)`` (an object with ``ok``):
    Tülu 3's binary reward, ``correct_value`` when ``ok`` else 0.

    The row's task comes from ``extra.task``; ``constraints`` (JSON text) is decoded for IFEval rows. A row the
    verifier cannot check (no ground truth, malformed constraints) is an error naming the row.
    """
    verify = importlib.import_module(module).verify

    def check(row: dict[str, Any], response: str) -> tuple[float, bool]:
        try:
            constraints = json.loads(row["constraints"]) if row.get("constraints") else None
            verdict = verify(row_task(row), response, ground_truth=row.get("ground_truth"), constraints=constraints)
        except ValueError as exc:
            raise ValueError(f"row {row.get('row_id')}: the verifier cannot check it: {exc}") from exc
        ok = bool(verdict.ok)
        return (correct_value if ok else 0.0), ok

    return check


@dataclass
class GRPOResult:
    """A finished GRPO run: where the checkpoint is, its metrics and its manifest."""

    checkpoint_dir: Path
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    reused: bool = False

    @property
    def resumed_from_step(self) -> int:
        return int(self.metrics.get("resumed_from_step", 0))

    @property
    def reward_curve_path(self) -> Path:
        return self.checkpoint_dir / REWARD_CURVE_FILE

    @property
    def training_metrics_path(self) -> Path:
        return self.checkpoint_dir / TRAINING_METRICS_FILE


@dataclass
class Rollout:
    prompt_index: int
    completion_ids: list[int]
    text: str
    finished: bool  # ended with EOS within max_completion_length
    score: float = 0.0  # the verifier's
    ok: bool = False
    reward: float = 0.0  # after the unfinished penalty
    advantage: float = 0.0
    sampler_logps: list[float] | None = None  # per completion token, from the engine that sampled it
    in_loss: bool = True  # False: a truncated completion left out by mask_truncated_completions


# ---------------------------------------------------------------------------------------------
# prompts and rewards
# ---------------------------------------------------------------------------------------------
def prompt_ids(row: dict[str, Any], tokenizer: Any) -> list[int]:
    """The row's conversation up to the final assistant turn, rendered with the Tülu template plus the
    ``<|assistant|>\\n`` generation header (a trailing assistant turn is dropped: the policy writes it)."""
    messages = [dict(m) for m in row["messages"]]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise ValueError(f"row {row.get('row_id')}: no prompt message")
    encoded = encode_conversation(messages + [{"role": "assistant", "content": ""}], tokenizer)
    return encoded["input_ids"][:-1]  # drop the EOS that closes the empty assistant turn


def apply_unfinished_penalty(score: float, finished: bool, config: GRPOTrainingConfig) -> float:
    """The reward a completion trains on: the verifier's score, or ``-unfinished_penalty`` without EOS."""
    if not finished and config.unfinished_penalty is not None:
        return -float(config.unfinished_penalty)
    return score


def group_advantages(rewards: Sequence[float], normalization: str = "std") -> list[float]:
    """GRPO's group-relative advantages: reward minus the group mean, over the group's (unbiased) std + 1e-4
    with ``normalization="std"``; without the division with ``"centered"`` (Dr GRPO)."""
    if normalization not in ("std", "centered"):
        raise ValueError(f"advantage normalization must be 'std' or 'centered', got {normalization!r}")
    n = len(rewards)
    mean = sum(rewards) / n
    if normalization == "centered":
        return [r - mean for r in rewards]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1)) if n > 1 else 0.0
    return [(r - mean) / (std + 1e-4) for r in rewards]


def has_signal(rewards: Sequence[float]) -> bool:
    """Whether a group's rewards differ (a group whose rewards are all equal has zero advantages)."""
    return max(rewards) - min(rewards) > 1e-9


def resample_prompt_indices(step: int, sampling_round: int, per_step: int, total: int, seed: int) -> list[int]:
    """Prompts of an active-sampling round (``sampling_round`` >= 1) of step ``step``: a seeded draw, so a resumed
    run draws the same ones."""
    return random.Random(f"{seed}:{step}:{sampling_round}").sample(range(total), min(per_step, total))


def step_prompt_indices(step: int, per_step: int, total: int, seed: int) -> list[int]:
    """Prompt indices of optimizer step ``step`` (1-based): consecutive slices of seeded per-epoch permutations."""
    out = []
    for position in range((step - 1) * per_step, step * per_step):
        epoch, offset = divmod(position, total)
        order = list(range(total))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[offset])
    return out


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
def _split_completion(ids: Sequence[int], eos_id: int, pad_id: int | None) -> tuple[list[int], bool]:
    ids = list(ids)
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1], True
    if pad_id is not None and pad_id != eos_id:
        while ids and ids[-1] == pad_id:
            ids.pop()
    return ids, False


class TransformersRollouts:
    """Sampling with ``model.generate`` on the training model itself (CPU, or a GPU without vLLM)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def generate(self, model: Any, prompts: Sequence[list[int]], n: int, max_new_tokens: int, seed: int,
                 temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 batch_size: int = 8) -> list[list[tuple]]:
        """``n`` completions per prompt as ``(token ids incl. EOS, finished)``, sampled ones with a third element:
        the sampling distribution's log-prob of each token."""
        import torch
        from transformers import GenerationConfig

        tok = self.tokenizer
        device = next(model.parameters()).device
        gen_config = GenerationConfig(
            do_sample=not greedy, max_new_tokens=max_new_tokens, num_return_sequences=n,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True,
            output_scores=not greedy, return_dict_in_generate=True,
            **({} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}))
        was_training = model.training
        model.eval()
        results: list[list[tuple[list[int], bool]]] = []
        per_chunk = max(1, batch_size // n)
        torch.manual_seed(seed)
        for start in range(0, len(prompts), per_chunk):
            chunk = prompts[start : start + per_chunk]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, ids in enumerate(chunk):  # left padding: generation continues every row at the same column
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                mask[i, width - len(ids):] = 1
            with torch.no_grad():
                out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_config)
                tokens = out.sequences[:, width:]
                # The processed scores are the sampling distribution (after temperature / top-p): the log-prob
                # each sampled token had, for the sampler/learner comparison and importance sampling.
                sampled_logps = None if greedy else torch.stack(
                    [torch.log_softmax(score.float(), dim=-1).gather(1, tokens[:, t : t + 1]).squeeze(1)
                     for t, score in enumerate(out.scores)], dim=1).tolist()
            generated = tokens.tolist()
            for i in range(len(chunk)):
                group = []
                for j in range(n):
                    ids, finished = _split_completion(generated[i * n + j], tok.eos_token_id, tok.pad_token_id)
                    group.append((ids, finished) if sampled_logps is None
                                 else (ids, finished, sampled_logps[i * n + j][: len(ids)]))
                results.append(group)
        model.train(was_training)
        return results

    def sync(self, model: Any) -> None:
        """Nothing to do: generation uses the training model."""

    def close(self) -> None:
        pass


def _repack_lm_head(engine_model: Any) -> None:
    """Re-run the LM head's post-load processing after a weight reload. A tied head has no weights of its own to
    reload, but vLLM's CPU backend packs it into a matmul kernel at start-up: without this, logits keep coming
    from the start checkpoint's embeddings. (CPU only: the GPU build packs nothing there.)"""
    head = getattr(engine_model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None and getattr(head, "weight", None) is not None:
        method.process_weights_after_loading(head)


class VLLMRollouts:
    """Sampling with a colocated vLLM engine (vLLM is imported here, never at module import: the GRPO job then
    runs with the vLLM interpreter, see `tulu_pipeline.vllm_runtime`).

    After every optimizer step the policy's weights are loaded into the engine in place (TRL's colocate mode),
    so rollouts always come from the current policy.
    """

    def __init__(self, model_dir: Path, tokenizer: Any, config: GRPOTrainingConfig):
        import torch

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in this process
        self.on_gpu = on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.update(engine_env())
        from vllm import LLM

        self.tokenizer = tokenizer
        # fp32 on CPU: bf16 is slower on AVX2 and its log-probs drift from the fp32 learner's.
        self.llm = LLM(model=str(model_dir), gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                       max_model_len=config.max_prompt_length + max(config.max_completion_length,
                                                                    config.heldout_max_completion_length or 0),
                       seed=config.seed, dtype="bfloat16" if on_gpu else "float32", enable_prefix_caching=True,
                       enforce_eager=not on_gpu,
                       logprobs_mode="processed_logprobs")  # sampler log-probs after temperature, as trained

    def generate(self, model: Any, prompts: Sequence[list[int]], n: int, max_new_tokens: int, seed: int,
                 temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 batch_size: int = 8) -> list[list[tuple[list[int], bool]]]:
        from vllm import SamplingParams

        params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                                 top_p=1.0 if greedy else top_p, seed=seed + i, skip_special_tokens=False,
                                 logprobs=None if greedy else 0)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        results = []
        for o in outputs:
            group = []
            for c in o.outputs:
                ids, finished = _split_completion(c.token_ids, eos, pad)
                if greedy or not c.logprobs:
                    group.append((ids, finished))
                else:  # logprobs=0: each position holds the sampled token's log-prob
                    group.append((ids, finished, [pos[t].logprob for pos, t in zip(c.logprobs, ids)]))
            results.append(group)
        return results

    def sync(self, model: Any) -> None:
        # The worker's reload_weights takes checkpoint-format weights and re-runs the post-load processing
        # (the CPU backend repacks linear weights, so a bare model.load_weights after start-up fails there).
        weights = [(name, param.data) for name, param in model.named_parameters()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if not self.on_gpu:
            self.llm.apply_model(_repack_lm_head)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        del self.llm
        gc.collect()


# ---------------------------------------------------------------------------------------------
# log-probabilities and the loss
# ---------------------------------------------------------------------------------------------
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
    if getattr(model.config, "final_logit_softcapping", None):
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


def grpo_loss(logps: Any, old_logps: Any, advantages: Any, mask: Any, config: GRPOTrainingConfig, *,
              num_sequences: int, num_tokens: int, ref_logps: Any | None = None,
              is_weights: Any | None = None) -> LossTerms:
    """The clipped-surrogate (+ ``beta`` * k3 KL) loss of one micro-batch, normalized for the whole step.

    Per token: ``-min(r * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A)`` with ``r = exp(logps - old_logps)``
    (capped at ``delta`` when set), times the importance weight when given, plus ``beta * KL``. Summed over the
    ``mask`` (0 on padding and on masked completions) and divided as ``config.loss_type`` says, where
    ``num_sequences`` / ``num_tokens`` count the completions / loss tokens of the whole step, so the
    micro-batches' losses add up to the step loss. On one micro-batch this is TRL's ``GRPOTrainer._compute_loss``
    (tests/test_grpo_trl_parity.py).
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


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _load_model(model_dir: Path, device: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    return model


def heldout_accuracy(model: Any, rollouts: Any, rows: Sequence[dict[str, Any]], encoded: Sequence[list[int]],
                     tokenizer: Any, verifier: Verifier, max_new_tokens: int, config: GRPOTrainingConfig
                     ) -> dict[str, Any] | None:
    """The held-out prompts, answered greedily (verifier ok-rate overall and per task, mean score) and, with
    ``config.heldout_samples`` > 0, sampled as in training: the training reward (unfinished penalty included) per
    prompt, averaged over its samples. The sampling seed is fixed, so the start and the trained checkpoint draw
    with the same random stream (a paired comparison)."""
    if not rows:
        return None
    outs = rollouts.generate(model, list(encoded), n=1, max_new_tokens=max_new_tokens, seed=config.seed,
                             greedy=True, batch_size=config.eval_batch_size)
    per_task: dict[str, list[bool]] = {}
    scores, oks = [], []
    for row, [out] in zip(rows, outs):
        score, ok = verifier(row, tokenizer.decode(out[0], skip_special_tokens=True))
        per_task.setdefault(row_task(row), []).append(ok)
        scores.append(score)
        oks.append(ok)
    result: dict[str, Any] = {
        "accuracy": sum(oks) / len(oks), "accuracy_ci95": _ci(oks), "mean_score": sum(scores) / len(scores),
        "rows": len(oks), "ok_per_row": [int(ok) for ok in oks],
        "per_task": {task: sum(v) / len(v) for task, v in sorted(per_task.items())}}
    if config.heldout_samples:
        result.update(_sampled_heldout(model, rollouts, rows, encoded, tokenizer, verifier, max_new_tokens, config))
    return result


def _sampled_heldout(model: Any, rollouts: Any, rows: Sequence[dict[str, Any]], encoded: Sequence[list[int]],
                     tokenizer: Any, verifier: Verifier, max_new_tokens: int,
                     config: GRPOTrainingConfig) -> dict[str, Any]:
    k = config.heldout_samples
    groups = rollouts.generate(model, list(encoded), n=k, max_new_tokens=max_new_tokens, seed=config.seed + 1,
                               temperature=config.temperature, top_p=config.top_p,
                               batch_size=max(k, config.eval_batch_size))
    scored = [[scored_rollout(i, row, out, tokenizer, verifier, config) for out in outs]
              for i, (row, outs) in enumerate(zip(rows, groups))]
    rewards = [_mean([r.reward for r in group]) for group in scored]
    every = [r for group in scored for r in group]
    return {"sampled_reward": _mean(rewards), "sampled_reward_ci95": _ci(rewards),
            "sampled_reward_per_row": rewards, "sampled_accuracy": _mean([float(r.ok) for r in every]),
            "sampled_unfinished_rate": _mean([float(not r.finished) for r in every]), "samples_per_row": k}


def _ci(values: Sequence[float], seed: int = 0) -> list[float]:
    """Seeded percentile-bootstrap 95% interval of the mean."""
    from tulu_pipeline.evaluation.scoring import bootstrap_ci

    return list(bootstrap_ci([float(v) for v in values], n_resamples=2000, seed=seed))


def reward_curve_png(history: list[dict[str, Any]], before: float | None, after: float | None,
                     title: str = "RLVR: mean verifiable reward per step",
                     heldout_reward: tuple[float, float] | None = None) -> bytes:
    """Mean reward per optimizer step (and verifier accuracy), with the held-out greedy accuracy and (when
    measured) the held-out sampled reward before and after."""
    from tulu_pipeline.plots import figure_png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["reward_mean"] for h in history], color="#4c72b0", marker="o", label="mean reward")
    if heldout_reward is not None:
        ax.scatter([steps[0] - 0.3 if steps else 0], [heldout_reward[0]], color="#c44e52", marker="D", zorder=3,
                   label=f"held-out reward before {heldout_reward[0]:.2f}")
        ax.scatter([steps[-1] + 0.3 if steps else 1], [heldout_reward[1]], color="#55a868", marker="D", zorder=3,
                   label=f"held-out reward after {heldout_reward[1]:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["accuracy"] for h in history], color="#dd8452", linestyle=":", label="train accuracy")
    if before is not None:
        ax2.axhline(before, color="#c44e52", linestyle="--", label=f"held-out acc. before {before:.2f}")
    if after is not None:
        ax2.axhline(after, color="#55a868", linestyle="--", label=f"held-out acc. after {after:.2f}")
    ax2.set_ylabel("verifier accuracy")
    ax2.set_ylim(-0.02, 1.02)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper left", fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return figure_png(fig)


# (panel title, [(metric key, label)]) of `training_metrics_png`
METRIC_PANELS = (
    ("reward", [("reward_mean", "mean"), ("reward_std", "std")]),
    ("share of rollouts / groups", [("unfinished_rate", "truncated"),
                                    ("zero_std_groups_dropped_share", "zero-std groups dropped")]),
    ("clipped tokens", [("clip_low_fraction", "low (r < 1 - eps_low, A < 0)"),
                        ("clip_high_fraction", "high (r > 1 + eps_high, A > 0)")]),
    ("policy", [("entropy", "entropy (nats)"), ("kl", "KL to start (k3)")]),
    ("response length (tokens)", [("completion_tokens_mean", "mean")]),
    ("sampler vs learner", [("logprob_mismatch", "mean |log p diff|"), ("is_weight_mean", "mean IS weight")]),
)


def training_metrics_png(history: list[dict[str, Any]], title: str = "RLVR: per-step training metrics") -> bytes:
    """One panel per group of `METRIC_PANELS` over the optimizer steps (a metric a run did not record is left out,
    e.g. KL with beta = 0)."""
    from tulu_pipeline.plots import figure_png, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6), dpi=100)
    steps = [h["step"] for h in history]
    for ax, (panel, series) in zip(axes.flat, METRIC_PANELS):
        for key, label in series:
            values = [h.get(key) for h in history]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], marker=".", label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return figure_png(fig)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def scored_rollout(index: int, row: dict[str, Any], out: tuple, tokenizer: Any, verifier: Verifier,
                   config: GRPOTrainingConfig) -> Rollout:
    """One completion as a rollout backend returns it (``(token ids, finished)``, or with the sampler's log-probs
    as a third element), decoded and scored: the verifier's score and the training reward."""
    ids, finished = list(out[0]), bool(out[1])
    sampler = list(out[2]) if len(out) > 2 and out[2] is not None else None
    if not ids:  # an empty completion cannot be scored per token; EOS is the shortest real one
        ids, finished, sampler = [tokenizer.eos_token_id], True, None
    text = tokenizer.decode(ids, skip_special_tokens=True)
    score, ok = verifier(row, text)
    return Rollout(index, ids, text, finished, score, ok, apply_unfinished_penalty(score, finished, config),
                   sampler_logps=sampler)


def _rollout_groups(model: Any, rollouts_backend: Any, tokenizer: Any, config: GRPOTrainingConfig, seed: int,
                    indices: list[int], train_rows: Sequence[dict[str, Any]], train_prompts: Sequence[list[int]],
                    verifier: Verifier) -> list[list[Rollout]]:
    """Sample ``num_generations`` completions of each prompt in ``indices`` and score them, one group per prompt.

    A backend returns ``(token ids, finished)`` per completion, or ``(token ids, finished, sampler log-probs)``
    when it can report the log-probability its sampling distribution gave each token (needed for
    ``importance_sampling_correction``, whichever engine sampled)."""
    outputs = rollouts_backend.generate(model, [train_prompts[i] for i in indices], n=config.num_generations,
                                        max_new_tokens=config.max_completion_length, seed=seed,
                                        temperature=config.temperature, top_p=config.top_p,
                                        batch_size=config.micro_batch_size)
    groups = []
    for index, outs in zip(indices, outputs):
        members = [scored_rollout(index, train_rows[index], out, tokenizer, verifier, config) for out in outs]
        for member, adv in zip(members, group_advantages([m.reward for m in members],
                                                         config.advantage_normalization)):
            member.advantage = adv
        groups.append(members)
    return groups


def _train_step(model: Any, ref_model: Any | None, optimizer: Any, scheduler: Any, rollouts_backend: Any,
                tokenizer: Any, config: GRPOTrainingConfig, step: int, train_rows: Sequence[dict[str, Any]],
                train_prompts: Sequence[list[int]], verifier: Verifier) -> tuple[dict[str, Any], list[int]]:
    """One optimizer step (``num_iterations`` updates on one batch of rollouts); its metrics and the indices of
    the prompts it trained on (a prompt whose group was dropped for zero reward std is not among them)."""
    import torch

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
        for group in _rollout_groups(model, rollouts_backend, tokenizer, config, seed, indices, train_rows,
                                     train_prompts, verifier):
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
    chunks = [rollouts[i : i + config.micro_batch_size] for i in range(0, len(rollouts), config.micro_batch_size)]

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
            loss_mask = mask * torch.tensor([[float(r.in_loss)] for r in chunk], device=device)
            if iteration == 0:
                sampler = _sampler_logps(chunk, mask)
                if sampler is not None:
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
            terms.loss.backward()
            totals["loss"] += float(terms.loss.detach())
            for key in ("kl", "clip_low", "clip_high"):
                totals[key] += getattr(terms, key if key != "kl" else "kl_sum")
            totals["tokens"] += terms.tokens
        if config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
        optimizer.step()
        scheduler.step()
    if not num_tokens:  # nothing to learn from this step: keep the schedule aligned with the step count
        for _ in range(config.num_iterations):
            scheduler.step()
    rollouts_backend.sync(model)

    by_task: dict[str, list[float]] = {}
    for r in sampled:
        by_task.setdefault(row_task(train_rows[r.prompt_index]), []).append(r.reward)
    rewards = [r.reward for r in sampled]
    updates = max(1, config.num_iterations if num_tokens else 1)
    loss_tokens = max(1.0, totals["tokens"])
    first_tokens = max(1.0, totals["tokens"] / updates)
    metrics = {
        "reward_mean": _mean(rewards),
        "reward_std": math.sqrt(_mean([(x - _mean(rewards)) ** 2 for x in rewards])),
        "verifier_score_mean": _mean([r.score for r in sampled]),
        "accuracy": _mean([float(r.ok) for r in sampled]),
        "unfinished_rate": _mean([float(not r.finished) for r in sampled]),
        "completion_tokens_mean": _mean([float(len(r.completion_ids)) for r in sampled]),
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
        "reward_by_task": {task: _mean(v) for task, v in sorted(by_task.items())},
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


def lr_schedule(config: GRPOTrainingConfig) -> Callable[[int], float]:
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


def run_grpo(
    prompts: Sequence[dict[str, Any]],
    heldout: Sequence[dict[str, Any]],
    start_model_dir: str | Path,
    output_dir: str | Path,
    config: GRPOTrainingConfig | dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    manifest_extra: dict[str, Any] | None = None,
    verifier: Verifier | None = None,
) -> GRPOResult:
    """Train the model in ``start_model_dir`` with GRPO on ``prompts`` (RLVR rows: ``messages``, ``extra.task``,
    ``ground_truth`` / ``constraints``) and publish it at ``output_dir``.

    ``heldout`` rows are never trained on; their greedy verifier accuracy is measured before and after.
    ``verifier`` defaults to `verifier_from_module` (``tulu_pipeline.rewards``) with ``config.correct_reward``.
    ``manifest_extra`` is copied into ``training_manifest.json``; its ``prompts_version`` is part of the run
    fingerprint. See the module docstring for the algorithm, resume and layout.
    """
    wall_start = time.perf_counter()
    config = config if isinstance(config, GRPOTrainingConfig) else GRPOTrainingConfig.model_validate(config or {})
    reporter = reporter if reporter is not None else NullReporter()
    start_model_dir = Path(start_model_dir).resolve()
    output_dir = Path(output_dir).resolve()
    manifest_extra = dict(manifest_extra or {})
    clashes = sorted(set(manifest_extra) & {"fingerprint", "metrics", "config"})
    if clashes:
        raise ValueError(f"manifest_extra may not set {clashes}")
    verifier = verifier or verifier_from_module(correct_value=config.correct_reward)
    layout = config.batch_layout(launch_world_size(), manifest_extra.get("preset"))  # before anything loads
    if layout.world_size > 1:
        raise NotImplementedError(f"GRPO trains in one process; this launch has {layout.world_size} (WORLD_SIZE): "
                                  "run the RLVR job without torchrun")

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
    identity = {
        "grpo_code_version": GRPO_CODE_VERSION,
        "config": config.model_dump(mode="json"),
        "start_model_sha256": start_sha,
        "prompt_rows_sha256": _rlvr_rows_sha256(train_rows),
        "heldout_rows_sha256": _rlvr_rows_sha256(held_rows),
        "prompts_version": manifest_extra.get("prompts_version"),
    }
    run_fingerprint = fingerprint(identity)
    existing = read_json(output_dir / MANIFEST_FILE)
    if existing is not None and existing.get("fingerprint") == run_fingerprint:
        reporter.log(f"{output_dir} already holds this run (fingerprint {run_fingerprint[:12]}); not retraining")
        return GRPOResult(output_dir, dict(existing.get("metrics", {})), existing, reused=True)
    for stale in remove_stale_siblings(output_dir):
        reporter.log(f"removed {stale.name}, left behind by an interrupted run")
    root, resume_from = prepare_run_dir(output_dir, run_fingerprint, identity, reporter.log)

    torch.manual_seed(config.seed)
    device = training_device()
    model = _load_model(start_model_dir, device)
    ref_model = None
    if config.beta > 0:
        ref_model = _load_model(start_model_dir, device).eval()
        ref_model.requires_grad_(False)
    if config.use_vllm:
        rollouts_backend: Any = VLLMRollouts(start_model_dir, tokenizer, config)
    else:
        rollouts_backend = TransformersRollouts(tokenizer)
    eval_tokens = config.heldout_max_completion_length or config.max_completion_length

    def measure_heldout(policy: Any) -> dict[str, Any] | None:
        # Both checkpoints, loaded by _load_model (fp32), are scored by transformers whatever sampled the training
        # rollouts (vLLM runs bf16 on a GPU): one engine, dtype and decoding (and, sampled, one random stream).
        return heldout_accuracy(policy, TransformersRollouts(tokenizer), held_rows, held_prompts, tokenizer,
                                verifier, eval_tokens, config)

    before = measure_heldout(model)
    if before is not None:
        reporter.log(f"held-out greedy accuracy of the start checkpoint: {before['accuracy']:.3f} "
                     f"({before['rows']} prompts)" + (f", sampled reward {before['sampled_reward']:.3f} "
                                                     f"({config.heldout_samples} per prompt)"
                                                     if "sampled_reward" in before else ""))

    progress: dict[str, Any] = {}
    if resume_from is not None:
        progress = read_json(resume_from / PROGRESS_FILE) or {}
        del model
        model = _load_model(resume_from, device)  # the policy as it was at that step (any sharding)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    history: list[dict[str, Any]] = []
    used: set[int] = set()
    resumed_from_step, prior_seconds = 0, 0.0
    if resume_from is not None:
        resumed_from_step = int(progress["step"])
        saved = torch.load(resume_from / STATE_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        history = list(progress.get("history", []))
        used = set(progress.get("used_prompts", []))
        prior_seconds = float(progress.get("train_seconds", 0.0))
        rollouts_backend.sync(model)
        reporter.log(f"resuming from {resume_from.name} (step {resumed_from_step})")

    delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
    reporter.log(f"GRPO on {len(train_rows)} prompts ({_task_counts(train_rows)}), {config.max_steps} steps x "
                 f"{config.prompts_per_step} prompts x {config.num_generations} completions, beta={config.beta}, "
                 f"device {device}, generation {'vllm' if config.use_vllm else 'transformers'}")
    session_start = time.perf_counter()
    save_seconds = 0.0
    for step in range(resumed_from_step + 1, config.max_steps + 1):
        metrics, trained_indices = _train_step(model, ref_model, optimizer, scheduler, rollouts_backend, tokenizer,
                                               config, step, train_rows, train_prompts, verifier)
        used.update(trained_indices)
        history.append({"step": step, **metrics})
        if step % config.logging_steps == 0 or step == config.max_steps:
            reporter.log_metrics(step, {k: v for k, v in metrics.items() if k != "sample"})
        if delay > 0:
            time.sleep(delay)
        if step % config.save_steps == 0 and step < config.max_steps:
            saving = time.perf_counter()
            checkpoint = root / f"checkpoint-{step}"
            checkpoint.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(checkpoint, safe_serialization=True)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       checkpoint / STATE_FILE)
            train_seconds = prior_seconds + time.perf_counter() - session_start
            mark_complete(checkpoint, {"step": step, "history": history, "used_prompts": sorted(used),
                                       "train_seconds": train_seconds})
            prune_checkpoints(root, keep=KEEP_CHECKPOINTS)
            save_seconds += time.perf_counter() - saving
            reporter.log(f"checkpoint saved at step {step}")
    train_seconds = prior_seconds + time.perf_counter() - session_start
    rollouts_backend.close()

    with publishing(output_dir) as staging:
        model.config.use_cache = True
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        del model, ref_model
        gc.collect()
        final_model = _load_model(staging, device)
        after = measure_heldout(final_model)
        del final_model
        metrics = _final_metrics(history, before, after, config)
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
        manifest = {
            **manifest_extra,
            "format_version": MANIFEST_FORMAT_VERSION,
            "method": "grpo",
            "grpo_code_version": GRPO_CODE_VERSION,
            "fingerprint": run_fingerprint,
            "config": config.model_dump(mode="json"),
            "seed": config.seed,
            "chat_template": "tulu",
            "template_lineage": template_lineage(tokenizer),
            "start_model": {"path": str(start_model_dir), "weights_sha256": start_sha},
            "start_model_sha256": start_sha,
            "prompt_row_ids_sha256": row_ids_sha256(r["row_id"] for r in train_rows),
            "trained_row_ids_file": TRAINED_ROWS_FILE,
            "trained_row_ids_sha256": row_ids_sha256(seen_ids),
            "heldout_row_ids": [r["row_id"] for r in held_rows],
            "prompt_rows_sha256": identity["prompt_rows_sha256"],
            "heldout_rows_sha256": identity["heldout_rows_sha256"],
            "too_long_row_ids": too_long,
            "batch": layout.manifest(),
            "versions": library_versions(),
            "metrics": metrics,
        }
        write_json_atomic(staging / MANIFEST_FILE, manifest)  # last: a directory with it is complete
    reporter.log(f"published {output_dir}: mean reward {metrics['reward_first_steps']:.3f} (first steps) -> "
                 f"{metrics['reward_last_steps']:.3f} (last steps), held-out greedy accuracy "
                 f"{_fmt(metrics['heldout_accuracy_before'])} -> {_fmt(metrics['heldout_accuracy_after'])}"
                 + (f", held-out sampled reward {metrics['heldout_reward_before']:.3f} -> "
                    f"{metrics['heldout_reward_after']:.3f} (change 95% CI {metrics['heldout_reward_change_ci95']})"
                    if "heldout_reward_before" in metrics else ""))
    return GRPOResult(output_dir, metrics, manifest)


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


def _final_metrics(history: list[dict[str, Any]], before: dict | None, after: dict | None,
                   config: GRPOTrainingConfig) -> dict[str, Any]:
    k = max(1, len(history) // 4)
    rewards = [h["reward_mean"] for h in history]
    return {
        "reward_per_step": [{key: h[key] for key in STEP_CURVE_KEYS if key in h} for h in history],
        "mean_reward": _mean(rewards),
        "reward_first_steps": _mean(rewards[:k]),
        "reward_last_steps": _mean(rewards[-k:]),
        "reward_window_steps": k,
        "heldout_accuracy_before": before["accuracy"] if before else None,
        "heldout_accuracy_after": after["accuracy"] if after else None,
        # paired: the same prompts greedily answered by the start and the trained checkpoint
        "heldout_accuracy_change_ci95": (_ci([a - b for a, b in zip(after["ok_per_row"], before["ok_per_row"])])
                                         if before and after else None),
        **_sampled_change(before, after),
        "heldout_before": before,
        "heldout_after": after,
        "samples": [h["sample"] for h in history[-3:]],
        "correct_reward": config.correct_reward,
    }


def _sampled_change(before: dict | None, after: dict | None) -> dict[str, Any]:
    """The held-out sampled reward before and after, and the paired interval of its change (per prompt)."""
    if not before or not after or "sampled_reward" not in before:
        return {}
    diffs = [a - b for a, b in zip(after["sampled_reward_per_row"], before["sampled_reward_per_row"])]
    return {"heldout_reward_before": before["sampled_reward"], "heldout_reward_after": after["sampled_reward"],
            "heldout_reward_change": _mean(diffs), "heldout_reward_change_ci95": _ci(diffs),
            "heldout_sampled_accuracy_before": before["sampled_accuracy"],
            "heldout_sampled_accuracy_after": after["sampled_accuracy"]}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def load_manifest(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The ``training_manifest.json`` of a published checkpoint."""
    return json.loads((Path(checkpoint_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
