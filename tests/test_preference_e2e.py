"""The preference assets end to end with real processes: the generation job and the judge job run through
the local compute launcher (dagster-pipes subprocesses) on a tiny random Llama standing in for the SFT
checkpoint, the base model and the local judge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
from test_preference_assets import HUMAN_SOURCES, tiny_home  # noqa: F401  (fixture)
from test_sft_support import save_tiny_model

from assets.preference import preference_assets
from resources import LocalLauncher, TuluStorage
from resources.generation import GenerationResource, JudgeResource
from tulu_pipeline.preference.rubric import ASPECTS

pytestmark = pytest.mark.integration  # generation and judge processes


@pytest.mark.slow  # three Python processes that import torch: over a minute on 2 shared cores
def test_preference_assets_with_real_jobs(tiny_home):  # noqa: F811
    store, _, _ = tiny_home
    tiny = save_tiny_model(Path(store.path("models", "base_model")))
    shutil.rmtree(store.path("models", "sft-fake"))
    shutil.copytree(tiny, store.path("models", "sft-fake"))
    store.write_json("models/sft-fake/training_manifest.json", {"checkpoint_id": "sft-fake"})
    config = {"ops": {  # the judged recipe (tests/test_preference_assets.py: JUDGED_PATH)
        "preference_prompts": {"config": {"size": 3, "sources": None}},
        "policy_completions": {"config": {"samples_per_model": 1, "max_new_tokens": 8, "include_base": True}},
        "judged_completions": {"config": {"batch_size": 4, "judge_verifiable": True}},
        "preference_pairs": {"config": {"eval_suites": ["dev"], "eval_benchmarks": ["gsm8k"], "rank_by": "auto",
                                        "human_sources": HUMAN_SOURCES, "human_rows_per_source": 2}},
    }}
    resources = {"storage": TuluStorage(root=store.url),
                 "launcher": LocalLauncher(extra_env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}),
                 "generation": GenerationResource(device="cpu", batch_size=4),
                 "judge": JudgeResource(device="cpu", batch_size=8)}
    result = dg.materialize(preference_assets, resources=resources, run_config=config,
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success

    completions = list(store.iter_rows("policy_completions"))
    assert {c["model_id"] for c in completions} == {"sft-fake", "base_model", "dataset_reference"}
    sampled = [c for c in completions if c["model_role"] != "reference"]
    assert len(sampled) == 3 * 2 and all(c["seed"] is not None and c["completion_tokens"] for c in sampled)
    judged = list(store.iter_rows("judged_completions"))
    assert len(judged) == len(completions)  # the log-likelihood judge never fails to parse
    for row in judged:
        ratings = json.loads(row["ratings"])
        assert set(ratings) == set(ASPECTS)
        assert all(r["rating"] in range(1, 6) and 1 <= r["expected"] <= 5 and abs(sum(r["probs"]) - 1) < 1e-4
                   for r in ratings.values())
        assert row["judge_id"].startswith("local:models/base_model:ultrafeedback-v1:")
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert all(checks.values()) and len(checks) == 3
    assert store.dataset_info("preference_pairs").rows + store.dataset_info("preference_pairs_quarantine").rows >= 3
    completions_meta = result.asset_materializations_for_node("policy_completions")[0].metadata
    runs = completions_meta["generation_runs"].value
    assert set(runs) == {"sft-fake", "base_model"} and all(r.get("completions") == 3 for r in runs.values())
    judge_run = result.asset_materializations_for_node("judged_completions")[0].metadata["judge_run"].value
    assert judge_run["judged"] == len(judged) and judge_run["quarantined"] == 0
