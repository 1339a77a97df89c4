"""`tulu decontam`: the file-based decontamination CLI, outside Dagster."""

from __future__ import annotations

import json
from pathlib import Path

from tulu_pipeline.cli import main as tulu
from tulu_pipeline.curation.decontaminate import RULE_VERSION
from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import get_source

CLEAN_PROMPTS = [
    "Write a haiku about the first snow falling on a quiet mountain village at dawn.",
    "Explain how a bicycle derailleur moves the chain between sprockets, step by step.",
]


def _write(path: Path, objects: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_vicuna_questions_are_quarantined_against_vicuna_bench(tmp_path: Path, capsys) -> None:
    vicuna = [r["messages"][0]["content"] for r in iter_source_rows(get_source("vicuna_bench"))][:5]
    train = _write(tmp_path / "train.jsonl", [
        *({"id": f"v{i}", "prompt": f"Please answer: {q.upper()}", "response": "ok"} for i, q in enumerate(vicuna)),
        *({"id": f"c{i}", "messages": [{"role": "user", "content": p}]} for i, p in enumerate(CLEAN_PROMPTS)),
    ])
    out = tmp_path / "out"
    assert tulu(["decontam", "--train", str(train), "--evals", "vicuna_bench", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"rows_in": 7, "rows_clean": 2, "rows_quarantined": 5, "bad_lines": 0}
    assert [o["id"] for o in _read(out / "clean.jsonl")] == ["c0", "c1"]
    quarantine = _read(out / "quarantine.jsonl")
    assert [q["id"] for q in quarantine] == [f"v{i}" for i in range(5)]
    first = quarantine[0]
    assert first["benchmark"] == "vicuna_bench" and first["eval_id"] == "1" and first["score"] == 1.0
    assert first["span"].lower() == vicuna[0].lower()  # the matched tokens ("?" is one), as written in the row
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["rule"] == "token_coverage" and report["rule_version"] == RULE_VERSION
    assert report["benchmarks"]["vicuna_bench"] == {"items": 80, "rows_removed": 5, "items_hit": 5,
                                                    "share_items_hit": 0.0625}


def test_default_evals_are_the_whole_registry(tmp_path: Path) -> None:
    gsm = next(iter_source_rows(get_source("gsm8k_test")))["messages"][0]["content"]
    train = _write(tmp_path / "train.jsonl", [{"id": 1, "prompt": gsm}, {"id": 2, "prompt": CLEAN_PROMPTS[0]}])
    assert tulu(["decontam", "--train", str(train), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {"gsm8k", "math", "ifeval", "bbh", "alpaca_eval", "mbpp"} <= set(report["benchmarks"])
    assert report["rows_quarantined"] == 1
    assert _read(tmp_path / "out" / "quarantine.jsonl")[0]["benchmark"] == "gsm8k"


def test_eval_directory_and_include_response(tmp_path: Path) -> None:
    evals = tmp_path / "evals"
    evals.mkdir()
    _write(evals / "secret_bench.jsonl", [{"id": "s1", "prompt": "the quick brown fox jumps over the lazy dog today"}])
    train = _write(tmp_path / "train.jsonl", [
        {"id": "a", "prompt": "Tell me a story.", "response": "The quick brown fox jumps over the lazy dog today!"}])
    assert tulu(["decontam", "--train", str(train), "--evals", str(evals), "--out", str(tmp_path / "o1")]) == 0
    assert _read(tmp_path / "o1" / "quarantine.jsonl") == []
    assert tulu(["decontam", "--train", str(train), "--evals", str(evals), "--include-response",
                 "--out", str(tmp_path / "o2")]) == 0
    [entry] = _read(tmp_path / "o2" / "quarantine.jsonl")
    assert (entry["id"], entry["benchmark"], entry["eval_id"]) == ("a", "secret_bench", "s1")


def test_malformed_line_stops_without_output(tmp_path: Path, capsys) -> None:
    train = _write(tmp_path / "train.jsonl", [{"id": 1, "prompt": "fine"}, '{"id": 2, "prompt": "trunc',
                                              {"id": 3, "prompt": "fine"}])
    out = tmp_path / "out"
    assert tulu(["decontam", "--train", str(train), "--evals", "koala", "--out", str(out)]) == 2
    assert f"{train}:2: invalid JSON" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # nothing half-written, no staging directory left behind

    assert tulu(["decontam", "--train", str(train), "--evals", "koala", "--skip-bad", "--out", str(out)]) == 0
    assert [o["id"] for o in _read(out / "clean.jsonl")] == [1, 3]
    [bad] = _read(out / "quarantine.jsonl")
    assert bad["line"] == 2 and "invalid JSON" in bad["reason"] and bad["raw"] == '{"id": 2, "prompt": "trunc'


def test_missing_fields_and_unknown_evals(tmp_path: Path, capsys) -> None:
    train = _write(tmp_path / "train.jsonl", [{"id": 1, "text": "no prompt"}])
    assert tulu(["decontam", "--train", str(train), "--evals", "koala", "--out", str(tmp_path / "o")]) == 2
    assert "train.jsonl:1: expected 'messages' ([{role, content}]) or a string 'prompt'" in capsys.readouterr().err
    train = _write(tmp_path / "train2.jsonl", [{"id": 1, "prompt": "x"}])
    assert tulu(["decontam", "--train", str(train), "--evals", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown evals ['nope']" in capsys.readouterr().err
