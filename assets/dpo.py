"""DPO: reference log-probs of the SFT checkpoint on the preference pairs, and the DPO checkpoint trained on them."""

from typing import Any

import dagster as dg

from assets.automation import GPU_STAGE
from assets.metadata import TRAINING_OWNERS, checkpoint_metadata, heldout_effect_metadata, latest_checkpoint_id
from resources import ComputeLauncher, TuluStorage
from tulu_pipeline.training.dpo import DPO_CODE_VERSION, LOSS_CURVE_FILE
from tulu_pipeline.training.dpo_reference import REFERENCE_CODE_VERSION
from tulu_pipeline.training.dpo_plan import (
    JOB_MODULE,
    dpo_checkpoint_plan,
    record_dpo_ledger,
    reference_logprobs_plan,
)


class DPOStageConfig(dg.Config):
    preset: str = "cpu_demo"
    """a named DPO preset: cpu_demo (CPU, minutes) or tulu3_8b (Tülu 3's dpo_norm recipe, beta 5, lr 5e-7)"""
    overrides: dict[str, Any] = {}
    """fields of DPOTrainingConfig to change, e.g. {"max_steps": 4}; give reference_logprobs the same max_length"""
    sft_checkpoint_id: str = ""
    """the SFT checkpoint to start from (also the reference); empty: sft_checkpoint's latest materialization"""


def _sft_checkpoint_id(context: dg.AssetExecutionContext, config: DPOStageConfig) -> str | None:
    """The configured id, else the one sft_checkpoint's latest materialization reported (None: newest on disk)."""
    if config.sft_checkpoint_id:
        return config.sft_checkpoint_id
    return latest_checkpoint_id(context.instance, "sft_checkpoint")


@dg.asset(group_name="preference", kinds={"parquet"}, owners=TRAINING_OWNERS, code_version=REFERENCE_CODE_VERSION,
          deps=["preference_pairs", "sft_checkpoint"], **GPU_STAGE,
          description="Summed log-probs and token counts of every pair's chosen and rejected response under the "
          "reference model (the SFT checkpoint), computed once per (pairs version, reference checkpoint, max_length) "
          "in its own process and reused by every DPO run.")
def reference_logprobs(context: dg.AssetExecutionContext, config: DPOStageConfig, storage: TuluStorage,
                       launcher: ComputeLauncher) -> dg.MaterializeResult:
    store = storage.store()
    plan = reference_logprobs_plan(store, config.preset, config.overrides, _sft_checkpoint_id(context, config))
    reported = launcher.run(context, JOB_MODULE, extras=plan.extras).get_materialize_result().metadata or {}
    return dg.MaterializeResult(
        metadata={**reported, "pairs_version": plan.pairs_version, "reference_checkpoint": plan.reference.checkpoint_id,
                  "max_length": plan.extras["config"]["max_length"]},
        data_version=dg.DataVersion(plan.version))


@dg.asset(group_name="preference", kinds={"pytorch", "safetensors"}, owners=TRAINING_OWNERS,
          code_version=DPO_CODE_VERSION, deps=[reference_logprobs, "preference_pairs", "sft_checkpoint"],
          **GPU_STAGE,
          description="Length-normalized DPO (Tülu 3's dpo_norm) of the SFT checkpoint on the train split of "
          "preference_pairs with the stored reference log-probs, run by the compute launcher; held-out preference "
          "and reward accuracy before and after.")
def dpo_checkpoint(context: dg.AssetExecutionContext, config: DPOStageConfig, storage: TuluStorage,
                   launcher: ComputeLauncher) -> dg.MaterializeResult:
    store = storage.store()
    plan = dpo_checkpoint_plan(store, config.preset, config.overrides, _sft_checkpoint_id(context, config))
    reported = launcher.run(context, JOB_MODULE, extras=plan.extras).get_materialize_result().metadata or {}
    curve = f"{plan.checkpoint_dir}/{LOSS_CURVE_FILE}"
    metadata, manifest = checkpoint_metadata(
        store, plan.checkpoint_id, plan.checkpoint_dir, reported, plots={"loss_curve": (curve, curve)},
        pairs_version=plan.pairs_version, reference_checkpoint=plan.reference.checkpoint_id,
        reference_logprobs_version=plan.reference_version)
    metrics = manifest["metrics"]
    metadata.update({
        "ledger_events": dg.MetadataValue.json(record_dpo_ledger(store, plan, manifest, context.run.run_id)),
        "heldout_before": dg.MetadataValue.json(metrics["heldout_before"]),
        "heldout_after": dg.MetadataValue.json(metrics["heldout_after"]),
        **heldout_effect_metadata(metrics.get("heldout_effect")),
        "manifest": dg.MetadataValue.json({k: v for k, v in manifest.items() if k != "metrics"}),
    })
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(plan.version))


dpo_assets = [reference_logprobs, dpo_checkpoint]
