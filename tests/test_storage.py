"""TULU_HOME storage: atomic writes, datasets, and paths that cannot escape the root."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from tulu_pipeline.storage import LOCK_DIR, TMP_MARKER, Store, StorageWriteError, StoreLockTimeout, StorePathError

SCHEMA = pa.schema([("x", pa.int64())])


def _files(root: Path) -> list[str]:
    """Published files (the lock files under .locks/ are bookkeeping, kept between runs)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and LOCK_DIR not in p.parts)


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


# ---------------------------------------------------------------------------------------------
# crashes, concurrency and unwritable homes (issue: reliability)
# ---------------------------------------------------------------------------------------------
def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"*{TMP_MARKER}*"))


@pytest.mark.integration
def test_temporaries_of_a_killed_writer_are_swept_by_the_next_write(store: Store) -> None:
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    # a writer killed with SIGKILL in the middle of a dataset and of a file write
    script = textwrap.dedent(f"""
        import os, signal, pyarrow as pa
        from tulu_pipeline.storage import Store
        store = Store({store.url!r})
        def rows():
            yield [{{"x": 1}}]
            os.kill(os.getpid(), signal.SIGKILL)
        with store.atomic_open("reports/a.json") as handle:
            handle.write(b"half")
            store.write_dataset("d", "v1", rows(), pa.schema([("x", pa.int64())]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    root = Path(store.root)
    assert len(_leftovers(root)) == 2 and not store.exists("data/d/v1") and not store.exists("reports/a.json")

    store.write_rows("d", "v1", [{"x": 1}, {"x": 2}], pa.schema([("x", pa.int64())]))
    store.write_json("reports/a.json", {"ok": True})
    assert _leftovers(root) == [] and store.read_json("reports/a.json") == {"ok": True}
    assert [r["x"] for r in store.iter_rows("d", "v1")] == [1, 2]
    assert sorted(os.listdir(store.path("data/d"))) == ["LATEST", "v1"]


@pytest.mark.integration
def test_two_processes_writing_the_same_version_take_turns(store: Store) -> None:
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, time, pyarrow as pa
        from tulu_pipeline.storage import Store
        store = Store({store.url!r})
        tag = int(sys.argv[1])
        def batches():
            for i in range(20):
                time.sleep(0.02)  # slow enough that the two writers overlap
                yield [{{"x": i, "writer": tag}}]
        store.write_dataset("d", "v1", batches(), pa.schema([("x", pa.int64()), ("writer", pa.int64())]),
                            rows_per_part=5)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tag)]) for tag in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    rows = list(store.iter_rows("d", "v1"))
    # one writer's complete output, never a mix of both or a nested directory
    assert [r["x"] for r in rows] == list(range(20)) and len({r["writer"] for r in rows}) == 1
    assert sorted(p.name for p in Path(store.path("data/d/v1")).iterdir()) == \
        ["_dataset.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert _leftovers(Path(store.root)) == []


def test_lock_timeout_names_the_target(store: Store) -> None:
    import multiprocessing

    ready, release = multiprocessing.Event(), multiprocessing.Event()

    def hold() -> None:
        with Store(store.url).lock("data/d/v1"):
            ready.set()
            release.wait(30)

    holder = multiprocessing.get_context("fork").Process(target=hold)
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(StoreLockTimeout, match="data/d/v1"):
            with store.lock("data/d/v1", timeout_s=0.3):
                pass
    finally:
        release.set()
        holder.join(30)
    with store.lock("data/d/v1", timeout_s=5):  # free again
        pass


def test_full_disk_gives_a_clear_error_and_keeps_what_was_written(store: Store, monkeypatch) -> None:
    import errno

    schema = pa.schema([("x", pa.int64())])
    store.write_rows("d", "v1", [{"x": 1}], schema)
    store.write_json("reports/a.json", {"old": True})
    real_open = store.fs.open

    def full(path, mode="rb", **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(store.fs, "open", full)
    with pytest.raises(StorageWriteError, match="disk is full") as error:
        store.write_rows("d", "v1", [{"x": 2}], schema)
    assert "data/d/v1" in str(error.value)
    with pytest.raises(StorageWriteError, match="reports/a.json"):
        store.write_json("reports/a.json", {"new": True})
    monkeypatch.undo()
    assert [r["x"] for r in store.iter_rows("d", "v1")] == [1] and store.read_json("reports/a.json") == {"old": True}
    assert _leftovers(Path(store.root)) == []


def test_unwritable_home_is_a_clear_error(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:  # root ignores permission bits: use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(StorageWriteError, match="TULU_HOME .* cannot be created"):
            Store(str(blocker / "home"))
        return
    home = tmp_path / "ro"
    home.mkdir()
    store = Store(str(home))
    home.chmod(0o500)
    try:
        with pytest.raises(StorageWriteError, match="permission denied"):
            store.write_json("a.json", {})
    finally:
        home.chmod(0o700)


def _staged(store: Store, rel: str, xs: list[int]) -> tuple[str, int]:
    import pyarrow.parquet as pq

    with store.atomic_open(rel) as handle:
        pq.write_table(pa.Table.from_pylist([{"x": x} for x in xs], schema=SCHEMA), handle)
    return rel, len(xs)


def test_committed_parts_read_back_in_order_and_only_the_listed_ones(store: Store) -> None:
    # A retried task rewrote shard 1 under the same name; a leftover shard-9 file is no winner.
    parts = [_staged(store, "_ray/s/shard-0", [0, 1]), _staged(store, "_ray/s/shard-1", [9]),
             _staged(store, "_ray/s/shard-2", []), _staged(store, "_ray/s/shard-3", [4])]
    parts[1] = _staged(store, "_ray/s/shard-1", [2, 3])
    _staged(store, "_ray/s/shard-9", [99])
    info = store.commit_dataset("demo", "v1", parts, SCHEMA, inputs={"up": "v0"})
    assert info.rows == 5 and info.parts == ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet")
    assert [r["x"] for b in store.iter_dataset("demo") for r in b] == [0, 1, 2, 3, 4]
    assert store.read_json("data/demo/v1/_dataset.json")["inputs"] == {"up": "v0"}
    # What was not committed (the empty part, the loser) stays where it was, for the caller's cleanup.
    assert store.latest_version("demo") == "v1" and store.listdir("_ray/s") == ["shard-2", "shard-9"]
    # All parts empty: one is kept for the schema.
    empty = store.commit_dataset("none", "v1", [_staged(store, "_ray/e/0", []), _staged(store, "_ray/e/1", [])],
                                 SCHEMA)
    assert empty.rows == 0 and empty.parts == ("part-00000.parquet",) and list(store.iter_dataset("none")) == []


def test_a_commit_that_fails_keeps_the_previous_version(store: Store) -> None:
    store.write_dataset("demo", "v1", [[{"x": 1}]], SCHEMA)
    with pytest.raises(FileNotFoundError):
        store.commit_dataset("demo", "v1", [_staged(store, "_ray/a", [5]), ("_ray/missing", 1)], SCHEMA)
    assert [r["x"] for b in store.iter_dataset("demo") for r in b] == [1]
    assert store.listdir("data", "demo") == ["LATEST", "v1"]


def test_jsonl_parts_one_part_or_many_read_the_same(store: Store) -> None:
    records = [{"row_id": f"r{i}", "reason": "empty", "n": i} for i in range(5)]
    store.write_jsonl_parts("quarantine/a/v1", records)
    staged = []
    for k, chunk in enumerate((records[:2], [], records[2:])):
        store.write_jsonl(f"_ray/q/{k}.jsonl", chunk)
        staged.append((f"_ray/q/{k}.jsonl", len(chunk)))
    store.commit_jsonl_parts("quarantine/b/v1", staged)
    assert list(store.iter_jsonl_parts("quarantine/a/v1")) == list(store.iter_jsonl_parts("quarantine/b/v1")) == records
    assert store.read_json("quarantine/b/v1/_parts.json")["records"] == 5
