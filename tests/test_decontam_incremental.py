"""Incremental decontamination: a benchmark added, changed or removed, rows appended, edited or removed, and
all at once; every published result (rows, quarantine, ledger events but run ids and timestamps) equals a full
rerun's, and the run record says which route ran and why."""

from __future__ import annotations

import json
import random

import pytest

from tulu_pipeline.curation.config import CurationConfig, EvalSelection
from tulu_pipeline.curation.incremental import run_record_path
from tulu_pipeline.curation.pipeline import decontaminate_prompts
from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import get_source
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.provenance.ledger import Ledger

EVALS = {"gsm8k": "gsm8k_test", "mbpp": "mbpp", "ifeval": "ifeval"}


def rows_of(source_id: str, limit: int) -> list[dict]:
    return list(iter_source_rows(get_source(source_id)))[:limit]


def training_rows(rng: random.Random, start: int, count: int, evals: dict[str, list[dict]]) -> list[dict]:
    """Real training rows, every fourth one with a copied eval prompt of some benchmark inside."""
    base = rows_of("code_alpaca", start + count)[start:]
    out = []
    for k, row in enumerate(base):
        row = dict(row)
        if k % 4 == 0:
            eval_row = rng.choice(evals[rng.choice(sorted(evals))])
            prompt = next(m["content"] for m in eval_row["messages"] if m["role"] == "user")
            row["messages"] = [{"role": "user", "content": "Please help: " + prompt},
                               *[m for m in row["messages"] if m["role"] == "assistant"]]
        out.append(row)
    return out


def publish(store, name: str, version: str, rows: list[dict]) -> None:
    store.write_rows(name, version, [{f.name: r.get(f.name) for f in ROW_SCHEMA} for r in rows], ROW_SCHEMA)


def published(store, version: str, run_id: str) -> dict:
    """Everything a version publishes, but run ids and timestamps."""
    quarantine = list(store.iter_rows("decontamination_quarantine", version))
    for q in quarantine:
        q["matches"] = json.loads(q["matches"])
    events = Ledger(store).query(
        "SELECT row_id, event, stage, asset_key, asset_version, seq, decision, reason, related_ids, details "
        f"FROM events WHERE asset_version = '{version}' AND run_id = '{run_id}' ORDER BY seq")
    for e in events:
        e["details"] = json.loads(e["details"]) if e["details"] else None
    return {"rows": list(store.iter_rows("decontaminated_prompts", version)), "quarantine": quarantine,
            "events": events}


def run_both(store, config: CurationConfig, run: str):
    """The incremental result; a full rerun of the same inputs (which replaces its events) must equal it."""
    incremental = decontaminate_prompts(store, config, f"{run}-incremental")
    got = published(store, incremental.version, f"{run}-incremental")
    record = store.read_json(run_record_path(incremental.version))
    assert len(got["events"]) == incremental.stats["rows"] == incremental.ledger_events
    full = decontaminate_prompts(store, config, f"{run}-full", incremental=False)
    assert full.version == incremental.version
    assert full.stats["incremental"]["route"] == "full" and full.stats["scanned"] == {"all": full.stats["rows"]}
    want = published(store, full.version, f"{run}-full")
    assert got == want
    assert (incremental.dataset.rows, incremental.quarantined) == (full.dataset.rows, full.quarantined)
    assert incremental.samples == full.samples and incremental.text_lengths == full.text_lengths
    for key in ("rows", "clean", "quarantined", "removed", "eval_ids_hit", "benchmarks"):
        assert incremental.stats[key] == full.stats[key], key
    return incremental, got["events"], record


def count_rechecks(monkeypatch) -> list[str]:
    """Every text `OverlapChecker` re-checks from now on (first turn, enough to count and to tell rows apart)."""
    from tulu_pipeline.curation.overlap_check import OverlapChecker

    seen: list[str] = []
    overlaps = OverlapChecker.overlaps

    def counting(self, turns):
        seen.append(turns[0] if turns else "")
        return overlaps(self, turns)

    monkeypatch.setattr(OverlapChecker, "overlaps", counting)
    return seen


def by_benchmarks(names: list[str]) -> CurationConfig:
    return CurationConfig(evals=EvalSelection(benchmarks=names))


@pytest.fixture
def setup(store, bundle):
    evals = {b: rows_of(s, 300) for b, s in EVALS.items()}
    for benchmark, source in EVALS.items():
        publish(store, f"raw/{source}", "v1", evals[benchmark])
    pool = training_rows(random.Random(0), 0, 400, evals)
    publish(store, "deduplicated_prompts", "d1", pool)
    return evals, pool


def test_each_change_takes_the_incremental_route_and_equals_a_full_rerun(store, setup):
    evals, pool = setup
    # 1. The first run has nothing to reuse.
    first = decontaminate_prompts(store, by_benchmarks(["gsm8k", "mbpp"]), "first")
    assert first.stats["incremental"]["route"] == "full" and first.stats["incremental"]["reason"] == "no earlier version"
    assert first.stats["scanned"] == {"all": 400} and first.quarantined > 0
    assert set(store.read_json(run_record_path(first.version))["fingerprints"]) == {"gsm8k", "mbpp"}

    # 2. A benchmark is added: every row is scanned against IFEval only, nothing against the others.
    three = by_benchmarks(["gsm8k", "mbpp", "ifeval"])
    added, events, record = run_both(store, three, "added")
    assert record["route"] == "incremental" and record["added_benchmarks"] == ["ifeval"]
    assert record["previous_version"] == first.version and record["reason"] == "added ifeval"
    assert added.stats["scanned"] == {"changed": 400}
    assert added.stats["removed"].keys() >= {"code_alpaca/ifeval"}
    # the events of the new version name the new benchmark: every row was checked against it
    assert all("ifeval" in e["details"]["checked"] for e in events)
    assert any(e["event"] == "quarantined" and "ifeval" in e["details"]["benchmarks"] for e in events)

    # 3. The pool gains rows (and one row is edited in place): only those are scanned.
    more = training_rows(random.Random(1), 400, 60, evals)
    edited = dict(pool[1], messages=[{"role": "user", "content": "Please help: " + evals["mbpp"][5]["messages"][0]
                                      ["content"]}])
    publish(store, "deduplicated_prompts", "d2", [pool[0], edited, *pool[2:], *more])
    appended, _, record = run_both(store, three, "appended")
    assert record["route"] == "incremental" and record["rows_new_or_changed"] == 61 and record["rows_removed"] == 0
    assert appended.stats["scanned"] == {"all": 61}
    assert pool[1]["row_id"] not in {q["row_id"] for q in store.iter_rows("decontamination_quarantine", added.version)}
    assert pool[1]["row_id"] in {q["row_id"] for q in store.iter_rows("decontamination_quarantine", appended.version)}

    # 4. A benchmark's file changes: every unchanged row is scanned against its new items alone.
    changed_mbpp = [dict(r, row_id=r["row_id"] + "-v2") for r in evals["mbpp"][:150]]
    publish(store, "raw/mbpp", "v2", changed_mbpp)
    changed, _, record = run_both(store, three, "changed")
    assert record["changed_benchmarks"] == ["mbpp"] and changed.stats["scanned"] == {"changed": 460}
    # Rows copied from MBPP items 150-299 were quarantined only by MBPP: now clean, as in a full rerun.
    assert changed.quarantined < appended.quarantined

    # 5. A benchmark is removed: nothing is scanned; rows only it quarantined are clean now.
    two = by_benchmarks(["mbpp", "ifeval"])
    removed, events, record = run_both(store, two, "removed")
    assert record["removed_benchmarks"] == ["gsm8k"] and removed.stats["scanned"] == {}
    assert removed.quarantined < changed.quarantined
    assert all("gsm8k" not in e["details"]["checked"] for e in events)

    # 6. All at once: a benchmark back, rows appended and removed, one edited.
    extra = training_rows(random.Random(2), 460, 40, evals)
    publish(store, "deduplicated_prompts", "d3", [*pool[10:], *more, *extra])
    both, _, record = run_both(store, three, "combined")
    assert record["route"] == "incremental" and record["added_benchmarks"] == ["gsm8k"]
    assert (record["rows_new_or_changed"], record["rows_removed"]) == (40, 10)
    assert both.stats["scanned"] == {"all": 40, "changed": 450}


def test_a_rerun_of_the_same_inputs_scans_in_full(store, setup):
    config = by_benchmarks(list(EVALS))
    first = decontaminate_prompts(store, config, "first")
    again = decontaminate_prompts(store, config, "again")
    assert again.version == first.version and again.stats["incremental"]["reason"] == "a rerun of the same version"


def test_a_different_config_is_never_reused(store, setup):
    decontaminate_prompts(store, by_benchmarks(list(EVALS)), "first")
    other = CurationConfig.model_validate({"decontam": {"rule": "ngram_share"}, "evals": {"benchmarks": list(EVALS)}})
    result = decontaminate_prompts(store, other, "second")
    assert result.stats["incremental"]["route"] == "full" and result.stats["scanned"] == {"all": 400}
    assert result.stats["incremental"]["reason"] == "decontam settings or rule version changed"


def test_most_of_the_pool_new_is_a_full_rerun(store, setup):
    evals, pool = setup
    config = by_benchmarks(list(EVALS))
    decontaminate_prompts(store, config, "first")
    publish(store, "deduplicated_prompts", "d2", [*pool[:100], *training_rows(random.Random(5), 400, 300, evals)])
    result = decontaminate_prompts(store, config, "second")
    assert result.stats["incremental"]["route"] == "full"
    assert result.stats["incremental"]["reason"] == "300 of 400 pool rows are new or changed"


def test_decisions_under_another_rule_version_are_never_reused(store, setup, monkeypatch):
    """A run made with an older tokenizer or rule (`RULE_VERSION`) has another version and is not reused."""
    from tulu_pipeline.curation import incremental, pipeline, stages

    config = by_benchmarks(list(EVALS))
    with monkeypatch.context() as old:
        for module in (incremental, pipeline, stages):
            old.setattr(module, "RULE_VERSION", "1")
        before = decontaminate_prompts(store, config, "old-rule")
    result = decontaminate_prompts(store, config, "new-rule")
    assert result.version != before.version
    assert result.stats["incremental"]["route"] == "full" and result.stats["scanned"] == {"all": 400}
    assert store.read_json(run_record_path(result.version))["rule_version"] == pipeline.RULE_VERSION


def test_the_asset_takes_the_incremental_route_when_a_pool_gains_rows(store, setup, monkeypatch):
    """What `source_change_sensor`'s run does when a training pool gains rows: its run config is the default, so
    the decontamination asset is incremental and scans only the new rows; its blocking checks pass, and the
    independent re-check reads only the new rows (the earlier version's passed)."""
    import dagster as dg

    from assets.curation import DecontamStageConfig, decontamination
    from resources import LocalLauncher, TuluStorage

    assert DecontamStageConfig().incremental
    evals, pool = setup
    run_config = {"ops": {"decontamination": {"config": {"benchmarks": list(EVALS)}}}}
    resources = {"storage": TuluStorage(root=store.root), "launcher": LocalLauncher()}

    def materialize() -> dict:
        result = dg.materialize([decontamination], run_config=run_config, resources=resources)
        assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
        return next(m.materialization.metadata["stats"].value for m in result.get_asset_materialization_events()
                    if m.asset_key == dg.AssetKey("decontaminated_prompts"))

    rechecked = count_rechecks(monkeypatch)
    first = materialize()
    assert first["incremental"]["route"] == "full" and len(rechecked) == first["clean"]
    rechecked.clear()
    publish(store, "deduplicated_prompts", "d2", [*pool, *training_rows(random.Random(3), 400, 30, evals)])
    stats = materialize()
    assert len(rechecked) == stats["clean"] - first["clean"] < 30
    assert stats["incremental"]["route"] == "incremental" and stats["incremental"]["reason"] == \
        "30 pool rows new or changed, 0 removed"
    assert stats["scanned"] == {"all": 30}
    version = store.latest_version("decontaminated_prompts")
    report = store.read_json(f"reports/decontamination/{version}/report.json")
    assert report["run"]["route"] == "incremental" and report["run"]["rows_new_or_changed"] == 30
    assert sum(s["rows_in"] for s in report["sources"].values()) == 430


def test_the_recheck_after_a_removed_benchmark_reads_only_rows_it_had_quarantined(store, setup, monkeypatch):
    from tulu_pipeline.curation.pipeline import record_check_results, verify_no_eval_overlap
    from tulu_pipeline.curation.stages import build_eval_index

    first = decontaminate_prompts(store, by_benchmarks(list(EVALS)), "first")
    two = by_benchmarks(["mbpp", "ifeval"])
    removed = decontaminate_prompts(store, two, "removed")
    assert removed.stats["incremental"]["removed_benchmarks"] == ["gsm8k"]
    index = build_eval_index(store, two)[0]
    rechecked = count_rechecks(monkeypatch)
    # the earlier version's checks are unknown: every clean row is re-checked
    assert verify_no_eval_overlap(store, removed.version, index, two, route=removed.plan) == []
    assert len(rechecked) == removed.dataset.rows
    rechecked.clear()
    record_check_results(store, first.version, {"no_eval_overlap": True})
    assert verify_no_eval_overlap(store, removed.version, index, two, route=removed.plan) == []
    assert len(rechecked) == first.quarantined - removed.quarantined > 0


@pytest.mark.parametrize("include_response", [False, True])
def test_arrow_texts_and_turns_equal_the_row_dicts(include_response):
    import pyarrow as pa

    from tulu_pipeline.curation.decontaminate import training_text, training_turns
    from tulu_pipeline.curation.incremental import ArrowTurns, arrow_training_texts

    rng = random.Random(4)
    roles, words = ["system", "user", "assistant", "tool"], ["", "a", "Ünïcode", "x\ny", "漢字", "👍", " "]
    rows = [{"messages": [{"role": rng.choice(roles), "content": " ".join(rng.choices(words, k=rng.randint(0, 4)))}
                          for _ in range(rng.randint(0, 5))]} for _ in range(300)]
    messages = pa.Table.from_pylist(rows, schema=pa.schema([ROW_SCHEMA.field("messages")])).column("messages")
    for column in (messages, messages.combine_chunks().slice(7)):
        expected = rows[len(rows) - len(column):]
        assert arrow_training_texts(column, include_response) == [training_text(r, include_response) for r in expected]
        turns = ArrowTurns(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column,
                           include_response)
        assert [turns[k] for k in range(len(turns))] == [training_turns(r, include_response) for r in expected]
        assert turns[2:5] == [training_turns(r, include_response) for r in expected[2:5]]


def test_with_responses_and_short_items_anywhere(store, setup):
    """Other settings take the same routes: assistant turns matched too, short items counted anywhere."""
    evals, pool = setup
    decontam = {"include_response": True, "short_items": "anywhere"}

    def config(names: list[str]) -> CurationConfig:
        return CurationConfig.model_validate({"decontam": decontam, "evals": {"benchmarks": names}})

    first = decontaminate_prompts(store, config(["gsm8k", "ifeval"]), "first")
    answer = evals["mbpp"][7]["messages"][0]["content"]
    more = [dict(r, messages=[*r["messages"], {"role": "assistant", "content": answer}])
            for r in training_rows(random.Random(6), 400, 20, evals)]
    publish(store, "deduplicated_prompts", "d2", [*pool, *more])
    both, _, record = run_both(store, config(list(EVALS)), "both")
    assert record["route"] == "incremental" and record["added_benchmarks"] == ["mbpp"]
    assert both.stats["scanned"] == {"all": 20, "changed": 400} and both.quarantined > first.quarantined + 10
