"""RLVR prompt sets: verifiable-reward prompts (GSM8K, MATH, IFEval-style constraints) for GRPO training."""

from tulu_pipeline.rlvr.prompts import (
    RLVR_CODE_VERSION,
    RLVR_DATASET,
    TASKS,
    RLVRPromptsConfig,
    RLVRPromptsResult,
    build_rlvr_prompts,
    rlvr_info_path,
    row_split,
    row_task,
)

__all__ = [
    "RLVR_CODE_VERSION", "RLVR_DATASET", "TASKS", "RLVRPromptsConfig", "RLVRPromptsResult", "build_rlvr_prompts",
    "rlvr_info_path", "row_split", "row_task",
]
