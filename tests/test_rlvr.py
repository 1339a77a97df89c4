"""RLVR prompt sets from a small decontaminated pool of real bundled rows, and the rlvr assets under Dagster.

The rlvr_checkpoint asset is tested in test_rlvr_checkpoint.py.
"""

from __future__ import annotations

import json
import os

import dagster as dg
import pytest
from test_sft_support import bundled_rows

from tulu_pipeline.curation.pipeline import BlockedByChecksError, record_check_results
from tulu_pipeline.data.schema import ROW_SCHEMA, row_problems
from tulu_pipeline.provenance.ledger import Ledger
from tulu_pipeline.rewards import verify
from tulu_pipeline.rlvr.prompts import (
    IF_SOURCE,
    RLVR_DATASET,
    RLVRPromptsConfig,
    build_rlvr_prompts,
    rlvr_info_path,
    row_split,
    row_task,
)
from tulu_pipeline.storage import Store
from tulu_pipeline.training.rlvr_plan import (
    find_start_checkpoint,
    start_checkpoint_by_id,
)

CHECKS_OK = {"no_eval_overlap": True, "schema_valid": True, "unique_row_ids": True}
SMALL = RLVRPromptsConfig(gsm8k_rows=4, math_rows=4, ifeval_rows=4, heldout_per_task=2, seed=3)


def _pool() -> list[dict]:
    rows = (bundled_rows("gsm8k_train", 8) + bundled_rows("math_train", 8) + bundled_rows("self_instruct_seed", 6)
            + bundled_rows("code_alpaca", 4) + bundled_rows("hh_rlhf_harmless", 2))
    unverifiable = {**bundled_rows("gsm8k_train", 1, skip=8)[0], "ground_truth": None}
    return rows + [unverifiable]


def _home(tmp_path, checks=CHECKS_OK) -> Store:
    store = Store(str(tmp_path / "tulu_home"))
    store.write_rows("decontaminated_prompts", "dv1", _pool(), ROW_SCHEMA)
    record_check_results(store, "dv1", checks)
    return store


def test_rlvr_prompts_per_task_with_answers_constraints_and_a_heldout_split(tmp_path):
    store = _home(tmp_path)
    result = build_rlvr_prompts(store, SMALL, "run-1")
    rows = list(store.iter_rows(RLVR_DATASET, result.version))
    assert {t: (c["train"], c["heldout"]) for t, c in result.counts.items()} == {
        "gsm8k": (4, 2), "math": (4, 2), "ifeval": (4, 2)}
    assert result.counts["gsm8k"]["quarantined"] == 1 and result.quarantined == 1
    assert all(row_problems(row) == [] for row in rows)
    assert len(rows) == 18 and len({r["row_id"] for r in rows}) == 18
    pool = {r["row_id"]: r for r in _pool()}
    for row in rows:
        task, split = row_task(row), row_split(row)
        assert split in ("train", "heldout")
        assert [m["role"] for m in row["messages"]] == ["user"]  # the policy writes the answer
        if task in ("gsm8k", "math"):
            source = pool[row["row_id"]]  # the same prompt keeps its row id
            assert row["source"] == {"gsm8k": "gsm8k_train", "math": "math_train"}[task]
            assert row["ground_truth"] == source["ground_truth"] and row["ground_truth"]
            assert verify(task, source["messages"][1]["content"], ground_truth=row["ground_truth"]).ok
        else:
            extra = json.loads(row["extra"])
            parent = pool[extra["parent_row_id"]]
            assert row["row_id"].startswith(f"{IF_SOURCE}-") and row["source_key"] == parent["row_id"]
            assert parent["source"] in SMALL.if_sources and row["license"] == parent["license"]
            constraints = json.loads(row["constraints"])
            assert set(constraints) == {"instruction_id_list", "kwargs"}
            assert row["messages"][0]["content"].endswith(extra["instruction_text"])
            verdict = verify("ifeval", "A short answer.", constraints=constraints)
            assert len(verdict.details["follow_instruction_list"]) == 1
    info = store.read_json(rlvr_info_path(result.version))
    assert sorted(info["heldout_row_ids"]) == sorted(r["row_id"] for r in rows if row_split(r) == "heldout")
    assert info["counts"] == result.counts and info["inputs"] == {"decontaminated_prompts": "dv1"}
    quarantine = store.read_bytes(f"quarantine/{RLVR_DATASET}/{result.version}.jsonl").decode()
    assert "no ground-truth final answer for gsm8k" in quarantine

    ledger = Ledger(store)
    if_row = next(r for r in rows if row_task(r) == "ifeval")
    parent_id = json.loads(if_row["extra"])["parent_row_id"]
    events = ledger.events_for(if_row["row_id"])
    own = [e for e in events if e["row_id"] == if_row["row_id"]]
    assert [e["event"] for e in own] == ["included_in_mix"]
    assert own[0]["details"]["stage"] == "rlvr" and own[0]["related_ids"] == [parent_id]
    parent_events = [e for e in ledger.events_for(parent_id) if e["row_id"] == parent_id]
    assert [(e["event"], e["decision"]) for e in parent_events] == [("included_in_mix", "constraint_attached")]
    math_row = next(r for r in rows if row_task(r) == "math")
    [event] = [e for e in ledger.events_for(math_row["row_id"]) if e["row_id"] == math_row["row_id"]]
    assert event["decision"] == row_split(math_row) and event["details"]["task"] == "math"


def test_same_inputs_and_config_give_the_same_prompt_set(tmp_path):
    first = build_rlvr_prompts(_home(tmp_path / "a"), SMALL, "run-1")
    second_store = _home(tmp_path / "b")
    second = build_rlvr_prompts(second_store, SMALL, "run-2")
    assert first.version == second.version and first.heldout_row_ids == second.heldout_row_ids
    other = build_rlvr_prompts(second_store, SMALL.model_copy(update={"seed": 4}), "run-3")
    assert other.version != first.version


def test_refuses_a_pool_whose_blocking_checks_failed(tmp_path):
    store = _home(tmp_path, checks={**CHECKS_OK, "no_eval_overlap": False})
    with pytest.raises(BlockedByChecksError, match="no_eval_overlap"):
        build_rlvr_prompts(store, SMALL, "run-1")
    assert store.latest_version(RLVR_DATASET) is None


@pytest.mark.integration
def test_materialize_rlvr_prompts(tmp_path):
    from assets.rlvr import rlvr_prompts
    from resources import TuluStorage

    store = _home(tmp_path)
    run_config = dg.RunConfig(ops={"rlvr_prompts": {"config": {"preset": "cpu_demo", "overrides": {
        "gsm8k_rows": 3, "math_rows": 3, "ifeval_rows": 5, "heldout_per_task": 1}}}})
    result = dg.materialize([rlvr_prompts], resources={"storage": TuluStorage(root=store.url)}, run_config=run_config,
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    meta = result.asset_materializations_for_node("rlvr_prompts")[0].metadata
    assert meta["dagster/row_count"].value == 3 + 3 + 5 + 3
    assert meta["heldout_rows"].value == 3
    assert meta["counts"].value["ifeval"]["train"] == 5
    assert "| ifeval | 5 | 1 |" in meta["rows_per_task"].value
    assert "rlvr_if-" in meta["samples"].value
    assert store.latest_version(RLVR_DATASET) == meta["version"].value


# ---------------------------------------------------------------------------------------------
# the checkpoint
# ---------------------------------------------------------------------------------------------
def _fake_checkpoint(store: Store, name: str, checkpoint_id: str, mtime: float) -> None:
    """A published checkpoint manifest, stamped `mtime` (explicit: no sleeping to order files)."""
    rel = f"models/{name}/training_manifest.json"
    store.write_json(rel, {"checkpoint_id": checkpoint_id, "fingerprint": name})
    os.utime(store.path(rel), (mtime, mtime))


def test_start_checkpoint_is_the_latest_dpo_else_the_latest_sft(tmp_path):
    store = Store(str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="materialize sft_checkpoint first"):
        find_start_checkpoint(store)
    _fake_checkpoint(store, "sft-new", "sft-new", mtime=1_700_000_100)  # written first, stamped newer
    _fake_checkpoint(store, "sft-old", "sft-old", mtime=1_700_000_000)
    store.write_json("models/base_model/tulu_model.json", {"weights_sha256": "x"})
    assert find_start_checkpoint(store).checkpoint_id == "sft-new"
    _fake_checkpoint(store, "dpo-a", "dpo-a", mtime=1_700_000_200)
    _fake_checkpoint(store, "sft-newest", "sft-newest", mtime=1_700_000_300)
    start = find_start_checkpoint(store)
    assert (start.checkpoint_id, start.kind, start.checkpoint_dir) == ("dpo-a", "dpo", "models/dpo-a")
    assert start_checkpoint_by_id(store, "sft-old").checkpoint_dir == "models/sft-old"
    with pytest.raises(FileNotFoundError, match="dpo-missing"):
        start_checkpoint_by_id(store, "dpo-missing")
    with pytest.raises(ValueError, match="DPO or SFT"):
        start_checkpoint_by_id(store, "base_model")


def test_cpu_demo_prompts_are_word_limited_constraint_prompts_only(tmp_path):
    from tulu_pipeline.rlvr.prompts import RLVR_PRESETS

    store = _home(tmp_path)
    demo = RLVR_PRESETS["cpu_demo"].model_copy(update={"ifeval_rows": 6, "heldout_per_task": 3})
    result = build_rlvr_prompts(store, demo, "run-demo")
    rows = list(store.iter_rows(RLVR_DATASET, result.version))
    # a task with 0 training rows is left out entirely, held-out rows included
    assert {t: (c["train"], c["heldout"]) for t, c in result.counts.items()} == {
        "gsm8k": (0, 0), "math": (0, 0), "ifeval": (6, 3)}
    assert {row_task(r) for r in rows} == {"ifeval"}
    lo, hi = demo.if_word_limit
    for row in rows:
        constraints = json.loads(row["constraints"])
        assert constraints["instruction_id_list"] == ["length_constraints:number_words"]
        kwargs = constraints["kwargs"][0]
        assert kwargs["relation"] == "less than" and lo <= kwargs["num_words"] <= hi
        assert f"less than {kwargs['num_words']} words" in row["messages"][0]["content"]
        assert verify("ifeval", "Yes.", constraints=constraints).ok
        assert not verify("ifeval", "word " * hi, constraints=constraints).ok


def test_constraint_sampler_restricted_to_types():
    import random

    from tulu_pipeline.rewards.constraints import sample_constraints

    drawn = [sample_constraints(random.Random(i), k=1, types=("punctuation:no_comma", "keywords:existence"))
             for i in range(20)]
    assert {d["instruction_id_list"][0] for d in drawn} == {"punctuation:no_comma", "keywords:existence"}
    with pytest.raises(ValueError, match="cannot sample"):
        sample_constraints(random.Random(0), types=("combination:repeat_prompt",))
    with pytest.raises(ValueError, match="could not draw 2"):
        sample_constraints(random.Random(0), k=2, types=("change_case:english_lowercase",))
