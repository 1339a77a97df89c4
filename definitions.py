"""The Dagster code location: every stage's assets, checks, jobs and the deployment's resources."""

from __future__ import annotations

import os

import dagster as dg

from assets.audit import audit_report
from assets.base_model import base_model
from assets.curation import curation_assets
from assets.sft import sft_assets
from assets.sources import raw_source_assets
from resources import resources_for

DEPLOYMENT = os.environ.get("TULU_DEPLOYMENT", "local")

# Locally one process runs a materialization step by step: the heavy stages launch their own
# processes through the compute launcher, and two cores gain nothing from parallel small steps.
EXECUTORS = {"local": dg.in_process_executor, "k8s": dg.multiprocess_executor}

full_pipeline = dg.define_asset_job(
    "full_pipeline",
    selection=dg.AssetSelection.all(),
    description="Materialize every stage of the pipeline on the configured deployment.",
)

defs = dg.Definitions(
    assets=[*raw_source_assets, *curation_assets, base_model, *sft_assets, audit_report],
    jobs=[full_pipeline],
    resources=resources_for(DEPLOYMENT),
    executor=EXECUTORS[DEPLOYMENT],
)
