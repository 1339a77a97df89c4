"""Every loader on the real bundled files, row-id stability, and corrupted sources."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest

from tulu_pipeline.data.ingest import ingest_source
from tulu_pipeline.data.loaders import (
    SourceRecordError, extract_boxed, extract_gsm8k_final, iter_source_rows, parse_hh_transcript,
)
from tulu_pipeline.data.registry import get_source, registry, sha256_file
from tulu_pipeline.data.schema import row_problems
from tulu_pipeline.storage import Store

SPECS = registry()


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_loader_on_bundled_file(spec, bundle: Path) -> None:
    rows = list(iter_source_rows(spec, bundle))
    assert len(rows) == spec.rows
    assert len({r["row_id"] for r in rows}) == len(rows)
    assert len({r["source_key"] for r in rows}) == len(rows)
    for row in rows:
        assert row_problems(row) == []
        assert row["source"] == spec.id and row["license"] == spec.license
        assert row["source_key"].startswith(spec.path)
        assert row["row_id"].startswith(spec.id + "-")
    if spec.role != "train":
        assert all(r["eval_id"] for r in rows)
        assert len({r["eval_id"] for r in rows}) == len(rows), "eval ids must identify items"


def test_row_ids_are_stable_across_runs_and_machines(bundle: Path) -> None:
    first = [r["row_id"] for r in iter_source_rows(get_source("gsm8k_train"), bundle)]
    second = [r["row_id"] for r in iter_source_rows(get_source("gsm8k_train"), bundle)]
    assert first == second
    # Pinned: ids depend only on source id, location and the record's bytes.
    pinned = {
        "gsm8k_train": ("gsm8k_train-8ba6f3f198bc688923671845", "train/gsm8k/train.jsonl:1"),
        "code_alpaca": ("code_alpaca-8f744910d8f79172882daeca", "train/code_alpaca/code_alpaca_2k.json#0"),
        "bbh_snarks": ("bbh_snarks-608604603d982e323b49d96d", "eval/bbh/snarks.json#0"),
        "truthfulqa": ("truthfulqa-3dfaf26a3e5d80f128d04643", "eval/truthfulqa/TruthfulQA.csv:2"),
        "hh_rlhf_harmless": ("hh_rlhf_harmless-de914d024a0adedda5cef49b", "train/hh_rlhf/harmless-base/test.jsonl.gz:1"),
    }
    for source_id, (row_id, key) in pinned.items():
        row = next(iter_source_rows(get_source(source_id), bundle))
        assert (row["row_id"], row["source_key"]) == (row_id, key)


def test_field_mappings_on_known_rows(bundle: Path) -> None:
    gsm = next(iter_source_rows(get_source("gsm8k_train"), bundle))
    assert gsm["messages"][0]["content"].startswith("Natalia sold clips")
    assert gsm["ground_truth"] == "72"
    assert [m["role"] for m in gsm["messages"]] == ["user", "assistant"]

    math = next(iter_source_rows(get_source("math500"), bundle))
    assert math["eval_id"] == "test/precalculus/807.json"
    assert math["ground_truth"] == "\\left( 3, \\frac{\\pi}{2} \\right)"

    ifeval = next(iter_source_rows(get_source("ifeval"), bundle))
    assert ifeval["eval_id"] == "1000"
    constraints = json.loads(ifeval["constraints"])
    assert constraints["instruction_id_list"][0] == "punctuation:no_comma"
    assert constraints["kwargs"][1] == {"num_highlights": 3}

    human = next(iter_source_rows(get_source("humaneval"), bundle))
    assert human["eval_id"] == "HumanEval/0" and json.loads(human["extra"])["entry_point"] == "has_close_elements"

    mt = next(iter_source_rows(get_source("mt_bench"), bundle))
    assert [m["role"] for m in mt["messages"]] == ["user", "user"]

    hh = next(iter_source_rows(get_source("hh_rlhf_harmless"), bundle))
    assert hh["messages"][-1]["role"] == "user"
    extra = json.loads(hh["extra"])
    assert extra["chosen"] and extra["rejected"]

    user_oriented = {r["eval_id"]: r for r in iter_source_rows(get_source("self_instruct_user_oriented"), bundle)}
    first = user_oriented["user_oriented_task_0"]["messages"][0]["content"]
    assert first.startswith("The sentence you are given might be too wordy") and "\n\nIf you have any questions" in first

    bbh = next(iter_source_rows(get_source("bbh_boolean_expressions"), bundle))
    assert bbh["messages"][0]["content"] == "not ( True ) and ( True ) is" and bbh["ground_truth"] == "False"


def test_math_train_boxed_answers_extracted(bundle: Path) -> None:
    rows = list(iter_source_rows(get_source("math_train"), bundle))
    assert sum(r["ground_truth"] is not None for r in rows) == len(rows)


def test_extractors() -> None:
    assert extract_gsm8k_final("so 1,234 total\n#### 1,234") == "1234"
    assert extract_gsm8k_final("no marker") is None
    assert extract_boxed(r"thus $\boxed{\frac{1}{2}}$ and") == r"\frac{1}{2}"
    assert extract_boxed(r"first \boxed{1} then \boxed{x^{2}}") == "x^{2}"
    assert extract_boxed(r"answer \boxed 5$") == "5"
    assert extract_boxed("nothing") is None
    assert parse_hh_transcript("\n\nHuman: hi\n\nAssistant: hello") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


# ---------------------------------------------------------------------------------------------
# corrupted sources: a copy of a real file, damaged, under a temporary data dir
# ---------------------------------------------------------------------------------------------
def _damaged(tmp_path: Path, bundle: Path, source_id: str, damage) -> tuple:
    spec = get_source(source_id)
    target = tmp_path / spec.path
    target.parent.mkdir(parents=True, exist_ok=True)
    data = (bundle / spec.path).read_bytes()
    if spec.format == "jsonl.gz":
        data = gzip.compress(damage(gzip.decompress(data)), mtime=0)
    else:
        data = damage(data)
    target.write_bytes(data)
    # The manifest pins the real file; the damaged copy is given its own hash so that the record-level
    # check, not the sha256 check, is what fails.
    return dataclasses.replace(spec, sha256=sha256_file(target)), tmp_path


def _replace_line(n: int, new: bytes):
    def damage(data: bytes) -> bytes:
        lines = data.split(b"\n")
        lines[n - 1] = new
        return b"\n".join(lines)
    return damage


def test_truncated_jsonl_line_names_file_and_line(tmp_path: Path, bundle: Path) -> None:
    def truncate(data: bytes) -> bytes:
        lines = data.split(b"\n")
        lines[41] = lines[41][: len(lines[41]) // 2]
        return b"\n".join(lines)

    spec, root = _damaged(tmp_path, bundle, "gsm8k_test", truncate)
    with pytest.raises(SourceRecordError) as excinfo:
        list(iter_source_rows(spec, root))
    assert str(excinfo.value).startswith("eval/gsm8k/test.jsonl:42: invalid JSON")
    assert "expected one JSON object per line" in str(excinfo.value)
    assert excinfo.value.line == 42


def test_missing_field_names_field_and_line(tmp_path: Path, bundle: Path) -> None:
    spec, root = _damaged(tmp_path, bundle, "gsm8k_train", _replace_line(7, b'{"query": "x", "answer": "#### 1"}'))
    with pytest.raises(SourceRecordError, match=r"train/gsm8k/train.jsonl:7: missing field 'question'"):
        list(iter_source_rows(spec, root))


def test_wrong_type_and_invalid_utf8(tmp_path: Path, bundle: Path) -> None:
    spec, root = _damaged(tmp_path, bundle, "koala", _replace_line(3, b'{"id": "koala_2", "prompt": ["a list"]}'))
    with pytest.raises(SourceRecordError, match=r"koala_test_set.jsonl:3: field 'prompt' must be a string, got list"):
        list(iter_source_rows(spec, root))
    spec, root = _damaged(tmp_path / "b", bundle, "koala", _replace_line(5, b'{"id": "k", "prompt": "caf\xe9"}'))
    with pytest.raises(SourceRecordError, match=r"koala_test_set.jsonl:5: invalid UTF-8"):
        list(iter_source_rows(spec, root))


def test_gzip_and_csv_damage(tmp_path: Path, bundle: Path) -> None:
    spec, root = _damaged(tmp_path, bundle, "hh_rlhf_harmless", _replace_line(3, b'{"chosen": "no turns here"}'))
    with pytest.raises(SourceRecordError, match=r"harmless-base/test.jsonl.gz:3: .*Human"):
        list(iter_source_rows(spec, root))

    def drop_column(data: bytes) -> bytes:
        return data.replace(b"What happens to you if you eat watermelon seeds?,", b"", 1)

    spec, root = _damaged(tmp_path / "c", bundle, "truthfulqa", drop_column)
    with pytest.raises(SourceRecordError, match=r"TruthfulQA.csv:2: expected 7 columns"):
        list(iter_source_rows(spec, root))


def test_quarantine_mode_keeps_good_rows_and_explains_bad_ones(tmp_path: Path, bundle: Path) -> None:
    def damage(data: bytes) -> bytes:
        lines = data.split(b"\n")
        lines[9] = b'{"question": "truncated'
        lines[19] = b'{"answer": "#### 3"}'
        return b"\n".join(lines)

    spec, root = _damaged(tmp_path, bundle, "gsm8k_test", damage)
    store = Store(str(tmp_path / "home"))
    result = ingest_source(spec, store, "run-q", root=root, on_error="quarantine")
    assert result.dataset.rows == spec.rows - 2
    reasons = {q.line: q.reason for q in result.quarantined}
    assert set(reasons) == {10, 20}
    assert "invalid JSON" in reasons[10] and "missing field 'question'" in reasons[20]
    quarantine = [json.loads(line) for line in store.read_bytes(
        f"quarantine/raw/gsm8k_test/{result.version}.jsonl").splitlines()]
    assert [q["source_key"] for q in quarantine] == ["eval/gsm8k/test.jsonl:10", "eval/gsm8k/test.jsonl:20"]
    assert [q["raw"] for q in quarantine] == ['{"question": "truncated', '{"answer": "#### 3"}']


def test_failed_ingestion_publishes_nothing(tmp_path: Path, bundle: Path) -> None:
    spec, root = _damaged(tmp_path, bundle, "gsm8k_test", _replace_line(1000, b"{broken"))
    store = Store(str(tmp_path / "home"))
    with pytest.raises(SourceRecordError, match="test.jsonl:1000"):
        ingest_source(spec, store, "run-fail", root=root)
    assert store.latest_version("raw/gsm8k_test") is None
    # lock files (.locks/) are bookkeeping kept between runs, not outputs
    leftovers = [p for p in (tmp_path / "home").rglob("*") if p.is_file() and ".locks" not in p.parts]
    assert leftovers == [], f"half-written files left behind: {leftovers}"
