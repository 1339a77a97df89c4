"""The curation group end to end on the bundled data: assets, metadata, ledger, trace, blocking checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from assets.curation import curation_assets
from assets.sources import raw_source_assets
from resources import DataBundle, LocalLauncher, TuluStorage
from tulu_pipeline.curation.decontaminate import RULE_VERSION
from tulu_pipeline.curation.overlap_check import Overlap, OverlapChecker
from tulu_pipeline.cli import main as tulu
from tulu_pipeline.provenance.ledger import Ledger
from tulu_pipeline.storage import Store

pytestmark = pytest.mark.integration  # the whole curation group materialized through Dagster


@pytest.fixture(scope="module")
def curated(tmp_path_factory, bundle: Path):
    """Raw sources and the whole curation group, materialized once into a temporary TULU_HOME."""
    home = tmp_path_factory.mktemp("curation") / "home"
    result = dg.materialize(
        [*raw_source_assets, *curation_assets],
        resources={"storage": TuluStorage(root=str(home)), "data_bundle": DataBundle(data_dir=str(bundle)),
                   "launcher": LocalLauncher()},
    )
    assert result.success
    return result, Store(str(home))


def _metadata(result, key: str) -> dict:
    return next(m for m in result.get_asset_materialization_events()
                if m.asset_key == dg.AssetKey(key)).materialization.metadata


def test_curation_outputs_and_checks(curated) -> None:
    result, store = curated
    normalized = _metadata(result, "normalized_prompts")
    deduplicated = _metadata(result, "deduplicated_prompts")
    clean = _metadata(result, "decontaminated_prompts")
    # 19,977 training rows; two empty Code Alpaca answers dropped; 3 exact + 17 near duplicates.
    assert normalized["dagster/row_count"].value == 19_975 and normalized["quarantined"].value == 2
    assert deduplicated["dagster/row_count"].value == 19_955 and deduplicated["quarantined"].value == 20
    removed = clean["quarantined"].value
    assert clean["dagster/row_count"].value + removed == 19_955
    # Dominated by MATH train problems sharing stock phrasing and LaTeX punctuation with MATH test
    # (token coverage over spaCy-like tokens: 1410, measured; see test_math_train_against_math_test).
    assert 1300 <= removed <= 1500, removed
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()
              if c.asset_key == dg.AssetKey("decontaminated_prompts")}
    assert checks == {"no_eval_overlap": True, "schema_valid": True, "unique_row_ids": True}

    report_md = _metadata(result, "decontamination_report")
    assert "| math_train | math |" in report_md["report"].value
    assert report_md["heatmap"].value.startswith("![heatmap.png](data:image/png;base64,")
    version = clean["version"].value
    report = store.read_json(f"reports/decontamination/{version}/report.json")
    flagged = {(c["source"], c["benchmark"]) for c in report["flagged"]}
    assert ("math_train", "math") in flagged and ("math_train", "math500") in flagged
    assert report["benchmarks"]["math500"]["items"] == 500
    assert (report["rule"], report["rule_version"]) == ("token_coverage", RULE_VERSION)
    # Every eval benchmark of both suites is a decontamination target.
    assert {"gsm8k", "ifeval", "humaneval", "alpaca_eval", "bbh", "mbpp", "mt_bench"} <= set(report["benchmarks"])


def test_known_exact_math_overlap_is_quarantined(curated) -> None:
    _, store = curated
    quarantined = {r["source_key"]: r for r in store.iter_rows("decontamination_quarantine")}
    # MATH test/precalculus/24307 is exactly MATH train/geometry/6032 (../shared/data/README.md).
    row = next(r for r in quarantined.values() if json.loads(r["extra"] or "{}").get("type") == "Geometry"
               and r["eval_id"] == "train/geometry/6032.json")
    matches = json.loads(row["matches"])
    assert any(m["eval_id"] == "test/precalculus/24307.json" and m["score"] == 1.0 for m in matches)


def test_trace_shows_decontamination_and_dedup_decisions(curated, capsys) -> None:
    _, store = curated
    row = next(store.iter_rows("decontamination_quarantine"))
    capsys.readouterr()
    assert tulu(["--home", store.root, "trace", row["row_id"]]) == 0
    trace = json.loads(capsys.readouterr().out)
    events = {e["event"]: e for e in trace["events"]}
    assert set(events) == {"ingested", "normalized", "kept", "quarantined"}
    quarantined = events["quarantined"]
    match = quarantined["details"]["matches"][0]
    assert {"benchmark", "eval_id", "score", "span"} <= set(match) and match["span"]
    assert match["eval_row_id"] in quarantined["related_ids"]

    duplicates = Ledger(store).query("SELECT row_id, related_ids FROM events WHERE event = 'dropped_duplicate' LIMIT 1")
    assert tulu(["--home", store.root, "trace", duplicates[0]["row_id"]]) == 0
    trace = json.loads(capsys.readouterr().out)
    dropped = next(e for e in trace["events"] if e["event"] == "dropped_duplicate")
    assert dropped["related_ids"] == duplicates[0]["related_ids"]
    assert dropped["reason"].startswith(("exact duplicate of", "near duplicate of"))


def test_one_curation_event_per_row_and_stage(curated) -> None:
    _, store = curated
    rows = Ledger(store).query(
        "SELECT asset_key, count(*) AS n, count(DISTINCT row_id) AS u FROM events "
        "WHERE stage IN ('curation', 'decontamination') GROUP BY asset_key ORDER BY asset_key")
    assert rows == [
        {"asset_key": "decontaminated_prompts", "n": 19_955, "u": 19_955},
        {"asset_key": "deduplicated_prompts", "n": 19_975, "u": 19_975},
        {"asset_key": "normalized_prompts", "n": 19_977, "u": 19_977},
    ]


def test_failed_overlap_check_blocks_downstream(curated, monkeypatch, tmp_path: Path, bundle: Path) -> None:
    """If the independent pass finds an overlap, the blocking check fails and training never runs."""
    monkeypatch.setattr(OverlapChecker, "overlaps", lambda self, turns: [Overlap(0, 1.0)])
    trained = []

    @dg.asset(deps=["decontaminated_prompts"])
    def fake_training() -> None:
        trained.append(True)

    _, store = curated
    home = tmp_path / "home"
    shutil.copytree(store.root, home)  # the module's TULU_HOME stays as the other tests expect it
    result = dg.materialize(
        [*curation_assets, fake_training],
        selection=["decontaminated_prompts", "decontamination_report", "fake_training"],
        resources={"storage": TuluStorage(root=str(home)), "data_bundle": DataBundle(data_dir=str(bundle)),
                   "launcher": LocalLauncher()},
        raise_on_error=False,
    )
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["no_eval_overlap"] is False
    assert trained == []
    assert not result.success
