"""Curation: normalized → deduplicated → decontaminated prompts, the decontamination report, and the
blocking checks that gate every training stage."""

import json
from typing import Any

import dagster as dg
from pydantic import Field

from assets.metadata import DATA_OWNERS, config_hash, image, samples, table_schema
from resources import ComputeLauncher, TuluStorage
from tulu_pipeline.curation.config import DEFAULT_SOURCE_PRIORITY, CurationConfig, EvalSelection, RaySettings
from tulu_pipeline.curation.decontaminate import DecontamConfig
from tulu_pipeline.curation.dedup import DedupConfig
from tulu_pipeline.curation.normalize import NormalizeConfig
from tulu_pipeline.curation.pipeline import (
    decontamination_report, record_check_results, run_stage, schema_violations, verify_no_eval_overlap,
)
from tulu_pipeline.curation.ray_job import MODULE as RAY_JOB, load_stage_result
from tulu_pipeline.curation.report import heatmap_png, report_markdown
from tulu_pipeline.curation.stages import (
    CURATION_CODE_VERSION,
    DECONTAMINATION_CODE_VERSION,
    StageResult,
    build_eval_index,
)
from tulu_pipeline.data.registry import registry
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.plots import histogram_png

TRAIN_KEYS = [dg.AssetKey(["raw", s.id]) for s in registry() if s.role == "train"]
EVAL_KEYS = [dg.AssetKey(["raw", s.id]) for s in registry() if s.role == "eval"]
SAMPLE_COLUMNS = ["row_id", "source", "messages"]


class ExecutionConfig(dg.Config):
    """Where a stage runs; the outputs are the same either way, so it is left out of the config hash."""

    executor: str = Field(default="local", description="local: in this process; ray: a Ray Data job launched "
                          "through the compute launcher (see docs/scale.md)")
    ray_address: str | None = Field(default=None, description="Ray cluster address (default $RAY_ADDRESS, else a "
                                    "local Ray started by the job)")
    shard_rows: int = Field(default=RaySettings().shard_rows, description="rows per Ray task")
    eval_index_max_bytes: int = Field(default=RaySettings().eval_index_max_bytes,
                                      description="decontamination on Ray: an eval index larger than this is split "
                                      "by n-gram hash into parts joined with the rows (see docs/scale.md)")
    eval_index_shards: int | None = Field(default=None, description="parts of a split eval index (default: its "
                                          "bytes / eval_index_max_bytes, rounded up)")


EXECUTION_FIELDS = set(ExecutionConfig.model_fields)


def _settings(config: dg.Config) -> dict:
    """The stage's own settings, without where it runs."""
    return config.model_dump(exclude=EXECUTION_FIELDS)


def _runs_on_ray(config: ExecutionConfig) -> bool:
    if config.executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {config.executor!r}")
    return config.executor == "ray"


def _run(context: dg.AssetExecutionContext, launcher: ComputeLauncher, store, stage: str,
         curation: CurationConfig, config: ExecutionConfig, **local: Any) -> tuple[StageResult, dict]:
    """Run ``stage`` in this process (`pipeline.run_stage`, with ``local`` options) or, with executor ray, as
    a Ray job through the launcher; its result and the metrics the job reported (``ray_*``)."""
    if not _runs_on_ray(config):
        return run_stage(stage, store, curation, context.run.run_id, **local), {}
    curation = curation.model_copy(update={"executor": "ray", "ray": RaySettings(
        address=config.ray_address, shard_rows=config.shard_rows, eval_index_max_bytes=config.eval_index_max_bytes,
        eval_index_shards=config.eval_index_shards)})
    invocation = launcher.run(context, RAY_JOB, extras={"tulu_home": store.url, "stage": stage,
                                                        "run_id": context.run.run_id,
                                                        "config": curation.model_dump(mode="json")})
    reported = {key: value for r in invocation.get_results() if isinstance(r, dg.MaterializeResult)
                for key, value in (r.metadata or {}).items() if key.startswith("ray_")}
    return load_stage_result(store, context.run.run_id, stage), reported


class NormalizeStageConfig(ExecutionConfig):
    train_sources: list[str] | None = None
    max_chars: int = NormalizeConfig().max_chars
    strip_template_artifacts: bool = True


class DedupStageConfig(ExecutionConfig):
    key: str = "prompt"
    near_duplicates: bool = True
    shingle_size: int = 5
    num_perm: int = 128
    threshold: float = 0.8
    seed: int = 1
    source_priority: list[str] = Field(default_factory=lambda: list(DEFAULT_SOURCE_PRIORITY))


class DecontamStageConfig(ExecutionConfig):
    ngram: int = 8
    threshold: float = 0.5
    rule: str = Field("token_coverage", description="token_coverage (Tülu 3) or ngram_share")
    short_items: str = Field("share", description="items shorter than ngram tokens: share, anywhere or ignore")
    include_response: bool = False
    incremental: bool = Field(True, description="reuse the latest version's decisions where its fingerprints "
                              "allow: scan new or changed rows against every benchmark, the others only against "
                              "added or changed benchmarks (see docs/decontamination.md)")
    suites: list[str] = Field(default_factory=lambda: ["dev", "unseen"])
    benchmarks: list[str] | None = None
    flag_share: float = 0.02


def _stage_metadata(store, result: StageResult, config: dg.Config) -> dict:
    return {
        "config_hash": config_hash(_settings(config)),
        "dagster/row_count": result.dataset.rows,
        "dagster/column_schema": table_schema(ROW_SCHEMA),
        "path": dg.MetadataValue.path(result.dataset.path),
        "version": result.version,
        "quarantined": result.quarantined,
        "quarantine_path": dg.MetadataValue.path(result.quarantine_path or ""),
        "ledger_events": result.ledger_events,
        "stats": dg.MetadataValue.json(json.loads(json.dumps(result.stats, default=str))),
        "inputs": dg.MetadataValue.json(result.inputs),
        "samples": samples(result.samples, SAMPLE_COLUMNS),
        "length_histogram": image(store, f"reports/{result.name}/{result.version}/lengths.png",
                                  histogram_png(result.text_lengths, f"{result.name}: text length", "characters")),
    }


def _stage_result(store, result: StageResult, reported: dict, config: dg.Config, **kwargs: Any) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={**_stage_metadata(store, result, config), **reported},
                                data_version=dg.DataVersion(result.version), **kwargs)


@dg.asset(group_name="curation", kinds={"parquet"}, owners=DATA_OWNERS, code_version=CURATION_CODE_VERSION, deps=TRAIN_KEYS,
          description="Every training pool in the row schema, Unicode-NFC and whitespace normalized, template "
          "artifacts stripped; empty and over-long rows quarantined with a reason.")
def normalized_prompts(context: dg.AssetExecutionContext, config: NormalizeStageConfig,
                       storage: TuluStorage, launcher: ComputeLauncher) -> dg.MaterializeResult:
    store = storage.store()
    curation = CurationConfig(train_sources=config.train_sources, normalize=NormalizeConfig(
        max_chars=config.max_chars, strip_template_artifacts=config.strip_template_artifacts))
    return _stage_result(store, *_run(context, launcher, store, "normalized_prompts", curation, config), config)


@dg.asset(group_name="curation", kinds={"parquet"}, owners=DATA_OWNERS, code_version=CURATION_CODE_VERSION, deps=[normalized_prompts],
          description="Exact duplicates (normalized text) and MinHash-LSH near duplicates removed; the first row "
          "by source priority, then row_id, is kept; each dropped row's ledger event names the row it duplicates.")
def deduplicated_prompts(context: dg.AssetExecutionContext, config: DedupStageConfig,
                         storage: TuluStorage, launcher: ComputeLauncher) -> dg.MaterializeResult:
    store = storage.store()
    curation = CurationConfig(dedup=DedupConfig(**_settings(config)))
    return _stage_result(store, *_run(context, launcher, store, "deduplicated_prompts", curation, config), config)


@dg.multi_asset(
    specs=[
        dg.AssetSpec("decontaminated_prompts", group_name="curation", kinds={"parquet"}, owners=DATA_OWNERS,
                     code_version=DECONTAMINATION_CODE_VERSION, deps=[deduplicated_prompts, *EVAL_KEYS],
                     description="Deduplicated prompts with every row that overlaps an evaluation item removed "
                     "(exhaustive word n-gram matching, no hit cap); the quarantine keeps benchmark, eval id, "
                     "score and span. Its blocking checks gate all training."),
        dg.AssetSpec("decontamination_report", group_name="curation", kinds={"json"}, owners=DATA_OWNERS,
                     code_version=DECONTAMINATION_CODE_VERSION, deps=["decontaminated_prompts"],
                     description="Per training source × benchmark: rows removed and share of the benchmark's "
                     "items hit (flagged above 2%), as a table and a heatmap."),
    ],
    check_specs=[
        dg.AssetCheckSpec("no_eval_overlap", asset="decontaminated_prompts", blocking=True,
                          description="an independent reference pass finds no clean row over the threshold"),
        dg.AssetCheckSpec("schema_valid", asset="decontaminated_prompts", blocking=True,
                          description="every row matches the row schema"),
        dg.AssetCheckSpec("unique_row_ids", asset="decontaminated_prompts", blocking=True,
                          description="no two rows share a row_id"),
    ],
)
def decontamination(context: dg.AssetExecutionContext, config: DecontamStageConfig, storage: TuluStorage,
                    launcher: ComputeLauncher):
    store = storage.store()
    curation = CurationConfig(
        decontam=DecontamConfig(ngram=config.ngram, threshold=config.threshold, rule=config.rule,
                                short_items=config.short_items, include_response=config.include_response),
        evals=EvalSelection(suites=config.suites, benchmarks=config.benchmarks), flag_share=config.flag_share)
    index = build_eval_index(store, curation)
    result, reported = _run(context, launcher, store, "decontaminated_prompts", curation, config, index=index,
                            incremental=config.incremental)
    yield _stage_result(store, result, reported, config, asset_key="decontaminated_prompts")

    violations = verify_no_eval_overlap(store, result.version, index[0], curation, route=result.plan)
    problems, duplicates = schema_violations(store, "decontaminated_prompts", result.version)
    record_check_results(store, result.version, {"no_eval_overlap": not violations, "schema_valid": not problems,
                                                 "unique_row_ids": duplicates == 0})
    yield dg.AssetCheckResult(asset_key="decontaminated_prompts", check_name="no_eval_overlap",
                              passed=not violations, metadata={"violations": dg.MetadataValue.json(violations)})
    yield dg.AssetCheckResult(asset_key="decontaminated_prompts", check_name="schema_valid",
                              passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)})
    yield dg.AssetCheckResult(asset_key="decontaminated_prompts", check_name="unique_row_ids",
                              passed=duplicates == 0, metadata={"duplicates": duplicates})

    report = decontamination_report(store, result.version, curation, result.inputs)
    base = f"reports/decontamination/{result.version}"
    store.write_json(f"{base}/report.json", report)
    markdown = report_markdown(report)
    store.write_bytes(f"{base}/report.md", markdown.encode())
    yield dg.MaterializeResult(
        asset_key="decontamination_report",
        metadata={
            "rows_removed": report["rows_removed"],
            "config_hash": config_hash(_settings(config)),
            "flagged_cells": len(report["flagged"]),
            "report": dg.MetadataValue.md(markdown),
            "heatmap": image(store, f"{base}/heatmap.png", heatmap_png(report)),
            "path": dg.MetadataValue.path(store.uri(f"{base}/report.json")),
        },
        data_version=dg.DataVersion(result.version),
    )


curation_assets = [normalized_prompts, deduplicated_prompts, decontamination]
