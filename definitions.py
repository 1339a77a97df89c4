"""The Dagster code location: every stage's assets, checks, jobs, schedules, sensors and the deployment's resources."""

import os

import dagster as dg

from assets.audit import audit_report
from assets.automation import (
    GPU_POOL, auto_train_enabled, build_coverage_checks, build_recuration, build_source_change_sensor,
    build_source_files, stage_jobs,
)
from assets.base_model import base_model
from assets.curation import curation_assets
from assets.dpo import dpo_assets, dpo_checkpoint
from assets.evaluation import evaluation_assets, evaluation_checks, evaluation_jobs, evaluation_sensors
from assets.lineage import build_template_checks, checkpoint_diff
from assets.preference import preference_assets, preference_checks
from assets.rlvr import rlvr_assets, rlvr_checkpoint
from assets.sft import sft_assets, sft_checkpoint
from assets.sources import raw_source_assets
from resources import resources_for
from tulu_pipeline.data.registry import registry

DEPLOYMENT = os.environ.get("TULU_DEPLOYMENT", "local")

# Locally one process runs a materialization step by step: the heavy stages launch their own
# processes through the compute launcher, and two cores gain nothing from parallel small steps.
EXECUTORS = {"local": dg.in_process_executor, "k8s": dg.multiprocess_executor}

TRAINING_ASSETS = [sft_checkpoint, dpo_checkpoint, rlvr_checkpoint]
CHECKPOINT_KEYS = [a.key for a in TRAINING_ASSETS]
STAGE_GROUPS = ("sources", "curation", "sft", "preference", "rlvr", "audit")


def _training(asset: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """GPU stages share the `gpu` pool (one at a time per slot) and start by themselves only when enabled."""
    def attrs(spec: dg.AssetSpec) -> dg.AssetSpec:
        condition = dg.AutomationCondition.eager() if auto_train_enabled() else None
        return spec.replace_attributes(automation_condition=condition)

    return dg.map_asset_specs(attrs, [asset])[0]


source_files = build_source_files(registry())
recuration_job, weekly_recuration = build_recuration()
jobs = stage_jobs(STAGE_GROUPS)
full_pipeline = dg.define_asset_job(
    "full_pipeline",
    # evaluation is partitioned by checkpoint: `evaluate_checkpoint` runs it per partition (see assets/evaluation.py)
    selection=dg.AssetSelection.all() - dg.AssetSelection.key_prefixes("source_file") - dg.AssetSelection.groups("evaluation"),
    description="Materialize every stage of the pipeline on the configured deployment, up to the checkpoints; "
    "evaluation runs per checkpoint partition (evaluate_checkpoint).",
)

defs = dg.Definitions(
    assets=[source_files, *raw_source_assets, *curation_assets, base_model,
            *[a for a in [*sft_assets, *preference_assets, *dpo_assets, *rlvr_assets] if a not in TRAINING_ASSETS],
            *map(_training, TRAINING_ASSETS), audit_report, checkpoint_diff, *evaluation_assets],
    asset_checks=[*preference_checks, *evaluation_checks, *build_coverage_checks(CHECKPOINT_KEYS),
                  *build_template_checks(CHECKPOINT_KEYS)],
    jobs=[full_pipeline, recuration_job, *jobs.values(), *evaluation_jobs],
    schedules=[weekly_recuration],
    sensors=[build_source_change_sensor(recuration_job, checkpoint_keys=CHECKPOINT_KEYS), *evaluation_sensors],
    resources=resources_for(DEPLOYMENT),
    executor=EXECUTORS[DEPLOYMENT],
)

__all__ = ["defs", "GPU_POOL"]
