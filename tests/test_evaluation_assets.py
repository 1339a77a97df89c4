"""Evaluation assets on a tiny random Llama: partitioned eval assets (in process and through the
generation job), their checks, the ledger events, eval_comparison and the partitions sensor."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest
from test_sft_support import save_tiny_model

# integration: whole Dagster materializations
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::dagster.BetaWarning", "ignore::dagster.PreviewWarning")]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("tulu_home")
    save_tiny_model(root / "models" / "base_model", seed=0)
    shutil.copytree(root / "models" / "base_model", root / "models" / "sft-tiny")  # same weights, another id
    (root / "models" / "sft-tiny" / "training_manifest.json").write_text(json.dumps({"checkpoint_id": "sft-tiny"}))
    return root


def _resources(home):
    from resources import LocalLauncher, TuluStorage
    from resources.generation import GenerationResource, JudgeResource

    return {"storage": TuluStorage(root=str(home)), "launcher": LocalLauncher(extra_env={"OMP_NUM_THREADS": "1"}),
            "generation": GenerationResource(device="cpu", batch_size=4),
            "judge": JudgeResource(model="models/base_model", device="cpu")}


def _config(name, **values):
    return {"ops": {f"eval__{name}": {"config": {"sample_size": 2, "max_new_tokens": 8, **values}}}}


def test_partitioned_eval_assets_and_comparison(home, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from assets.evaluation import (
        CONTAMINATION_CHECK,
        REGRESSION_CHECK,
        TEMPLATE_CHECK,
        checkpoint_partitions_sensor,
        eval_assets,
        eval_comparison,
        no_possibly_contaminated_scores,
        register_checkpoint,
    )
    from tulu_pipeline.evaluation.results import checkpoints_that_saw, read_summary
    from tulu_pipeline.storage import Store

    by_name = {a.key.path[-1]: a for a in eval_assets}
    instance = dg.DagsterInstance.ephemeral()
    with dg.build_sensor_context(instance=instance, resources=_resources(home)) as context:
        result = checkpoint_partitions_sensor(context)
    added = result.dynamic_partitions_requests[0].partition_keys
    assert added == ["base_model", "sft-tiny"]
    assert [r.partition_key for r in result.run_requests] == added
    instance.add_dynamic_partitions("checkpoints", added)
    assert register_checkpoint(instance, "sft-tiny") is False

    store = Store(str(home))
    for checkpoint, names in (("base_model", ("gsm8k", "safety")), ("sft-tiny", ("truthfulqa",))):
        for name in names:
            run = dg.materialize([by_name[name]], instance=instance, partition_key=checkpoint,
                                 resources=_resources(home), run_config=_config(name))
            assert run.success
    # the sft checkpoint with generation in its own process (the generation job through pipes)
    run = dg.materialize([by_name["gsm8k"]], instance=instance, partition_key="sft-tiny", resources=_resources(home),
                         run_config=_config("gsm8k", execution="launcher"))
    assert run.success
    summary = read_summary(store, "gsm8k", "sft-tiny")
    assert summary["execution"] == "launcher" and summary["n"] == 2
    materialization = run.asset_materializations_for_node("eval__gsm8k")[0]
    assert materialization.partition == "sft-tiny" and materialization.metadata["n_items"].value == 2
    checks = {c.check_name: c for c in run.get_asset_check_evaluations()}
    assert set(checks) == {REGRESSION_CHECK, CONTAMINATION_CHECK, TEMPLATE_CHECK}
    # the generation job recorded the template it prompted with (the copy's own ChatML); the copied checkpoint's
    # manifest records none, so the lineage check warns and says so
    assert summary["template_lineage"]["mask_rule"] == "model-template/no-labels"
    template = checks[TEMPLATE_CHECK]
    assert not template.passed and template.severity == dg.AssetCheckSeverity.WARN
    assert template.description == "sft-tiny recorded no template lineage"
    assert checks[CONTAMINATION_CHECK].metadata["status"].value == "possibly_contaminated"  # no decontam recorded
    assert "parent base_model" in checks[REGRESSION_CHECK].description

    safety = read_summary(store, "safety", "base_model")
    assert safety["judge"] == "models/base_model" and safety["contamination"]["status"] == "not_applicable"
    item = json.loads(store.read_bytes(safety["items_path"].split(str(home) + "/", 1)[1]).decode().splitlines()[0])
    assert item["details"]["method"] == "judge loglikelihood" and item["reason"]
    mc1 = read_summary(store, "truthfulqa", "sft-tiny")
    assert mc1["n"] == 2 and 0.0 <= mc1["score"] <= 1.0

    gsm8k_rows = list(store.iter_rows("eval/gsm8k/base_model"))
    assert checkpoints_that_saw(store, gsm8k_rows[0]["item_id"]) == ["base_model", "sft-tiny"]
    assert read_summary(store, "gsm8k", "base_model")["execution"] == "in_process"

    comparison = dg.materialize([eval_comparison, no_possibly_contaminated_scores], instance=instance,
                                resources={"storage": _resources(home)["storage"]})
    assert comparison.success
    metadata = comparison.asset_materializations_for_node("eval_comparison")[0].metadata
    assert metadata["checkpoints"].value == ["base_model", "sft-tiny"]
    table = metadata["table"].value
    assert "| gsm8k | dev |" in table and "| truthfulqa | dev |" in table and "sft-tiny (sft)" in table
    assert "⚠" in table
    assert (home / "reports" / "eval" / "comparison" / "comparison.png").read_bytes().startswith(b"\x89PNG")
    assert not comparison.get_asset_check_evaluations()[0].passed  # sft-tiny records no decontamination


def test_eval_asset_refuses_a_missing_checkpoint(home):
    from assets.evaluation import eval_assets

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("checkpoints", ["dpo-missing"])
    gsm8k = next(a for a in eval_assets if a.key.path[-1] == "gsm8k")
    with pytest.raises(dg.Failure, match="no model"):
        dg.materialize([gsm8k], instance=instance, partition_key="dpo-missing", resources=_resources(home),
                       run_config=_config("gsm8k"))


def test_every_benchmark_has_an_asset_key_and_checks(home):
    from assets.evaluation import (
        evaluation_assets,
        evaluation_checks,
        evaluation_jobs,
        evaluation_sensors,
    )
    from tulu_pipeline.evaluation.benchmarks import benchmarks

    keys = {a.key for a in evaluation_assets}
    assert {dg.AssetKey(["eval", name]) for name in benchmarks()} | {dg.AssetKey("eval_comparison")} == keys
    defs = dg.Definitions(assets=evaluation_assets, asset_checks=evaluation_checks, sensors=evaluation_sensors,
                          jobs=evaluation_jobs, resources=_resources(home))
    job = defs.resolve_job_def("evaluate_checkpoint")
    assert job.partitions_def.name == "checkpoints"
    assert {k for k in job.asset_layer.executable_asset_keys} == keys - {dg.AssetKey("eval_comparison")}


def test_open_ended_set_judged_against_the_parent_by_the_local_tiny_judge(home, monkeypatch):
    """Vicuna on the base model (answers kept), then on sft-tiny: judged against the base model's saved answers
    by the local judge (the tiny base model itself: low-confidence), marked ‡ in the comparison."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from assets.evaluation import eval_assets
    from tulu_pipeline.evaluation.comparison import comparison_markdown, comparison_table
    from tulu_pipeline.evaluation.judge_scoring import PAIRWISE_TEMPLATE_VERSION
    from tulu_pipeline.evaluation.results import read_summary
    from tulu_pipeline.storage import Store

    vicuna = next(a for a in eval_assets if a.key.path[-1] == "vicuna_bench")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("checkpoints", ["base_model", "sft-tiny"])
    failed = dg.materialize([vicuna], instance=instance, partition_key="sft-tiny", resources=_resources(home),
                            run_config=_config("vicuna_bench", missing_parent="error"), raise_on_error=False)
    assert not failed.success  # the base model's answers are not saved yet, and missing_parent says error
    failure = next(e for e in failed.all_events if e.is_step_failure).step_failure_data.error.message
    assert "materialize eval/vicuna_bench for partition base_model" in failure
    for checkpoint in ("base_model", "sft-tiny"):
        run = dg.materialize([vicuna], instance=instance, partition_key=checkpoint, resources=_resources(home),
                             run_config=_config("vicuna_bench", missing_parent="error"))
        assert run.success
    store = Store(str(home))
    base, sft = read_summary(store, "vicuna_bench", "base_model"), read_summary(store, "vicuna_bench", "sft-tiny")
    assert base["outputs_only"] and base["judge_info"] is None
    assert sft["parent"]["source"] == "saved" and sft["parent"]["version"] == base["version"]
    judge = sft["judge_info"]
    assert judge["method"] == "loglikelihood" and judge["backend"] == "TransformersBackend"
    assert judge["template_version"] == PAIRWISE_TEMPLATE_VERSION and judge["low_confidence"]
    assert judge["parameters"] < 10_000_000 and judge["same_family"]
    items = [json.loads(line) for line in store.read_bytes(sft["items_path"].split(str(home) + "/", 1)[1])
             .decode().splitlines()]
    base_rows = {r["item_id"]: r["response"] for r in store.iter_rows("eval/vicuna_bench/base_model")}
    for item in items:
        assert item["details"]["parent_response"] == base_rows[item["item_id"]]
        assert set(item["details"]["verdicts"]) == {"model_first", "model_second"}
        assert item["details"]["judge"]["model_id"] == "models/base_model"
    metadata = run.asset_materializations_for_node("eval__vicuna_bench")[0].metadata
    assert metadata["low_confidence"].value is True
    markdown = comparison_markdown(comparison_table(store))
    assert "| vicuna_bench | unseen | win rate vs parent |" in markdown and "‡ = low confidence" in markdown


def test_evaluate_checkpoint_decodes_every_benchmark_in_one_batched_pass(tmp_path, monkeypatch):
    """The evaluate_checkpoint job runs in one process: its first generated benchmark decodes the others'
    answers in the same batches (one generate_many call for the checkpoint), the model loads once, and each
    benchmark's answers are the ones it gets evaluated alone."""
    from assets.evaluation import evaluation_assets, evaluation_checks, evaluation_jobs
    from tulu_pipeline.evaluation import pipeline
    from tulu_pipeline.evaluation.results import read_summary
    from tulu_pipeline.generation import spec as spec_module
    from tulu_pipeline.generation.transformers_backend import TransformersBackend
    from tulu_pipeline.storage import Store

    home = tmp_path / "home"
    save_tiny_model(home / "models" / "base_model", seed=0)
    calls, loads = [], []
    many, build = TransformersBackend.generate_many, spec_module.build_backend
    monkeypatch.setattr(TransformersBackend, "generate_many",
                        lambda self, requests: calls.append(len(requests)) or many(self, requests))
    monkeypatch.setattr(spec_module, "build_backend", lambda spec, store=None: loads.append(spec.model) or build(spec, store))
    monkeypatch.setattr(spec_module, "shared_backends", spec_module.BackendPool())
    monkeypatch.setattr(pipeline, "_batched", pipeline.BatchedAnswers())
    defs = dg.Definitions(assets=evaluation_assets, asset_checks=evaluation_checks, jobs=evaluation_jobs,
                          resources=_resources(home))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("checkpoints", ["base_model"])
    names = ("gsm8k", "ifeval", "truthfulqa")
    config = {"ops": {f"eval__{name}": {"config": {"sample_size": 2, "max_new_tokens": 8}} for name in names}}
    result = defs.resolve_job_def("evaluate_checkpoint").execute_in_process(
        instance=instance, partition_key="base_model", run_config=config,
        asset_selection=[dg.AssetKey(["eval", name]) for name in names])
    assert result.success
    assert calls == [2]  # gsm8k and ifeval together; truthfulqa is scored by log-likelihood
    assert loads.count("models/base_model") == 1  # the judge spec differs; the policy model loads once
    store = Store(str(home))
    batched = [r["response"] for r in store.iter_rows("eval/ifeval/base_model")]
    assert read_summary(store, "ifeval", "base_model")["n"] == 2 and len(batched) == 2

    # ifeval evaluated alone (no companions, nothing kept) answers the same
    calls.clear()
    monkeypatch.setattr(pipeline, "_batched", pipeline.BatchedAnswers())
    alone = dg.materialize([a for a in evaluation_assets if a.key == dg.AssetKey(["eval", "ifeval"])],
                           instance=instance, partition_key="base_model", resources=_resources(home),
                           run_config=_config("ifeval"))
    assert alone.success and calls == [1]
    assert [r["response"] for r in store.iter_rows("eval/ifeval/base_model")] == batched


def test_tulu_evaluate_skips_what_is_current(tmp_path, monkeypatch):
    """A second `tulu-evaluate` over unchanged checkpoints runs nothing; a benchmark whose config changed is
    the only one evaluated again."""
    from assets.evaluation import eval_assets, evaluate_all_checkpoints, evaluation_assets, evaluation_checks, evaluation_jobs
    from tulu_pipeline.evaluation.benchmarks import benchmark_config
    from tulu_pipeline.evaluation.pipeline import is_current
    from tulu_pipeline.storage import Store

    home = tmp_path / "home"
    save_tiny_model(home / "models" / "base_model", seed=0)
    monkeypatch.setenv("TULU_HOME", str(home))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    defs = dg.Definitions(assets=evaluation_assets, asset_checks=evaluation_checks, jobs=evaluation_jobs,
                          resources=_resources(home))
    instance = dg.DagsterInstance.ephemeral()
    small = {"sample_size": 1, "max_new_tokens": 4}
    config = {"ops": {a.node_def.name: {"config": small} for a in eval_assets}}
    runs = []
    execute = dg.JobDefinition.execute_in_process
    monkeypatch.setattr(dg.JobDefinition, "execute_in_process",
                        lambda self, **kw: runs.append((self.name, kw.get("asset_selection"))) or execute(self, **kw))

    assert evaluate_all_checkpoints(instance, ["base_model"], defs, config) == {"base_model": "evaluated"}
    assert runs[0] == ("evaluate_checkpoint", None) and runs[-1][0] == "eval_report"
    store = Store(str(home))
    assert is_current(store, "gsm8k", "base_model", benchmark_config("gsm8k", **small))
    assert not is_current(store, "gsm8k", "base_model", benchmark_config("gsm8k", sample_size=2, max_new_tokens=4))

    runs.clear()
    assert evaluate_all_checkpoints(instance, ["base_model"], defs, config) == {"base_model": "unchanged"}
    assert [name for name, _ in runs] == ["eval_report"]

    runs.clear()
    config["ops"]["eval__gsm8k"]["config"] = {"sample_size": 2, "max_new_tokens": 4}
    assert evaluate_all_checkpoints(instance, ["base_model"], defs, config) == {"base_model": "evaluated"}
    assert runs[0] == ("evaluate_checkpoint", [dg.AssetKey(["eval", "gsm8k"])])
    assert evaluate_all_checkpoints(instance, ["base_model"], defs, config, force=True) == {"base_model": "evaluated"}
