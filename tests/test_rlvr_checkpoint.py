"""The rlvr_checkpoint asset under Dagster: RLVR prompts -> GRPO job through the compute launcher -> checkpoint,
manifest, metadata and ledger. The "SFT checkpoint" is an untrained tiny character-level Llama (test_rlvr_support): it
learns nothing in two steps; this checks the wiring (tests/test_rlvr_training.py checks that training learns).
"""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest
from test_rlvr_support import save_warm_addition_model
from test_rlvr import _home

from tulu_pipeline.provenance.ledger import Ledger

pytestmark = pytest.mark.integration  # a whole Dagster materialization with training


def test_materialize_rlvr_checkpoint_from_the_sft_checkpoint(tmp_path):
    from assets.rlvr import rlvr_assets
    from resources import LocalLauncher, TuluStorage
    from tulu_pipeline.training.rlvr_plan import rlvr_checkpoint_plan

    store = _home(tmp_path)
    sft_dir = save_warm_addition_model(tmp_path / "sft", [], steps=0)
    shutil.copytree(sft_dir, store.path("models/sft-tiny"))
    store.write_json("models/sft-tiny/training_manifest.json", {"checkpoint_id": "sft-tiny", "fingerprint": "f" * 64})
    # the untrained toy model's groups mostly score alike: keep them (cpu_demo would drop zero-std groups)
    overrides = {"max_steps": 2, "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 6,
                 "save_steps": 1, "learning_rate": 1e-3, "max_prompt_length": 2048,
                 "filter_zero_std_groups": False, "active_sampling": False}
    run_config = dg.RunConfig(ops={
        "rlvr_prompts": {"config": {"overrides": {"gsm8k_rows": 2, "math_rows": 2, "ifeval_rows": 2,
                                                   "heldout_per_task": 1}}},
        "rlvr_checkpoint": {"config": {"overrides": overrides}}})
    resources = {"storage": TuluStorage(root=store.url),
                 "launcher": LocalLauncher(extra_env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})}
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(rlvr_assets, resources=resources, run_config=run_config, instance=instance)
    assert result.success

    plan = rlvr_checkpoint_plan(store, "cpu_demo", overrides)
    meta = result.asset_materializations_for_node("rlvr_checkpoint")[0].metadata
    assert meta["checkpoint_id"].value == plan.checkpoint_id and plan.checkpoint_id.startswith("rlvr-")
    assert meta["start_checkpoint"].value == "sft-tiny" and meta["start_kind"].value == "sft"
    assert meta["steps"].value == 2
    assert {"heldout_accuracy_before", "heldout_accuracy_after", "mean_reward", "reward_curve",
            "reward_per_step"} <= meta.keys()
    assert len(meta["reward_per_step"].value) == 2
    assert "data:image/png;base64," in meta["reward_curve"].value
    assert "data:image/png;base64," in meta["training_metrics"].value  # the per-step metrics' panels
    manifest = store.read_json(f"{plan.checkpoint_dir}/training_manifest.json")
    assert manifest["start_checkpoint"] == "sft-tiny" and manifest["start_checkpoint_info"]["kind"] == "sft"
    assert manifest["prompts_dataset"] == "rlvr_prompts" and manifest["prompts_version"] == plan.dataset_version
    # lineage: the checkpoint's data descends from the decontaminated pool it was drawn from
    from tulu_pipeline.data.coverage import checkpoint_decontaminated_versions

    assert checkpoint_decontaminated_versions(store, plan.checkpoint_id) == {"dv1"}
    assert manifest["metrics"]["heldout_before"]["rows"] == 3
    logged = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message]
    streamed = [json.loads(m) for m in logged if m.startswith("{") and '"reward_mean"' in m]
    assert [line["step"] for line in streamed] == [1, 2]

    # ledger: every prompt row is trained_on / evaluated / not_trained with the checkpoint related
    ledger = Ledger(store)
    events = ledger.query("SELECT row_id, event, related_ids FROM events WHERE stage = 'rlvr' "
                          "AND asset_key = 'rlvr_checkpoint'")
    by_event: dict[str, set] = {}
    for event in events:
        assert list(event["related_ids"]) == [plan.checkpoint_id]
        by_event.setdefault(event["event"], set()).add(event["row_id"])
    assert by_event["evaluated"] == set(plan.extras["heldout_row_ids"])
    trained = set(store.read_bytes(f"{plan.checkpoint_dir}/trained_row_ids.txt").decode().split())
    assert by_event["trained_on"] == trained and 1 <= len(trained) <= 4
    assert meta["trained_rows"].value == len(trained)
