"""GRPO with vLLM rollouts on a GPU (skipped only on a machine without CUDA): the toy addition task of test_rlvr_training.py, with
rollouts sampled by a colocated vLLM engine whose weights are synced after every optimizer step. If the sync did
not happen, the rollouts would keep coming from the start checkpoint and the reward would not rise."""

from __future__ import annotations

import pytest
from test_rlvr_training import LEARN, TRAIN_PAIRS
from test_rlvr_support import addition_row, save_warm_addition_model


# `cuda`: skipped (the only skip CI allows) on a machine without CUDA; on one with CUDA, vLLM must be installed.
@pytest.mark.cuda
@pytest.mark.slow
def test_grpo_with_vllm_rollouts_learns(tmp_path):
    import vllm  # noqa: F401  (the `gpu` extra: pip install -e '.[gpu]')

    from tulu_pipeline.training.rlvr import run_rlvr

    # head_dim 64: vLLM's attention kernels do not take the CPU toy's 16
    model = save_warm_addition_model(tmp_path / "sft-toy", TRAIN_PAIRS, steps=200, hidden_size=128, heads=2)
    rows = [addition_row(a, b) for a, b in TRAIN_PAIRS]
    config = LEARN.model_copy(update={"use_vllm": True, "vllm_gpu_memory_utilization": 0.25,
                                      "max_prompt_length": 64})
    result = run_rlvr(rows, rows[:4], model, tmp_path / "rlvr-toy", config)
    rewards = [point["reward_mean"] for point in result.metrics["reward_per_step"]]
    k = len(rewards) // 4
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    print(f"vLLM rollouts: mean reward first {k} steps {first:.2f} -> last {k} steps {last:.2f}")
    assert last > first + 1.0, rewards
