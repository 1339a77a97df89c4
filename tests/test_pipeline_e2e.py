"""README command (a) in miniature: the full job through the Dagster CLI into a real local instance, every stage
at smoke-test sizes (tests/configs/e2e_small.yaml), then evaluation of the base model and the final checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from definitions import defs

pytestmark = pytest.mark.integration  # the Dagster CLI running the whole job

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_full_pipeline_job_materializes_everything(tmp_path: Path, converted_base_model) -> None:
    env = {**os.environ, "TULU_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "home" / "dagster")}
    # The session's conversion of the same GGUF, hard-linked in (nothing writes into it in place): the base_model
    # asset takes its reuse path; the conversion itself is tested in test_base_model.py.
    shutil.copytree(converted_base_model.path, tmp_path / "home" / "models" / "base_model", copy_function=os.link)
    subprocess.run([str(BIN / "tulu"), "instance"], cwd=REPO, env=env, check=True, capture_output=True)
    run = subprocess.run(
        [str(BIN / "dagster"), "job", "execute", "-m", "definitions", "-j", "full_pipeline",
         "-c", str(REPO / "tests" / "configs" / "e2e_small.yaml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        for key in defs.get_job_def("full_pipeline").asset_layer.executable_asset_keys:
            event = instance.get_latest_materialization_event(key)
            assert event is not None, f"{key.to_user_string()} was not materialized"
        gsm = instance.get_latest_materialization_event(dg.AssetKey(["raw", "gsm8k_test"]))
        row_count = gsm.asset_materialization.metadata["dagster/row_count"].value
        assert row_count == 1319
        model = instance.get_latest_materialization_event(dg.AssetKey("base_model")).asset_materialization
        assert model.metadata["parameter_count"].value == 134_515_008
    finally:
        instance.dispose()

    model_dir = tmp_path / "home" / "models" / "base_model"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(model_dir).num_parameters() == 134_515_008

    first_row = subprocess.run(
        [str(BIN / "python"), "-c",
         "from tulu_pipeline.storage import Store; import os;"
         "print(next(Store(os.environ['TULU_HOME']).iter_dataset('raw/math_train'))[4]['row_id'])"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    trace = subprocess.run([str(BIN / "tulu"), "trace", first_row], env=env, capture_output=True, text=True)
    assert trace.returncode == 0, trace.stderr
    origin = json.loads(trace.stdout)["origin"]
    assert origin["file"] == "train/math/train.jsonl" and origin["line"] == 5

    # Forward through the whole demo: a row the SFT run learned from names its source line and checkpoint.
    from tulu_pipeline.provenance.ledger import Ledger
    from tulu_pipeline.storage import Store

    store = Store(env["TULU_HOME"])
    trained = Ledger(store).query("SELECT row_id, related_ids FROM events WHERE event = 'trained_on' ORDER BY row_id")
    assert trained, "the SFT checkpoint recorded no trained_on events"
    checkpoint_id = trained[0]["related_ids"][0]
    assert (tmp_path / "home" / "models" / checkpoint_id / "training_manifest.json").exists()
    trace = json.loads(subprocess.run([str(BIN / "tulu"), "trace", trained[0]["row_id"]], env=env,
                                      capture_output=True, text=True, check=True).stdout)
    assert trace["origin"]["file"].startswith("train/")
    events = [e["event"] for e in trace["events"]]
    assert {"ingested", "normalized", "kept", "included_in_mix", "trained_on"} <= set(events)
    sft_trained = [r for r in trained if r["related_ids"][0].startswith("sft-")]
    bill = json.loads(subprocess.run([str(BIN / "tulu"), "audit", "checkpoint", checkpoint_id], env=env,
                                     capture_output=True, text=True, check=True).stdout)
    assert bill["rows"] == len(sft_trained) and all(v is not False for v in bill["checks"].values())

    # Every later stage left its trail: pairs, DPO and RLVR checkpoints built on the SFT one.
    events = {r["event"] for r in Ledger(store).query("SELECT DISTINCT event FROM events")}
    assert {"selected_for_preference", "paired", "trained_on", "not_trained"} <= events
    stages = {r["related_ids"][0].split("-")[0] for r in trained}
    assert stages == {"sft", "dpo", "rlvr"}, stages
    rlvr = next(r["related_ids"][0] for r in trained if r["related_ids"][0].startswith("rlvr-"))
    manifest = json.loads((tmp_path / "home" / "models" / rlvr / "training_manifest.json").read_text())
    assert manifest["start_checkpoint"].startswith("dpo-")
    bill = json.loads(subprocess.run([str(BIN / "tulu"), "audit", "checkpoint", rlvr], env=env,
                                     capture_output=True, text=True, check=True).stdout)
    assert bill["parent"]["checkpoint_id"].startswith("dpo-") and bill["parent"]["parent"]["checkpoint_id"] == checkpoint_id

    # Evaluation through the partitions: the base model and the final checkpoint, two items per benchmark, short
    # answers (what is scored does not change how the stages connect; tests/test_evaluation*.py score for real).
    evaluation = subprocess.run([str(BIN / "tulu-evaluate"), "--checkpoint", "base_model", "--checkpoint", rlvr,
                                 "--sample-size", "2", "--max-new-tokens", "16"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=1200)
    assert evaluation.returncode == 0, evaluation.stdout[-3000:] + evaluation.stderr[-3000:]
    comparison = (tmp_path / "home" / "reports" / "eval" / "comparison" / "comparison.md").read_text()
    assert "gsm8k" in comparison and rlvr in comparison
