"""Where and in what shape the row ledger's events are stored: the event schema, the per-run event files under
``ledger/events`` and the compacted generations under ``ledger/compacted`` (read by `ledger.Ledger`, written by
`compaction.compact`)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tulu_pipeline.hashing import short_hash
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


# Events in the order they happened; the later keys only break ties, so the order is total.
EVENT_ORDER = "ts, asset_key, seq, run_id, row_id, event"


def empty_events_sql() -> str:
    casts = {
        pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
        pa.list_(pa.string()): "VARCHAR[]",
    }
    cols = ", ".join(f"CAST(NULL AS {casts[f.type]}) AS {f.name}" for f in EVENT_SCHEMA)
    return f"SELECT {cols} WHERE false"


COMPACTED_DIR = "ledger/compacted"
POINTER = posixpath.join(COMPACTED_DIR, "CURRENT")
DEFAULT_BUCKETS = 64
ROW_GROUP_ROWS = 8192
HASH_NAME = "md5-prefix32"
KEY_SEPARATOR = "\x1f"  # joins asset_key, asset_version and run_id into one run key


def bucket_of(key: str, buckets: int) -> int:
    """The bucket of a row id (or related id): first 32 bits of md5(utf-8), modulo ``buckets``."""
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16) % buckets


def bucket_sql(column: str, buckets: int) -> str:
    """`bucket_of` as a DuckDB expression over ``column``."""
    return f"(('0x' || left(md5({column}), 8))::UBIGINT % {int(buckets)})"


def sql_str(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_list(values: list[str]) -> str:
    return "[" + ", ".join(sql_str(v) for v in values) + "]"


def run_key(asset_key: str, asset_version: str, run_id: str) -> str:
    return KEY_SEPARATOR.join((asset_key, asset_version, run_id))


RUN_KEY_SQL = f"concat_ws(chr({ord(KEY_SEPARATOR)}), asset_key, asset_version, run_id)"


# ---------------------------------------------------------------------------------------------
# what is published
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunDir:
    """One published run directory of the ledger: its Parquet parts and their fingerprint."""

    rel: str
    files: tuple[str, ...]
    fingerprint: str


# What object stores say about a file that changes when it is rewritten (s3, gcs, azure, memory).
_STAMP_KEYS = ("mtime", "LastModified", "last_modified", "ETag", "etag", "updated", "generation", "created")


def _stamp(info: dict[str, Any]) -> list[str]:
    return [f"{k}={info[k]}" for k in _STAMP_KEYS if info.get(k) is not None]


def _local_parts(root: str) -> dict[str, list[tuple[str, Any, list[str]]]]:
    """`os.scandir` walk of a local ledger (several times faster than fsspec's find with details)."""
    groups: dict[str, list[tuple[str, Any, list[str]]]] = defaultdict(list)
    stack = [root]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.name.endswith(".parquet"):
                    st = entry.stat(follow_symlinks=False)
                    stamp = [f"mtime_ns={st.st_mtime_ns}", f"ino={st.st_ino}"]
                    groups[directory].append((entry.name, st.st_size, stamp))
    return groups


def _remote_parts(store: Store, root: str) -> dict[str, list[tuple[str, Any, list[str]]]]:
    groups: dict[str, list[tuple[str, Any, list[str]]]] = defaultdict(list)
    for path, info in store.fs.find(root, detail=True).items():
        if path.endswith(".parquet"):
            groups[posixpath.dirname(path)].append((posixpath.basename(path), info.get("size"), _stamp(info)))
    return groups


def list_run_dirs(store: Store) -> dict[str, RunDir]:
    """Every published run directory under ``ledger/events`` (relative path → `RunDir`)."""

    root = store.path(EVENTS_DIR)
    if not store.fs.exists(root):
        return {}
    prefix = root.rstrip("/") + "/"
    groups = _local_parts(root) if store.is_local else _remote_parts(store, root)
    runs = {}
    for directory, parts in groups.items():
        if not directory.startswith(prefix):
            continue
        rel = EVENTS_DIR + "/" + directory[len(prefix):]
        parts.sort(key=lambda p: p[0])
        fingerprint = short_hash(json.dumps(parts, default=str))
        runs[rel] = RunDir(rel, tuple(posixpath.join(rel, p[0]) for p in parts), fingerprint)
    return dict(sorted(runs.items()))


@dataclass(frozen=True)
class LedgerLayout:
    """What a reader has to read: the current generation (if any), its stale runs, and the rest."""

    generation: dict[str, Any] | None
    generation_rel: str | None
    stale_keys: tuple[str, ...]
    remainder: tuple[str, ...]  # relative paths of per-run files not in the generation

    def events_file(self, bucket: int) -> str:
        return posixpath.join(self.generation_rel, "events", f"{bucket:03d}.parquet")

    def related_file(self, bucket: int) -> str:
        return posixpath.join(self.generation_rel, "related", f"{bucket:03d}.parquet")

    @property
    def buckets(self) -> int:
        return int(self.generation["buckets"]) if self.generation else 0


def current_generation(store: Store) -> tuple[str, dict[str, Any]] | None:
    """(relative directory, manifest) of the generation ``CURRENT`` points at, or None."""
    if not store.exists(POINTER):
        return None
    name = store.read_json(POINTER)["generation"]
    rel = posixpath.join(COMPACTED_DIR, name)
    return rel, store.read_json(posixpath.join(rel, "manifest.json"))


def ledger_layout(store: Store) -> LedgerLayout | None:
    """The read plan for a compacted ledger, or None when the ledger was never compacted."""
    current = current_generation(store)
    if current is None:
        return None
    rel, manifest = current
    runs = list_run_dirs(store)
    folded = manifest["folded"]
    stale: list[str] = []
    remainder: list[str] = []
    for dir_rel, entry in folded.items():
        run = runs.get(dir_rel)
        if run is None or run.fingerprint != entry["fingerprint"]:
            stale.extend(entry["run_keys"])
    for dir_rel, run in runs.items():
        entry = folded.get(dir_rel)
        if entry is None or entry["fingerprint"] != run.fingerprint:
            remainder.extend(run.files)
    return LedgerLayout(manifest, rel, tuple(sorted(set(stale))), tuple(remainder))
