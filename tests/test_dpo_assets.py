"""The DPO assets on a tiny TULU_HOME: content-addressed plans, and dg.materialize with ledger events.

The home holds a ``preference_pairs`` dataset (tests/test_dpo_support.py) and a tiny "SFT checkpoint"
(``models/sft-tiny``: the tiny random Llama with a training manifest), as the SFT stage would leave them.
"""

from __future__ import annotations

import dagster as dg
import pytest
from test_dpo_support import SFT_ID, TINY_DPO, split_pairs, tiny_home, tiny_setup

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.training.dpo_reference import REFERENCE_DATASET
from tulu_pipeline.training.dpo_plan import (
    dpo_checkpoint_plan,
    reference_logprobs_plan,
    sft_checkpoint_ref,
)

pytestmark = pytest.mark.integration  # whole Dagster materializations with training


def test_plan_is_content_addressed(tmp_path):
    store = tiny_home(tmp_path)
    assert sft_checkpoint_ref(store).checkpoint_id == SFT_ID  # the newest published sft-* when none is named
    plan = dpo_checkpoint_plan(store, "cpu_demo", {})
    assert plan.checkpoint_id.startswith("dpo-") and plan.checkpoint_id == dpo_checkpoint_plan(store, "cpu_demo", {}).checkpoint_id
    assert plan.checkpoint_id != dpo_checkpoint_plan(store, "cpu_demo", {"beta": 0.1}).checkpoint_id
    reference = reference_logprobs_plan(store, "cpu_demo", {"beta": 0.1})
    assert reference.version == plan.reference_version  # beta does not change the reference numbers...
    assert reference.version != reference_logprobs_plan(store, "cpu_demo", {"max_length": 64}).version  # max_length does
    assert plan.extras["manifest_extra"]["reference_checkpoint"] == SFT_ID


def test_materialize_reference_logprobs_and_dpo_checkpoint(tmp_path):
    from assets.dpo import dpo_assets
    from resources import LocalLauncher, TuluStorage
    from tulu_pipeline.provenance.ledger import Ledger

    store = tiny_home(tmp_path)
    overrides = {**TINY_DPO, "max_steps": 2}
    run_config = dg.RunConfig(ops={name: {"config": {"preset": "cpu_demo", "overrides": overrides}}
                                   for name in ("reference_logprobs", "dpo_checkpoint")})
    resources = {"storage": TuluStorage(root=store.url),
                 "launcher": LocalLauncher(extra_env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})}
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(dpo_assets, resources=resources, run_config=run_config, instance=instance)
    assert result.success

    ref_meta = result.asset_materializations_for_node("reference_logprobs")[0].metadata
    plan = dpo_checkpoint_plan(store, "cpu_demo", overrides)
    assert ref_meta["reference_checkpoint"].value == SFT_ID
    assert ref_meta["pairs"].value == len(tiny_setup()[1]) and ref_meta["reused_existing"].value is False
    assert store.dataset_info(REFERENCE_DATASET).version == plan.reference_version

    meta = result.asset_materializations_for_node("dpo_checkpoint")[0].metadata
    assert meta["checkpoint_id"].value == plan.checkpoint_id
    assert meta["steps"].value == 2 and meta["reference_logprobs_version"].value == plan.reference_version
    assert {"heldout_preference_accuracy_before", "heldout_preference_accuracy_after", "heldout_reward_accuracy_after",
            "heldout_mean_margin_after", "loss_curve", "manifest", "config", "heldout_effect",
            "heldout_effect_table"} <= meta.keys()
    n_heldout = len(split_pairs(tiny_setup()[1])[1])
    assert {d["n"] for d in meta["heldout_effect"].value.values()} == {n_heldout}
    table = meta["heldout_effect_table"].value
    assert "| metric | Δ | 95% CI | sign-test p | n (changed) |" in table
    assert all(f"| {name} |" in table for name in ("preference_accuracy", "reward_accuracy", "margin"))
    manifest = store.read_json(f"{plan.checkpoint_dir}/{MANIFEST_FILE}")
    assert manifest["reference_logprobs_source"] == "precomputed"
    assert manifest["reference_checkpoint"] == SFT_ID and manifest["pairs_version"] == "pairs-v1"

    # ledger: every pair's prompt row has one event naming the checkpoint and the pair
    train, heldout = split_pairs(tiny_setup()[1])
    trained = set(store.read_bytes(f"{plan.checkpoint_dir}/trained_pair_ids.txt").decode().split())
    assert 0 < len(trained) <= len(train)  # 2 steps of 4 pairs: fewer than all train pairs
    ledger = Ledger(store)
    for pair in train[:3] + heldout[:2]:
        events = [e for e in ledger.events_for(pair["prompt_row_id"]) if e["asset_key"] == "dpo_checkpoint"]
        expected = ("evaluated" if pair["split"] == "heldout" else
                    "trained_on" if pair["pair_id"] in trained else "not_trained")
        assert [e["event"] for e in events] == [expected]
        assert list(events[0]["related_ids"]) == [plan.checkpoint_id, pair["pair_id"]]
    assert meta["ledger_events"].value == {"trained_on": len(trained), "evaluated": len(heldout),
                                           "not_trained": len(train) - len(trained)}

    # a second materialization of reference_logprobs reuses the stored numbers
    again = dg.materialize([dpo_assets[0]], resources=resources, run_config=dg.RunConfig(
        ops={"reference_logprobs": {"config": {"preset": "cpu_demo", "overrides": overrides}}}), instance=instance)
    assert again.asset_materializations_for_node("reference_logprobs")[0].metadata["reused_existing"].value is True
