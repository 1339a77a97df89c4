"""`tulu diff`: two SFT checkpoints whose mixes differ by a known set of rows, and their evaluations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_sft_support import bundled_rows

from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.evaluation.results import EVAL_SCHEMA, dataset_name, summary_path
from tulu_pipeline.mixing.publish import MIX_DATASET, mix_info_path
from tulu_pipeline.audit.diff import checkpoint_diff, diff_markdown
from tulu_pipeline.provenance.ledger import LedgerWriter
from tulu_pipeline.training.sft_plan import SFTPlan, record_trained_on

ITEMS = ["gsm8k-i0", "gsm8k-i1", "gsm8k-i2", "gsm8k-i3"]


def _checkpoint(store, name, mix_version, rows, config):
    """A published mix and an SFT checkpoint trained on all of it, with the ledger events the stages write."""
    store.write_rows(MIX_DATASET, mix_version, rows, ROW_SCHEMA)
    store.write_json(mix_info_path(mix_version), {"mix_hash": mix_version, "inputs": {}, "heldout_row_ids": []})
    with LedgerWriter(store, "sft", MIX_DATASET, mix_version, "run-mix") as ledger:
        for row in rows:
            ledger.record(row["row_id"], "included_in_mix", decision="train", details={"mix_hash": mix_version})
    manifest = {"checkpoint_id": name, "mix_hash": mix_version, "config": config, "sft_code_version": "7",
                "trained_row_ids_file": "trained_row_ids.txt", "versions": {"torch": "2.13.0"}}
    store.write_bytes(f"models/{name}/trained_row_ids.txt", "".join(r["row_id"] + "\n" for r in rows).encode())
    store.write_json(f"models/{name}/training_manifest.json", manifest)
    plan = SFTPlan(mix_version, name, f"models/{name}", mix_version, {"heldout_row_ids": []})
    record_trained_on(store, plan, manifest, "run-" + name)


def _evaluation(store, checkpoint_id, scores):
    records = [{"item_id": item, "eval_id": item, "benchmark": "gsm8k", "source": "gsm8k_test",
                "checkpoint_id": checkpoint_id, "prompt": "[]", "response": "", "score": score, "reason": "",
                "details": "{}"} for item, score in zip(ITEMS, scores)]
    version = f"v-{checkpoint_id}"
    store.write_rows(dataset_name("gsm8k", checkpoint_id), version, records, EVAL_SCHEMA)
    store.write_json(summary_path("gsm8k", checkpoint_id), {"benchmark": "gsm8k", "version": version,
                                                             "score": sum(scores) / len(scores)})


@pytest.fixture
def pair(store):
    rows = bundled_rows("gsm8k_train", 10) + bundled_rows("code_alpaca", 4)
    mix_a = rows[:12]
    mix_b = rows[2:10] + rows[12:]  # known change: rows 0, 1, 10, 11 out; rows 12, 13 in
    _checkpoint(store, "sft-a", "mixa", mix_a, {"learning_rate": 1e-4, "seed": 1})
    _checkpoint(store, "sft-b", "mixb", mix_b, {"learning_rate": 2e-4, "seed": 1})
    _evaluation(store, "sft-a", [1.0, 0.0, 1.0, 0.0])
    _evaluation(store, "sft-b", [1.0, 1.0, 0.0, 0.0])
    # decontamination matched training row 3 against item i1 (below threshold here: it stayed in both mixes)
    with LedgerWriter(store, "decontamination", "decontaminated_prompts", "dv1", "run-dc") as ledger:
        ledger.record(rows[3]["row_id"], "quarantined", decision="contaminated", details={
            "matches": [{"benchmark": "gsm8k", "eval_id": "gsm8k-i1", "eval_row_id": "gsm8k-i1", "score": 0.6,
                         "span": "x"}]})
    added = {r["row_id"] for r in rows[12:]}
    removed = {r["row_id"] for r in rows[:2] + rows[10:12]}
    return added, removed, rows


def test_diff_reports_exactly_the_rows_that_changed(store, pair):
    added, removed, rows = pair
    diff = checkpoint_diff(store, "sft-a", "sft-b")
    assert (diff["rows"]["a"], diff["rows"]["b"]) == (12, 10)
    got_added = {r for s in diff["rows"]["per_source"] for r in s["added_row_ids"]}
    got_removed = {r for s in diff["rows"]["per_source"] for r in s["removed_row_ids"]}
    assert (got_added, got_removed) == (added, removed)
    by_source = {s["source"]: (s["added"], s["removed"]) for s in diff["rows"]["per_source"]}
    assert by_source == {"code_alpaca": (2, 2), "gsm8k_train": (0, 2)}
    # the mix selection is the decision that differs, for exactly those rows
    assert {d["row_id"] for d in diff["decisions_differ"]} == added | removed
    first = next(d for d in diff["decisions_differ"] if d["row_id"] in added)
    assert first["decisions"] == {"sft/included_in_mix": {"a": "absent", "b": "train"}}
    assert diff["hyperparameters"] == [{"key": "learning_rate", "a": 1e-4, "b": 2e-4}]
    assert diff["licenses"] == {"added": [], "removed": []}


def test_diff_lists_flipped_items_with_paired_intervals_and_overlapping_rows(store, pair):
    _added, _removed, rows = pair
    (evaluation,) = checkpoint_diff(store, "sft-a", "sft-b")["evaluations"]
    assert evaluation["items"] == 4 and evaluation["delta"] == 0.0
    assert evaluation["ci_low"] <= 0.0 <= evaluation["ci_high"]
    flips = {f["item_id"]: f for f in evaluation["flipped"]}
    assert set(flips) == {"gsm8k-i1", "gsm8k-i2"}
    assert flips["gsm8k-i1"]["direction"] == "wrong→right"
    (overlap,) = flips["gsm8k-i1"]["overlapping_training_rows"]
    assert overlap["row_id"] == rows[3]["row_id"] and overlap["trained_in_a"] and overlap["trained_in_b"]
    assert flips["gsm8k-i2"]["overlapping_training_rows"] == []
    markdown = diff_markdown(checkpoint_diff(store, "sft-a", "sft-b"))
    assert "`gsm8k-i1` wrong→right" in markdown and "2 added, 4 removed" in markdown


def test_cli_diff_json_and_markdown(store, pair):
    base = [sys.executable, "-m", "tulu_pipeline.cli", "--home", store.url, "diff", "sft-a", "sft-b"]
    out = subprocess.run([*base, "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["rows"]["added"] == 2
    out = subprocess.run(base, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("## `sft-b` vs `sft-a`")


def test_base_model_against_sft(store, pair):
    store.write_json("models/base_model/tulu_model.json", {"weights_sha256": "abc"})
    _evaluation(store, "base_model", [0.0, 0.0, 1.0, 1.0])
    diff = checkpoint_diff(store, "base_model", "sft-a")
    assert (diff["rows"]["a"], diff["rows"]["added"], diff["rows"]["removed"]) == (0, 12, 0)
    (evaluation,) = diff["evaluations"]
    assert {f["item_id"]: f["direction"] for f in evaluation["flipped"]} == {
        "gsm8k-i0": "wrong→right", "gsm8k-i3": "right→wrong"}
