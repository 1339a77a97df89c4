"""The RLVR (GRPO) config: typed, with defaults that run on a CPU in minutes, and named presets.

The field defaults are TRL-like GRPO (KL 0.05, symmetric clip, std-normalized advantages, token-level loss).
``RLVR_TRAINING_PRESETS["cpu_demo"]`` is the CPU demo (see its comment), ``"tulu3_8b"`` carries the Tülu 3 8B RLVR
hyperparameters over to GRPO and ``"olmo3_style"`` is open-instruct's grpo_fast as the Olmo 3 recipes run it (each
value with its source).

Reward (Tülu 3's RLVR): the verifier's score, ``correct_reward`` (10) when the answer is right and 0 otherwise;
a completion that reaches ``max_completion_length`` without the EOS token gets ``-unfinished_penalty`` instead,
whatever the verifier says (open-instruct's ``non_stop_penalty`` with ``penalty_reward_value=-10``).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from tulu_pipeline.training.batch_layout import BatchLayout, require_divisible
from tulu_pipeline.training.sharding_config import ShardingConfig, is_unsharded_default


class RLVRTrainingConfig(BaseModel):
    """Hyperparameters of one GRPO run over verifiable-reward prompts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler: Literal["constant", "linear"] = Field(
        "constant", description="over every optimizer update of the run: max_steps x num_iterations updates")
    warmup_steps: int = Field(0, ge=0, description="steps (like max_steps) of linear warmup")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; None disables it")
    max_steps: int = Field(4, ge=1, description="steps, each one batch of prompts_per_step x num_generations rollouts "
                           "and num_iterations optimizer updates on it")
    prompts_per_step: int = Field(2, ge=1, description="prompts sampled per step (cycling through seeded epochs)")
    num_generations: int = Field(4, ge=2, description="group size G: completions per prompt, the GRPO baseline group")
    num_iterations: int = Field(
        1, ge=1, description="optimizer updates per batch of rollouts (GRPO's mu); >1 makes the clipped ratio bite")
    micro_batch_size: int = Field(8, ge=1, description="completions per forward/backward pass (memory, not math)")
    max_prompt_length: int = Field(256, ge=8, description="prompts with more tokens are left out and reported")
    max_completion_length: int = Field(48, ge=1, description="generated tokens per completion")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "dapo", description="how per-token losses are averaged (TRL's names): grpo = mean over each completion's "
        "tokens, then over completions; dapo = over all completion tokens of the step; dr_grpo = sum over "
        "completions x max_completion_length (a constant denominator)")
    beta: float = Field(0.05, ge=0.0, description="KL coefficient against the start checkpoint (k3 estimator); "
                        "0 loads no reference model")
    epsilon_low: float = Field(0.2, gt=0, validation_alias=AliasChoices("epsilon_low", "epsilon"),
                               description="lower clip of the policy ratio: 1 - epsilon_low (TRL's epsilon)")
    epsilon_high: float | None = Field(
        None, gt=0, description="upper clip: 1 + epsilon_high (DAPO's clip-higher); None: epsilon_low")
    delta: float | None = Field(
        None, gt=1.0, description="TRL's two-sided clipping: the unclipped ratio is capped at delta; None: off")
    advantage_normalization: Literal["std", "centered"] = Field(
        "std", description="std: (r - group mean) / (group std + 1e-4); centered: r - group mean (Dr GRPO; "
        "open-instruct's advantage_normalization_type)")
    filter_zero_std_groups: bool = Field(
        False, description="drop groups whose rewards are all equal (no learning signal) before the loss "
        "(open-instruct's filter_zero_std_samples)")
    active_sampling: bool = Field(
        False, description="with filter_zero_std_groups: sample further prompts until prompts_per_step groups "
        "with signal are collected, at most max_sampling_rounds generation rounds per step")
    max_sampling_rounds: int = Field(4, ge=1, description="bound on generation rounds per step (active sampling)")
    mask_truncated_completions: bool = Field(
        False, description="leave completions cut off without EOS out of the loss (DAPO's overlong filtering); "
        "the alternative to unfinished_penalty")
    importance_sampling_correction: bool = Field(
        False, description="truncated importance sampling: weight each token's policy loss by "
        "min(exp(learner - sampler log-prob), importance_sampling_cap), for samplers (vLLM, bf16) whose "
        "log-probs differ from the learner's; needs a rollout backend that returns sampler log-probs")
    importance_sampling_cap: float = Field(2.0, gt=0, description="cap of the truncated importance weight")
    correct_reward: float = Field(10.0, description="reward of a completion the verifier accepts (else 0)")
    unfinished_penalty: float | None = Field(
        10.0, ge=0.0,
        description="a completion that hits max_completion_length without EOS scores -unfinished_penalty "
        "instead of the verifier's reward; None: no penalty")
    heldout_max_completion_length: int | None = Field(
        None, ge=1, description="tokens for the greedy held-out accuracy; None: max_completion_length")
    heldout_samples: int = Field(
        0, ge=0, description="sampled completions per held-out prompt (at the training temperature, with the "
        "training reward incl. the unfinished penalty), scored before and after training; 0: greedy accuracy only")
    eval_batch_size: int = Field(8, ge=1)
    use_vllm: bool = Field(False, description="sample rollouts with vLLM (GPU; colocated, weights synced each step)")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)
    seed: int = 42
    save_steps: int = Field(2, ge=1, description="optimizer steps between resumable checkpoints")
    logging_steps: int = Field(1, ge=1)
    sharding: ShardingConfig = Field(
        default_factory=ShardingConfig, exclude_if=is_unsharded_default,
        description="FSDP2 sharding of the learner (and reference) over the torchrun processes (docs/sharding.md); "
        "left out of the config's dump (identity, checkpoint ids, manifest config) while it is the default, "
        "strategy none")

    @model_validator(mode="after")
    def _consistent(self) -> RLVRTrainingConfig:
        if self.mask_truncated_completions and self.unfinished_penalty is not None:
            raise ValueError("mask_truncated_completions and unfinished_penalty are alternatives: set "
                             "unfinished_penalty=None to mask truncated completions instead of penalizing them")
        if self.active_sampling and not self.filter_zero_std_groups:
            raise ValueError("active_sampling refills groups dropped by filter_zero_std_groups; enable it too")
        if self.use_vllm and self.sharding.strategy == "fsdp":
            raise ValueError("use_vllm with sharding.strategy='fsdp' is not supported yet: a sharded learner samples "
                             "its rollouts with transformers (every rank the same ones); set use_vllm=False")
        return self

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def global_batch_size(self) -> int:
        """Rollouts per step of the whole run (prompts_per_step x num_generations), whatever the world size."""
        return self.rollouts_per_step

    def batch_layout(self, world_size: int, preset: str | None = None) -> BatchLayout:
        """The step's rollouts over ``world_size`` processes: whole groups (a prompt's samples share the baseline)
        per process, ``micro_batch_size`` rollouts per forward/backward pass."""
        prompts = require_divisible(
            self.prompts_per_step, world_size, preset=preset,
            what=f"{self.prompts_per_step} prompts x {self.num_generations} samples (groups stay whole)")
        rollouts = prompts * self.num_generations
        micro = min(self.micro_batch_size, rollouts)
        return BatchLayout(world_size, self.rollouts_per_step, micro, math.ceil(rollouts / micro), "rollouts")

    @property
    def clip_high(self) -> float:
        """The upper clip epsilon (epsilon_high, else epsilon_low)."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high


RLVR_TRAINING_PRESETS: dict[str, RLVRTrainingConfig] = {
    # SmolLM2-135M (the DPO checkpoint of it in `make run`) on 2 shared CPU cores, on rlvr_prompts' cpu_demo set
    # ("answer with less than N words" constraints): 8 steps x 2 prompts x 4 completions of at most 24 tokens, in
    # the Olmo 3 form (no KL, clip-higher, zero-std groups dropped and refilled), with a learning rate that
    # moves a 135M model in 8 steps and temperature 0.7 (at 1.0 the 135M model's samples are mostly noise). The
    # held-out prompts are scored greedily and with 4 samples each, before and after: on the default run held-out
    # greedy accuracy rose 0.31 -> 0.88 and the sampled reward -4.1 -> 9.1 (benchmarks/results/rlvr_default_run.json).
    "cpu_demo": RLVRTrainingConfig(
        learning_rate=3e-5,
        max_steps=8,
        prompts_per_step=2,
        num_generations=4,
        micro_batch_size=8,
        max_prompt_length=96,
        max_completion_length=24,
        temperature=0.7,
        beta=0.0,
        epsilon_high=0.28,
        filter_zero_std_groups=True,
        active_sampling=True,
        max_sampling_rounds=2,
        heldout_samples=4,
        eval_batch_size=16,
        save_steps=4,
    ),
    # Tülu 3 8B RLVR (Lambert et al. 2024, "RLVR hyperparameters"): lr 3e-7 with a linear schedule and no warmup,
    # beta 0.05, clip 0.2, 4 update iterations per batch, temperature 1.0, grad-norm 1.0, -10 for responses without
    # EOS, responses up to 1024 tokens, max prompt length 2048. Tülu 3 trained with PPO (a value model); this
    # preset is the GRPO form open-instruct adopted later (group baseline instead of a value model; group size
    # 16 as in its grpo_fast recipes; 64 prompts x 16 = 1024 rollouts per step; ~100k episodes).
    "tulu3_8b": RLVRTrainingConfig(
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
        loss_type="grpo",  # PPO's per-response mean, as open-instruct's GRPO had it in 2024
        beta=0.05,
        epsilon_low=0.2,
        advantage_normalization="std",
        correct_reward=10.0,
        unfinished_penalty=10.0,
        use_vllm=True,
        vllm_gpu_memory_utilization=0.3,
        seed=1,
        save_steps=10,
    ),
    # open-instruct's grpo_fast as the Olmo 3 Instruct RL recipe runs it. Sources: "7b_instruct_rl.sh" is
    # allenai/open-instruct scripts/train/olmo3/7b_instruct_rl.sh; "grpo_utils" / "data_loader" are the defaults of
    # open_instruct/grpo_utils.py GRPOExperimentConfig and open_instruct/data_loader.py StreamingDataLoaderConfig.
    "olmo3_style": RLVRTrainingConfig(
        learning_rate=1e-6,  # 7b_instruct_rl.sh: --learning_rate 1e-6
        lr_scheduler="constant",  # 7b_instruct_rl.sh: --lr_scheduler_type constant
        max_grad_norm=1.0,  # grpo_utils: max_grad_norm 1.0
        max_steps=1000,  # 7b_instruct_rl.sh: --total_episodes 1024000 / (64 x 8) = 2000 steps; a tenth of it
        prompts_per_step=64,  # 7b_instruct_rl.sh: --num_unique_prompts_rollout 64
        num_generations=8,  # 7b_instruct_rl.sh: --num_samples_per_prompt_rollout 8
        num_iterations=1,  # 7b_instruct_rl.sh: --num_epochs 1
        micro_batch_size=16,
        max_prompt_length=2048,  # 7b_instruct_rl.sh: --max_prompt_token_length 2048
        max_completion_length=8192,  # 7b_instruct_rl.sh: --response_length 8192
        temperature=1.0,  # 7b_instruct_rl.sh: --temperature 1.0
        loss_type="dapo",  # grpo_utils: loss_fn dapo, loss_denominator "token" (token-level normalization)
        beta=0.0,  # 7b_instruct_rl.sh: --beta 0.0 (no KL, no reference model)
        epsilon_low=0.2,  # grpo_utils: clip_lower 0.2
        epsilon_high=0.272,  # 7b_instruct_rl.sh / grpo_utils: --clip_higher 0.272
        advantage_normalization="centered",  # 7b_instruct_rl.sh: --advantage_normalization_type centered
        filter_zero_std_groups=True,  # data_loader: filter_zero_std_samples True
        active_sampling=True,  # 7b_instruct_rl.sh: --active_sampling
        max_sampling_rounds=8,  # ours: grpo_fast keeps pulling prompts asynchronously; here a bound per step
        mask_truncated_completions=False,  # 7b_instruct_rl.sh: --mask_truncated_completions False
        unfinished_penalty=None,  # 7b_instruct_rl.sh: --non_stop_penalty False
        importance_sampling_correction=True,  # grpo_utils: truncated_importance_sampling_ratio_cap 2.0
        importance_sampling_cap=2.0,
        correct_reward=10.0,  # grpo_utils / grpo_fast: verification_reward 10.0
        use_vllm=True,
        vllm_gpu_memory_utilization=0.3,
        seed=1,  # 7b_instruct_rl.sh: --seed 1
        save_steps=50,  # 7b_instruct_rl.sh: --checkpoint_state_freq 50
    ),
}


def rlvr_training_config(preset: str = "cpu_demo", **overrides: object) -> RLVRTrainingConfig:
    """A preset with fields replaced (validated like any other config)."""
    if preset not in RLVR_TRAINING_PRESETS:
        raise KeyError(f"unknown GRPO preset {preset!r}; known: {sorted(RLVR_TRAINING_PRESETS)}")
    return RLVRTrainingConfig.model_validate({**RLVR_TRAINING_PRESETS[preset].model_dump(), **overrides})
