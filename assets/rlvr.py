"""RLVR: verifiable-reward prompts (GSM8K, MATH, IFEval-style constraints) and the GRPO checkpoint trained on them."""

from typing import Any

import dagster as dg

from assets.automation import GPU_STAGE
from assets.metadata import (
    TRAINING_OWNERS, checkpoint_metadata, config_hash, latest_checkpoint_id, samples, table_schema,
)
from resources import ComputeLauncher, TuluStorage
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.plots import markdown_table
from tulu_pipeline.rlvr.prompts import (
    RLVR_CODE_VERSION,
    RLVR_PRESETS,
    RLVRPromptsConfig,
    build_rlvr_prompts,
)
from tulu_pipeline.training.rlvr import RLVR_TRAINING_CODE_VERSION
from tulu_pipeline.training.rlvr_rollouts import DEFAULT_VERIFIER_MODULE
from tulu_pipeline.training.rlvr_plan import record_rlvr_events, rlvr_checkpoint_plan


class RLVRPromptsAssetConfig(dg.Config):
    preset: str = "cpu_demo"
    """cpu_demo (16 training + 4 held-out prompts per task) or tulu3 (every eligible prompt)"""
    overrides: dict[str, Any] = {}
    """fields of RLVRPromptsConfig to change, e.g. {"gsm8k_rows": 64, "seed": 2}"""


@dg.asset(group_name="rlvr", kinds={"parquet"}, owners=TRAINING_OWNERS, code_version=RLVR_CODE_VERSION,
          deps=["decontaminated_prompts"],
          description="Verifiable-reward prompts: GSM8K and MATH train with their final answers, and curated prompts "
          "with sampled IFEval-taxonomy constraints; seeded, with a held-out split. Refuses a decontaminated set "
          "whose blocking checks failed.")
def rlvr_prompts(context: dg.AssetExecutionContext, config: RLVRPromptsAssetConfig,
                 storage: TuluStorage) -> dg.MaterializeResult:
    if config.preset not in RLVR_PRESETS:
        raise dg.Failure(f"unknown rlvr_prompts preset {config.preset!r}; known: {sorted(RLVR_PRESETS)}")
    prompts_config = RLVRPromptsConfig.model_validate({**RLVR_PRESETS[config.preset].model_dump(), **config.overrides})
    store = storage.store()
    result = build_rlvr_prompts(store, prompts_config, context.run.run_id)
    per_task = [{"task": task, **counts} for task, counts in result.counts.items()]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.dataset.rows,
            "dagster/column_schema": table_schema(ROW_SCHEMA),
            "path": dg.MetadataValue.path(result.dataset.path),
            "version": result.version,
            "config_hash": config_hash(prompts_config),
            "seed": prompts_config.seed,
            "heldout_rows": len(result.heldout_row_ids),
            "quarantined_rows": result.quarantined,
            "rows_per_task": dg.MetadataValue.md(markdown_table(
                per_task, ["task", "train", "heldout", "available", "quarantined"])),
            "counts": dg.MetadataValue.json(result.counts),
            "input_versions": dg.MetadataValue.json(result.inputs),
            "samples": samples(result.samples, ["row_id", "source", "messages", "ground_truth", "constraints"]),
        },
        data_version=dg.DataVersion(result.version),
    )


class RLVRCheckpointConfig(dg.Config):
    preset: str = "cpu_demo"
    """a named GRPO preset: cpu_demo (CPU, minutes) or tulu3_8b (GPU, vLLM rollouts)"""
    overrides: dict[str, Any] = {}
    """fields of RLVRTrainingConfig to change, e.g. {"max_steps": 8, "beta": 0.01}"""
    verifier_module: str = DEFAULT_VERIFIER_MODULE
    """module whose verify(task, response, ground_truth=, constraints=).ok decides each completion's reward"""
    start_checkpoint_id: str = ""
    """the DPO/SFT checkpoint to start from; empty: dpo_checkpoint's latest materialization, else sft_checkpoint's,
    else the newest DPO (then SFT) checkpoint on disk"""


def _start_checkpoint_id(context: dg.AssetExecutionContext, config: RLVRCheckpointConfig) -> str | None:
    if config.start_checkpoint_id:
        return config.start_checkpoint_id
    for key in ("dpo_checkpoint", "sft_checkpoint"):
        checkpoint_id = latest_checkpoint_id(context.instance, key)
        if checkpoint_id is not None:
            return checkpoint_id
    return None


@dg.asset(group_name="rlvr", kinds={"pytorch", "safetensors"}, owners=TRAINING_OWNERS, code_version=RLVR_TRAINING_CODE_VERSION,
          deps=[rlvr_prompts, "sft_checkpoint", "dpo_checkpoint"], **GPU_STAGE,
          description="RL with verifiable rewards (GRPO; 10 when the verifier accepts the answer, else 0, minus a "
          "penalty for answers cut off without EOS) from the latest DPO checkpoint, else the latest SFT one; run by "
          "the compute launcher in its own process; resumes from its last saved step.")
def rlvr_checkpoint(context: dg.AssetExecutionContext, config: RLVRCheckpointConfig, storage: TuluStorage,
                    launcher: ComputeLauncher) -> dg.MaterializeResult:
    store = storage.store()
    plan = rlvr_checkpoint_plan(store, config.preset, config.overrides, verifier_module=config.verifier_module,
                                start_checkpoint_id=_start_checkpoint_id(context, config))
    context.log.info(f"RLVR from {plan.start.kind} checkpoint {plan.start.checkpoint_id} on rlvr_prompts@"
                     f"{plan.dataset_version} -> {plan.checkpoint_id}")
    invocation = launcher.run(context, "tulu_pipeline.training.rlvr_job", extras=plan.extras)
    metadata, manifest = checkpoint_metadata(
        store, plan.checkpoint_id, plan.checkpoint_dir, invocation.get_materialize_result().metadata or {},
        plots={name: (f"{plan.checkpoint_dir}/{name}.png", f"reports/rlvr/{plan.checkpoint_id}/{name}.png")
               for name in ("reward_curve", "training_metrics")},
        start_checkpoint=plan.start.checkpoint_id, start_kind=plan.start.kind, dataset_version=plan.dataset_version)
    events = record_rlvr_events(store, plan, manifest, context.run.run_id)
    metadata.update({"trained_rows": events["trained_on"], "evaluated_rows": events["evaluated"]})
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(plan.version))


rlvr_assets = [rlvr_prompts, rlvr_checkpoint]
