"""The RLVR (GRPO) config: typed, with defaults that run on a CPU in minutes, and named presets.

`GRPOTrainingConfig()` is the CPU demo (``GRPO_PRESETS["cpu_demo"]``): a handful of optimizer steps, each on
2 prompts x 4 sampled completions of at most 48 tokens. ``GRPO_PRESETS["tulu3_8b"]`` carries the Tülu 3 8B
RLVR hyperparameters over to GRPO (see the preset's comment for what is taken from the paper and what is not).

Reward (Tülu 3's RLVR): the verifier's score, ``correct_reward`` (10) when the answer is right and 0 otherwise;
a completion that reaches ``max_completion_length`` without the EOS token gets ``-unfinished_penalty`` instead,
whatever the verifier says (open-instruct's ``non_stop_penalty`` with ``penalty_reward_value=-10``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GRPOTrainingConfig(BaseModel):
    """Hyperparameters of one GRPO run over verifiable-reward prompts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler: Literal["constant", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; None disables it")
    max_steps: int = Field(4, ge=1, description="optimizer steps (each on prompts_per_step x num_generations rollouts)")
    prompts_per_step: int = Field(2, ge=1, description="prompts sampled per step (cycling through seeded epochs)")
    num_generations: int = Field(4, ge=2, description="group size G: completions per prompt, the GRPO baseline group")
    num_iterations: int = Field(
        1, ge=1, description="optimizer updates per batch of rollouts (GRPO's mu); >1 makes the clipped ratio bite")
    micro_batch_size: int = Field(8, ge=1, description="completions per forward/backward pass (memory, not math)")
    max_prompt_length: int = Field(256, ge=8, description="prompts with more tokens are left out and reported")
    max_completion_length: int = Field(48, ge=1, description="generated tokens per completion")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    beta: float = Field(0.05, ge=0.0, description="KL coefficient against the start checkpoint (k3 estimator)")
    epsilon: float = Field(0.2, gt=0, description="PPO-style clipping of the policy ratio")
    scale_rewards: bool = Field(True, description="divide group-relative advantages by the group's reward std")
    correct_reward: float = Field(10.0, description="reward of a completion the verifier accepts (else 0)")
    unfinished_penalty: float | None = Field(
        10.0, ge=0.0,
        description="a completion that hits max_completion_length without EOS scores -unfinished_penalty "
        "instead of the verifier's reward; None: no penalty")
    heldout_max_completion_length: int | None = Field(
        None, ge=1, description="tokens for the greedy held-out accuracy; None: max_completion_length")
    eval_batch_size: int = Field(8, ge=1)
    use_vllm: bool = Field(False, description="sample rollouts with vLLM (GPU; colocated, weights synced each step)")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)
    seed: int = 42
    save_steps: int = Field(2, ge=1, description="optimizer steps between resumable checkpoints")
    logging_steps: int = Field(1, ge=1)

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations


GRPO_PRESETS: dict[str, GRPOTrainingConfig] = {
    # SmolLM2-135M (or an SFT checkpoint of it) on 2 CPU cores: 4 steps x 2 prompts x 4 completions of at most
    # 48 tokens, a few minutes end to end. Too short to move the verifier accuracy of a 135M model: it shows the
    # stage running and logging rewards; tests/test_grpo.py shows learning on a task a tiny model can learn.
    "cpu_demo": GRPOTrainingConfig(),
    # Tülu 3 8B RLVR (Lambert et al. 2024, "RLVR hyperparameters"): lr 3e-7 with a linear schedule and no warmup,
    # beta 0.05, clip 0.2, 4 update iterations per batch, temperature 1.0, grad-norm 1.0, -10 for responses without
    # EOS, responses up to 1024 tokens, max prompt length 2048. Tülu 3 trained with PPO (a value model); this
    # preset is the GRPO form open-instruct adopted later (group baseline instead of a value model; group size
    # 16 as in its grpo_fast recipes; 64 prompts x 16 = 1024 rollouts per step; ~100k episodes).
    "tulu3_8b": GRPOTrainingConfig(
        learning_rate=3e-7,
        lr_scheduler="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_steps=100,
        prompts_per_step=64,
        num_generations=16,
        num_iterations=4,
        micro_batch_size=16,
        max_prompt_length=2048,
        max_completion_length=1024,
        temperature=1.0,
        beta=0.05,
        epsilon=0.2,
        correct_reward=10.0,
        unfinished_penalty=10.0,
        use_vllm=True,
        vllm_gpu_memory_utilization=0.3,
        seed=1,
        save_steps=10,
    ),
}


def grpo_config(preset: str = "cpu_demo", **overrides: object) -> GRPOTrainingConfig:
    """A preset with fields replaced (validated like any other config)."""
    if preset not in GRPO_PRESETS:
        raise KeyError(f"unknown GRPO preset {preset!r}; known: {sorted(GRPO_PRESETS)}")
    return GRPOTrainingConfig.model_validate({**GRPO_PRESETS[preset].model_dump(), **overrides})
