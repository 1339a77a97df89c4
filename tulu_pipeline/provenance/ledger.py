"""The row ledger: append-only Parquet of per-row events, queried with DuckDB.

Every stage writes one event per row it touches (``ingested``, ``normalized``, ``dropped_duplicate``,
``quarantined``, ``kept``, ``included_in_mix``, ``trained_on`` …). A writer stages its parts in
``ledger/_staging/`` and publishes them by renaming one directory,
``ledger/events/<asset>/<asset_version>/<run_id>/``, so a crash never leaves half an event batch
visible and a retried run replaces, rather than duplicates, its own events.

`Ledger` reads them with DuckDB. Thousands of small run files make a one-row lookup a full scan;
`tulu_pipeline.provenance.compaction.compact` folds them into a generation bucketed by row id (with a
reverse index of related ids), which `Ledger` then reads together with the run files published after
it. Compaction changes no answer, only how much is read.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from tulu_pipeline.provenance.ledger_layout import (
    EVENT_ORDER,
    EVENT_SCHEMA,
    EVENTS_DIR,
    RUN_KEY_SQL,
    STAGING_DIR,
    bucket_of,
    empty_events_sql,
    ledger_layout,
    sql_list,
    sql_str,
)
from tulu_pipeline.provenance.trace import summarize
from tulu_pipeline.storage import Store



class DecisionSink(Protocol):
    """Where a library step reports per-row decisions; `LedgerWriter` is the real one."""

    def record(self, row_id: str, event: str, decision: str | None = None, reason: str | None = None,
               related_ids: Sequence[str] = (), details: dict[str, Any] | None = None) -> None: ...


def record_many(sink: DecisionSink, row_ids: Sequence[str], event: str, decision: str | None = None,
                details: dict[str, Any] | None = None) -> None:
    """The same event (no reason, no related ids) about each of ``row_ids``, in order: the sink's own
    ``record_many`` where it has one (one call per run of rows), else `record` per row."""
    many = getattr(sink, "record_many", None)
    if many is not None:
        many(row_ids, event, decision, details)
        return
    for row_id in row_ids:
        sink.record(row_id, event, decision=decision, details=details)


class MemorySink:
    """A `DecisionSink` that keeps events in a list (tests, dry runs, the CLI)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def record(self, row_id: str, event: str, decision: str | None = None, reason: str | None = None,
               related_ids: Sequence[str] = (), details: dict[str, Any] | None = None) -> None:
        self.events.append({"row_id": row_id, "event": event, "decision": decision, "reason": reason,
                            "related_ids": list(related_ids), "details": details})

    def record_many(self, row_ids: Sequence[str], event: str, decision: str | None = None,
                    details: dict[str, Any] | None = None) -> None:
        """`record` of the same event about each of ``row_ids``."""
        self.events += [{"row_id": row_id, "event": event, "decision": decision, "reason": None, "related_ids": [],
                         "details": details} for row_id in row_ids]


class SharedDetails(dict):
    """Details shared by many events (e.g. what every kept row was checked against): serialized once.

    Do not mutate one after recording it; the JSON is taken when it is made.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.json = json.dumps(self, sort_keys=True, ensure_ascii=False) if self else None


def details_json(details: dict[str, Any] | None) -> str | None:
    """The ``details`` column of an event: sorted-key JSON, or null when there are none."""
    if isinstance(details, SharedDetails):
        return details.json
    return json.dumps(details, sort_keys=True, ensure_ascii=False) if details else None


def _event_row(stage: str, asset_key: str, asset_version: str, run_id: str, ts: datetime, seq: int, row_id: str,
               event: str, decision: str | None, reason: str | None, related_ids: Sequence[str],
               details: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "row_id": row_id, "event": event, "stage": stage, "asset_key": asset_key, "asset_version": asset_version,
        "run_id": run_id, "seq": seq, "ts": ts, "decision": decision, "reason": reason,
        "related_ids": list(related_ids),
        "details": details_json(details),
    }


@dataclass(frozen=True)
class EventPart:
    """The run an event file belongs to, and the ``seq`` of its first event (`LedgerWriter.part_spec`).

    A shard task writes its events with `write`; `LedgerWriter.adopt_parts` publishes the file. The
    rows are those `LedgerWriter.record` buffers, so a ledger written in parts reads back the same.
    """

    stage: str
    asset_key: str
    asset_version: str
    run_id: str
    ts: datetime
    first_seq: int

    def write(self, store: Store, rel: str, events: Sequence[dict[str, Any]]) -> int:
        """Write `MemorySink` events as one Parquet file at ``rel`` (atomically), numbered from
        ``first_seq``; returns how many."""
        rows = [_event_row(self.stage, self.asset_key, self.asset_version, self.run_id, self.ts, self.first_seq + i,
                           e["row_id"], e["event"], e["decision"], e["reason"], e["related_ids"], e["details"])
                for i, e in enumerate(events)]
        with store.atomic_open(rel, "wb") as handle:
            pq.write_table(pa.Table.from_pylist(rows, schema=EVENT_SCHEMA), handle)
        return len(rows)


def path_safe(part: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in part)


class LedgerWriter:
    """Buffers events for one asset materialization and publishes them atomically on `commit()`.

    Use as a context manager: events are published when the block exits cleanly and discarded
    when it raises. Inside the block the writer holds the store lock of its asset version, so two runs
    materializing the same version take turns; staging left by a killed writer of that version is removed
    on entry, and a commit supersedes the events earlier runs published for the same version (versions are
    content addressed: same inputs and config, same decisions), so a crash and rerun never duplicates events.
    """

    def __init__(self, store: Store, stage: str, asset_key: str, asset_version: str, run_id: str,
                 rows_per_part: int = 100_000):
        self.store, self.stage, self.asset_key = store, stage, asset_key
        self.asset_version, self.run_id = asset_version, run_id
        self.rows_per_part = rows_per_part
        self._staging_parent = posixpath.join(STAGING_DIR, path_safe(asset_key), path_safe(asset_version))
        self._staging = posixpath.join(self._staging_parent, f"{path_safe(run_id)}-{uuid.uuid4().hex}")
        self._lock = None
        self._buffer: list[dict[str, Any]] = []
        self._parts = 0
        self.count = 0
        self._ts = datetime.now(timezone.utc)

    @property
    def target(self) -> str:
        return posixpath.join(EVENTS_DIR, path_safe(self.asset_key), path_safe(self.asset_version), path_safe(self.run_id))

    def record(self, row_id: str, event: str, decision: str | None = None, reason: str | None = None,
               related_ids: Sequence[str] = (), details: dict[str, Any] | None = None) -> None:
        """Append one event about ``row_id``."""
        self._buffer.append(_event_row(self.stage, self.asset_key, self.asset_version, self.run_id, self._ts, self.count,
                                       row_id, event, decision, reason, related_ids, details))
        self.count += 1
        if len(self._buffer) >= self.rows_per_part:
            self._flush()

    def record_many(self, row_ids: Sequence[str], event: str, decision: str | None = None,
                    details: dict[str, Any] | None = None) -> None:
        """`record` of the same event (no reason, no related ids) about each of ``row_ids``, in order."""
        shared = _event_row(self.stage, self.asset_key, self.asset_version, self.run_id, self._ts, 0, "", event,
                            decision, None, (), details)
        for row_id in row_ids:
            self._buffer.append({**shared, "row_id": row_id, "seq": self.count, "related_ids": []})
            self.count += 1
            if len(self._buffer) >= self.rows_per_part:
                self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        fs = self.store.fs
        fs.makedirs(self.store.path(self._staging), exist_ok=True)
        with fs.open(self.store.path(self._staging, f"part-{self._parts:05d}.parquet"), "wb") as handle:
            pq.write_table(pa.Table.from_pylist(self._buffer, schema=EVENT_SCHEMA), handle)
        self._parts += 1
        self._buffer.clear()

    def record_columns(self, row_ids: pa.Array, event: Sequence[str], decision: Sequence[str | None],
                       reason: Sequence[str | None], related_ids: Sequence[Sequence[str]],
                       details: Sequence[str | None]) -> None:
        """Append one event per ``row_ids`` entry from columns (``details`` already `details_json`), in
        order: the same rows `record` would buffer, for a step that decides whole batches at once."""
        self._flush()
        n = len(row_ids)
        if not n:
            return
        table = pa.table({
            "row_id": row_ids.cast(pa.string()), "event": pa.array(event, pa.string()),
            "stage": pa.array([self.stage] * n, pa.string()), "asset_key": pa.array([self.asset_key] * n, pa.string()),
            "asset_version": pa.array([self.asset_version] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "seq": pa.array(range(self.count, self.count + n), pa.int64()),
            "ts": pa.array([self._ts] * n, pa.timestamp("us", tz="UTC")),
            "decision": pa.array(decision, pa.string()), "reason": pa.array(reason, pa.string()),
            "related_ids": pa.array(related_ids, pa.list_(pa.string())), "details": pa.array(details, pa.string()),
        }, schema=EVENT_SCHEMA)
        fs = self.store.fs
        fs.makedirs(self.store.path(self._staging), exist_ok=True)
        with fs.open(self.store.path(self._staging, f"part-{self._parts:05d}.parquet"), "wb") as handle:
            pq.write_table(table, handle)
        self._parts += 1
        self.count += n

    def part_spec(self, first_seq: int) -> "EventPart":
        """What a writer elsewhere (a shard task) needs to write events of this run from ``seq = first_seq``
        exactly as `record` would; hand the files back with `adopt_parts`."""
        return EventPart(self.stage, self.asset_key, self.asset_version, self.run_id, self._ts, first_seq)

    def adopt_parts(self, parts: Sequence[tuple[str, int]]) -> None:
        """Take event files written with `part_spec` (relative path, events), in ``seq`` order, into this run:
        each is renamed into the staging directory, so `commit` publishes them with the rest. The first
        must start at `count` and each the next at the previous one's end (the caller's prefix sum)."""
        if self._buffer:
            raise RuntimeError("adopt_parts after record(): the adopted parts' seq would not follow the buffered events")
        fs = self.store.fs
        fs.makedirs(self.store.path(self._staging), exist_ok=True)
        for rel, events in parts:
            if events:
                fs.mv(self.store.path(rel), self.store.path(self._staging, f"part-{self._parts:05d}.parquet"))
                self._parts += 1
            self.count += events

    @property
    def version_dir(self) -> str:
        return posixpath.dirname(self.target)

    def commit(self) -> int:
        """Publish the staged events, replacing every earlier run's events for this asset version; returns
        the count."""
        self._flush()
        fs = self.store.fs
        with self.store.lock(self.version_dir):
            for run_dir in self.store.listdir(self.version_dir):  # superseded by this run
                fs.rm(self.store.path(self.version_dir, run_dir), recursive=True)
            if self._parts:
                target = self.store.path(self.target)
                fs.makedirs(posixpath.dirname(target), exist_ok=True)
                fs.mv(self.store.path(self._staging), target, recursive=True)
        return self.count

    def abort(self) -> None:
        self._buffer.clear()
        staging = self.store.path(self._staging)
        if self.store.fs.exists(staging):
            self.store.fs.rm(staging, recursive=True)

    def __enter__(self) -> "LedgerWriter":
        self._lock = self.store.lock(self.version_dir)
        self._lock.__enter__()
        for leftover in self.store.listdir(self._staging_parent):  # nobody else can be staging this version
            self.store.fs.rm(self.store.path(self._staging_parent, leftover), recursive=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
            else:
                self.abort()
        finally:
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.__exit__(None, None, None)


class Ledger:
    """Read side of the ledger: SQL over every published event file.

    A compacted ledger (see `tulu_pipeline.provenance.compaction`) is read through its current
    generation plus the run files published after it; the answers are the same either way.
    """

    # Row-id lists up to this size are inlined in SQL; longer ones are joined as an Arrow table.
    _INLINE_IDS = 256

    def __init__(self, store: Store):
        self.store = store

    def _connect(self):
        import duckdb

        con = duckdb.connect()
        con.execute("SET enable_progress_bar = false")  # it would print into JSON written to stdout
        if not self.store.is_local:
            con.register_filesystem(self.store.fs)
        return con

    def _glob(self) -> str | None:
        if not self.store.fs.glob(self.store.path(EVENTS_DIR, "**", "*.parquet")):
            return None
        return self.store.uri(EVENTS_DIR) + "/**/*.parquet"

    def query(self, sql: str, params: Iterable[Any] = (), *, row_ids: Iterable[str] | None = None,
              related_to: str | None = None) -> list[dict[str, Any]]:
        """Run ``sql`` where the table ``events`` holds every event; rows come back as dicts.

        ``row_ids`` and/or ``related_to`` narrow ``events`` to the events about those rows and/or
        the events naming ``related_to`` in their related ids (either, when both are given). On a
        compacted ledger they read only the buckets that can hold such events.
        """
        con = self._connect()
        try:
            ids = None if row_ids is None else sorted(set(row_ids))
            if ids is not None and len(ids) > self._INLINE_IDS:
                con.register("_tulu_row_ids", pa.table({"row_id": pa.array(ids, pa.string())}))
            con.execute(f"CREATE VIEW events AS {self._events_sql(ids, related_to)}")
            cursor = con.execute(sql, list(params))
            columns = [d[0] for d in cursor.description]
            return [dict(zip(columns, values)) for values in cursor.fetchall()]
        finally:
            con.close()

    def _events_sql(self, ids: list[str] | None, related_to: str | None) -> str:
        def id_filter(column: str = "row_id") -> str:
            if len(ids) > self._INLINE_IDS:
                return f"{column} IN (SELECT row_id FROM _tulu_row_ids)"
            return f"{column} IN ({', '.join(sql_str(i) for i in ids)})" if ids else "false"

        def restriction() -> str:
            terms = []
            if ids is not None:
                terms.append(id_filter())
            if related_to is not None:
                terms.append(f"list_contains(related_ids, {sql_str(related_to)})")
            return f" WHERE {' OR '.join(terms)}" if terms else ""

        layout = ledger_layout(self.store)
        if layout is None:
            glob = self._glob()
            if glob is None:
                return f"SELECT * FROM ({empty_events_sql()})"
            return f"SELECT * FROM read_parquet({sql_str(glob)}, union_by_name=true){restriction()}"

        stale = f"{RUN_KEY_SQL} NOT IN (SELECT unnest({sql_list(list(layout.stale_keys))}::VARCHAR[]))" \
            if layout.stale_keys else "true"
        uri = self.store.uri
        parts: list[str] = []
        if ids is None and related_to is None:
            files = [uri(layout.events_file(b)) for b in range(layout.buckets)]
            parts.append(f"SELECT * FROM read_parquet({sql_list(files)}) WHERE {stale}")
        if ids is not None and ids:
            # many ids touch every bucket anyway: skip hashing them
            buckets = range(layout.buckets) if len(ids) > 8 * layout.buckets \
                else sorted({bucket_of(i, layout.buckets) for i in ids})
            files = [uri(layout.events_file(b)) for b in buckets]
            parts.append(f"SELECT * FROM read_parquet({sql_list(files)}) WHERE {id_filter()} AND {stale}")
        if related_to is not None:
            own = f" AND NOT {id_filter()}" if ids else ""
            file = uri(layout.related_file(bucket_of(related_to, layout.buckets)))
            parts.append(f"SELECT * EXCLUDE (related_id) FROM read_parquet({sql_str(file)}) "
                         f"WHERE related_id = {sql_str(related_to)}{own} AND {stale}")
        if layout.remainder:
            files = [uri(f) for f in layout.remainder]
            parts.append(f"SELECT * FROM read_parquet({sql_list(files)}, union_by_name=true){restriction()}")
        if not parts:
            return f"SELECT * FROM ({empty_events_sql()})"
        return " UNION ALL BY NAME ".join(f"({part})" for part in parts)

    def events_for(self, row_id: str) -> list[dict[str, Any]]:
        """Events about ``row_id`` and events that name it as related (e.g. rows that duplicate it)."""
        rows = self.query(f"SELECT * FROM events ORDER BY {EVENT_ORDER}", row_ids=[row_id], related_to=row_id)
        for row in rows:
            row["ts"] = row["ts"].isoformat()
            row["details"] = json.loads(row["details"]) if row["details"] else None
        return rows

    def trace(self, row_id: str) -> dict[str, Any]:
        """What the ledger knows about one row: its origin, every decision in order, and a per-stage summary."""
        events = self.events_for(row_id)
        own = [e for e in events if e["row_id"] == row_id]
        origin = next((e["details"] for e in own if e["event"] == "ingested"), None)
        result = {
            "row_id": row_id,
            "found": bool(own),
            "origin": origin,
            "events": own,
            "referenced_by": [e for e in events if e["row_id"] != row_id],
        }
        result["summary"] = summarize(result)
        return result


