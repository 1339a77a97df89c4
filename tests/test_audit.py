"""Provenance on a small real pipeline state: trace forward, audit backward, a checkpoint's data bill,
license audits, reproduction from a manifest, and ledger compaction that changes no answer.

The state is built with the library (no Dagster): three training sources and three benchmarks are
ingested, normalized, deduplicated and decontaminated; a small mix is published; a checkpoint is
simulated by writing its manifest and recording ``trained_on`` events.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tulu_pipeline.cli import main as tulu
from tulu_pipeline.curation.config import CurationConfig, EvalSelection
from tulu_pipeline.curation.pipeline import (
    decontaminate_prompts, decontamination_report, deduplicate_prompts, normalize_prompts,
    record_check_results, schema_violations, verify_no_eval_overlap,
)
from tulu_pipeline.curation.stages import build_eval_index
from tulu_pipeline.data.ingest import ingest_source, source_version
from tulu_pipeline.data.registry import get_source, registry
from tulu_pipeline.mixing.config import MixConfig
from tulu_pipeline.mixing.publish import build_sft_mix
from tulu_pipeline.mixing.sample import row_ids_hash
from tulu_pipeline.audit.reports import (
    bill_markdown, checkpoint_bill, eval_audit, license_audit, license_is_non_commercial, registry_version,
)
from tulu_pipeline.provenance.compaction import compact, compaction_status
from tulu_pipeline.provenance.ledger import Ledger, LedgerWriter
from tulu_pipeline.provenance.ledger_layout import bucket_of, bucket_sql, sql_str
from tulu_pipeline.audit.reproduce import rebuild_mix, reproduce_plan
from tulu_pipeline.provenance.trace import render_tree
from tulu_pipeline.storage import Store
from tulu_pipeline.training.sft_plan import SFTPlan, record_trained_on, sft_checkpoint_id

pytestmark = pytest.mark.integration  # a curated and trained TULU_HOME, CLI runs

TRAIN = ["gsm8k_train", "code_alpaca", "self_instruct_seed"]
BENCHMARKS = ["gsm8k", "mbpp", "humaneval"]
RUNS = {"ingest": "run-ingest", "normalize": "run-normalize", "dedup": "run-dedup", "decontam": "run-decontam",
        "mix": "run-mix", "sft": "run-sft"}


def _simulate_checkpoint(store: Store, mix_result, run_id: str, preset: str = "cpu_demo") -> tuple[str, dict]:
    """A finished SFT checkpoint as the trainer leaves it: its manifest, then the ledger's trained_on events."""
    mix_info = store.read_json(f"data/sft_mix/{mix_result.version}/mix.json")
    config = {"num_epochs": 2, "learning_rate": 2e-5, "max_length": 1024, "seed": 123, "preset": preset}
    base_sha = "ab" * 32
    checkpoint_id = sft_checkpoint_id("1", config, mix_result.version, base_sha)
    manifest_extra = {
        "checkpoint_id": checkpoint_id, "mix_hash": mix_result.version, "mix": mix_info["mix"],
        "train_row_ids_hash": mix_info["train_row_ids_hash"], "heldout_row_ids_hash": mix_info["heldout_row_ids_hash"],
        "base_model_sha256": base_sha, "preset": preset,
        "mix_dataset": "sft_mix", "mix_version": mix_result.version,
        "heldout_row_ids": sorted(mix_info["heldout_row_ids"]),
    }
    manifest = {**manifest_extra, "format_version": 1, "sft_code_version": "1", "fingerprint": "f" * 64,
                "config": config, "seed": 123, "dropped_row_ids": [], "versions": {"python": "3.11", "torch": "2.13.0"},
                "metrics": {"final_loss": 1.0}, "trained_row_ids_file": "trained_row_ids.txt"}
    heldout = set(mix_info["heldout_row_ids"])
    trained = sorted(r["row_id"] for r in store.iter_rows("sft_mix", mix_result.version) if r["row_id"] not in heldout)
    store.write_bytes(f"models/{checkpoint_id}/trained_row_ids.txt", "\n".join(trained).encode())
    store.write_json(f"models/{checkpoint_id}/training_manifest.json", manifest)
    plan = SFTPlan(version=checkpoint_id.removeprefix("sft-"), checkpoint_id=checkpoint_id,
                   checkpoint_dir=f"models/{checkpoint_id}", mix_version=mix_result.version,
                   extras={"heldout_row_ids": mix_info["heldout_row_ids"], "manifest_extra": manifest_extra})
    record_trained_on(store, plan, manifest, run_id)
    return checkpoint_id, manifest


@pytest.fixture(scope="module")
def state(tmp_path_factory, bundle: Path) -> dict:
    store = Store(str(tmp_path_factory.mktemp("audit") / "home"))
    for spec in registry():
        if spec.id in TRAIN or (spec.role == "eval" and spec.benchmark in BENCHMARKS):
            ingest_source(spec, store, RUNS["ingest"], root=bundle)
    config = CurationConfig(train_sources=TRAIN, evals=EvalSelection(benchmarks=BENCHMARKS))
    normalize_prompts(store, config, RUNS["normalize"])
    deduplicate_prompts(store, config, RUNS["dedup"])
    index = build_eval_index(store, config)
    decontaminated = decontaminate_prompts(store, config, RUNS["decontam"], index=index)
    violations = verify_no_eval_overlap(store, decontaminated.version, index[0], config)
    problems, duplicates = schema_violations(store, "decontaminated_prompts", decontaminated.version)
    record_check_results(store, decontaminated.version, {
        "no_eval_overlap": not violations, "schema_valid": not problems, "unique_row_ids": not duplicates})
    store.write_json(f"reports/decontamination/{decontaminated.version}/report.json",
                     decontamination_report(store, decontaminated.version, config, decontaminated.inputs))
    mix = MixConfig.model_validate({"name": "audit_test", "seed": 7, "heldout_rows": 4, "sources": {
        "gsm8k_train": {"rows": 20}, "code_alpaca": {"rows": 10}, "self_instruct_seed": {"fraction": 0.05}}})
    mix_result = build_sft_mix(store, mix, RUNS["mix"])
    checkpoint_id, manifest = _simulate_checkpoint(store, mix_result, RUNS["sft"])
    return {"store": store, "decontaminated": decontaminated, "mix": mix_result, "checkpoint": checkpoint_id,
            "manifest": manifest}


def _copy(state: dict, tmp_path: Path) -> Store:
    target = tmp_path / "home"
    shutil.copytree(state["store"].root, target)
    return Store(str(target))


def _cli_json(capsys, *argv: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = tulu(list(argv))
    return code, json.loads(capsys.readouterr().out)


def _trained_row(state: dict) -> str:
    """A gsm8k_train row of the mix's training split that normalization changed (or any, if none was)."""
    store, train = state["store"], state["mix"].sample.train["gsm8k_train"]
    changed = {r["row_id"] for r in Ledger(store).query(
        "SELECT row_id FROM events WHERE event = 'normalized' AND decision = 'changed'", row_ids=train)}
    return next((r for r in train if r in changed), train[0])


# ---------------------------------------------------------------------------------------------
# trace, forward
# ---------------------------------------------------------------------------------------------
def test_trace_follows_a_row_from_source_line_to_checkpoint(state, capsys) -> None:
    store, checkpoint = state["store"], state["checkpoint"]
    row_id = _trained_row(state)
    code, trace = _cli_json(capsys, "--home", store.root, "trace", row_id)
    assert code == 0
    assert {"row_id", "found", "origin", "events", "referenced_by", "summary"} <= set(trace)
    s = trace["summary"]
    spec = get_source("gsm8k_train")

    [source] = s["source"]
    assert source["decision"] == "ingested" and source["source"] == "gsm8k_train"
    assert source["file"] == spec.path and isinstance(source["line"], int) and source["line"] >= 1
    assert source["file_sha256"] == spec.sha256 and source["license"] == "MIT"
    assert source["asset_key"] == "raw/gsm8k_train" and source["asset_version"] == source_version(spec)
    # the line really is that row's source line
    raw = next(r for r in store.iter_rows("raw/gsm8k_train") if r["row_id"] == row_id)
    assert raw["source_key"] == f"{spec.path}:{source['line']}"

    [normalization] = s["normalization"]
    assert normalization["decision"] in ("changed", "unchanged")
    if normalization["decision"] == "changed":
        assert normalization["changes"]
    assert [d["decision"] for d in s["dedup"]] == ["kept"]
    [decontam] = s["decontamination"]
    assert decontam["decision"] == "clean" and decontam["asset_version"] == state["decontaminated"].version
    [mix] = s["mixes"]
    assert mix == {**mix, "decision": "train", "mix": "audit_test", "mix_hash": state["mix"].version}
    [trained] = s["checkpoints"]
    assert trained["checkpoint"] == checkpoint and trained["event"] == "trained_on" and trained["epochs"] == 2
    assert s["preference_pairs"] == []
    assert s["status"] == f"trained on {checkpoint}"
    assert s["run_ids"] == {"source": [RUNS["ingest"]], "normalization": [RUNS["normalize"]],
                            "dedup": [RUNS["dedup"]], "decontamination": [RUNS["decontam"]],
                            "mixes": [RUNS["mix"]], "checkpoints": [RUNS["sft"]]}

    capsys.readouterr()
    assert tulu(["--home", store.root, "trace", row_id, "--tree"]) == 0
    tree = capsys.readouterr().out
    assert tree.startswith(row_id + "\n")
    assert f"status: trained on {checkpoint}" in tree
    for text in (f"ingested: gsm8k_train  {spec.path} line {source['line']}", f"sha256 {spec.sha256}",
                 "dedup", "kept (unique)", "decontamination", "clean", f"audit_test@{state['mix'].version} (train)",
                 "preference pairs: none", f"{checkpoint}: trained, 2 epoch(s)", f"run {RUNS['sft']}",
                 f"decontaminated_prompts@{state['decontaminated'].version}  run {RUNS['decontam']}"):
        assert text in tree, text
    assert tree.rstrip().splitlines()[-3].startswith("└── checkpoints")


def test_trace_names_the_duplicate_and_the_kept_row(state) -> None:
    ledger = Ledger(state["store"])
    [dup] = ledger.query("SELECT row_id, related_ids FROM events WHERE event = 'dropped_duplicate'")
    trace = ledger.trace(dup["row_id"])
    [dedup] = trace["summary"]["dedup"]
    assert dedup["decision"] == "dropped_duplicate" and dedup["kind"] == "near"
    assert dedup["duplicate_of"] == dup["related_ids"][0] and dedup["jaccard"] > 0.5
    assert trace["summary"]["decontamination"] == [] and trace["summary"]["mixes"] == []
    assert trace["summary"]["status"] == f"dropped as near duplicate of {dup['related_ids'][0]}"

    kept = ledger.trace(dup["related_ids"][0])["summary"]
    assert [d["row_id"] for d in kept["duplicates_dropped"]] == [dup["row_id"]]
    assert "rows dropped as its duplicates" in render_tree(ledger.trace(dup["related_ids"][0]))


def test_trace_of_a_quarantined_row_and_of_the_eval_item(state) -> None:
    ledger = Ledger(state["store"])
    row_id = ledger.query("SELECT min(row_id) AS r FROM events WHERE event = 'quarantined' "
                          "AND stage = 'decontamination' AND row_id LIKE 'gsm8k_train-%'")[0]["r"]
    s = ledger.trace(row_id)["summary"]
    [decontam] = s["decontamination"]
    match = decontam["matches"][0]
    assert decontam["decision"] == "contaminated" and match["benchmark"] == "gsm8k"
    assert match["score"] >= 0.5 and match["span"] and match["eval_row_id"].startswith("gsm8k_test-")
    assert s["mixes"] == [] and s["checkpoints"] == []
    assert s["status"].startswith(f"quarantined by decontamination: gsm8k item {match['eval_id']}")

    item = ledger.trace(match["eval_row_id"])["summary"]
    assert row_id in {c["row_id"] for c in item["contaminated_training_rows"]}
    assert item["source"][0]["eval_id"] == match["eval_id"]
    assert item["status"].startswith("eval item;")


def test_trace_of_a_checkpoint_id_counts_its_rows(state) -> None:
    trace = Ledger(state["store"]).trace(state["checkpoint"])
    assert trace["found"] is False
    counts = {r["event"]: r["rows"] for r in trace["summary"]["rows_of_checkpoint"]}
    assert counts == {"trained_on": state["mix"].sample.n_train, "evaluated": state["mix"].sample.n_heldout}


# ---------------------------------------------------------------------------------------------
# audit eval, backward
# ---------------------------------------------------------------------------------------------
def test_audit_eval_finds_overlapping_rows_and_no_checkpoint(state, capsys) -> None:
    store = state["store"]
    code, audit = _cli_json(capsys, "--home", store.root, "audit", "eval", "gsm8k")
    assert code == 0
    assert audit["registered_benchmark"] and audit["totals"]["rows"] >= 1
    assert [c["version"] for c in audit["decontaminated_against"]] == [state["decontaminated"].version]
    for row in audit["rows"]:
        assert row["source"] == "gsm8k_train" and row["source_key"].startswith("train/")
        [stop] = row["stopped_at"]
        assert stop["stage"] == "decontamination" and stop["asset_version"] == state["decontaminated"].version
        assert stop["run_id"] == RUNS["decontam"] and stop["score"] >= 0.5 and stop["span"]
        assert row["mixes"] == [] and row["checkpoints"] == [] and row["reached_checkpoint"] is False
    assert audit["totals"]["rows_reaching_a_checkpoint"] == 0 and audit["checkpoints_exposed"] == []

    item = audit["rows"][0]["stopped_at"][0]
    by_item = eval_audit(store, "gsm8k", item["eval_id"])
    by_row = eval_audit(store, "gsm8k", item["eval_row_id"])
    assert by_item["rows"] == by_row["rows"] and by_item["items_hit"] == {item["eval_id"]: len(by_item["rows"])}
    assert eval_audit(store, "gsm8k", "no-such-item")["rows"] == []
    # checked against but never overlapped, and never checked at all, are told apart
    humaneval = eval_audit(store, "humaneval")
    assert humaneval["rows"] == [] and humaneval["decontaminated_against"]
    assert eval_audit(store, "bbh")["decontaminated_against"] == []

    capsys.readouterr()
    assert tulu(["--home", store.root, "audit", "eval", "mbpp", "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert "## Training rows overlapping `mbpp`" in markdown and "code_alpaca" in markdown
    assert "reached a checkpoint" in markdown and "| row | source | item |" in markdown


def test_audit_eval_flags_a_row_that_reached_a_checkpoint(state, tmp_path, capsys) -> None:
    store = _copy(state, tmp_path)
    leaked = eval_audit(store, "gsm8k")["rows"][0]["row_id"]
    with LedgerWriter(store, "sft", "sft_checkpoint", "leak", "run-leak") as writer:
        writer.record(leaked, "trained_on", decision="trained", related_ids=["sft-leaky"])
    code, audit = _cli_json(capsys, "--home", store.root, "audit", "eval", "gsm8k")
    assert code == 1
    assert audit["checkpoints_exposed"] == ["sft-leaky"]
    assert next(r for r in audit["rows"] if r["row_id"] == leaked)["reached_checkpoint"] is True


# ---------------------------------------------------------------------------------------------
# the checkpoint's data bill and licenses
# ---------------------------------------------------------------------------------------------
def test_checkpoint_bill(state, capsys) -> None:
    store, checkpoint, sample = state["store"], state["checkpoint"], state["mix"].sample
    bill = checkpoint_bill(store, checkpoint)
    sources = {s["source"]: s for s in bill["sources"]}
    assert set(sources) == set(TRAIN)
    for source in TRAIN:
        assert sources[source]["rows"] == sample.counts[source]["train"]
        assert sources[source]["heldout"] == sample.counts[source]["heldout"]
        assert sources[source]["ingested_file_sha256"] == [get_source(source).sha256]
    assert bill["rows"] == sample.n_train and bill["heldout_rows"] == sample.n_heldout == 4
    assert sources["code_alpaca"]["license"] == "CC-BY-NC-4.0 (DATA_LICENSE)"
    assert sources["code_alpaca"]["non_commercial"] is True and sources["gsm8k_train"]["non_commercial"] is False
    assert bill["non_commercial_sources"] == ["code_alpaca"] and bill["commercial_use_ok"] is False
    assert {e["license"]: e["rows"] for e in bill["licenses"]}["MIT"] == sources["gsm8k_train"]["rows"]

    decontam = bill["decontamination"]
    assert decontam["version"] == state["decontaminated"].version and decontam["checks_passed"] is True
    assert decontam["checks"] == {"no_eval_overlap": True, "schema_valid": True, "unique_row_ids": True}
    assert set(decontam["benchmarks"]) == set(BENCHMARKS) and decontam["ngram"] == 8
    assert bill["registry"]["version"] == registry_version() and len(registry_version()) == 16
    assert bill["mix"]["mix_hash"] == state["mix"].version and bill["mix"]["name"] == "audit_test"
    assert bill["mix"]["inputs"] == {"decontaminated_prompts": state["decontaminated"].version}
    assert bill["mix"]["train_row_ids_hash"] == row_ids_hash(sample.train_ids)
    assert len(bill["mix"]["config_hash"]) == 16 and len(bill["training"]["config_hash"]) == 16
    assert bill["code"]["sft_code_version"] == "1" and bill["code"]["libraries"]["torch"] == "2.13.0"
    assert bill["checks"] == {"train_row_ids_hash_matches": True, "ledger_trained_on_rows": sample.n_train,
                              "ledger_heldout_rows": sample.n_heldout, "ledger_matches_mix": True,
                              "ingested_files_match_registry": True}

    markdown = bill_markdown(bill)
    assert f"## Data bill of `{checkpoint}`" in markdown
    assert "⚠ Non-commercial data from: code_alpaca" in markdown
    assert "no_eval_overlap: pass" in markdown and "gsm8k, humaneval, mbpp" in markdown
    assert "All checks pass" in markdown
    capsys.readouterr()
    assert tulu(["--home", store.root, "audit", "checkpoint", checkpoint, "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == markdown.strip()
    assert tulu(["--home", store.root, "audit", "checkpoint", "sft-nope"]) == 2
    assert "no checkpoint 'sft-nope'" in capsys.readouterr().err


def test_bill_of_a_short_run_checks_only_the_sources_it_reached(state, tmp_path) -> None:
    # A run stopped after a few steps (the e2e smoke run) learned from some sources only: the others have no
    # trained row whose ingested file could be checked, and that is not a registry mismatch.
    store, checkpoint = _copy(state, tmp_path), state["checkpoint"]
    trained = store.read_bytes(f"models/{checkpoint}/trained_row_ids.txt").decode().split()
    source = "gsm8k_train"
    kept = [row_id for row_id in trained if row_id.startswith(f"{source}-")][:2]
    assert kept
    store.write_bytes(f"models/{checkpoint}/trained_row_ids.txt", "\n".join(kept).encode())
    bill = checkpoint_bill(store, checkpoint)
    sources = {s["source"]: s for s in bill["sources"]}
    assert sources[source]["rows"] == 2 and sources[source]["ingested_file_sha256"] == [get_source(source).sha256]
    assert all(s["rows"] == 0 and s["not_reached"] > 0 for name, s in sources.items() if name != source)
    assert bill["checks"]["ingested_files_match_registry"] is True

    # ... while a reached source with a row ingested from another file still fails the check
    with LedgerWriter(store, "ingest", f"raw/{source}", "other-file", "run-other") as writer:
        writer.record(kept[0], "ingested", decision="ingested", details={"source": source, "file_sha256": "0" * 64})
    assert checkpoint_bill(store, checkpoint)["checks"]["ingested_files_match_registry"] is False


def test_license_audit_of_datasets(state, capsys) -> None:
    store = state["store"]
    code, mix = _cli_json(capsys, "--home", store.root, "audit", "licenses", "sft_mix")
    assert code == 0 and mix["version"] == state["mix"].version
    assert mix["rows"] == state["mix"].sample.n_train + state["mix"].sample.n_heldout
    licenses = {e["license"]: e for e in mix["licenses"]}
    assert licenses["CC-BY-NC-4.0 (DATA_LICENSE)"]["non_commercial"] is True
    assert licenses["CC-BY-NC-4.0 (DATA_LICENSE)"]["sources"] == {"code_alpaca": 10}
    assert mix["non_commercial_sources"] == ["code_alpaca"] and mix["non_commercial_rows"] == 10
    assert not mix["commercial_use_ok"]

    raw = license_audit(store, "raw/gsm8k_train")
    assert raw["commercial_use_ok"] and [e["license"] for e in raw["licenses"]] == ["MIT"]
    pool = license_audit(store, "decontaminated_prompts", state["decontaminated"].version)
    assert pool["rows"] == state["decontaminated"].dataset.rows
    capsys.readouterr()
    assert tulu(["--home", store.root, "audit", "licenses", "decontaminated_prompts", "--markdown"]) == 0
    assert "⚠" in capsys.readouterr().out
    # the flag agrees with the registry's for every registered license
    assert all(license_is_non_commercial(s.license) == s.is_non_commercial for s in registry())


# ---------------------------------------------------------------------------------------------
# reproduce
# ---------------------------------------------------------------------------------------------
def _listing(store: Store) -> dict[str, int]:
    root = Path(store.root)
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_reproduce_rebuilds_identical_row_ids_from_the_manifest(state, capsys) -> None:
    store, checkpoint, sample = state["store"], state["checkpoint"], state["mix"].sample
    rebuilt = rebuild_mix(store, state["manifest"])
    assert rebuilt.resolved_by == "mix_hash_search"
    assert rebuilt.inputs == {"decontaminated_prompts": state["decontaminated"].version}
    assert rebuilt.sample.train == sample.train and rebuilt.sample.heldout_by_source == sample.heldout_by_source
    trained = {r["row_id"] for r in Ledger(store).query("SELECT row_id FROM events WHERE event = 'trained_on'",
                                                         related_to=checkpoint)}
    assert trained == set(rebuilt.sample.train_ids)

    before = _listing(store)
    code, plan = _cli_json(capsys, "--home", store.root, "reproduce", checkpoint, "--dry-run")
    assert _listing(store) == before  # --dry-run writes nothing
    assert code == 0 and plan["identical"] is True
    assert plan["verified"] == {"mix_hash": True, "train_row_ids_hash": True, "heldout_row_ids_hash": True,
                                "heldout_row_ids": True, "checkpoint_id": True}
    assert plan["mix"]["config"] == state["mix"].mix.canonical()
    assert plan["data"]["inputs"] == rebuilt.inputs and plan["data"]["decontamination"]["checks_passed"]
    lineage = plan["data"]["lineage"]
    assert [v["version"] for v in lineage["decontaminated_prompts"]] == [state["decontaminated"].version]
    assert lineage["raw/gsm8k_train"][0]["version"] == lineage["raw/gsm8k_train"][0]["current_registry_version"]
    assert {"normalized_prompts", "deduplicated_prompts", "raw/code_alpaca"} <= set(lineage)
    assert plan["training"]["config"] == state["manifest"]["config"]
    assert plan["training"]["checkpoint_id_recomputed"] == checkpoint
    assert plan["run_config"]["ops"]["sft_checkpoint"]["config"]["preset"] == "cpu_demo"


def test_reproduce_writes_a_kit_and_flags_a_tampered_manifest(state, tmp_path, capsys) -> None:
    import yaml

    store = _copy(state, tmp_path)
    checkpoint = state["checkpoint"]
    code, plan = _cli_json(capsys, "--home", store.root, "reproduce", checkpoint)
    assert code == 0 and set(plan["written"]) == {"plan", "mix", "run_config"}
    mix = MixConfig.model_validate(yaml.safe_load(Path(plan["written"]["mix"]).read_text()))
    assert mix == state["mix"].mix

    # recorded input versions are used (and checked) when the manifest has them
    manifest = dict(state["manifest"], mix_inputs={"decontaminated_prompts": state["decontaminated"].version})
    assert rebuild_mix(store, manifest).resolved_by == "manifest"

    tampered = dict(state["manifest"], train_row_ids_hash="0" * 16)
    store.write_json(f"models/{checkpoint}/training_manifest.json", tampered)
    result = reproduce_plan(store, checkpoint)
    assert result["identical"] is False and result["verified"]["train_row_ids_hash"] is False
    capsys.readouterr()
    assert tulu(["--home", store.root, "reproduce", checkpoint, "--dry-run"]) == 1
    assert "train_row_ids_hash" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# compaction changes no answer
# ---------------------------------------------------------------------------------------------
def test_bucket_function_is_the_same_in_python_and_duckdb() -> None:
    import duckdb

    keys = ["", "r1", "gsm8k_train-045461d7f5fee568d4a0e0f9", "sft-0123456789abcdef", "é✓🙂", "o'neil"]
    keys += [f"row-{i}" for i in range(200)]
    got = duckdb.connect().execute("SELECT " + ", ".join(bucket_sql(sql_str(k), 64) for k in keys)).fetchone()
    assert list(got) == [bucket_of(k, 64) for k in keys]


def _answers(store: Store, row_ids: list[str], checkpoint: str) -> dict:
    ledger = Ledger(store)
    return {
        "traces": {r: ledger.trace(r) for r in row_ids},
        "counts": ledger.query("SELECT event, asset_key, count(*) AS n FROM events GROUP BY ALL ORDER BY ALL"),
        "audit": eval_audit(store, "gsm8k"),
        "bill": checkpoint_bill(store, checkpoint),
    }


@pytest.mark.parametrize("buckets", [3, 64])
def test_compaction_keeps_every_answer(state, tmp_path, buckets) -> None:
    store = _copy(state, tmp_path)
    ledger = Ledger(store)
    dup = ledger.query("SELECT row_id, related_ids FROM events WHERE event = 'dropped_duplicate'")[0]
    quarantined = eval_audit(store, "gsm8k")["rows"][0]
    row_ids = [_trained_row(state), state["mix"].sample.heldout[0], dup["row_id"], dup["related_ids"][0],
               quarantined["row_id"], quarantined["stopped_at"][0]["eval_row_id"], state["checkpoint"], "no-such-row"]
    before = _answers(store, row_ids, state["checkpoint"])

    summary = compact(store, buckets=buckets)
    assert summary["changed"] and summary["events"] == sum(c["n"] for c in before["counts"])
    status = compaction_status(store)
    assert status["compacted"] and status["remainder_files"] == 0 and status["stale_runs"] == 0
    assert _answers(store, row_ids, state["checkpoint"]) == before
    assert compact(store, buckets=buckets)["changed"] is False  # nothing new

    # events published after compaction are read from their own files ...
    second, _ = _simulate_checkpoint(store, state["mix"], "run-sft-2", preset="tulu3_8b")
    after_new = Ledger(store).trace(row_ids[0])
    assert [c["checkpoint"] for c in after_new["summary"]["checkpoints"]] == [state["checkpoint"], second]
    assert compaction_status(store)["remainder_files"] == 1
    # ... a retried run that replaced its events hides what was folded of it ...
    with LedgerWriter(store, "curation", "deduplicated_prompts",
                      before["traces"][dup["row_id"]]["events"][-1]["asset_version"], RUNS["dedup"]) as writer:
        writer.record(dup["row_id"], "kept", decision="unique")
    retried = Ledger(store).trace(dup["row_id"])["summary"]["dedup"]
    assert [d["decision"] for d in retried] == ["kept"]
    assert Ledger(store).trace(dup["related_ids"][0])["summary"]["duplicates_dropped"] == []
    expected = _answers(store, row_ids, state["checkpoint"])
    assert compaction_status(store)["stale_runs"] == 1
    # ... and compacting again folds both in without changing an answer
    again = compact(store, buckets=buckets)
    assert again["changed"] and again["runs_stale"] == 1
    assert compaction_status(store)["remainder_files"] == 0
    assert _answers(store, row_ids, state["checkpoint"]) == expected


def test_ledger_cli_compact_and_status(state, tmp_path, capsys) -> None:
    store = _copy(state, tmp_path)
    code, status = _cli_json(capsys, "--home", store.root, "ledger", "status")
    assert code == 0 and status["compacted"] is False and status["run_dirs"] > 10
    code, summary = _cli_json(capsys, "--home", store.root, "ledger", "compact", "--buckets", "8")
    assert code == 0 and summary["changed"] and summary["buckets"] == 8
    code, status = _cli_json(capsys, "--home", store.root, "ledger", "status")
    assert status["compacted"] and status["generation"] == summary["generation"] and status["remainder_files"] == 0
    code, trace = _cli_json(capsys, "--home", store.root, "trace", _trained_row(state))
    assert code == 0 and trace["summary"]["status"] == f"trained on {state['checkpoint']}"


def test_bill_of_a_checkpoint_trained_from_another_inherits_its_data(state, tmp_path) -> None:
    """An RLVR/DPO-style checkpoint: its own prompts from the ledger, plus its start checkpoint's bill."""
    from tulu_pipeline.data.schema import ROW_SCHEMA

    store = _copy(state, tmp_path)
    decontam = store.latest_version("decontaminated_prompts")
    rows = [r for r in store.iter_rows("decontaminated_prompts", decontam) if r["source"] == "code_alpaca"][:5]
    store.write_rows("rlvr_prompts", "p1", rows, ROW_SCHEMA, inputs={"decontaminated_prompts": decontam})
    checkpoint = "rlvr-test"
    store.write_json(f"models/{checkpoint}/training_manifest.json", {
        "checkpoint_id": checkpoint, "prompts_dataset": "rlvr_prompts", "prompts_version": "p1",
        "start_checkpoint": state["checkpoint"], "config": {"seed": 1}})
    with LedgerWriter(store, "rlvr", "rlvr_checkpoint", "v1", "run-rlvr") as ledger:
        for row in rows[:3]:
            ledger.record(row["row_id"], "trained_on", related_ids=[checkpoint])
        ledger.record(rows[3]["row_id"], "evaluated", related_ids=[checkpoint])
    bill = checkpoint_bill(store, checkpoint)
    assert (bill["rows"], bill["heldout_rows"], bill["not_reached"]) == (3, 1, 1)
    assert bill["parent"]["checkpoint_id"] == state["checkpoint"]
    # code_alpaca is CC BY-NC: the derived checkpoint inherits that too, whichever stage brought it in
    assert "code_alpaca" in bill["non_commercial_sources"] and not bill["commercial_use_ok"]
    assert set(bill["non_commercial_sources"]) >= set(bill["parent"]["non_commercial_sources"])
    assert bill["decontamination"]["version"] == decontam
    assert all(v is not False for v in bill["checks"].values())
    markdown = bill_markdown(bill)
    assert f"Inherited from `{state['checkpoint']}`" in markdown
