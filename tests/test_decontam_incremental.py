"""Incremental decontamination: a benchmark added or changed, rows appended or edited; every result
equals a full rerun's, and the ledger says what each row was checked against."""

from __future__ import annotations

import json
import random

from tulu_pipeline.curation.config import CurationConfig, EvalSelection
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


def outputs(store, version: str) -> tuple[list[dict], list[dict]]:
    quarantine = list(store.iter_rows("decontamination_quarantine", version))
    for q in quarantine:
        q["matches"] = json.loads(q["matches"])
    return list(store.iter_rows("decontaminated_prompts", version)), quarantine


def run_both(store, config: CurationConfig, run: str):
    """The incremental result and its ledger events; a full rerun of the same inputs must equal it."""
    incremental = decontaminate_prompts(store, config, f"{run}-incremental")
    got = outputs(store, incremental.version)
    events = details(store, incremental.version, f"{run}-incremental")
    assert len(events) == incremental.stats["rows"]
    full = decontaminate_prompts(store, config, f"{run}-full", incremental=False)
    assert full.version == incremental.version
    assert got == outputs(store, full.version)
    assert full.stats["scanned"] == {"all": full.stats["rows"]}
    return incremental, events


def details(store, version: str, run_id: str) -> list[dict]:
    rows = Ledger(store).query(f"SELECT row_id, event, details FROM events WHERE asset_version = '{version}' "
                               f"AND run_id = '{run_id}' ORDER BY seq")
    return [{**r, "details": json.loads(r["details"]) if isinstance(r["details"], str) else r["details"]}
            for r in rows]


def test_incremental_runs_equal_full_reruns(store, bundle):
    rng = random.Random(0)
    evals = {b: rows_of(s, 300) for b, s in EVALS.items()}
    for benchmark, source in EVALS.items():
        publish(store, f"raw/{source}", "v1", evals[benchmark])
    pool = training_rows(rng, 0, 400, evals)
    publish(store, "deduplicated_prompts", "d1", pool)

    # 1. The first run has nothing to reuse.
    two = CurationConfig(evals=EvalSelection(benchmarks=["gsm8k", "mbpp"]))
    first = decontaminate_prompts(store, two, "first")
    assert first.stats["scanned"] == {"all": 400} and first.quarantined > 0

    # 2. A benchmark is added: rows kept before are scanned against IFEval only.
    three = CurationConfig(evals=EvalSelection(benchmarks=["gsm8k", "mbpp", "ifeval"]))
    added, events = run_both(store, three, "added")
    assert added.stats["changed_benchmarks"] == ["ifeval"] and added.stats["previous_version"] == first.version
    assert added.stats["scanned"] == {"changed": 400 - first.quarantined, "all": first.quarantined}
    assert added.stats["removed"].keys() >= {"code_alpaca/ifeval"}
    newly = [e for e in events if e["event"] == "quarantined" and e["details"]["scanned"] == "changed"]
    assert newly and all(e["details"]["benchmarks"] == ["ifeval"] for e in newly)
    kept = [e for e in events if e["event"] == "kept" and e["details"]["scanned"] == "changed"]
    assert kept and all(e["details"]["benchmarks_scanned"] == ["ifeval"] for e in kept)

    # 3. The pool gains rows (and one row is edited in place): only those, and the quarantined, are scanned.
    more = training_rows(random.Random(1), 400, 60, evals)
    edited = dict(pool[1], messages=[{"role": "user", "content": "Please help: " + evals["mbpp"][5]["messages"][0]
                                      ["content"]}])
    publish(store, "deduplicated_prompts", "d2", [pool[0], edited, *pool[2:], *more])
    appended, _ = run_both(store, three, "appended")
    assert appended.stats["changed_benchmarks"] == []
    assert appended.stats["scanned"] == {"all": added.quarantined + 60 + 1, "reused": 400 - added.quarantined - 1}

    # 4. A benchmark's file changes: only its new items are scanned against the rows kept before.
    changed_mbpp = [dict(r, row_id=r["row_id"] + "-v2") for r in evals["mbpp"][:150]]
    publish(store, "raw/mbpp", "v2", changed_mbpp)
    changed, _ = run_both(store, three, "changed")
    assert changed.stats["changed_benchmarks"] == ["mbpp"]
    assert changed.stats["scanned"]["changed"] == 460 - appended.quarantined
    # Rows copied from MBPP items 150-299 were quarantined only by MBPP: now clean, as in a full rerun.
    assert changed.quarantined < appended.quarantined


def test_a_different_config_is_never_reused(store, bundle):
    evals = {b: rows_of(s, 100) for b, s in EVALS.items()}
    for benchmark, source in EVALS.items():
        publish(store, f"raw/{source}", "v1", evals[benchmark])
    publish(store, "deduplicated_prompts", "d1", training_rows(random.Random(2), 0, 80, evals))
    decontaminate_prompts(store, CurationConfig(evals=EvalSelection(benchmarks=list(EVALS))), "first")
    other = CurationConfig.model_validate({"decontam": {"rule": "ngram_share"}, "evals": {"benchmarks": list(EVALS)}})
    result = decontaminate_prompts(store, other, "second")
    assert result.stats["previous_version"] is None and result.stats["scanned"] == {"all": 80}


def test_decisions_under_another_rule_version_are_never_reused(store, bundle, monkeypatch):
    """A run made with an older tokenizer or rule (`RULE_VERSION`) has another version and is not reused."""
    from tulu_pipeline.curation import pipeline, stages

    evals = {b: rows_of(s, 100) for b, s in EVALS.items()}
    for benchmark, source in EVALS.items():
        publish(store, f"raw/{source}", "v1", evals[benchmark])
    publish(store, "deduplicated_prompts", "d1", training_rows(random.Random(3), 0, 80, evals))
    config = CurationConfig(evals=EvalSelection(benchmarks=list(EVALS)))
    with monkeypatch.context() as old:
        old.setattr(pipeline, "RULE_VERSION", "1")
        old.setattr(stages, "RULE_VERSION", "1")
        before = decontaminate_prompts(store, config, "old-rule")
    result = decontaminate_prompts(store, config, "new-rule")
    assert result.version != before.version
    assert result.stats["previous_version"] is None and result.stats["scanned"] == {"all": 80}
    assert store.read_json(f"reports/decontamination/{result.version}/run.json")["rule_version"] == pipeline.RULE_VERSION
