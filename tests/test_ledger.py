"""The row ledger: atomic per-run publication, idempotent retries, and trace."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tulu_pipeline.data.ingest import ingest_source
from tulu_pipeline.data.registry import get_source
from tulu_pipeline.provenance.ledger import Ledger, LedgerWriter
from tulu_pipeline.storage import Store


def test_empty_ledger_answers(store: Store) -> None:
    assert Ledger(store).query("SELECT count(*) AS n FROM events") == [{"n": 0}]
    assert Ledger(store).trace("nope")["found"] is False


def test_events_are_invisible_until_commit_and_dropped_on_error(store: Store) -> None:
    ledger = Ledger(store)
    with pytest.raises(RuntimeError):
        with LedgerWriter(store, "curation", "dedup", "v1", "run-a") as writer:
            writer.record("r1", "kept")
            raise RuntimeError("crash")
    assert ledger.query("SELECT count(*) AS n FROM events") == [{"n": 0}]
    assert not any(Path(store.root).rglob("*.parquet"))

    writer = LedgerWriter(store, "curation", "dedup", "v1", "run-a", rows_per_part=2)
    for i in range(5):
        writer.record(f"r{i}", "kept")
    assert ledger.query("SELECT count(*) AS n FROM events") == [{"n": 0}]  # staged parts are not events yet
    assert writer.commit() == 5
    assert ledger.query("SELECT count(*) AS n FROM events") == [{"n": 5}]


def test_retries_and_reruns_of_a_version_replace_its_events(store: Store) -> None:
    for _attempt in range(2):  # a retried step of one run
        with LedgerWriter(store, "curation", "dedup", "v1", "run-a") as writer:
            writer.record("r1", "dropped_duplicate", reason="exact duplicate", related_ids=["r0"])
    # a rerun after a crash: the same content-addressed version, the same decisions, recorded once
    with LedgerWriter(store, "curation", "dedup", "v1", "run-b") as writer:
        writer.record("r1", "dropped_duplicate", reason="exact duplicate", related_ids=["r0"])
    with LedgerWriter(store, "curation", "dedup", "v2", "run-c") as writer:  # another version keeps its own
        writer.record("r1", "kept")
    rows = Ledger(store).query("SELECT run_id, count(*) AS n FROM events GROUP BY run_id ORDER BY run_id")
    assert rows == [{"run_id": "run-b", "n": 1}, {"run_id": "run-c", "n": 1}]


def test_a_killed_writers_staging_is_removed_by_the_next_writer(store: Store) -> None:
    killed = LedgerWriter(store, "curation", "dedup", "v1", "run-a", rows_per_part=1)
    killed.record("r1", "kept")
    killed.record("r2", "kept")  # flushed to staging, never committed: the process died here
    staging = Path(store.path("ledger/_staging"))
    assert any(staging.rglob("*.parquet"))
    with LedgerWriter(store, "curation", "dedup", "v1", "run-b") as writer:
        writer.record("r1", "kept")
    assert not any(staging.rglob("*.parquet"))
    assert Ledger(store).query("SELECT row_id, run_id FROM events") == [{"row_id": "r1", "run_id": "run-b"}]


def test_trace_shows_origin_and_related_rows(store: Store, bundle: Path) -> None:
    result = ingest_source(get_source("vicuna_bench"), store, "run-1", root=bundle)
    row_id = result.samples[0]["row_id"]
    with LedgerWriter(store, "curation", "dedup", "v1", "run-2") as writer:
        writer.record("other-row", "dropped_duplicate", reason="exact duplicate", related_ids=[row_id])
    trace = Ledger(store).trace(row_id)
    assert trace["found"]
    assert trace["origin"]["file"] == "eval/vicuna_bench/question.jsonl"
    assert trace["origin"]["line"] == 1
    assert trace["origin"]["file_sha256"] == get_source("vicuna_bench").sha256
    assert [e["event"] for e in trace["events"]] == ["ingested"]
    assert trace["referenced_by"][0]["row_id"] == "other-row"


def test_events_written_in_parts_read_back_as_recorded_ones(store: Store) -> None:
    from tulu_pipeline.provenance.ledger import MemorySink

    sink = MemorySink()
    for i in range(5):
        sink.record(f"r{i}", "dropped_duplicate", decision="near", reason="near r0", related_ids=["r0"],
                    details={"jaccard": 0.9})
    with LedgerWriter(store, "curation", "dedup", "v1", "run-a") as writer:
        for e in sink.events:
            writer.record(**e)
    columns = "row_id, event, stage, asset_key, asset_version, seq, ts, decision, reason, related_ids, details"
    recorded = Ledger(store).query(f"SELECT {columns} FROM events ORDER BY seq")

    with LedgerWriter(store, "curation", "dedup", "v1", "run-a") as writer:
        spec = writer.part_spec(0)
        # Shard tasks, out of order: each numbers its events from the prefix sum of the ones before.
        second = replace(spec, first_seq=2).write(store, "_ray/events-1.parquet", sink.events[2:])
        first = replace(spec, first_seq=0).write(store, "_ray/events-0.parquet", sink.events[:2])
        writer.adopt_parts([("_ray/events-0.parquet", first), ("_ray/empty.parquet", 0),
                            ("_ray/events-1.parquet", second)])
        assert writer.count == 5
    in_parts = Ledger(store).query(f"SELECT {columns} FROM events ORDER BY seq")
    assert [{**e, "ts": None} for e in in_parts] == [{**e, "ts": None} for e in recorded]
    assert len({e["ts"] for e in in_parts}) == 1  # one timestamp per run, as record() gives
    with pytest.raises(RuntimeError, match="after record"):
        with LedgerWriter(store, "curation", "dedup", "v2", "run-b") as writer:
            writer.record("r9", "kept")
            writer.adopt_parts([("_ray/none.parquet", 0)])


def events_of_version(store: Store, version: str) -> list[dict]:
    """The events of one asset version in ``seq`` order (every column a run does not set itself)."""
    return Ledger(store).query("SELECT row_id, event, stage, asset_key, seq, decision, reason, related_ids, details "
                               f"FROM events WHERE asset_version = '{version}' ORDER BY seq")


def test_events_recorded_as_columns_equal_events_recorded_one_by_one(store: Store) -> None:
    """`LedgerWriter.record_columns` (a whole batch decided at once) writes the rows `record` would, `seq`
    continuing across both; `SharedDetails` serialize as a plain dict does."""
    import pyarrow as pa

    from tulu_pipeline.provenance.ledger import SharedDetails, details_json

    shared = SharedDetails(checked=["b", "a"], n=1)
    assert shared.json == details_json(dict(shared)) and SharedDetails().json is None
    events = [("r0", "kept", "clean", None, [], shared), ("r1", "quarantined", "contaminated", "x:1", ["e1", "e2"],
                                                          {"z": 1, "a": [1, 2]}),
              ("r2", "kept", "clean", None, [], None), ("r3", "kept", "clean", None, [], shared)]
    for name, by_columns in (("one-by-one", False), ("columns", True)):
        with LedgerWriter(store, "s", "asset", name, "run") as writer:
            writer.record("first", "kept")
            if by_columns:
                writer.record_columns(pa.chunked_array([pa.array([e[0] for e in events])]), [e[1] for e in events],
                                      [e[2] for e in events], [e[3] for e in events], [e[4] for e in events],
                                      [details_json(e[5]) for e in events])
            else:
                for row_id, event, decision, reason, related, details in events:
                    writer.record(row_id, event, decision=decision, reason=reason, related_ids=related, details=details)
            writer.record("last", "kept")
            assert writer.count == 6
    rows = {name: events_of_version(store, name) for name in ("one-by-one", "columns")}
    assert rows["columns"] == rows["one-by-one"] and [r["seq"] for r in rows["columns"]] == list(range(6))


def test_events_recorded_as_runs_equal_events_recorded_one_by_one(store: Store) -> None:
    """`record_many` (a run of rows with the same event) writes the rows `record` would, across part
    boundaries; the `record_many` helper falls back to `record` for a sink without it."""
    from tulu_pipeline.provenance.ledger import MemorySink, SharedDetails, record_many

    shared = SharedDetails(checked=["b", "a"])
    ids = [f"r{i}" for i in range(7)]
    for name, runs in (("one-by-one", False), ("runs", True)):
        with LedgerWriter(store, "s", "asset", name, "run", rows_per_part=3) as writer:
            writer.record("first", "quarantined", decision="contaminated", reason="x", related_ids=["e"])
            if runs:
                writer.record_many(ids, "kept", "clean", shared)
            else:
                for row_id in ids:
                    writer.record(row_id, "kept", decision="clean", details=shared)
            writer.record("last", "kept")
            assert writer.count == 9
    rows = {name: events_of_version(store, name) for name in ("one-by-one", "runs")}
    assert rows["runs"] == rows["one-by-one"] and [r["seq"] for r in rows["runs"]] == list(range(9))
    assert Ledger(store).query("SELECT count(DISTINCT ts) AS n FROM events WHERE asset_version = 'runs'") == [{"n": 1}]

    class OneByOne:
        def __init__(self) -> None:
            self.events: list[dict] = []

        def record(self, row_id, event, decision=None, reason=None, related_ids=(), details=None) -> None:
            MemorySink.record(self, row_id, event, decision, reason, related_ids, details)  # type: ignore[arg-type]

    plain, many = OneByOne(), MemorySink()
    for sink in (plain, many):
        record_many(sink, ids, "kept", "clean", shared)
    assert plain.events == many.events and len(many.events) == 7
