"""Evaluation: one asset per benchmark (``eval/<benchmark>``) partitioned by checkpoint, and
``eval_comparison``, every evaluated checkpoint side by side.

Partitions: the dynamic partitions ``checkpoints`` (one per checkpoint id, ``base_model`` included).
`register_checkpoint(instance_or_context, checkpoint_id)` adds one (training assets call it when a
checkpoint materializes); `checkpoint_partitions_sensor` adds any ``models/*/training_manifest.json``
(and ``models/base_model``) it finds under TULU_HOME.

Each eval materialization runs two checks with it: ``no_regression_vs_parent`` (the score against the
checkpoint the run started from; thresholds in the config) and ``decontaminated_upstream`` (every
training run upstream was decontaminated against the benchmark; otherwise the score is marked possibly
contaminated). Both warn by default: an 8-item CPU sample is noisy.

The open-ended sets (MT-Bench, Vicuna, Koala, WizardLM) judge a checkpoint against its parent's answers, read
from the parent's partition of the same asset: evaluate parents first (`tulu-evaluate` does, in lineage order);
``missing_parent`` says what to do otherwise. Judged assets put the judge (id, method, template version,
low-confidence verdict) in their metadata.
"""

from typing import Any

import dagster as dg

from assets.automation import GPU_STAGE
from assets.metadata import TRAINED_CHECKPOINT_ASSETS, image, latest_checkpoint_id
from assets.metadata import samples as samples_table
from resources import ComputeLauncher, TuluStorage
from resources.generation import GenerationResource, JudgeResource
from tulu_pipeline.evaluation.benchmarks import benchmark_config, benchmarks
from tulu_pipeline.evaluation.comparison import (
    COMPARISON_CODE_VERSION,
    COMPARISON_REPORT,
    comparison_markdown,
    comparison_png,
    comparison_table,
    regression,
)
from tulu_pipeline.evaluation.lineage import BASE_MODEL_ID, lineage_order, list_checkpoints
from tulu_pipeline.evaluation.pipeline import MissingParentOutputs, is_current, run_benchmark
from tulu_pipeline.evaluation.results import dataset_name
from tulu_pipeline.evaluation.run_summary import write_run_summary
from tulu_pipeline.evaluation.runner import EVAL_CODE_VERSION
from tulu_pipeline.audit.template_checks import check_evaluation_lineage

EVAL_OWNERS = ["team:evaluation"]
CHECKPOINT_PARTITIONS = "checkpoints"
checkpoint_partitions = dg.DynamicPartitionsDefinition(name=CHECKPOINT_PARTITIONS)
REGRESSION_CHECK = "no_regression_vs_parent"
CONTAMINATION_CHECK = "decontaminated_upstream"
TEMPLATE_CHECK = "template_matches_checkpoint"
EVALUATE_CHECKPOINT = "evaluate_checkpoint"
# the assets that write models/<checkpoint_id>/ (lineage in the UI; the partition names the checkpoint)
CHECKPOINT_ASSETS = ["base_model", *TRAINED_CHECKPOINT_ASSETS]


def register_checkpoint(instance_or_context: Any, checkpoint_id: str) -> bool:
    """Add ``checkpoint_id`` to the ``checkpoints`` partitions (an instance or any context with
    ``.instance``); returns whether it was new."""
    instance = getattr(instance_or_context, "instance", instance_or_context)
    if instance.has_dynamic_partition(CHECKPOINT_PARTITIONS, checkpoint_id):
        return False
    instance.add_dynamic_partitions(CHECKPOINT_PARTITIONS, [checkpoint_id])
    return True


class EvalConfig(dg.Config):
    preset: str = "cpu"
    """cpu (a few seeded items, minutes on the embedded model) or full (every item, published settings)"""
    sample_size: int | None = None
    """override the preset's number of items"""
    few_shot: int | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    execution: str = "auto"
    """in_process (load the model here), launcher (the generation job through the compute launcher),
    auto (in_process up to 32 items)"""
    max_regression: float = 0.10
    """largest allowed drop against the parent checkpoint (absolute, 0-1)"""
    missing_parent: str = "generate"
    """open-ended sets judged against the parent checkpoint, when the parent's own evaluation saved no answers
    to the items: generate (answer with the parent's model in this run) or error (name the partition to
    materialize first)"""
    regression_needs_disjoint_intervals: bool = True
    """only flag a drop when the two bootstrap intervals do not overlap"""
    blocking_checks: bool = False
    """make the regression and contamination checks errors instead of warnings"""


def _benchmark_config(name: str, config: EvalConfig):
    overrides = {k: v for k, v in {"sample_size": config.sample_size, "few_shot": config.few_shot,
                                   "max_new_tokens": config.max_new_tokens, "seed": config.seed}.items()
                 if v is not None}
    return benchmark_config(name, config.preset, **overrides)


def _companions(context: dg.AssetExecutionContext, config: EvalConfig) -> dict[str, Any] | None:
    """The other benchmarks this run evaluates on the checkpoint, when they run in this process after this one
    (`evaluate_checkpoint` runs its steps in one process): their answers are generated in the same batches."""
    if context.job_name != EVALUATE_CHECKPOINT:
        return None
    selected = context.run.asset_selection  # empty (or None) when the run is the whole job
    names = [name for name in benchmarks() if not selected or dg.AssetKey(["eval", name]) in selected]
    return {name: _benchmark_config(name, config) for name in names}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def build_eval_asset(name: str) -> dg.AssetsDefinition:
    spec = benchmarks()[name]
    key = dg.AssetKey(["eval", name])

    @dg.asset(
        key=key, partitions_def=checkpoint_partitions, group_name="evaluation", kinds={"parquet"},
        owners=EVAL_OWNERS, code_version=EVAL_CODE_VERSION, **GPU_STAGE,
        deps=[*CHECKPOINT_ASSETS, *[dg.AssetKey(["raw", source]) for source in spec.sources]],
        metadata={"suite": spec.suite, "metric": spec.metric, "sources": list(spec.sources)},
        check_specs=[dg.AssetCheckSpec(REGRESSION_CHECK, asset=key,
                                       description="score against the checkpoint this one was trained from"),
                     dg.AssetCheckSpec(CONTAMINATION_CHECK, asset=key,
                                       description="every training run upstream was decontaminated against it"),
                     dg.AssetCheckSpec(TEMPLATE_CHECK, asset=key,
                                       description="prompted with the chat template and tokenizer the checkpoint "
                                       "was trained with (warns, naming both hashes and the first differing line)")],
        description=f"{name} ({spec.suite} suite, {spec.metric}) of one checkpoint: per-item prompt, response, "
                    "score and reason, with a seeded bootstrap interval.",
    )
    def _eval(context: dg.AssetExecutionContext, config: EvalConfig, storage: TuluStorage,
              launcher: ComputeLauncher, generation: GenerationResource, judge: JudgeResource) -> dg.MaterializeResult:
        store = storage.store()
        checkpoint_id = context.partition_key
        model = f"models/{checkpoint_id}"
        if not store.exists(model, "config.json"):
            raise dg.Failure(f"{store.uri(model)}: no model (config.json) for checkpoint {checkpoint_id!r}",
                             allow_retries=False)
        cfg = _benchmark_config(name, config)

        def run_job(requests_rel, output_rel, backend_spec, params) -> None:
            launcher.run(context, "tulu_pipeline.generation.job", extras={
                "tulu_home": store.url, "requests": requests_rel, "output": output_rel,
                "backend": backend_spec.model_dump(mode="json"), "params": params.to_json()})

        try:
            summary = run_benchmark(store, name, checkpoint_id, cfg, run_id=context.run.run_id,
                                    backend_spec=generation.spec(model, checkpoint_id), judge_spec=judge.spec(),
                                    execution=config.execution, run_job=run_job, log=context.log.info,
                                    backend_spec_for=lambda parent: generation.spec(f"models/{parent}", parent),
                                    missing_parent=config.missing_parent, companions=_companions(context, config))
        except MissingParentOutputs as error:
            raise dg.Failure(str(error), allow_retries=False) from error
        rows = list(store.iter_rows(dataset_name(name, checkpoint_id), summary["version"]))
        severity = dg.AssetCheckSeverity.ERROR if config.blocking_checks else dg.AssetCheckSeverity.WARN
        reg = regression(store, name, checkpoint_id, config.max_regression, config.regression_needs_disjoint_intervals)
        contamination = summary["contamination"]
        template = check_evaluation_lineage(summary, store, checkpoint_id)
        checks = [
            dg.AssetCheckResult(check_name=REGRESSION_CHECK, passed=reg.passed, severity=severity,
                                description=reg.description, metadata={k: v for k, v in reg.metadata.items()
                                                                       if isinstance(v, (int, float, str, bool))}),
            dg.AssetCheckResult(check_name=CONTAMINATION_CHECK, passed=contamination["status"] != "possibly_contaminated",
                                severity=severity, description="; ".join(contamination["reasons"]) or contamination["status"],
                                metadata={"status": contamination["status"],
                                          "checked": dg.MetadataValue.json(contamination["checked"])}),
            dg.AssetCheckResult(check_name=TEMPLATE_CHECK, passed=template["passed"], severity=dg.AssetCheckSeverity.WARN,
                                description=template["description"],
                                metadata={"template_lineage": dg.MetadataValue.json(template["lineage"]),
                                          "checkpoint": dg.MetadataValue.json(template["parents"])}),
        ]
        metadata = {
            **({} if summary.get("outputs_only") else {
                "score": dg.MetadataValue.float(float(summary["score"])),
                "ci_95": f"[{_pct(summary['ci_low'])}, {_pct(summary['ci_high'])}]"}),
            **({"judge": dg.MetadataValue.json(summary["judge_info"]), "low_confidence": summary["low_confidence"]}
               if summary.get("judge_info") else {}),
            **({"parent": dg.MetadataValue.json(summary["parent"] or {}), "outputs_only": summary["outputs_only"]}
               if summary.get("kind") == "pairwise_vs_parent" else {}),
            "n_items": summary["n"], "suite": spec.suite, "metric": spec.metric, "checkpoint_id": checkpoint_id,
            "execution": summary["execution"], "contamination": contamination["status"],
            "metrics": dg.MetadataValue.json(summary["metrics"]),
            "config": dg.MetadataValue.json(summary["config"]),
            "dagster/row_count": len(rows),
            "path": dg.MetadataValue.path(summary["dataset_path"]),
            "items_jsonl": dg.MetadataValue.path(summary["items_path"]),
            "items": samples_table([{**r, "response": r["response"][:200]} for r in rows[:10]],
                                   ["eval_id", "score", "reason", "response"]),
        }
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(summary["version"]),
                                    check_results=checks)

    return _eval


eval_assets = [build_eval_asset(name) for name in benchmarks()]


@dg.asset(group_name="evaluation", kinds={"json"}, owners=EVAL_OWNERS, code_version=COMPARISON_CODE_VERSION,
          deps=[a.key for a in eval_assets],
          description="Every evaluated checkpoint side by side (rows: benchmarks, dev then unseen; columns: "
                      "base, SFT, DPO, RLVR in lineage order), with bootstrap intervals and contamination marks; "
                      "each stage's paired effect on its parent; the run summary (reports/eval/comparison/summary.md).")
def eval_comparison(context: dg.AssetExecutionContext, storage: TuluStorage) -> dg.MaterializeResult:
    store = storage.store()
    table = comparison_table(store)
    markdown = comparison_markdown(table)
    store.write_json(f"{COMPARISON_REPORT}/comparison.json", table)
    store.write_bytes(f"{COMPARISON_REPORT}/comparison.md", (markdown + "\n").encode())
    summary = write_run_summary(store, table)
    flagged = [f"{row['benchmark']}@{c}" for row in table["rows"] for c, cell in row["cells"].items()
               if cell.get("contamination") == "possibly_contaminated"]
    return dg.MaterializeResult(metadata={
        "table": dg.MetadataValue.md(markdown),
        "summary": dg.MetadataValue.md(summary),
        "chart": image(store, f"{COMPARISON_REPORT}/comparison.png", comparison_png(table)),
        "checkpoints": dg.MetadataValue.json(table["columns"]),
        "benchmarks": len(table["rows"]),
        "possibly_contaminated": dg.MetadataValue.json(flagged),
        "path": dg.MetadataValue.path(store.uri(f"{COMPARISON_REPORT}/comparison.json")),
    })


@dg.asset_check(asset=eval_comparison, name="no_possibly_contaminated_scores",
                description="warns when a reported score comes from a checkpoint whose training data was not "
                            "decontaminated against that benchmark")
def no_possibly_contaminated_scores(storage: TuluStorage) -> dg.AssetCheckResult:
    table = comparison_table(storage.store())
    flagged = [f"{row['benchmark']}@{c}" for row in table["rows"] for c, cell in row["cells"].items()
               if cell.get("contamination") == "possibly_contaminated"]
    return dg.AssetCheckResult(passed=not flagged, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"flagged": dg.MetadataValue.json(flagged)})


# Partitioned eval assets cannot run in an unpartitioned job (full_pipeline): one job evaluates a
# checkpoint (a partition), another redraws the comparison.
# One process for a checkpoint's benchmarks: its model and the judge load once, and the answers of every
# benchmark are generated in shared batches by the first step that needs them.
evaluate_checkpoint = dg.define_asset_job(
    EVALUATE_CHECKPOINT, selection=dg.AssetSelection.assets(*[a.key for a in eval_assets]),
    executor_def=dg.in_process_executor,
    description="Every benchmark of the dev and unseen suites on one checkpoint (a partition of `checkpoints`), "
                "in one process.")
eval_report = dg.define_asset_job("eval_report", selection=dg.AssetSelection.assets(eval_comparison),
                                  description="Redraw the side-by-side comparison of every evaluated checkpoint.")


@dg.sensor(name="checkpoint_partitions_sensor", minimum_interval_seconds=60, job=evaluate_checkpoint,
           description="adds a checkpoints partition for every models/*/training_manifest.json and the base "
                       "model, and requests an evaluate_checkpoint run for each new one")
def checkpoint_partitions_sensor(context: dg.SensorEvaluationContext, storage: TuluStorage) -> dg.SensorResult:
    known = set(context.instance.get_dynamic_partitions(CHECKPOINT_PARTITIONS))
    new = [c for c in list_checkpoints(storage.store()) if c not in known]
    if not new:
        return dg.SensorResult(skip_reason="no new checkpoints")
    return dg.SensorResult(dynamic_partitions_requests=[checkpoint_partitions.build_add_request(new)],
                           run_requests=[dg.RunRequest(partition_key=c, run_key=f"evaluate:{c}") for c in new])


@dg.sensor(name="new_benchmark_backfill_sensor", minimum_interval_seconds=300, job=evaluate_checkpoint,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="a benchmark added after checkpoints exist is evaluated on every existing checkpoint, "
                       "one run per checkpoint partition")
def new_benchmark_backfill_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Backfills a new eval asset over the ``checkpoints`` partitions.

    A benchmark is new when no partition of its asset was ever materialized while other benchmarks were
    (a checkpoint nobody evaluated yet is `checkpoint_partitions_sensor`'s job). Run keys make each
    (benchmark, checkpoint) request once.
    """
    partitions = context.instance.get_dynamic_partitions(CHECKPOINT_PARTITIONS)
    done = {asset.key: context.instance.get_materialized_partitions(asset.key) for asset in eval_assets}
    if not partitions or not any(done.values()):
        return dg.SensorResult(skip_reason="no checkpoint has been evaluated yet")
    requests = [dg.RunRequest(run_key=f"backfill:{key.to_user_string()}:{partition}", partition_key=partition,
                              asset_selection=[key], tags={"tulu/trigger": "new_benchmark"})
                for key, materialized in done.items() if not materialized for partition in partitions]
    if not requests:
        return dg.SensorResult(skip_reason="every benchmark has evaluations")
    return dg.SensorResult(run_requests=requests)


def current_checkpoints(instance: dg.DagsterInstance, store) -> list[str]:
    """The base model and the checkpoint each training asset last materialized, in lineage order (older
    checkpoints on disk stay evaluable through their partitions); every checkpoint on disk when the instance
    has recorded none."""
    ids = []
    for key in TRAINED_CHECKPOINT_ASSETS:
        checkpoint_id = latest_checkpoint_id(instance, key)
        if checkpoint_id is not None:
            ids.append(checkpoint_id)
    if not ids:
        return list_checkpoints(store)
    return lineage_order(store, [BASE_MODEL_ID, *ids]) if store.exists("models", BASE_MODEL_ID) else lineage_order(store, ids)


def evaluate_all_checkpoints(instance: dg.DagsterInstance | None = None, checkpoints: list | None = None,
                             defs: dg.Definitions | None = None, run_config: dict | None = None,
                             force: bool = False) -> dict[str, str]:
    """Register and evaluate every checkpoint under TULU_HOME (or ``checkpoints``), then redraw the comparison;
    for ``make run`` after ``full_pipeline``. Only the benchmarks whose evaluation is not current run
    (`pipeline.is_current`: same eval code, weights, config, items and parent answers), all of them with
    ``force``. Returns ``{checkpoint_id: "evaluated" | "unchanged" | "FAILED"}``."""
    if defs is None:
        from definitions import (
            defs,  # the code location, with the deployment's resources
        )

    instance = instance or dg.DagsterInstance.get()
    store = TuluStorage().store()
    ids = checkpoints if checkpoints is not None else current_checkpoints(instance, store)
    job = defs.resolve_job_def(EVALUATE_CHECKPOINT)
    outcome = {}
    for checkpoint_id in ids:
        register_checkpoint(instance, checkpoint_id)
        stale = [a.key for a in eval_assets if force or not _is_current(store, a, checkpoint_id, run_config)]
        if not stale:
            outcome[checkpoint_id] = "unchanged"
            continue
        result = job.execute_in_process(instance=instance, partition_key=checkpoint_id, run_config=_subset(run_config, stale),
                                        asset_selection=stale if len(stale) < len(eval_assets) else None,
                                        raise_on_error=False)
        outcome[checkpoint_id] = "evaluated" if result.success else "FAILED"
    defs.resolve_job_def("eval_report").execute_in_process(instance=instance)
    return outcome


def _op_config(asset: dg.AssetsDefinition, run_config: dict | None) -> EvalConfig:
    ops = (run_config or {}).get("ops", {})
    return EvalConfig(**ops.get(asset.node_def.name, {}).get("config", {}))


def _is_current(store, asset: dg.AssetsDefinition, checkpoint_id: str, run_config: dict | None) -> bool:
    name = asset.key.path[-1]
    if not store.exists("models", checkpoint_id, "config.json"):
        return False  # let the step say what is missing
    return is_current(store, name, checkpoint_id, _benchmark_config(name, _op_config(asset, run_config)))


def _subset(run_config: dict | None, keys: list[dg.AssetKey]) -> dict | None:
    """``run_config`` with only the ops of ``keys`` (a run rejects config for ops it does not execute)."""
    if not run_config:
        return run_config
    names = {a.node_def.name for a in eval_assets if a.key in keys}
    return {**run_config, "ops": {op: value for op, value in run_config.get("ops", {}).items() if op in names}}


def main(argv: list[str] | None = None) -> None:
    """``tulu-evaluate``: evaluate every current checkpoint (or those named) through the eval partitions, skipping
    benchmarks whose evaluation is current, then redraw the comparison table and print the run summary; exits
    non-zero when any checkpoint's evaluation failed."""
    import argparse

    parser = argparse.ArgumentParser(prog="tulu-evaluate", description=main.__doc__.split(";")[0])
    parser.add_argument("--checkpoint", action="append", dest="checkpoints", metavar="ID",
                        help="a checkpoint id (repeatable); default: the base model and every stage's latest")
    parser.add_argument("--sample-size", type=int, help="items per benchmark (overrides each benchmark's config)")
    parser.add_argument("--max-new-tokens", type=int, help="answer length (overrides each benchmark's config)")
    parser.add_argument("--force", action="store_true",
                        help="evaluate every benchmark, also those whose evaluation is current")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("sample_size", args.sample_size), ("max_new_tokens", args.max_new_tokens))
                 if v is not None}
    run_config = ({"ops": {a.node_def.name: {"config": overrides} for a in eval_assets}} if overrides else None)
    outcome = evaluate_all_checkpoints(checkpoints=args.checkpoints, run_config=run_config, force=args.force)
    for checkpoint_id, status in outcome.items():
        print(f"{checkpoint_id}: {status}{' (every benchmark current; --force re-runs)' if status == 'unchanged' else ''}")
    # rebuilt rather than read back: the same function on the same results as eval_comparison's, and
    # present even where the report job did not run (a fake evaluate_all_checkpoints in tests)
    store = TuluStorage().store()
    print()
    print(write_run_summary(store, comparison_table(store)))
    raise SystemExit(0 if outcome and "FAILED" not in outcome.values() else 1)


evaluation_assets = [*eval_assets, eval_comparison]
evaluation_checks = [no_possibly_contaminated_scores]
evaluation_sensors = [checkpoint_partitions_sensor, new_benchmark_backfill_sensor]
evaluation_jobs = [evaluate_checkpoint, eval_report]
