"""RL with verifiable rewards: `run_grpo`, a small GRPO loop (config + trainer, like `run_sft`).

One optimizer step:

1. Takes ``prompts_per_step`` prompts in a seeded order (a fresh permutation per pass over the prompts) and samples
   ``num_generations`` completions of each (transformers' ``generate`` on CPU; vLLM colocated on a GPU with
   ``use_vllm``), with a sampling seed derived from the run seed and the step.
2. Scores every completion with the verifier (`tulu_pipeline.rewards.verify`: ``correct_reward`` when right, 0
   otherwise); a completion that stopped at ``max_completion_length`` without EOS scores ``-unfinished_penalty``.
3. Advantages are group-relative: ``(r - mean(group)) / (std(group) + 1e-4)`` (without the division when
   ``scale_rewards`` is off). A group whose completions all score the same teaches nothing.
4. Loss per completion token, averaged over all completion tokens of the step (the DAPO/TRL ``dapo``
   normalization: long and short completions weigh per token)::

       -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A) + beta * KL_k3(policy || start checkpoint)

   ``ratio`` is against the policy that sampled the rollouts; with ``num_iterations = 1`` it is 1 and the clip is
   inert; with more, the same rollouts are reused for that many optimizer updates (GRPO's mu).

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

from tulu_pipeline.models.base_model import weights_sha256
from tulu_pipeline.rlvr.prompts import row_task
from tulu_pipeline.training.chat_template import (
    apply_tulu_chat_template,
    encode_conversation,
)
from tulu_pipeline.training.checkpointing import (
    MANIFEST_FILE,
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
from tulu_pipeline.training.reporting import NullReporter, Reporter

# Bump when a change to this module changes what a run with the same inputs and config produces.
GRPO_CODE_VERSION = "1"
MANIFEST_FORMAT_VERSION = 1
REWARD_CURVE_FILE = "reward_curve.png"
TRAINED_ROWS_FILE = "trained_row_ids.txt"
STATE_FILE = "grpo_state.pt"
# Test knob: sleep this many seconds after every optimizer step (widens the kill -9 window; never in production).
STEP_DELAY_ENV = "TULU_GRPO_STEP_DELAY_S"
KEEP_CHECKPOINTS = 2
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


def group_advantages(rewards: Sequence[float], scale: bool = True) -> list[float]:
    """GRPO's group-relative advantages: reward minus the group mean, over the group std (+1e-4)."""
    n = len(rewards)
    mean = sum(rewards) / n
    if not scale:
        return [r - mean for r in rewards]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1)) if n > 1 else 0.0
    return [(r - mean) / (std + 1e-4) for r in rewards]


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
                 batch_size: int = 8) -> list[list[tuple[list[int], bool]]]:
        """``n`` completions per prompt as ``(token ids incl. EOS, finished)``."""
        import torch
        from transformers import GenerationConfig

        tok = self.tokenizer
        device = next(model.parameters()).device
        gen_config = GenerationConfig(
            do_sample=not greedy, max_new_tokens=max_new_tokens, num_return_sequences=n,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True,
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
            generated = out[:, width:].tolist()
            for i in range(len(chunk)):
                results.append([_split_completion(generated[i * n + j], tok.eos_token_id, tok.pad_token_id)
                                for j in range(n)])
        model.train(was_training)
        return results

    def sync(self, model: Any) -> None:
        """Nothing to do: generation uses the training model."""

    def close(self) -> None:
        pass


class VLLMRollouts:
    """Sampling with a colocated vLLM engine (GPU only; vLLM is imported here, never at module import).

    After every optimizer step the policy's weights are loaded into the engine in place (TRL's colocate mode),
    so rollouts always come from the current policy.
    """

    def __init__(self, model_dir: Path, tokenizer: Any, config: GRPOTrainingConfig):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in this process
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=str(model_dir), gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                       max_model_len=config.max_prompt_length + max(config.max_completion_length,
                                                                    config.heldout_max_completion_length or 0),
                       seed=config.seed, dtype="bfloat16", enable_prefix_caching=True)

    def generate(self, model: Any, prompts: Sequence[list[int]], n: int, max_new_tokens: int, seed: int,
                 temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 batch_size: int = 8) -> list[list[tuple[list[int], bool]]]:
        from vllm import SamplingParams

        params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                                 top_p=1.0 if greedy else top_p, seed=seed + i, skip_special_tokens=False)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        return [[_split_completion(c.token_ids, eos, pad) for c in o.outputs] for o in outputs]

    def _engine_model(self) -> Any | None:
        """The engine's torch module when it runs in this process (vLLM's in-process executors), else None."""
        engine = self.llm.llm_engine
        for path in (("model_executor",), ("engine_core", "engine_core", "model_executor")):
            executor = engine
            for name in path:
                executor = getattr(executor, name, None)
            worker = getattr(executor, "driver_worker", None)
            worker = getattr(worker, "worker", worker)  # vLLM v1 wraps the worker once more
            runner = getattr(worker, "model_runner", None)
            if runner is not None and hasattr(runner, "model"):
                return runner.model
        return None

    def sync(self, model: Any) -> None:
        weights = [(name, param.data) for name, param in model.named_parameters()]
        engine_model = self._engine_model()
        if engine_model is not None:
            engine_model.load_weights(weights)
        else:  # engine in worker processes: ship the weights to each (vLLM's apply_model)
            self.llm.apply_model(lambda engine: engine.load_weights(weights))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        del self.llm
        gc.collect()


# ---------------------------------------------------------------------------------------------
# log-probabilities and the loss
# ---------------------------------------------------------------------------------------------
def completion_logprobs(model: Any, prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int,
                        temperature: float = 1.0) -> tuple[Any, Any]:
    """Per-token log-probabilities of each completion given its prompt, ``[B, Lc]``, and their mask.

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
    return torch.gather(logps, 2, targets.unsqueeze(-1)).squeeze(-1) * mask, mask


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


def grpo_token_loss(logps: Any, old_logps: Any, ref_logps: Any | None, advantages: Any, mask: Any, beta: float,
                    epsilon: float) -> tuple[Any, Any]:
    """Summed clipped-surrogate + ``beta`` * k3-KL loss over masked tokens, and the summed KL (for logging)."""
    import torch

    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    return (per_token * mask).sum(), (kl.detach() * mask).sum()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_model(model_dir: Path, device: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    return model


def heldout_accuracy(model: Any, rollouts: Any, rows: Sequence[dict[str, Any]], encoded: Sequence[list[int]],
                     tokenizer: Any, verifier: Verifier, max_new_tokens: int, batch_size: int,
                     seed: int) -> dict[str, Any] | None:
    """Greedy completions of the held-out prompts: verifier ok-rate overall and per task, and mean score."""
    if not rows:
        return None
    outs = rollouts.generate(model, list(encoded), n=1, max_new_tokens=max_new_tokens, seed=seed, greedy=True,
                             batch_size=batch_size)
    per_task: dict[str, list[bool]] = {}
    scores = []
    for row, [(ids, _finished)] in zip(rows, outs):
        score, ok = verifier(row, tokenizer.decode(ids, skip_special_tokens=True))
        per_task.setdefault(row_task(row), []).append(ok)
        scores.append(score)
    oks = [ok for values in per_task.values() for ok in values]
    return {"accuracy": sum(oks) / len(oks), "mean_score": sum(scores) / len(scores), "rows": len(oks),
            "per_task": {task: sum(v) / len(v) for task, v in sorted(per_task.items())}}


def reward_curve_png(history: list[dict[str, Any]], before: float | None, after: float | None,
                     title: str = "RLVR: mean verifiable reward per step") -> bytes:
    """Mean reward per optimizer step (and verifier accuracy), with the held-out accuracy before and after."""
    from tulu_pipeline.reporting import figure_png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["reward_mean"] for h in history], color="#4c72b0", marker="o", label="mean reward")
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


def _library_versions() -> dict[str, str]:
    import platform

    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def _train_step(model: Any, ref_model: Any | None, optimizer: Any, scheduler: Any, rollouts_backend: Any,
                tokenizer: Any, config: GRPOTrainingConfig, step: int, batch_rows: list[dict[str, Any]],
                batch_prompts: list[list[int]], verifier: Verifier) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    seed = config.seed * 1_000_003 + step
    groups = rollouts_backend.generate(model, batch_prompts, n=config.num_generations,
                                       max_new_tokens=config.max_completion_length, seed=seed,
                                       temperature=config.temperature, top_p=config.top_p,
                                       batch_size=config.micro_batch_size)
    rollouts: list[Rollout] = []
    for index, group in enumerate(groups):
        members = []
        for ids, finished in group:
            if not ids:  # an empty completion cannot be scored per token; EOS is the shortest real one
                ids, finished = [tokenizer.eos_token_id], True
            text = tokenizer.decode(ids, skip_special_tokens=True)
            score, ok = verifier(batch_rows[index], text)
            reward = apply_unfinished_penalty(score, finished, config)
            members.append(Rollout(index, ids, text, finished, score, ok, reward))
        for member, adv in zip(members, group_advantages([m.reward for m in members], config.scale_rewards)):
            member.advantage = adv
        rollouts.extend(members)
    generate_s = time.perf_counter() - started

    device = next(model.parameters()).device
    total_tokens = sum(len(r.completion_ids) for r in rollouts)
    chunks = [rollouts[i : i + config.micro_batch_size] for i in range(0, len(rollouts), config.micro_batch_size)]
    old, ref = [], []
    with torch.no_grad():
        for chunk in chunks:
            p = [batch_prompts[r.prompt_index] for r in chunk]
            c = [r.completion_ids for r in chunk]
            if config.num_iterations > 1:
                model.eval()
                old.append(completion_logprobs(model, p, c, tokenizer.pad_token_id, config.temperature)[0])
            if ref_model is not None:
                ref.append(completion_logprobs(ref_model, p, c, tokenizer.pad_token_id, config.temperature)[0])
    model.train()
    loss_sum = kl_sum = 0.0
    grad_norm = None
    for _iteration in range(config.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for k, chunk in enumerate(chunks):
            p = [batch_prompts[r.prompt_index] for r in chunk]
            c = [r.completion_ids for r in chunk]
            logps, mask = completion_logprobs(model, p, c, tokenizer.pad_token_id, config.temperature)
            old_logps = old[k] if old else logps.detach()
            advantages = torch.tensor([r.advantage for r in chunk], dtype=torch.float32, device=device)
            loss, kl = grpo_token_loss(logps, old_logps, ref[k] if ref else None, advantages, mask, config.beta,
                                       config.epsilon)
            (loss / total_tokens).backward()
            loss_sum += float(loss.detach())
            kl_sum += float(kl)
        if config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
        optimizer.step()
        scheduler.step()
    rollouts_backend.sync(model)

    by_task: dict[str, list[float]] = {}
    for r in rollouts:
        by_task.setdefault(row_task(batch_rows[r.prompt_index]), []).append(r.reward)
    rewards = [r.reward for r in rollouts]
    metrics = {
        "reward_mean": _mean(rewards),
        "reward_std": math.sqrt(_mean([(x - _mean(rewards)) ** 2 for x in rewards])),
        "verifier_score_mean": _mean([r.score for r in rollouts]),
        "accuracy": _mean([float(r.ok) for r in rollouts]),
        "unfinished_rate": _mean([float(not r.finished) for r in rollouts]),
        "completion_tokens_mean": total_tokens / len(rollouts),
        "loss": loss_sum / (total_tokens * config.num_iterations),
        "kl": kl_sum / (total_tokens * config.num_iterations),
        "grad_norm": grad_norm,
        "learning_rate": float(scheduler.get_last_lr()[0]),
        "rollouts": len(rollouts),
        "zero_signal_groups": sum(1 for g in range(len(groups))
                                  if all(r.advantage == 0 for r in rollouts if r.prompt_index == g)),
        "reward_by_task": {task: _mean(v) for task, v in sorted(by_task.items())},
        "generate_s": generate_s,
        "step_s": time.perf_counter() - started,
        "sample": {"prompt_row_id": batch_rows[0].get("row_id"), "completion": rollouts[0].text[:200],
                   "reward": rollouts[0].reward},
    }
    return metrics


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
    device = _device()
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
    before = heldout_accuracy(model, rollouts_backend, held_rows, held_prompts, tokenizer, verifier, eval_tokens,
                              config.eval_batch_size, config.seed)
    if before is not None:
        reporter.log(f"held-out accuracy of the start checkpoint: {before['accuracy']:.3f} ({before['rows']} prompts)")

    progress: dict[str, Any] = {}
    if resume_from is not None:
        progress = read_json(resume_from / PROGRESS_FILE) or {}
        del model
        model = _load_model(resume_from, device)  # the policy as it was at that step (any sharding)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def schedule(done: int) -> float:
        warm = min(1.0, (done + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        if config.lr_scheduler == "linear":
            return warm * max(0.0, 1.0 - done / config.max_steps)
        return warm

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
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
        indices = step_prompt_indices(step, config.prompts_per_step, len(train_rows), config.seed)
        used.update(indices)
        metrics = _train_step(model, ref_model, optimizer, scheduler, rollouts_backend, tokenizer, config, step,
                              [train_rows[i] for i in indices], [train_prompts[i] for i in indices], verifier)
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
        after = heldout_accuracy(final_model, TransformersRollouts(tokenizer), held_rows, held_prompts, tokenizer,
                                 verifier, eval_tokens, config.eval_batch_size, config.seed)
        del final_model
        metrics = _final_metrics(history, before, after, config)
        metrics.update({
            "steps": len(history), "resumed_from_step": resumed_from_step, "train_s": train_seconds,
            "checkpoint_save_s": save_seconds, "wall_s": time.perf_counter() - wall_start,
            "prompt_rows": len(train_rows), "heldout_rows": len(held_rows), "too_long_rows": len(too_long),
            "task_counts": _task_counts(train_rows),
        })
        seen_ids = [train_rows[i]["row_id"] for i in sorted(used)]
        metrics["trained_rows_seen"] = len(seen_ids)
        (staging / TRAINED_ROWS_FILE).write_text("".join(f"{r}\n" for r in seen_ids), encoding="utf-8")
        (staging / REWARD_CURVE_FILE).write_bytes(reward_curve_png(
            history, before["accuracy"] if before else None, after["accuracy"] if after else None))
        manifest = {
            **manifest_extra,
            "format_version": MANIFEST_FORMAT_VERSION,
            "method": "grpo",
            "grpo_code_version": GRPO_CODE_VERSION,
            "fingerprint": run_fingerprint,
            "config": config.model_dump(mode="json"),
            "seed": config.seed,
            "chat_template": "tulu",
            "start_model": {"path": str(start_model_dir), "weights_sha256": start_sha},
            "start_model_sha256": start_sha,
            "prompt_row_ids_sha256": row_ids_sha256(r["row_id"] for r in train_rows),
            "trained_row_ids_file": TRAINED_ROWS_FILE,
            "trained_row_ids_sha256": row_ids_sha256(seen_ids),
            "heldout_row_ids": [r["row_id"] for r in held_rows],
            "prompt_rows_sha256": identity["prompt_rows_sha256"],
            "heldout_rows_sha256": identity["heldout_rows_sha256"],
            "too_long_row_ids": too_long,
            "versions": _library_versions(),
            "metrics": metrics,
        }
        write_json_atomic(staging / MANIFEST_FILE, manifest)  # last: a directory with it is complete
    reporter.log(f"published {output_dir}: mean reward {metrics['reward_first_steps']:.3f} (first steps) -> "
                 f"{metrics['reward_last_steps']:.3f} (last steps), held-out accuracy "
                 f"{_fmt(metrics['heldout_accuracy_before'])} -> {_fmt(metrics['heldout_accuracy_after'])}")
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
        "reward_per_step": [{"step": h["step"], "reward_mean": h["reward_mean"], "accuracy": h["accuracy"],
                             "unfinished_rate": h["unfinished_rate"], "kl": h["kl"], "loss": h["loss"],
                             "reward_by_task": h["reward_by_task"]} for h in history],
        "mean_reward": _mean(rewards),
        "reward_first_steps": _mean(rewards[:k]),
        "reward_last_steps": _mean(rewards[-k:]),
        "reward_window_steps": k,
        "heldout_accuracy_before": before["accuracy"] if before else None,
        "heldout_accuracy_after": after["accuracy"] if after else None,
        "heldout_before": before,
        "heldout_after": after,
        "samples": [h["sample"] for h in history[-3:]],
        "correct_reward": config.correct_reward,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def load_manifest(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The ``training_manifest.json`` of a published checkpoint."""
    return json.loads((Path(checkpoint_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
