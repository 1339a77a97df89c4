"""The row ledger: append-only Parquet of per-row events, queried with DuckDB.

Every stage writes one event per row it touches (``ingested``, ``normalized``, ``dropped_duplicate``,
``quarantined``, ``kept``, ``included_in_mix``, ``trained_on`` …). A writer stages its parts in
``ledger/_staging/`` and publishes them by renaming one directory,
``ledger/events/<asset>/<asset_version>/<run_id>/``, so a crash never leaves half an event batch
visible and a retried run replaces, rather than duplicates, its own events.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from tulu_pipeline.storage import Store

EVENT_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("event", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("asset_key", pa.string(), nullable=False),
        pa.field("asset_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("decision", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("related_ids", pa.list_(pa.string())),
        pa.field("details", pa.string()),
    ]
)

EVENTS_DIR = "ledger/events"
STAGING_DIR = "ledger/_staging"


class DecisionSink(Protocol):
    """Where a library step reports per-row decisions; `LedgerWriter` is the real one."""

    def record(self, row_id: str, event: str, decision: str | None = None, reason: str | None = None,
               related_ids: Sequence[str] = (), details: dict[str, Any] | None = None) -> None: ...


class MemorySink:
    """A `DecisionSink` that keeps events in a list (tests, dry runs, the CLI)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def record(self, row_id: str, event: str, decision: str | None = None, reason: str | None = None,
               related_ids: Sequence[str] = (), details: dict[str, Any] | None = None) -> None:
        self.events.append({"row_id": row_id, "event": event, "decision": decision, "reason": reason,
                            "related_ids": list(related_ids), "details": details})


def _safe(part: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in part)


class LedgerWriter:
    """Buffers events for one asset materialization and publishes them atomically on `commit()`.

    Use as a context manager: events are published when the block exits cleanly and discarded
    when it raises.
    """

    def __init__(self, store: Store, stage: str, asset_key: str, asset_version: str, run_id: str,
                 rows_per_part: int = 100_000):
        self.store, self.stage, self.asset_key = store, stage, asset_key
        self.asset_version, self.run_id = asset_version, run_id
        self.rows_per_part = rows_per_part
        self._staging = posixpath.join(STAGING_DIR, f"{_safe(run_id)}-{uuid.uuid4().hex}")
        self._buffer: list[dict[str, Any]] = []
        self._parts = 0
        self.count = 0
        self._ts = datetime.now(timezone.utc)

    @property
    def target(self) -> str:
        return posixpath.join(EVENTS_DIR, _safe(self.asset_key), _safe(self.asset_version), _safe(self.run_id))

    def record(self, row_id: str, event: str, decision: str | None = None, reason: str | None = None,
               related_ids: Sequence[str] = (), details: dict[str, Any] | None = None) -> None:
        """Append one event about ``row_id``."""
        self._buffer.append({
            "row_id": row_id, "event": event, "stage": self.stage, "asset_key": self.asset_key,
            "asset_version": self.asset_version, "run_id": self.run_id, "seq": self.count, "ts": self._ts,
            "decision": decision, "reason": reason, "related_ids": list(related_ids),
            "details": json.dumps(details, sort_keys=True, ensure_ascii=False) if details else None,
        })
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

    def commit(self) -> int:
        """Publish the staged events (replacing an earlier attempt of the same run); returns the count."""
        self._flush()
        fs = self.store.fs
        target = self.store.path(self.target)
        if fs.exists(target):
            fs.rm(target, recursive=True)
        if self._parts:
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            fs.mv(self.store.path(self._staging), target, recursive=True)
        return self.count

    def abort(self) -> None:
        self._buffer.clear()
        staging = self.store.path(self._staging)
        if self.store.fs.exists(staging):
            self.store.fs.rm(staging, recursive=True)

    def __enter__(self) -> "LedgerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Ledger:
    """Read side of the ledger: SQL over every published event file."""

    def __init__(self, store: Store):
        self.store = store

    def _connect(self):
        import duckdb

        con = duckdb.connect()
        if not self.store.is_local:
            con.register_filesystem(self.store.fs)
        return con

    def _glob(self) -> str | None:
        if not self.store.fs.glob(self.store.path(EVENTS_DIR, "**", "*.parquet")):
            return None
        return self.store.uri(EVENTS_DIR) + "/**/*.parquet"

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        """Run ``sql`` where the table ``events`` holds every event; rows come back as dicts."""
        glob = self._glob()
        con = self._connect()
        try:
            if glob is None:
                con.execute(f"CREATE VIEW events AS SELECT * FROM ({_empty_events_sql()})")
            else:
                con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{glob}', union_by_name=true)")
            cursor = con.execute(sql, list(params))
            columns = [d[0] for d in cursor.description]
            return [dict(zip(columns, values)) for values in cursor.fetchall()]
        finally:
            con.close()

    def events_for(self, row_id: str) -> list[dict[str, Any]]:
        """Events about ``row_id`` and events that name it as related (e.g. rows that duplicate it)."""
        rows = self.query(
            "SELECT * FROM events WHERE row_id = ? OR list_contains(related_ids, ?) ORDER BY ts, asset_key, seq",
            [row_id, row_id],
        )
        for row in rows:
            row["ts"] = row["ts"].isoformat()
            row["details"] = json.loads(row["details"]) if row["details"] else None
        return rows

    def trace(self, row_id: str) -> dict[str, Any]:
        """What the ledger knows about one row: its origin and every decision, in order."""
        events = self.events_for(row_id)
        own = [e for e in events if e["row_id"] == row_id]
        origin = next((e["details"] for e in own if e["event"] == "ingested"), None)
        return {
            "row_id": row_id,
            "found": bool(own),
            "origin": origin,
            "events": own,
            "referenced_by": [e for e in events if e["row_id"] != row_id],
        }


def _empty_events_sql() -> str:
    casts = {
        pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
        pa.list_(pa.string()): "VARCHAR[]",
    }
    cols = ", ".join(f"CAST(NULL AS {casts[f.type]}) AS {f.name}" for f in EVENT_SCHEMA)
    return f"SELECT {cols} WHERE false"
