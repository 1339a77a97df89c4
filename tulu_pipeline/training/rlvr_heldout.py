"""Held-out measurement of an RLVR policy (greedy verifier accuracy, sampled training reward) and the run's
final metrics: before/after with paired bootstrap intervals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tulu_pipeline.rlvr.prompts import row_task
from tulu_pipeline.training.rlvr_config import RLVRTrainingConfig
from tulu_pipeline.training.rlvr_rollouts import Verifier, mean_or_zero, scored_rollout

# Per-step metrics kept in the manifest and plotted (every metric is also streamed each logging step).
STEP_CURVE_KEYS = ("step", "reward_mean", "reward_std", "accuracy", "unfinished_rate", "zero_std_groups_dropped_share",
                   "clip_low_fraction", "clip_high_fraction", "kl", "entropy", "completion_tokens_mean",
                   "logprob_mismatch", "is_weight_mean", "loss", "reward_by_task")


def load_policy(model_dir: Path, device: Any) -> Any:
    """A policy checkpoint in fp32 on ``device``, its generation padding set."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    return model


def heldout_accuracy(model: Any, rollouts: Any, rows: Sequence[dict[str, Any]], encoded: Sequence[list[int]],
                     tokenizer: Any, verifier: Verifier, max_new_tokens: int, config: RLVRTrainingConfig
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
        "accuracy": sum(oks) / len(oks), "accuracy_ci95": ci95(oks), "mean_score": sum(scores) / len(scores),
        "rows": len(oks), "ok_per_row": [int(ok) for ok in oks],
        "per_task": {task: sum(v) / len(v) for task, v in sorted(per_task.items())}}
    if config.heldout_samples:
        result.update(_sampled_heldout(model, rollouts, rows, encoded, tokenizer, verifier, max_new_tokens, config))
    return result


def _sampled_heldout(model: Any, rollouts: Any, rows: Sequence[dict[str, Any]], encoded: Sequence[list[int]],
                     tokenizer: Any, verifier: Verifier, max_new_tokens: int,
                     config: RLVRTrainingConfig) -> dict[str, Any]:
    k = config.heldout_samples
    groups = rollouts.generate(model, list(encoded), n=k, max_new_tokens=max_new_tokens, seed=config.seed + 1,
                               temperature=config.temperature, top_p=config.top_p,
                               batch_size=max(k, config.eval_batch_size))
    scored = [[scored_rollout(i, row, out, tokenizer, verifier, config) for out in outs]
              for i, (row, outs) in enumerate(zip(rows, groups))]
    rewards = [mean_or_zero([r.reward for r in group]) for group in scored]
    every = [r for group in scored for r in group]
    return {"sampled_reward": mean_or_zero(rewards), "sampled_reward_ci95": ci95(rewards),
            "sampled_reward_per_row": rewards, "sampled_accuracy": mean_or_zero([float(r.ok) for r in every]),
            "sampled_unfinished_rate": mean_or_zero([float(not r.finished) for r in every]), "samples_per_row": k}


def ci95(values: Sequence[float], seed: int = 0) -> list[float]:
    """Seeded percentile-bootstrap 95% interval of the mean."""
    from tulu_pipeline.evaluation.scoring import bootstrap_ci

    return list(bootstrap_ci([float(v) for v in values], n_resamples=2000, seed=seed))


def final_metrics(history: list[dict[str, Any]], before: dict | None, after: dict | None,
                   config: RLVRTrainingConfig) -> dict[str, Any]:
    k = max(1, len(history) // 4)
    rewards = [h["reward_mean"] for h in history]
    return {
        "reward_per_step": [{key: h[key] for key in STEP_CURVE_KEYS if key in h} for h in history],
        "mean_reward": mean_or_zero(rewards),
        "reward_first_steps": mean_or_zero(rewards[:k]),
        "reward_last_steps": mean_or_zero(rewards[-k:]),
        "reward_window_steps": k,
        "heldout_accuracy_before": before["accuracy"] if before else None,
        "heldout_accuracy_after": after["accuracy"] if after else None,
        # paired: the same prompts greedily answered by the start and the trained checkpoint
        "heldout_accuracy_change_ci95": (ci95([a - b for a, b in zip(after["ok_per_row"], before["ok_per_row"])])
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
            "heldout_reward_change": mean_or_zero(diffs), "heldout_reward_change_ci95": ci95(diffs),
            "heldout_sampled_accuracy_before": before["sampled_accuracy"],
            "heldout_sampled_accuracy_after": after["sampled_accuracy"]}
