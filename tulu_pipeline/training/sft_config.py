"""The SFT config: typed, with defaults that run on the embedded 135M model on a CPU, and named presets.

`SFTTrainingConfig()` is the CPU demo (``SFT_PRESETS["cpu_demo"]``); ``SFT_PRESETS["tulu3_8b"]`` holds the
published Tülu 3 8B SFT recipe (lr 5e-6, 2 epochs, effective batch 128, max length 4096, linear schedule
with 3% warmup, sum loss reduction, seed 123). The whole config is saved with every checkpoint
(``training_manifest.json``), so a checkpoint says how it was made.

Global batch = ``per_device_batch_size * gradient_accumulation_steps`` sequences per optimizer step, whatever
the world size: a config describes the run as one process would train it, and at launch `run_sft` splits it over
the torchrun processes (`SFTTrainingConfig.for_world_size`, `tulu_pipeline.training.batch_layout`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from tulu_pipeline.training.batch_layout import DataParallelBatch
from tulu_pipeline.training.sharding_config import ShardingConfig, is_unsharded_default


class LoraSettings(BaseModel):
    """LoRA adapters (peft) instead of full fine-tuning; the published checkpoint has them merged in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SFTTrainingConfig(DataParallelBatch, BaseModel):
    """Hyperparameters of one SFT run. Defaults: the CPU demo on SmolLM2-135M (~250 short rows, 2 cores)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    BATCH_UNIT: ClassVar[str] = "sequences"

    learning_rate: float = Field(1e-4, gt=0)
    num_epochs: float = Field(1.0, gt=0)
    per_device_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8, description="tokens per conversation; longer ones keep their start")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0.0)
    loss_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="mean: per-token mean over the whole optimizer step (every trained token weighs the same); "
        "sum: per-micro-batch token sum, averaged over micro-batches (open-instruct's Tülu 3 setting)",
    )
    packing: bool = Field(
        True,
        description="padding-free batches: each micro-batch's sequences are concatenated into rows with "
        "per-sequence position ids and attention that never crosses a sequence boundary",
    )
    bf16: Literal["auto"] | bool = Field(
        "auto",
        description="bf16 autocast with fp32 master weights. auto: on CUDA devices that support bf16 and on CPUs "
        "with native bf16 matmuls (AVX512-BF16/AMX), fp32 elsewhere",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; None disables it")
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None
    seed: int = 42
    save_steps: int = Field(6, ge=1, description="optimizer steps between resumable checkpoints")
    logging_steps: int = Field(1, ge=1)
    max_steps: int | None = Field(
        12, ge=1, description="stop after this many optimizer steps (overrides epochs); None: train all epochs"
    )
    eval_batch_size: int = Field(8, ge=1, description="sequences per forward pass for the held-out loss")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa"
    )
    sharding: ShardingConfig = Field(
        default_factory=ShardingConfig, exclude_if=is_unsharded_default,
        description="FSDP2 sharding over the torchrun processes (docs/sharding.md); left out of the config's "
        "dump (identity, checkpoint ids, manifest config) while it is the default, strategy none")



SFT_PRESETS: dict[str, SFTTrainingConfig] = {
    # SmolLM2-135M on ~250 short rows, 2 CPU cores (the defaults): 12 steps of 8 conversations (96 rows,
    # ~15k tokens). Measured (benchmarks/results/sft.json, AVX512-BF16 CPU, bf16 autocast): ~150 tokens/s,
    # run_sft 125 s end to end; training loss 1.32 -> 0.98 (first/last 3 steps), held-out 1.51 -> 1.06.
    # Without native bf16 (fp32) expect roughly half the throughput.
    "cpu_demo": SFTTrainingConfig(),
    # Tülu 3 8B SFT (Lambert et al. 2024, Table "SFT hyperparameters"; open-instruct's tulu3_8b_sft recipe): a
    # global batch of 128 sequences per step, at most 8 per device (8 x 16 accumulation steps on one process,
    # 8 x 2 on 8 GPUs); no gradient clipping (open-instruct's default clip_grad_norm=-1).
    "tulu3_8b": SFTTrainingConfig(
        learning_rate=5e-6,
        num_epochs=2,
        per_device_batch_size=8,
        gradient_accumulation_steps=16,
        max_length=4096,
        warmup_ratio=0.03,
        lr_scheduler="linear",
        weight_decay=0.0,
        loss_reduction="sum",
        packing=True,
        bf16="auto",
        max_grad_norm=None,
        gradient_checkpointing=True,
        seed=123,
        save_steps=200,
        logging_steps=1,
        max_steps=None,
    ),
}


def sft_config(preset: str = "cpu_demo", **overrides: object) -> SFTTrainingConfig:
    """A preset with fields replaced (validated like any other config)."""
    if preset not in SFT_PRESETS:
        raise KeyError(f"unknown SFT preset {preset!r}; known: {sorted(SFT_PRESETS)}")
    return SFTTrainingConfig.model_validate({**SFT_PRESETS[preset].model_dump(), **overrides})
