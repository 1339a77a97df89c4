"""The artifact store: an fsspec root (local directory by default, an object store in production).

Every write is atomic: bytes go to a temporary sibling first and are renamed into place, so a crash
never leaves a half-written file where a reader would find it. Datasets are published the same way,
a whole version directory at a time.

Concurrency and crashes: on a local root every write takes an exclusive lock on its target
(``.locks/``, flock), so two runs writing the same dataset version or file take turns instead of
interleaving renames; under the lock, temporary siblings left by a killed writer are removed. Object
stores have no rename race (a put replaces an object whole) and datasets there live under
content-addressed version paths, so the lock is local only. A full disk or an unwritable TULU_HOME raises
`StorageWriteError` naming the path, after removing the partial temporary file; what was published before
is untouched.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

TMP_MARKER = ".tmp-"
LOCK_DIR = ".locks"
LOCK_TIMEOUT_ENV = "TULU_LOCK_TIMEOUT_S"
PARTS_MANIFEST = "_parts.json"  # the committed parts of a JSON-lines parts directory
# errno values that mean "this location cannot take the write", as opposed to a bug or a lost connection.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}
_held = threading.local()  # lock paths this thread holds, so a nested write to the same target does not deadlock


def swap_directory(new: "os.PathLike[str] | str", target: "os.PathLike[str] | str") -> None:
    """Move the finished local directory ``new`` to ``target``, replacing what is there.

    rename(2) cannot replace a non-empty directory, so an existing ``target`` is moved aside first and
    put back if the second rename fails; the window in which ``target`` is missing is two renames long.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        os.rename(target, old / "previous")
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old / "previous", target)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def json_line(record: Any) -> bytes:
    """One JSON-lines record as every writer of record files encodes it (sorted keys, UTF-8)."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True, default=str).encode() + b"\n"


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of up to ``size`` items."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class StorePathError(ValueError):
    """A relative path that would escape the store root."""


class StorageWriteError(OSError):
    """TULU_HOME cannot take a write (full disk, read-only or permission denied); nothing published was changed."""


class StoreLockTimeout(TimeoutError):
    """Another run held the lock on a target for longer than the configured timeout."""


def _write_error(store_url: str, rel: str, exc: OSError) -> StorageWriteError:
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only"}.get(exc.errno, "permission denied")
    return StorageWriteError(exc.errno, f"cannot write {rel!r} under TULU_HOME {store_url}: {reason} ({exc.strerror}); "
                             "the partial temporary file was removed and earlier outputs are unchanged")


@dataclass(frozen=True)
class DatasetInfo:
    """Where a published dataset version lives and how big it is."""

    name: str
    version: str
    path: str
    rows: int
    parts: tuple[str, ...]


class Store:
    """Files under one fsspec root. All paths given to it are relative and may not escape the root."""

    def __init__(self, root: str):
        self.url = root
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.is_local:
            try:
                self.fs.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StorageWriteError(exc.errno, f"TULU_HOME {root} cannot be created: {exc.strerror}; "
                                        "set TULU_HOME to a writable directory") from exc

    # -- paths -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Full path inside the filesystem for a relative path; rejects absolute paths and '..'."""
        rel = posixpath.join(*[str(p) for p in parts]) if parts else ""
        if rel.startswith("/") or "\\" in rel:
            raise StorePathError(f"path {rel!r} must be relative to TULU_HOME ({self.url})")
        normalized = posixpath.normpath(rel) if rel else ""
        if normalized == ".." or normalized.startswith("../"):
            raise StorePathError(f"path {rel!r} escapes TULU_HOME ({self.url})")
        return posixpath.join(self.root, normalized) if normalized not in ("", ".") else self.root

    def uri(self, *parts: str) -> str:
        """A user-facing location (local path or URL) for a relative path."""
        full = self.path(*parts)
        return full if self.is_local else self.fs.unstrip_protocol(full)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def listdir(self, *parts: str) -> list[str]:
        """Names directly under a relative directory (empty when it does not exist)."""
        full = self.path(*parts)
        if not self.fs.exists(full):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(full, detail=False))

    # -- locks and atomic writes -----------------------------------------------------------------
    @contextmanager
    def lock(self, rel: str, timeout_s: float | None = None) -> Iterator[None]:
        """Hold an exclusive lock on a relative target (local roots; a no-op on object stores).

        Waits up to ``timeout_s`` (default ``$TULU_LOCK_TIMEOUT_S`` or 6 hours: a training run can hold a
        checkpoint's lock that long), then raises `StoreLockTimeout` naming the target.
        """
        if not self.is_local:
            yield
            return
        key = os.path.join(self.root, LOCK_DIR, hashlib.sha1(self.path(rel).encode()).hexdigest() + ".lock")
        held = getattr(_held, "paths", None)
        if held is None:
            held = _held.paths = {}
        if held.get(key):
            held[key] += 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        try:
            os.makedirs(os.path.dirname(key), exist_ok=True)
            fd = os.open(key, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise _write_error(self.url, rel, exc) from exc
            raise
        timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, 6 * 3600)) if timeout_s is None else timeout_s
        deadline, delay = time.monotonic() + timeout, 0.02
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreLockTimeout(f"{rel}: another run has held this target's lock for over {timeout:.0f} s "
                                               f"(lock file {key}); raise {LOCK_TIMEOUT_ENV} or stop the other run")
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
            held[key] = 1
            try:
                yield
            finally:
                held.pop(key, None)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _sweep_tmp_siblings(self, final: str) -> None:
        """Remove temporary siblings of ``final`` left by a killed writer (call while holding its lock)."""
        parent, name = posixpath.split(final)
        if not self.fs.exists(parent):
            return
        for path in self.fs.ls(parent, detail=False):
            if posixpath.basename(path.rstrip("/")).startswith(name + TMP_MARKER):
                self.fs.rm(path, recursive=True)

    @contextmanager
    def atomic_open(self, rel: str, mode: str = "wb") -> Iterator[Any]:
        """Open a temporary sibling of ``rel`` for writing; rename it into place only on success."""
        final = self.path(rel)
        tmp = f"{final}{TMP_MARKER}{uuid.uuid4().hex}"
        with self.lock(rel):
            try:
                self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
                self._sweep_tmp_siblings(final)
                with self.fs.open(tmp, mode) as handle:
                    yield handle
                self.fs.mv(tmp, final)
            except BaseException as exc:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
                if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS and not isinstance(exc, StorageWriteError):
                    raise _write_error(self.url, rel, exc) from exc
                raise

    def write_bytes(self, rel: str, data: bytes) -> str:
        with self.atomic_open(rel, "wb") as handle:
            handle.write(data)
        return self.uri(rel)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as handle:
            return handle.read()

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    # -- datasets ------------------------------------------------------------------------------
    def dataset_dir(self, name: str, version: str) -> str:
        return posixpath.join("data", name, version)

    def write_dataset(
        self,
        name: str,
        version: str,
        batches: Iterable[list[dict[str, Any]] | pa.Table],
        schema: pa.Schema,
        rows_per_part: int = 50_000,
        *,
        inputs: dict[str, str] | None = None,
    ) -> DatasetInfo:
        """Publish ``data/<name>/<version>/part-*.parquet`` from batches of row dicts (or Arrow tables).

        Parts are written into a temporary directory that is renamed into place when complete, and
        ``data/<name>/LATEST`` then points at the version. Memory stays bounded by one batch. ``inputs``
        ({dataset: version} this one was made from) goes into ``_dataset.json``, so lineage can be walked
        from any dataset back to its sources.
        """
        final_rel = self.dataset_dir(name, version)
        info = self._publish_directory(final_rel, lambda tmp_rel: self._write_dataset_parts(
            name, version, final_rel, tmp_rel, batches, schema, rows_per_part, inputs))
        self.write_bytes(posixpath.join("data", name, "LATEST"), version.encode())
        return info

    def commit_dataset(self, name: str, version: str, parts: Sequence[tuple[str, int]], schema: pa.Schema, *,
                       inputs: dict[str, str] | None = None) -> DatasetInfo:
        """Publish ``data/<name>/<version>/`` from Parquet files already written elsewhere in the store.

        ``parts`` are (relative path, rows) in dataset order, e.g. one per shard task of a Ray stage;
        each is moved (renamed) into a temporary directory as ``part-<i>.parquet`` beside a
        ``_dataset.json`` listing exactly these parts, and that directory replaces the version in one
        rename, so the work here is one rename per part whatever the row count. Empty parts are
        left out (an all-empty dataset keeps one, for its schema); reading the result yields the
        parts' rows in the order given.
        """
        final_rel = self.dataset_dir(name, version)
        kept = [(rel, rows) for rel, rows in parts if rows] or list(parts[:1])

        def fill(tmp_rel: str) -> DatasetInfo:
            names = [f"part-{i:05d}.parquet" for i in range(len(kept))]
            for (rel, _), part_name in zip(kept, names):
                self.fs.mv(self.path(rel), self.path(tmp_rel, part_name))
            if not kept:
                names = ["part-00000.parquet"]
                with self.fs.open(self.path(tmp_rel, names[0]), "wb") as empty:
                    pq.write_table(schema.empty_table(), empty)
            rows = sum(r for _, r in kept)
            self._write_dataset_meta(tmp_rel, name, version, rows, names, inputs)
            return DatasetInfo(name, version, self.uri(final_rel), rows, tuple(names))

        info = self._publish_directory(final_rel, fill)
        self.write_bytes(posixpath.join("data", name, "LATEST"), version.encode())
        return info

    def _publish_directory(self, final_rel: str, fill: Callable[[str], Any]) -> Any:
        """Fill a temporary sibling of ``final_rel`` (``fill(tmp_rel)``), then rename it into place under
        the target's lock; the old directory stays readable until then, and a failure removes the sibling."""
        with self.lock(final_rel):
            self._sweep_tmp_siblings(self.path(final_rel))
            tmp_rel = f"{final_rel}{TMP_MARKER}{uuid.uuid4().hex}"
            try:
                self.fs.makedirs(self.path(tmp_rel), exist_ok=True)
                result = fill(tmp_rel)
                if self.is_local:  # the old version stays readable until the new one is in place
                    swap_directory(self.path(tmp_rel), self.path(final_rel))
                else:
                    if self.fs.exists(self.path(final_rel)):
                        self.fs.rm(self.path(final_rel), recursive=True)
                    self.fs.mv(self.path(tmp_rel), self.path(final_rel), recursive=True)
                return result
            except BaseException as exc:
                if self.fs.exists(self.path(tmp_rel)):
                    self.fs.rm(self.path(tmp_rel), recursive=True)
                if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS and not isinstance(exc, StorageWriteError):
                    raise _write_error(self.url, final_rel, exc) from exc
                raise

    def _write_dataset_meta(self, tmp_rel: str, name: str, version: str, rows: int, parts: list[str],
                            inputs: dict[str, str] | None) -> None:
        with self.fs.open(self.path(tmp_rel, "_dataset.json"), "wb") as meta:
            meta.write(json.dumps({"name": name, "version": version, "rows": rows, "parts": parts,
                                   "inputs": dict(inputs or {})}, sort_keys=True).encode())

    def _write_dataset_parts(self, name, version, final_rel, tmp_rel, batches, schema, rows_per_part,
                             inputs) -> DatasetInfo:
        parts: list[str] = []
        rows = 0
        writer: pq.ParquetWriter | None = None
        handle = None
        in_part = 0

        def close_part() -> None:
            nonlocal writer, handle
            if writer is not None:
                writer.close()
                handle.close()
                writer, handle = None, None

        try:
            for batch in batches:
                if not batch:
                    continue
                if writer is None or in_part >= rows_per_part:
                    close_part()
                    part_name = f"part-{len(parts):05d}.parquet"
                    parts.append(part_name)
                    handle = self.fs.open(self.path(tmp_rel, part_name), "wb")
                    writer = pq.ParquetWriter(handle, schema)
                    in_part = 0
                writer.write_table(batch.cast(schema) if isinstance(batch, pa.Table)
                                   else pa.Table.from_pylist(batch, schema=schema))
                in_part += len(batch)
                rows += len(batch)
            if not parts:  # an empty dataset still has a readable schema
                part_name = "part-00000.parquet"
                parts.append(part_name)
                with self.fs.open(self.path(tmp_rel, part_name), "wb") as empty:
                    pq.write_table(schema.empty_table(), empty)
            close_part()
            self._write_dataset_meta(tmp_rel, name, version, rows, parts, inputs)
        finally:
            close_part()
        return DatasetInfo(name, version, self.uri(final_rel), rows, tuple(parts))

    def write_rows(self, name: str, version: str, rows: Iterable[dict[str, Any]], schema: pa.Schema,
                   batch_size: int = 5_000, *, inputs: dict[str, str] | None = None) -> DatasetInfo:
        """`write_dataset` from a stream of single rows."""
        return self.write_dataset(name, version, batched(rows, batch_size), schema, inputs=inputs)

    def write_jsonl(self, rel: str, records: Iterable[dict[str, Any]]) -> str:
        """Write JSON lines atomically (quarantines and other append-free record files)."""
        with self.atomic_open(rel, "wb") as handle:
            for record in records:
                handle.write(json_line(record))
        return self.uri(rel)

    def write_jsonl_parts(self, rel: str, records: Iterable[dict[str, Any]]) -> str:
        """Publish the directory ``rel`` of JSON-lines parts (here one, ``part-00000.jsonl``) with a
        ``_parts.json`` manifest; read it with `iter_jsonl_parts`. The layout `commit_jsonl_parts` publishes."""

        def fill(tmp_rel: str) -> int:
            count = 0
            with self.fs.open(self.path(tmp_rel, "part-00000.jsonl"), "wb") as handle:
                for record in records:
                    handle.write(json_line(record))
                    count += 1
            self._write_parts_manifest(tmp_rel, ["part-00000.jsonl"], count)
            return count

        self._publish_directory(rel, fill)
        return self.uri(rel)

    def commit_jsonl_parts(self, rel: str, parts: Sequence[tuple[str, int]]) -> str:
        """Publish the directory ``rel`` from JSON-lines files written elsewhere in the store: (relative
        path, records) in order, each renamed to ``part-<i>.jsonl``; one directory rename commits them all."""

        def fill(tmp_rel: str) -> None:
            names = [f"part-{i:05d}.jsonl" for i in range(len(parts))]
            for (part_rel, _), name in zip(parts, names):
                self.fs.mv(self.path(part_rel), self.path(tmp_rel, name))
            self._write_parts_manifest(tmp_rel, names, sum(n for _, n in parts))

        self._publish_directory(rel, fill)
        return self.uri(rel)

    def _write_parts_manifest(self, tmp_rel: str, names: list[str], records: int) -> None:
        with self.fs.open(self.path(tmp_rel, PARTS_MANIFEST), "wb") as meta:
            meta.write(json.dumps({"parts": names, "records": records}, sort_keys=True).encode())

    def iter_jsonl_parts(self, rel: str) -> Iterator[dict[str, Any]]:
        """The records of a JSON-lines parts directory (`write_jsonl_parts`), parts in manifest order."""
        for name in self.read_json(posixpath.join(rel, PARTS_MANIFEST))["parts"]:
            with self.fs.open(self.path(rel, name), "rb") as handle:
                for line in handle:
                    yield json.loads(line)

    def iter_rows(self, name: str, version: str | None = None) -> Iterator[dict[str, Any]]:
        """A dataset's rows one at a time (read a row group at a time)."""
        for batch in self.iter_dataset(name, version):
            yield from batch

    def latest_version(self, name: str) -> str | None:
        rel = posixpath.join("data", name, "LATEST")
        return self.read_bytes(rel).decode().strip() if self.exists(rel) else None

    def dataset_info(self, name: str, version: str | None = None) -> DatasetInfo:
        """The published dataset ``name`` at ``version`` (default: the latest)."""
        version = version or self.latest_version(name)
        if version is None:
            raise FileNotFoundError(f"dataset {name!r} has not been materialized under {self.url}")
        meta = self.read_json(posixpath.join(self.dataset_dir(name, version), "_dataset.json"))
        return DatasetInfo(name, version, self.uri(self.dataset_dir(name, version)), meta["rows"], tuple(meta["parts"]))

    def dataset_inputs(self, name: str, version: str) -> dict[str, str]:
        """The input dataset versions ``name@version`` was published with (``write_rows(inputs=...)``)."""
        return self.read_json(posixpath.join(self.dataset_dir(name, version), "_dataset.json")).get("inputs") or {}

    def iter_dataset(self, name: str, version: str | None = None, batch_size: int = 10_000) -> Iterator[list[dict]]:
        """Yield a dataset's rows in batches of dicts, one Parquet row group at a time."""
        info = self.dataset_info(name, version)
        for part in info.parts:
            with self.fs.open(self.path(self.dataset_dir(name, info.version), part), "rb") as handle:
                for record_batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size):
                    yield record_batch.to_pylist()

    def iter_tables(self, name: str, version: str | None = None, batch_size: int = 65_536,
                    columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """A dataset's rows as Arrow tables of at most ``batch_size`` rows (``columns`` only, if given)."""
        info = self.dataset_info(name, version)
        for part in info.parts:
            with self.fs.open(self.path(self.dataset_dir(name, info.version), part), "rb") as handle:
                for record_batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns):
                    yield pa.Table.from_batches([record_batch])
