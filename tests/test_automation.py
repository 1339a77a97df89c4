"""Keeping data fresh: the source-change sensor, the re-curation schedule, the coverage flag on checkpoints,
GPU pools, retry policies and freshness policies, with Dagster's test helpers."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest

import definitions
from assets.automation import (
    COVERAGE_CHECK, GPU_POOL, TRANSIENT_RETRY, build_coverage_checks, build_source_change_sensor, final_on_bad_data,
)
from resources import TuluStorage
from tulu_pipeline.data.ingest import raw_dataset_name, source_version
from tulu_pipeline.data.registry import load_registry, registry
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.data.coverage import eval_coverage

pytestmark = pytest.mark.integration  # sensors and schedules against Dagster instances

CURATION_CHAIN = {"normalized_prompts", "deduplicated_prompts", "decontaminated_prompts", "decontamination_report"}


@pytest.fixture
def bundle_copy(tmp_path: Path, bundle: Path) -> Path:
    """The data bundle as symlinks (cheap), with a writable MANIFEST.json; tests replace single files."""
    root = tmp_path / "data"
    for path in bundle.rglob("*"):
        if path.is_file():
            target = root / path.relative_to(bundle)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.name == "MANIFEST.json":
                shutil.copy(path, target)
            else:
                target.symlink_to(path)
    return root


def _change_file(root: Path, rel: str, repin: bool) -> None:
    """Replace a bundle file by an edited copy (first line dropped); optionally re-pin it in MANIFEST.json."""
    path = root / rel
    data = path.read_bytes()
    opener = gzip if rel.endswith(".gz") else None
    text = (gzip.decompress(data) if opener else data).decode().splitlines(keepends=True)
    new = "".join(text[1:]).encode()
    new = gzip.compress(new, mtime=0) if opener else new
    path.unlink()
    path.write_bytes(new)
    if repin:
        manifest = json.loads((root / "MANIFEST.json").read_text())
        for entry in manifest:
            if entry["path"] == rel:
                entry.update(sha256=hashlib.sha256(new).hexdigest(), bytes=len(new), rows=entry["rows"] - 1)
        (root / "MANIFEST.json").write_text(json.dumps(manifest))


def _sensor(root: Path, checkpoint_keys=()):
    return build_source_change_sensor(definitions.recuration_job, specs_fn=lambda: load_registry(root / "MANIFEST.json"),
                                      root_fn=lambda: root, checkpoint_keys=checkpoint_keys)


def _tick(sensor, instance, cursor=None) -> dg.SensorResult:
    # as a context manager: leaving it resets the definitions state the evaluation set for this instance
    with dg.build_sensor_context(instance=instance, cursor=cursor,
                                 repository_def=definitions.defs.get_repository_def()) as context:
        return sensor.evaluate_tick(context)


def _selected(result) -> set[str]:
    (request,) = result.run_requests
    return {key.to_user_string() for key in request.asset_selection}


def test_first_look_records_hashes_and_requests_nothing(bundle_copy):
    with dg.instance_for_test(set_dagster_home=False) as instance:
        result = _tick(_sensor(bundle_copy), instance)
        assert not result.run_requests and "first look" in result.skip_message
        cursor = json.loads(result.cursor)
        assert cursor["gsm8k_train"]["sha256"] == hashlib.sha256((bundle_copy / "train/gsm8k/train.jsonl").read_bytes()).hexdigest()
        again = _tick(_sensor(bundle_copy), instance, result.cursor)
        assert not again.run_requests and again.skip_message == "no source changed"


def test_changed_training_source_reruns_exactly_its_curation(bundle_copy):
    with dg.instance_for_test(set_dagster_home=False) as instance:
        first = _tick(_sensor(bundle_copy), instance)
        _change_file(bundle_copy, "train/gsm8k/train.jsonl", repin=True)
        result = _tick(_sensor(bundle_copy), instance, first.cursor)
        assert _selected(result) == {"raw/gsm8k_train"} | CURATION_CHAIN
        (request,) = result.run_requests
        assert request.tags["tulu/changed_sources"] == "gsm8k_train"
        assert request.tags["tulu/decontamination"] == "incremental"
        assert not request.asset_check_keys  # a training pool changing leaves checkpoints' coverage alone
        observed = {e.asset_key.to_user_string() for e in result.asset_events}
        assert observed == {"source_file/gsm8k_train"}


def test_a_changed_file_that_was_not_repinned_is_reported_not_ingested(bundle_copy):
    with dg.instance_for_test(set_dagster_home=False) as instance:
        first = _tick(_sensor(bundle_copy), instance)
        _change_file(bundle_copy, "train/gsm8k/train.jsonl", repin=False)
        result = _tick(_sensor(bundle_copy), instance, first.cursor)
        assert not result.run_requests
        assert "not re-pinned in MANIFEST.json" in result.skip_message
        assert "gsm8k_train" in result.skip_message


def test_changed_benchmark_reruns_decontamination_and_flags_checkpoints(bundle_copy):
    key = dg.AssetKey("sft_checkpoint")
    with dg.instance_for_test(set_dagster_home=False) as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(key, metadata={"checkpoint_id": "sft-x"}))
        first = _tick(_sensor(bundle_copy, [key]), instance)
        _change_file(bundle_copy, "eval/gsm8k/test.jsonl", repin=True)
        result = _tick(_sensor(bundle_copy, [key]), instance, first.cursor)
        eval_id = next(s.id for s in registry() if s.path == "eval/gsm8k/test.jsonl")
        # no normalization or dedup: only the benchmark's table and decontamination against it
        assert _selected(result) == {f"raw/{eval_id}", "decontaminated_prompts", "decontamination_report"}
        (request,) = result.run_requests
        assert list(request.asset_check_keys) == [dg.AssetCheckKey(key, COVERAGE_CHECK)]


def _trained_checkpoint(store, eval_specs, checkpoint_id="sft-test"):
    """A decontaminated set checked against ``eval_specs``, a mix from it and a checkpoint trained on the mix."""
    inputs = {"deduplicated_prompts": "d1", **{raw_dataset_name(s.id): source_version(s) for s in eval_specs}}
    store.write_rows("decontaminated_prompts", "c1", [], ROW_SCHEMA, inputs=inputs)
    store.write_rows("sft_mix", "m1", [], ROW_SCHEMA, inputs={"decontaminated_prompts": "c1"})
    store.write_json(f"models/{checkpoint_id}/training_manifest.json",
                     {"checkpoint_id": checkpoint_id, "mix_dataset": "sft_mix", "mix_version": "m1"})
    return checkpoint_id


def test_coverage_names_benchmarks_added_after_training(store):
    evals = [s for s in registry() if s.role == "eval"]
    checkpoint = _trained_checkpoint(store, [s for s in evals if s.benchmark != "ifeval"])
    coverage = eval_coverage(store, checkpoint)
    assert not coverage.complete and coverage.decontaminated_versions == ["c1"]
    assert coverage.missing_benchmarks(evals) == ["ifeval"]
    # a DPO checkpoint that started from it inherits the gap through its parent
    store.write_json("models/dpo-test/training_manifest.json", {"checkpoint_id": "dpo-test", "start_checkpoint": checkpoint})
    assert eval_coverage(store, "dpo-test").missing_benchmarks(evals) == ["ifeval"]
    complete = _trained_checkpoint(store, evals, "sft-full")
    assert eval_coverage(store, complete).complete


def test_coverage_check_flags_the_checkpoint(tmp_path):
    storage = TuluStorage(root=str(tmp_path / "home"))
    evals = [s for s in registry() if s.role == "eval"]
    checkpoint = _trained_checkpoint(storage.store(), [s for s in evals if s.benchmark != "ifeval"])

    @dg.asset(name="sft_checkpoint")
    def fake_checkpoint() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"checkpoint_id": checkpoint})

    with dg.instance_for_test(set_dagster_home=False) as instance:
        result = dg.materialize([fake_checkpoint, *build_coverage_checks([fake_checkpoint.key])],
                                resources={"storage": storage}, instance=instance)
        (evaluation,) = result.get_asset_check_evaluations()
        assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
        assert evaluation.metadata["possibly_contaminated_benchmarks"].value == ["ifeval"]


def test_weekly_schedule_requests_the_recuration_job():
    schedule = definitions.weekly_recuration
    assert schedule.cron_schedule == "0 3 * * 1" and schedule.job_name == "recuration_job"
    with dg.instance_for_test(set_dagster_home=False) as instance:
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=datetime(
                2026, 11, 30, 3, tzinfo=timezone.utc)) as context:
            (request,) = schedule.evaluate_tick(context).run_requests
    job = definitions.defs.get_job_def("recuration_job")
    keys = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert CURATION_CHAIN <= keys and "raw/gsm8k_train" in keys
    assert not any(k.startswith(("sft", "source_file")) for k in keys)  # training never rides along
    assert request.job_name in (None, "recuration_job")


def test_training_waits_unless_enabled(monkeypatch):
    graph = definitions.defs.get_repository_def().asset_graph
    node = graph.get(dg.AssetKey("sft_checkpoint"))
    assert node.automation_condition is None
    assert all(asset.op.pool == GPU_POOL for asset in definitions.TRAINING_ASSETS)
    monkeypatch.setenv("TULU_AUTO_TRAIN", "1")
    for asset in definitions.TRAINING_ASSETS:
        enabled = definitions._training(asset)
        assert all(spec.automation_condition is not None for spec in enabled.specs)


def test_gpu_jobs_are_tagged_and_retry_transient_failures_only():
    assert definitions.defs.get_job_def("sft_job").tags["tulu/compute"] == "gpu"
    assert "tulu/compute" not in definitions.defs.get_job_def("curation_job").tags
    assert TRANSIENT_RETRY.max_retries == 3 and TRANSIENT_RETRY.backoff == dg.Backoff.EXPONENTIAL
    with pytest.raises(dg.Failure) as failure, final_on_bad_data():
        raise ValueError("train.jsonl line 3: expected an object")
    assert failure.value.allow_retries is False and "line 3" in failure.value.description
    with pytest.raises(OSError), final_on_bad_data():
        raise OSError("connection reset")  # stays retryable


def test_raw_sources_have_a_freshness_policy():
    graph = definitions.defs.get_repository_def().asset_graph
    policy = graph.get(dg.AssetKey(["raw", "gsm8k_train"])).freshness_policy
    assert policy.fail_window.to_timedelta().days == 30
    assert graph.get(dg.AssetKey(["raw", "gsm8k_train"])).parent_keys == {dg.AssetKey(["source_file", "gsm8k_train"])}


def test_a_new_benchmark_is_backfilled_over_every_checkpoint():
    from assets.evaluation import eval_assets, new_benchmark_backfill_sensor

    checkpoints = ["base_model", "sft-a", "dpo-b"]
    keys = [a.key for a in eval_assets]
    new, evaluated = keys[0], keys[1:]
    with dg.instance_for_test(set_dagster_home=False) as instance, dg.partition_loading_context(
            dynamic_partitions_store=instance), dg.build_sensor_context(
            instance=instance, repository_def=definitions.defs.get_repository_def()) as context:
        instance.add_dynamic_partitions("checkpoints", checkpoints)
        assert new_benchmark_backfill_sensor.evaluate_tick(context).skip_message  # nothing evaluated yet
        for key in evaluated:  # the suite ran on every checkpoint before `new` existed
            for partition in checkpoints:
                instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))
        result = new_benchmark_backfill_sensor.evaluate_tick(context)
        assert sorted(r.partition_key for r in result.run_requests) == sorted(checkpoints)
        assert all(list(r.asset_selection) == [new] for r in result.run_requests)
        assert len({r.run_key for r in result.run_requests}) == len(checkpoints)
        instance.report_runless_asset_event(dg.AssetMaterialization(new, partition="base_model"))
        assert new_benchmark_backfill_sensor.evaluate_tick(context).skip_message == "every benchmark has evaluations"
