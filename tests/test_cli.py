"""The `tulu` command outside Dagster."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tulu_pipeline.cli import main as tulu
from tulu_pipeline.data.registry import registry

REPO = Path(__file__).resolve().parent.parent


def test_sources_list_json(capsys) -> None:
    assert tulu(["sources", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == [s.id for s in registry()]
    assert {"id", "path", "format", "role", "suite", "license", "rows", "sha256", "upstream"} <= set(rows[0])


def test_sources_verify_reports_each_file(capsys, bundle: Path, tmp_path: Path) -> None:
    assert tulu(["sources", "verify", "--data-dir", str(bundle)]) == 0
    assert capsys.readouterr().out.count("ok ") == len(registry())
    assert tulu(["sources", "verify", "--data-dir", str(tmp_path)]) == 1
    assert "source file for 'gsm8k_train' is missing" in capsys.readouterr().err


def test_trace_unknown_row_exits_nonzero(capsys, tmp_path: Path) -> None:
    assert tulu(["--home", str(tmp_path), "trace", "no-such-row"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["found"] is False
    assert "no ledger events for row 'no-such-row'" in captured.err


def test_instance_writes_sqlite_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    assert tulu(["instance"]) == 0
    written = yaml.safe_load((tmp_path / "dh" / "dagster.yaml").read_text())
    assert written == yaml.safe_load((REPO / "dagster.yaml").read_text())
    assert "storage" not in written  # SQLite under DAGSTER_HOME is Dagster's default


def test_rows_lists_a_dataset(capsys, store, bundle: Path) -> None:
    from tulu_pipeline.data.ingest import ingest_source
    from tulu_pipeline.data.registry import get_source

    ingest_source(get_source("koala"), store, "run-1", root=bundle)
    assert tulu(["--home", store.root, "rows", "raw/koala", "--limit", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["source_key"] for line in lines] == ["eval/koala/koala_test_set.jsonl:1",
                                                      "eval/koala/koala_test_set.jsonl:2"]
    assert tulu(["--home", store.root, "rows", "raw/nothing"]) == 2
    assert "raw/nothing' has not been materialized" in capsys.readouterr().err
