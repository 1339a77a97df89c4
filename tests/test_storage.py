"""TULU_HOME storage: atomic writes, datasets, and paths that cannot escape the root."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from tulu_pipeline.storage import Store, StorePathError

SCHEMA = pa.schema([("x", pa.int64())])


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_paths_cannot_escape_root(store: Store) -> None:
    for bad in ("../outside", "/etc/passwd", "a/../../b", "..", "a\\..\\b"):
        with pytest.raises(StorePathError):
            store.path(bad)
    assert store.path("a/./b") == store.path("a", "b")


def test_atomic_write_leaves_nothing_on_failure(store: Store) -> None:
    store.write_bytes("reports/x.json", b"old")
    with pytest.raises(RuntimeError):
        with store.atomic_open("reports/x.json") as handle:
            handle.write(b"half")
            raise RuntimeError("crash mid-write")
    assert store.read_bytes("reports/x.json") == b"old"
    assert _files(Path(store.root)) == ["reports/x.json"]


def test_dataset_round_trip_in_parts(store: Store) -> None:
    batches = ([{"x": i} for i in range(start, start + 10)] for start in range(0, 100, 10))
    info = store.write_dataset("demo", "v1", batches, SCHEMA, rows_per_part=30)
    assert info.rows == 100 and info.parts == ("part-00000.parquet", "part-00001.parquet",
                                               "part-00002.parquet", "part-00003.parquet")
    assert store.latest_version("demo") == "v1"
    assert [r["x"] for batch in store.iter_dataset("demo", batch_size=7) for r in batch] == list(range(100))


def test_empty_dataset_keeps_schema(store: Store) -> None:
    info = store.write_dataset("empty", "v1", iter([]), SCHEMA)
    assert info.rows == 0
    assert list(store.iter_dataset("empty")) == []


def test_crash_while_publishing_keeps_previous_version(store: Store) -> None:
    store.write_dataset("demo", "v1", [[{"x": 1}]], SCHEMA)

    def crashing():
        yield [{"x": 2}]
        raise KeyboardInterrupt  # e.g. the run was terminated

    with pytest.raises(KeyboardInterrupt):
        store.write_dataset("demo", "v2", crashing(), SCHEMA)
    assert store.latest_version("demo") == "v1"
    assert store.listdir("data", "demo") == ["LATEST", "v1"]


def test_rewriting_a_version_replaces_it(store: Store) -> None:
    store.write_dataset("demo", "v1", [[{"x": 1}, {"x": 2}]], SCHEMA)
    store.write_dataset("demo", "v1", [[{"x": 3}]], SCHEMA)
    assert [r["x"] for b in store.iter_dataset("demo") for r in b] == [3]


def test_memory_filesystem_root() -> None:
    """Any fsspec URL works as TULU_HOME (object stores in production)."""
    store = Store("memory://tulu-test-home")
    store.write_json("reports/a.json", {"k": 1})
    assert store.read_json("reports/a.json") == {"k": 1}
    store.write_dataset("demo", "v1", [[{"x": 5}]], SCHEMA)
    assert [r["x"] for b in store.iter_dataset("demo") for r in b] == [5]
    assert store.uri("reports/a.json").startswith("memory://")
