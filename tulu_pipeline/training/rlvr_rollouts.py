"""RLVR rollouts: prompts, sampling backends (transformers, colocated vLLM), verifier rewards and advantages.

A backend's ``generate`` returns, per prompt, ``n`` completions as ``(token ids incl. EOS, finished)``, sampled ones
with a third element: the log-prob the sampling distribution gave each token (for the sampler/learner mismatch
and importance sampling). `rollout_groups` scores them with the verifier and computes group-relative advantages.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tulu_pipeline.rlvr.prompts import row_task
from tulu_pipeline.templates.chat_template import encode_conversation
from tulu_pipeline.training.rlvr_config import RLVRTrainingConfig
from tulu_pipeline.training.sharding import reshard
from tulu_pipeline.vllm_runtime import engine_env

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


def mean_or_zero(values: Sequence[float]) -> float:
    """The mean of ``values``; 0 for none."""
    return sum(values) / len(values) if values else 0.0


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


def apply_unfinished_penalty(score: float, finished: bool, config: RLVRTrainingConfig) -> float:
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
        from torch.distributed.fsdp import FSDPModule

        # An FSDP2-sharded model all-gathers its weights in every forward, a collective: every rank keeps decoding
        # until all ranks are done (transformers' synced_gpus; it does not detect a model sharded by fully_shard)
        synced = isinstance(model, FSDPModule) and torch.distributed.is_initialized()
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
                                     generation_config=gen_config, synced_gpus=synced)
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
        if synced:
            reshard(model)  # no backward follows a generation: FSDP2 would leave the root unit gathered
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

    def __init__(self, model_dir: Path, tokenizer: Any, config: RLVRTrainingConfig):
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


def scored_rollout(index: int, row: dict[str, Any], out: tuple, tokenizer: Any, verifier: Verifier,
                   config: RLVRTrainingConfig) -> Rollout:
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


def rollout_groups(model: Any, rollouts_backend: Any, tokenizer: Any, config: RLVRTrainingConfig, seed: int,
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
