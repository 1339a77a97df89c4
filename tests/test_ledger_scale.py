"""Compaction on a synthetic ledger with awkward shapes: every answer must be the one the per-run files give.

Many runs and assets, rows referencing themselves, repeated related ids, ids with quotes and non-ASCII
characters, null details and decisions, a hot related id (a checkpoint naming thousands of rows), rows
with no events of their own, retried runs and runs published after compaction. `benchmarks/trace.py`
measures the speed on 10M events; this test only checks correctness, quickly.
"""

from __future__ import annotations

import random

import pytest

from tulu_pipeline.provenance.compaction import compact, compaction_status
from tulu_pipeline.provenance.ledger import Ledger, LedgerWriter
from tulu_pipeline.storage import Store

ODD_IDS = ["o'neil-1", "ünïcødé-✓", "with space", "semi;colon", "back\\slash", '"quoted"', ""]


def _row_ids(n: int) -> list[str]:
    return [f"src{i % 5}-{i:06x}" for i in range(n)] + ODD_IDS


def _publish(store: Store, rng: random.Random, ids: list[str], runs: int, tag: str, events_per_run: int = 300) -> None:
    assets = ["raw/a", "normalized_prompts", "deduplicated_prompts", "decontaminated_prompts", "sft_mix"]
    for r in range(runs):
        asset = assets[r % len(assets)]  # a retry (same tag and r) publishes to the same run directory
        # versions are per run: a rerun of the same version would supersede it (see test_ledger.py)
        with LedgerWriter(store, "curation", asset, f"{tag}-v{r}", f"{tag}-{r}", rows_per_part=100) as writer:
            for _ in range(events_per_run):
                row_id = rng.choice(ids)
                kind = rng.random()
                if kind < 0.1:  # references, sometimes to itself or repeated
                    related = [rng.choice(ids) for _ in range(rng.randint(1, 3))]
                    if rng.random() < 0.3:
                        related.append(row_id)
                    if rng.random() < 0.3:
                        related.append(related[0])
                    writer.record(row_id, "dropped_duplicate", decision="near", reason="near duplicate",
                                  related_ids=related, details={"jaccard": round(rng.random(), 3)})
                elif kind < 0.15:
                    writer.record(row_id, "trained_on", decision="trained", related_ids=["sft-hot"],
                                  details={"checkpoint": "sft-hot"})
                else:
                    writer.record(row_id, "kept", decision=rng.choice(["unique", "clean", None]))


def _answers(store: Store, probe: list[str]) -> dict:
    ledger = Ledger(store)
    return {
        "traces": {row_id: ledger.trace(row_id) for row_id in probe},
        "count": ledger.query("SELECT count(*) AS n, count(DISTINCT row_id) AS u FROM events"),
        "by_run": ledger.query("SELECT asset_key, run_id, count(*) AS n FROM events GROUP BY ALL ORDER BY ALL"),
        "rows_view": ledger.query("SELECT row_id, event, seq, run_id FROM events ORDER BY ALL", row_ids=probe[:40]),
        "rows_view_many": ledger.query("SELECT count(*) AS n FROM events",
                                       row_ids=probe * 3 + [f"x{i}" for i in range(400)]),
        "related_view": ledger.query("SELECT row_id, seq, run_id FROM events ORDER BY ALL", related_to="sft-hot"),
    }


@pytest.mark.parametrize("buckets", [1, 7])
def test_compaction_changes_no_answer(tmp_path, buckets: int) -> None:
    rng = random.Random(buckets)
    store = Store(str(tmp_path / "home"))
    ids = _row_ids(600)
    _publish(store, rng, ids, runs=40, tag="run")
    probe = rng.sample(ids[:-len(ODD_IDS)], 15) + ODD_IDS + ["sft-hot", "never-seen"]
    baseline = _answers(store, probe)
    assert baseline["count"][0]["n"] == 40 * 300

    compact(store, buckets=buckets)
    assert _answers(store, probe) == baseline

    # later runs, a retried run that replaced its events, and a run that vanished
    _publish(store, rng, ids, runs=5, tag="later")
    _publish(store, rng, ids, runs=1, tag="run", events_per_run=50)  # run-0 retried
    victim = next(p for p in (tmp_path / "home" / "ledger" / "events").rglob("run-7"))
    for part in victim.iterdir():
        part.unlink()
    victim.rmdir()
    changed = _answers(store, probe)
    assert changed != baseline
    assert changed["count"][0]["n"] == 40 * 300 - 300 - 300 + 50 + 5 * 300
    status = compaction_status(store)
    assert status["stale_runs"] == 2 and status["remainder_files"] > 0

    compact(store, buckets=buckets)
    assert compaction_status(store)["remainder_files"] == 0
    assert _answers(store, probe) == changed


def test_compaction_on_an_object_store(tmp_path) -> None:
    """The same on an fsspec store that is not local (DuckDB reads through the registered filesystem)."""
    import uuid

    store = Store(f"memory://tulu-compaction-{uuid.uuid4().hex}")
    rng = random.Random(3)
    ids = _row_ids(200)
    _publish(store, rng, ids, runs=6, tag="run", events_per_run=100)
    probe = rng.sample(ids[:-len(ODD_IDS)], 8) + ODD_IDS[:2] + ["sft-hot"]
    baseline = _answers(store, probe)
    compact(store, buckets=4)
    assert _answers(store, probe) == baseline
    _publish(store, rng, ids, runs=1, tag="run", events_per_run=10)  # run-0 retried
    changed = _answers(store, probe)
    assert compaction_status(store)["stale_runs"] == 1
    assert changed["count"][0]["n"] == 5 * 100 + 10
    compact(store, buckets=4)
    assert _answers(store, probe) == changed and compaction_status(store)["remainder_files"] == 0


def test_a_failed_compaction_leaves_the_ledger_as_it_was(tmp_path, monkeypatch) -> None:
    import tulu_pipeline.provenance.compaction as compaction

    store = Store(str(tmp_path / "home"))
    rng = random.Random(5)
    ids = _row_ids(100)
    _publish(store, rng, ids, runs=3, tag="run", events_per_run=50)
    first = compact(store, buckets=4)["generation"]
    _publish(store, rng, ids, runs=2, tag="later", events_per_run=50)
    probe = ids[:10] + ["sft-hot"]
    before = _answers(store, probe)

    def broken(con, buckets):
        raise RuntimeError("disk full")

    monkeypatch.setattr(compaction, "_check_bucket_function", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        compact(store, buckets=4)
    assert compaction_status(store)["generation"] == first
    assert sorted(p.name for p in (tmp_path / "home" / "ledger" / "compacted").iterdir()) == ["CURRENT", first]
    assert _answers(store, probe) == before
