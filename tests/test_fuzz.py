"""Property and fuzz tests: bad input ends as a quarantined row with a reason, or as a clear error naming the
file and line, never as an unhandled traceback or a partial output. Covers loaders (ingestion), normalization,
decontamination and the verifiers."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tulu_pipeline.curation.decontaminate import DecontamConfig, Decontaminator, EvalIndex, EvalItem
from tulu_pipeline.curation.normalize import NormalizeConfig, Normalizer
from tulu_pipeline.data.ingest import ingest_source
from tulu_pipeline.data.loaders import SourceRecordError
from tulu_pipeline.data.registry import get_source, sha256_file
from tulu_pipeline.data.schema import row_problems
from tulu_pipeline.provenance.ledger import Ledger, MemorySink
from tulu_pipeline.rewards import verify
from tulu_pipeline.storage import TMP_MARKER, Store

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
GOOD = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
odd_text = st.one_of(st.text(max_size=40), st.just(""), st.just("   \n\t "), st.just("a\x00b"),
                     st.just("\u200b\ufeff"), st.text(alphabet="\x00\r\n\t ", max_size=10))
bad_lines = st.one_of(
    st.builds(lambda v: json.dumps(v).encode(), json_values),  # wrong shape or types
    st.builds(lambda q, a: json.dumps({"question": q, "answer": a}).encode(), odd_text, odd_text),  # empty, NUL...
    st.builds(lambda q: json.dumps({"question": q}).encode(), st.text(max_size=20)),  # a field missing
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),  # not JSON, maybe not UTF-8
    st.just(b'{"question": "caf\xe9", "answer": "#### 1"}'),  # invalid UTF-8 inside valid JSON
    st.just(b'{"question": "unterminated'),
)
lines = st.lists(st.one_of(st.just(json.dumps(GOOD).encode()), bad_lines), min_size=1, max_size=12)


def _spec_for(tmp: Path, content: bytes):
    """gsm8k_train's mapping over a file of our own, pinned to its own hash."""
    spec = get_source("gsm8k_train")
    path = tmp / spec.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return dataclasses.replace(spec, sha256=sha256_file(path))


def _temporaries(root: str) -> list[Path]:
    return [p for p in Path(root).rglob(f"*{TMP_MARKER}*")]


@FUZZ
@given(lines)
def test_ingestion_quarantines_or_names_file_and_line(tmp_path_factory, records):
    tmp = tmp_path_factory.mktemp("fuzz")
    content = b"\n".join(records) + b"\n"
    spec = _spec_for(tmp, content)
    nonblank = [i + 1 for i, line in enumerate(records) if line.strip()]

    quarantine_store = Store(str(tmp / "q"))
    result = ingest_source(spec, quarantine_store, "run-q", root=tmp, on_error="quarantine")
    assert result.dataset.rows + len(result.quarantined) == len(nonblank)
    for bad in result.quarantined:
        assert bad.reason and bad.line in nonblank
    for row in quarantine_store.iter_rows(f"raw/{spec.id}"):
        assert row_problems(row) == []
    assert not _temporaries(quarantine_store.root)

    strict_store = Store(str(tmp / "s"))
    if result.quarantined:
        with pytest.raises(SourceRecordError) as error:
            ingest_source(spec, strict_store, "run-s", root=tmp, on_error="raise")
        first_bad = min(b.line for b in result.quarantined)
        assert str(error.value).startswith(f"{spec.path}:{first_bad}: ")
        # nothing half-published: no dataset version, no ledger events, no temporaries
        assert strict_store.latest_version(f"raw/{spec.id}") is None
        assert Ledger(strict_store).query("SELECT count(*) AS n FROM events") == [{"n": 0}]
        assert not _temporaries(strict_store.root)
    else:
        assert ingest_source(spec, strict_store, "run-s", root=tmp).dataset.rows == len(nonblank)


def test_a_ten_megabyte_row_is_ingested_or_quarantined_not_crashed(tmp_path):
    huge = json.dumps({"question": "x " * 5_000_000, "answer": "#### 1"}).encode()
    spec = _spec_for(tmp_path, json.dumps(GOOD).encode() + b"\n" + huge + b"\n")
    store = Store(str(tmp_path / "home"))
    result = ingest_source(spec, store, "run", root=tmp_path, on_error="quarantine")
    assert result.dataset.rows == 2  # the loader has no size limit; normalization enforces max_chars
    sink = MemorySink()
    kept = list(Normalizer(NormalizeConfig(), sink)(store.iter_rows(f"raw/{spec.id}")))
    assert len(kept) == 1 and any(e["reason"] and e["reason"].startswith("too_long:") for e in sink.events)


messages = st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system", "human",
                                                                              "gpt", "tool", ""]), st.integers()),
                                           "content": st.one_of(odd_text, st.integers(), st.none())}), max_size=4)
rows = st.one_of(
    st.fixed_dictionaries({"row_id": st.text(min_size=1, max_size=8), "source": st.just("s"), "source_key": st.just("f:1"),
                           "license": st.just("MIT"), "messages": st.one_of(messages, json_values)}),
    json_values,
)


@FUZZ
@given(st.lists(rows, max_size=8))
def test_normalization_keeps_valid_rows_or_quarantines_with_a_reason(batch):
    sink = MemorySink()
    normalizer = Normalizer(NormalizeConfig(), sink)
    kept = list(normalizer(batch))
    assert len(kept) + len(normalizer.dropped) == len(batch)
    assert len(sink.events) == len(batch)  # exactly one decision per input row
    for row in kept:
        assert row_problems(row) == []
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in row["messages"])
    for dropped in normalizer.dropped:
        assert dropped["reason"].split(":", 1)[0] in ("invalid", "empty", "too_long")


EVAL = EvalItem("toy", "toy-1", "toy_eval", "toy_eval-1", "the quick brown fox jumps over the lazy dog near the river bank")


@FUZZ
@given(st.lists(st.tuples(odd_text, st.booleans()), min_size=1, max_size=8))
def test_decontamination_never_crashes_and_always_catches_a_planted_item(texts):
    config = DecontamConfig()
    index = EvalIndex.build([EVAL], config.ngram, config.min_item_tokens)
    sink = MemorySink()
    batch = []
    for i, (text, plant) in enumerate(texts):
        content = f"{text} {EVAL.text} {text}" if plant else text
        batch.append({"row_id": f"r{i}", "source": "s", "source_key": f"f:{i}", "license": "MIT",
                      "messages": [{"role": "user", "content": content}]})
    clean = {r["row_id"] for r in Decontaminator(index, config, sink)(batch)}
    for i, (_text, plant) in enumerate(texts):
        if plant:
            assert f"r{i}" not in clean
    assert len(sink.events) == len(batch)


@FUZZ
@given(odd_text, st.sampled_from(["#### 1,000", "42", "\\frac{1}{2}", "The answer is $\\boxed{3}$."]), odd_text)
def test_math_verifiers_give_a_verdict_for_any_response(response, truth, bad_truth):
    for task in ("gsm8k", "math"):
        verdict = verify(task, response, ground_truth=truth)
        assert isinstance(verdict.ok, bool) and 0.0 <= verdict.score <= 1.0 and verdict.reason
        try:  # a reference without an answer in it is a clear error, not a silent zero
            verify(task, response, ground_truth=bad_truth)
        except ValueError as error:
            assert task in str(error) or "ground_truth" in str(error) or "answer" in str(error)


@FUZZ
@given(odd_text, json_values)
def test_ifeval_verifier_rejects_malformed_constraints_clearly(response, constraints):
    try:
        verdict = verify("ifeval", response, constraints=constraints)
    except ValueError as error:
        assert str(error)  # a clear message, never another exception type
    else:
        assert 0.0 <= verdict.score <= 1.0 and not math.isnan(verdict.score)
