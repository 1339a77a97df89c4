"""Curation on Ray Data (executor: ray) against the in-process path, on one local Ray for the module.

The equivalence runs on a subset of the bundle (4 of the 6 training pools: code_alpaca,
hh_rlhf_harmless, self_instruct_seed, fine_grained_rlhf_qa, about 5,000 rows with 17 duplicates,
2 empty rows and 8 contaminated rows; evaluated against truthfulqa, mbpp, humaneval and
alpaca_eval) so that the module stays well under two minutes on two cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tulu_pipeline.curation import pipeline, stages
from tulu_pipeline.curation.config import CurationConfig, EvalSelection, RaySettings
from tulu_pipeline.curation.dedup import LSH_WEIGHTS, Deduplicator, dedup_order, lsh_bands
from tulu_pipeline.curation.ray_executor import (
    RAY_DIR,
    deduplicate_prompts_ray,
    normalize_prompts_ray,
    plan_shards,
)
from tulu_pipeline.data.ingest import ingest_source, raw_dataset_name
from tulu_pipeline.data.registry import registry
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.provenance.ledger import Ledger, MemorySink
from tulu_pipeline.storage import Store

pytestmark = pytest.mark.integration  # a local Ray cluster

TRAIN = ["code_alpaca", "hh_rlhf_harmless", "self_instruct_seed", "fine_grained_rlhf_qa"]
BENCHMARKS = ["truthfulqa", "mbpp", "humaneval", "alpaca_eval"]
STAGES = ("normalized_prompts", "deduplicated_prompts", "decontaminated_prompts")
EVENT_COLUMNS = "row_id, event, stage, asset_key, asset_version, seq, decision, reason, related_ids, details"


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module: 2 CPUs, a small object store, no dashboard."""
    import ray  # a hard dependency, imported where used so that collection stays cheap

    ray.init(num_cpus=2, object_store_memory=500 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(executor: str, shard_rows: int = 2_500) -> CurationConfig:
    return CurationConfig(train_sources=TRAIN, evals=EvalSelection(benchmarks=BENCHMARKS), executor=executor,
                          ray=RaySettings(shard_rows=shard_rows, partition_rows=1))


@pytest.fixture(scope="module")
def raw_home(tmp_path_factory, bundle: Path) -> Path:
    home = tmp_path_factory.mktemp("ray_raw") / "home"
    store = Store(str(home))
    for spec in registry():
        if spec.id in TRAIN or (spec.role == "eval" and spec.benchmark in BENCHMARKS):
            ingest_source(spec, store, "ingest", root=bundle)
    return home


def _copy(raw_home: Path, name: str) -> Store:
    home = raw_home.parent / name
    shutil.copytree(raw_home, home)
    return Store(str(home))


def _run_all(store: Store, config: CurationConfig) -> dict[str, stages.StageResult]:
    return {
        "normalized_prompts": pipeline.normalize_prompts(store, config, "run-1"),
        "deduplicated_prompts": pipeline.deduplicate_prompts(store, config, "run-1"),
        "decontaminated_prompts": pipeline.decontaminate_prompts(store, config, "run-1"),
    }


@pytest.fixture(scope="module")
def curated(raw_home: Path, ray_local):
    local, on_ray = _copy(raw_home, "local"), _copy(raw_home, "ray")
    return (local, _run_all(local, _config("local"))), (on_ray, _run_all(on_ray, _config("ray")))


def _events(store: Store, asset_key: str | None = None) -> list[dict]:
    where = "stage <> 'sources'" if asset_key is None else f"asset_key = '{asset_key}'"
    return Ledger(store).query(f"SELECT {EVENT_COLUMNS} FROM events WHERE {where} ORDER BY asset_key, seq")


def test_ray_and_local_publish_the_same_rows_decisions_and_ledger(curated) -> None:
    (local, local_results), (on_ray, ray_results) = curated
    for stage in STAGES:
        a, b = local_results[stage], ray_results[stage]
        assert (b.version, b.dataset.rows, b.quarantined, b.ledger_events) == \
               (a.version, a.dataset.rows, a.quarantined, a.ledger_events), stage
        assert decisions(b.stats) == decisions(a.stats) and b.samples == a.samples and b.text_lengths == a.text_lengths, stage
        assert list(on_ray.iter_rows(stage, b.version)) == list(local.iter_rows(stage, a.version)), stage
    # The subset exercises every kind of decision.
    assert local_results["normalized_prompts"].quarantined == 2
    dedup = local_results["deduplicated_prompts"].stats
    assert dedup["exact_duplicates"] >= 1 and dedup["near_duplicates"] >= 10
    assert local_results["decontaminated_prompts"].quarantined >= 5

    for stage in ("normalized_prompts", "deduplicated_prompts"):
        rel = stages.quarantine_dir(stage, local_results[stage].version)
        assert list(on_ray.iter_jsonl_parts(rel)) == list(local.iter_jsonl_parts(rel)), stage
        assert on_ray.read_json(f"{rel}/_parts.json")["records"] == local_results[stage].quarantined
    assert list(on_ray.iter_rows("decontamination_quarantine")) == list(local.iter_rows("decontamination_quarantine"))

    events = _events(local)
    assert len(events) == sum(r.ledger_events for r in local_results.values())
    assert _events(on_ray) == events
    assert not on_ray.exists(RAY_DIR) or not on_ray.fs.find(on_ray.path(RAY_DIR))  # shard files cleaned up

    metrics = ray_results["decontaminated_prompts"].ray_metrics
    assert metrics["shards"] >= 2 and metrics["rows"] == ray_results["decontaminated_prompts"].dataset.rows
    # The bundle's index is far below eval_index_max_bytes: broadcast, nothing shuffled.
    assert all(u["shuffle_bytes"] == 0 for u in metrics["usage"] if u["step"] == "decontaminate")


def _sharded_index_run(store: Store, config: CurationConfig) -> stages.StageResult:
    """Normalize and dedup locally, then decontaminate on Ray with the eval index forced into 3 parts."""
    local = config.model_copy(update={"executor": "local"})
    pipeline.normalize_prompts(store, local, "run-1")
    pipeline.deduplicate_prompts(store, local, "run-1")
    ray_settings = config.ray.model_copy(update={"eval_index_max_bytes": 1, "eval_index_shards": 3})
    result = pipeline.decontaminate_prompts(store, config.model_copy(update={"executor": "ray", "ray": ray_settings}),
                                            "run-1")
    usage = [u for u in result.ray_metrics["usage"] if u["step"] == "decontaminate"]
    assert len(usage) >= 2 and all(u["shuffle_bytes"] > 0 for u in usage if u["rows"])  # the join ran
    return result


def decisions(stats: dict) -> dict:
    """A stage's stats but how a decontamination was made (``incremental``: Ray always scans in full, a local
    run says which route it took)."""
    return {k: v for k, v in stats.items() if k != "incremental"}


def _same_decontamination(store: Store, result: stages.StageResult, local: Store,
                          expected: stages.StageResult) -> None:
    assert (result.version, result.dataset.rows, result.quarantined, result.ledger_events, decisions(result.stats),
            result.samples) == (expected.version, expected.dataset.rows, expected.quarantined,
                                expected.ledger_events, decisions(expected.stats), expected.samples)
    assert list(store.iter_rows("decontaminated_prompts", result.version)) == \
           list(local.iter_rows("decontaminated_prompts", expected.version))
    assert list(store.iter_rows("decontamination_quarantine")) == list(local.iter_rows("decontamination_quarantine"))
    assert _events(store) == _events(local)  # every stage's events: row ids, decisions, reasons, related ids


def test_the_index_is_broadcast_below_the_byte_limit_and_a_runaway_split_is_refused() -> None:
    from tulu_pipeline.curation.decontaminate import EvalIndex, EvalItem
    from tulu_pipeline.curation.ray_executor import _index_parts

    index = EvalIndex.build([EvalItem("b", f"e{i}", "s", f"r{i}", f"item {i} " + "word " * 20) for i in range(50)])
    assert _index_parts(index, RaySettings()) == (index, [], [])
    with pytest.raises(ValueError, match="split into .* parts"):
        _index_parts(index, RaySettings(eval_index_max_bytes=1))


def test_a_sharded_eval_index_gives_the_local_answers_on_the_bundle(raw_home: Path, curated) -> None:
    (local, local_results), _ = curated
    store = _copy(raw_home, "sharded-index")
    result = _sharded_index_run(store, _config("ray"))
    _same_decontamination(store, result, local, local_results["decontaminated_prompts"])


def _row(i: int, text: str, source: str = "synthetic", answer: str | None = None) -> dict:
    return {"row_id": f"{source}-{i:04d}", "source": source, "source_key": f"{source}:{i}", "license": "cc0",
            "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}],
            "ground_truth": answer, "constraints": None, "eval_id": None, "extra": None}


def _words(seed: int, n: int = 80) -> list[str]:
    return [f"w{(seed * 7919 + k * 104729) % 100_003}" for k in range(n)]


def test_duplicates_split_across_shards_are_caught_with_the_local_keep_rule(tmp_path, ray_local) -> None:
    store = Store(str(tmp_path / "home"))
    base = _words(1)
    near = base[:40] + ["changed"] + base[41:]  # one of 80 words differs: 71 of 81 shingles shared (0.88)
    texts = [" ".join(_words(seed)) for seed in range(100, 124)]
    texts[2] = " ".join(base)             # shard 0: kept
    texts[14] = " ".join(near)            # shard 3: near duplicate of row 2
    texts[21] = " ".join(base).upper()    # shard 5: exact duplicate of row 2 (dedup text is lowercased)
    texts[9] = " ".join(_words(2))        # shard 2: kept
    texts[17] = " ".join(_words(2)[:79])  # shard 4: near duplicate of row 9
    rows = [_row(i, t) for i, t in enumerate(texts)]
    # shard_rows=4: 6 shards of 4 rows, so every duplicate pair below spans two shards.
    store.write_dataset("normalized_prompts", "synthetic", (rows[i:i + 4] for i in range(0, len(rows), 4)), ROW_SCHEMA)
    config = CurationConfig(executor="ray", ray=RaySettings(shard_rows=4, partition_rows=1))
    assert len(plan_shards(store, {"normalized_prompts": "synthetic"}, 4)) == 6

    result = deduplicate_prompts_ray(store, config, "run-1")

    sink = MemorySink()
    local = Deduplicator(config.dedup, sink)
    kept_locally = [r["row_id"] for r in local(dedup_order(rows, config.dedup.source_priority))]
    assert [r["row_id"] for r in store.iter_rows("deduplicated_prompts", result.version)] == kept_locally
    dropped = {d["row_id"]: (d["duplicate_of"], d["kind"]) for d in local.dropped}
    assert dropped == {"synthetic-0014": ("synthetic-0002", "near"), "synthetic-0021": ("synthetic-0002", "exact"),
                       "synthetic-0017": ("synthetic-0009", "near")}
    ledger = [{k: e[k] for k in ("row_id", "event", "decision", "reason", "related_ids")}
              for e in _events(store, "deduplicated_prompts")]
    assert ledger == [{k: e[k] for k in ("row_id", "event", "decision", "reason", "related_ids")} for e in sink.events]


def _planted_pool(eval_texts: list[str]) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """Two training pools (code_alpaca ranks before hh_rlhf_harmless) with near-duplicate clusters that
    span many shards once shuffled: chains A~B~C whose ends are not similar (by the MinHash estimate
    the keep rule uses), a cluster of 1,000 one-word variants, exact and near duplicates across the
    sources, rows quoting eval items, and unique rows. Returns the pools and the planted row ids
    (``chains``: A, B, C, A, B, C, …; ``cluster``; ``cross``: hh_rlhf_harmless row, code_alpaca row, …)."""
    import random

    from datasketch import MinHashLSH

    rng = random.Random(2025)
    config = CurationConfig().dedup
    signature = Deduplicator(config, MemorySink()).signature

    def words(n: int = 200) -> list[str]:
        return [f"t{rng.randrange(10**7)}" for _ in range(n)]

    def minhash(ws: list[str]):
        return signature({"messages": [{"role": "user", "content": " ".join(ws)}]})[1]

    texts: list[tuple[str, str, tuple[str, int] | None]] = []  # (source, text, (planted group, position))
    chains = 0
    while chains < 12:
        a = words()
        b = [f"b{chains}x{i}" if i in (20, 60, 100) else w for i, w in enumerate(a)]
        c = [f"c{chains}x{i}" if i in (120, 150, 180) else w for i, w in enumerate(b)]
        ma, mb, mc = minhash(a), minhash(b), minhash(c)
        lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm, weights=LSH_WEIGHTS)
        lsh.insert("b", mb)
        linked = set(lsh.query(ma)) == set(lsh.query(mc)) == {"b"}  # LSH candidates (it misses some at 0.85)
        if linked and min(ma.jaccard(mb), mb.jaccard(mc)) >= 0.85 > 0.75 > ma.jaccard(mc):  # A~B~C, not A~C
            texts += [("code_alpaca", " ".join(ws), ("chains", 3 * chains + k)) for k, ws in enumerate((a, b, c))]
            chains += 1
    base = words()
    for i in range(1_000):
        variant = [f"v{i}" if k == (7 * i) % 200 else w for k, w in enumerate(base)]
        texts.append(("hh_rlhf_harmless" if i % 3 else "code_alpaca", " ".join(variant), ("cluster", i)))
    for i in range(40):
        ws = words()
        near = [f"n{i}" if k == 100 else w for k, w in enumerate(ws)]  # odd i: exact, even i: near
        texts += [("hh_rlhf_harmless", " ".join(ws), ("cross", 2 * i)),
                  ("code_alpaca", " ".join(ws if i % 2 else near), ("cross", 2 * i + 1))]
        texts += [("hh_rlhf_harmless", " ".join(ws), None)] * (i % 3 == 0)  # and a duplicate within the source
    texts += [("hh_rlhf_harmless", f"Please answer: {t}", None) for t in eval_texts]
    texts += [(("code_alpaca", "hh_rlhf_harmless")[i % 2], " ".join(words(rng.randrange(8, 120))), None)
              for i in range(900)]
    rng.shuffle(texts)
    pools: dict[str, list[dict]] = {"code_alpaca": [], "hh_rlhf_harmless": []}
    planted: dict[str, dict[int, str]] = {"chains": {}, "cluster": {}, "cross": {}}
    for source, text, tag in texts:
        pools[source].append(_row(len(pools[source]), text, source))
        if tag is not None:
            planted[tag[0]][tag[1]] = pools[source][-1]["row_id"]
    rng.shuffle(pools["hh_rlhf_harmless"])  # row ids out of file order as well
    return pools, {group: [ids[k] for k in sorted(ids)] for group, ids in planted.items()}


def test_planted_clusters_across_many_shards_get_the_same_answers_on_both_executors(raw_home: Path,
                                                                                    ray_local) -> None:
    store = _copy(raw_home, "planted-local")
    items = [r["messages"][0]["content"] for r in store.iter_rows("raw/truthfulqa")]
    pools, planted = _planted_pool([t for t in items if len(t.split()) >= 12][:4])
    for source, rows in pools.items():
        store.write_dataset(f"raw/{source}", "planted", (rows[i:i + 500] for i in range(0, len(rows), 500)),
                            ROW_SCHEMA)
    on_ray = _copy(Path(store.url), "planted-ray")
    sharded = _copy(Path(store.url), "planted-sharded")

    def config(executor: str) -> CurationConfig:
        # 128-row shards: about 17 per stage, and every planted cluster crosses many of them; dedup's later
        # shuffles get one partition per 400 rows (fewer than the shards and shuffle_partitions).
        return CurationConfig(train_sources=list(pools), evals=EvalSelection(benchmarks=["truthfulqa"]),
                              executor=executor,
                              ray=RaySettings(shard_rows=128, partition_rows=400, shuffle_partitions=7))

    local_results, ray_results = _run_all(store, config("local")), _run_all(on_ray, config("ray"))
    for stage in STAGES:
        a, b = local_results[stage], ray_results[stage]
        assert (b.version, b.dataset.rows, b.quarantined, b.ledger_events) == \
               (a.version, a.dataset.rows, a.quarantined, a.ledger_events), stage
        assert decisions(b.stats) == decisions(a.stats) and b.samples == a.samples and b.text_lengths == a.text_lengths, stage
        assert list(on_ray.iter_rows(stage, b.version)) == list(store.iter_rows(stage, a.version)), stage
        assert len(b.dataset.parts) > 1  # published in parts, one per shard (or range)
        assert sum(b.text_lengths.values()) == b.dataset.rows  # merged per-length counts, one per output row
    for stage in ("normalized_prompts", "deduplicated_prompts"):
        rel = stages.quarantine_dir(stage, local_results[stage].version)
        assert list(on_ray.iter_jsonl_parts(rel)) == list(store.iter_jsonl_parts(rel)), stage
    assert list(on_ray.iter_rows("decontamination_quarantine")) == list(store.iter_rows("decontamination_quarantine"))
    assert _events(on_ray) == _events(store)

    # What was planted was exercised: clusters crossing shards, decided by the keep rule.
    normalized = {"normalized_prompts": ray_results["normalized_prompts"].version}
    assert len(plan_shards(on_ray, normalized, 128)) >= 15
    pool = ray_results["normalized_prompts"].dataset.rows
    assert 2 <= ray_results["deduplicated_prompts"].ray_metrics["partitions"] == -(-pool // 400) < 7
    kept = {r["row_id"] for r in store.iter_rows("deduplicated_prompts")}
    dropped = {d["row_id"]: d for d in store.iter_jsonl_parts(
        stages.quarantine_dir("deduplicated_prompts", local_results["deduplicated_prompts"].version))}
    chains = planted["chains"]
    for i in range(0, len(chains), 3):
        a, b, c = chains[i:i + 3]
        if b in kept:  # B came first: both ends are its duplicates
            assert dropped[a]["duplicate_of"] == dropped[c]["duplicate_of"] == b, (a, b, c)
        else:  # an end came first: B is dropped, and the other end, not similar to the first, is kept
            assert a in kept and c in kept and dropped[b]["duplicate_of"] in (a, c), (a, b, c)
    cluster = planted["cluster"]
    survivors = [r for r in cluster if r in kept]
    assert len(survivors) == 1 and survivors[0].startswith("code_alpaca")
    assert all(dropped[r]["duplicate_of"] == survivors[0] for r in cluster if r not in kept)
    cross = planted["cross"]
    for i in range(0, len(cross), 2):
        hh, code = cross[i:i + 2]
        assert code in kept and dropped[hh]["duplicate_of"] == code, (hh, code)
    assert ray_results["decontaminated_prompts"].quarantined == local_results["decontaminated_prompts"].quarantined >= 4
    # The eval index split by n-gram hash into 3 parts (a join): the same answers again.
    _same_decontamination(sharded, _sharded_index_run(sharded, config("ray")), store,
                          local_results["decontaminated_prompts"])


def test_band_records_go_through_the_object_store_not_files_under_tulu_home(tmp_path, ray_local) -> None:
    store = Store(str(tmp_path / "home"))
    base = _words(5)
    texts = [" ".join(_words(seed)) for seed in range(200, 216)]
    texts[3], texts[12] = " ".join(base), " ".join(base[:79] + ["other"])  # a near pair across shards
    rows = [_row(i, t) for i, t in enumerate(texts)]
    store.write_dataset("normalized_prompts", "bands", (rows[i:i + 4] for i in range(0, len(rows), 4)), ROW_SCHEMA)
    listing = tmp_path / "staged.txt"

    def list_staged(step: str, shard: int) -> None:
        # In the worker, once a task's outputs are written: every file staged under TULU_HOME so far.
        with open(listing, "a") as out:
            out.writelines(f"{step} {path.name}\n" for path in (tmp_path / "home" / RAY_DIR).rglob("*")
                           if path.is_file())

    events: list[dict] = []
    config = CurationConfig(executor="ray", ray=RaySettings(shard_rows=4, partition_rows=1))
    result = deduplicate_prompts_ray(store, config, "run-1",
                                     progress=events.append, shard_hook=list_staged)

    staged = listing.read_text().splitlines()
    names = {line.split()[1] for line in staged}
    assert any(line.startswith("buckets ") for line in staged)  # the reducers ran the hook too
    assert {"shard-000000.sorted.parquet", "shard-000000.signatures.parquet", "shard-000000.cc-000.parquet"} <= names
    assert not [n for n in names if "buckets" in n]  # no band-record files: the shuffle is Ray Data's
    local = Deduplicator(CurationConfig().dedup, MemorySink())
    kept = [r["row_id"] for r in local(dedup_order(rows, CurationConfig().dedup.source_priority))]
    assert [r["row_id"] for r in store.iter_rows("deduplicated_prompts", result.version)] == kept
    assert "synthetic-0012" not in kept
    # The shuffle volume reported is the band records' Arrow bytes sent through the object store.
    signatures = [u for u in result.ray_metrics["usage"] if u["step"] == "signatures"]
    assert len(signatures) == 4 and all(u["shuffle_bytes"] > 0 for u in signatures)
    bucket_records = next(e["bucket_records"] for e in events if e.get("step") == "clusters")
    assert bucket_records == sum(u["rows"] for u in result.ray_metrics["usage"] if u["step"] == "buckets")


def test_a_failing_signature_or_bucket_task_fails_the_dedup_run_and_publishes_nothing(tmp_path, ray_local) -> None:
    rows = [_row(i, " ".join(_words(300 + i))) for i in range(8)]
    for step in ("signatures", "buckets"):
        store = Store(str(tmp_path / step))
        store.write_dataset("normalized_prompts", "fail", (rows[i:i + 2] for i in range(0, 8, 2)), ROW_SCHEMA)

        def fail(at: str, shard: int, step: str = step) -> None:
            if at == step and shard == 1:
                raise ValueError(f"injected failure in {at} {shard}")

        config = CurationConfig(executor="ray", ray=RaySettings(shard_rows=2, partition_rows=1))
        with pytest.raises(Exception, match=f"injected failure in {step} 1"):
            deduplicate_prompts_ray(store, config, "run-1", shard_hook=fail)
        assert store.latest_version("deduplicated_prompts") is None
        assert not _events(store, "deduplicated_prompts")
        assert not store.fs.find(store.path(RAY_DIR))


def test_distinct_answers_keep_near_identical_prompts_across_shards(tmp_path, ray_local) -> None:
    store = Store(str(tmp_path / "home"))
    base = _words(3)
    rows = [_row(0, " ".join(base), answer="30"),
            _row(1, " ".join(_words(4))),
            _row(2, " ".join(base[:79] + ["madam"]), answer="60"),   # near, another answer: another task
            _row(3, " ".join(base[:79] + ["level"]), answer="30"),   # near, same answer: a duplicate
            _row(4, " ".join(base), answer="60")]                    # exact: answers are not compared
    store.write_dataset("normalized_prompts", "answers", ([r] for r in rows), ROW_SCHEMA)
    config = CurationConfig(executor="ray", ray=RaySettings(shard_rows=1, partition_rows=1))
    result = deduplicate_prompts_ray(store, config, "run-1")
    local = Deduplicator(config.dedup, MemorySink())
    expected = [r["row_id"] for r in local(dedup_order(rows, config.dedup.source_priority))]
    assert [r["row_id"] for r in store.iter_rows("deduplicated_prompts", result.version)] == expected == \
           ["synthetic-0000", "synthetic-0001", "synthetic-0002"]
    assert {d["row_id"]: d["kind"] for d in local.dropped} == {"synthetic-0003": "near", "synthetic-0004": "exact"}


def test_a_worker_killed_mid_job_is_retried_without_duplicated_ledger_events(raw_home: Path, curated) -> None:
    (local, local_results), _ = curated
    store = _copy(raw_home, "killed")
    marker = raw_home.parent / "kill-once"
    marker.touch()

    def kill_once(step: str, shard: int) -> None:
        # After shard 1 has published its files: the window where a naive retry would double its events.
        if step == "normalize" and shard == 1:
            try:
                os.remove(marker)  # only the first attempt finds it
            except FileNotFoundError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    result = normalize_prompts_ray(store, _config("ray"), "run-1", shard_hook=kill_once)
    assert not marker.exists()  # the worker was killed once, and its task ran again
    expected = local_results["normalized_prompts"]
    assert result.ledger_events == expected.ledger_events == expected.stats["rows_in"]
    assert list(store.iter_rows("normalized_prompts", result.version)) == \
           list(local.iter_rows("normalized_prompts", expected.version))
    events = _events(store, "normalized_prompts")
    assert len({e["row_id"] for e in events}) == len(events)
    assert events == _events(local, "normalized_prompts")


def test_assets_launch_the_ray_job_through_the_compute_launcher(raw_home: Path, curated) -> None:
    import dagster as dg
    import ray

    from assets.curation import normalized_prompts
    from resources import LocalLauncher, TuluStorage

    (_, local_results), _ = curated
    store = _copy(raw_home, "dagster")
    # The job's driver joins this module's Ray instead of starting its own.
    address = ray.get_runtime_context().gcs_address
    run_config = {"ops": {"normalized_prompts": {"config": {
        "train_sources": TRAIN, "executor": "ray", "ray_address": address, "shard_rows": 2_500}}}}
    with dg.instance_for_test() as instance:
        result = dg.materialize([normalized_prompts], run_config=run_config, instance=instance,
                                resources={"storage": TuluStorage(root=store.url), "launcher": LocalLauncher()})
        assert result.success
        logs = [record.user_message for record in instance.all_logs(result.run_id)]
    metadata = result.asset_materializations_for_node("normalized_prompts")[0].metadata
    expected = local_results["normalized_prompts"]
    assert metadata["version"].value == expected.version
    assert metadata["dagster/row_count"].value == expected.dataset.rows
    assert metadata["ledger_events"].value == expected.ledger_events
    assert metadata["ray_shards"].value == 4 and metadata["ray_rows_per_s"].value > 0  # one per pool
    progress = [line for line in logs if '"curation_progress"' in line]
    assert any('"shards_done": 4' in line for line in progress) and '"step": "publish"' in progress[-1]
    assert list(store.iter_rows("normalized_prompts", expected.version))[:3] == expected.samples[:3]


# -- KubeRay manifests, validated offline --------------------------------------------------------
K8S = Path(__file__).resolve().parent.parent / "k8s"
# The ray.io/v1 fields these manifests use, from the KubeRay API reference: a misspelt field fails
# here instead of being dropped silently by the operator's CRD pruning.
KUBERAY_FIELDS = {
    "RayCluster": {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs"},
    "RayJob": {"entrypoint", "submissionMode", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
               "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "runtimeEnvYAML"},
}
HEAD_FIELDS = {"serviceType", "rayStartParams", "template"}
WORKER_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"}


def _kuberay_documents() -> list[dict]:
    import yaml

    paths = sorted(K8S.glob("ray*.yaml"))
    assert [p.name for p in paths] == ["ray-cluster.yaml", "ray-curation-job.yaml"]
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def _cluster_specs(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def test_kuberay_manifests_use_known_fields_and_the_pinned_ray(tmp_path) -> None:
    import json
    import subprocess
    import sys

    import ray
    import yaml

    docs = _kuberay_documents()
    plain, templates = [], []
    for doc in docs:
        if doc["apiVersion"] != "ray.io/v1":
            plain.append(doc)  # core kinds (the params ConfigMap) validate as they are
            continue
        assert set(doc["spec"]) <= KUBERAY_FIELDS[doc["kind"]], doc["kind"]
        spec = _cluster_specs(doc)
        assert set(spec) <= KUBERAY_FIELDS["RayCluster"]
        assert spec["rayVersion"] == ray.__version__  # the image's Ray must be the driver's
        assert set(spec["headGroupSpec"]) <= HEAD_FIELDS
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_FIELDS and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for name, group in groups:
            # Every pod template is a real PodTemplateSpec: validated by the Kubernetes schemas.
            templates.append({"apiVersion": "v1", "kind": "PodTemplate", "template": group["template"],
                              "metadata": {"name": f"{doc['metadata']['name']}-{name}", "namespace": "tulu"}})
            pod = group["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] and pod["serviceAccountName"] == "tulu-pipeline"
            (container,) = pod["containers"]
            assert container["resources"]["requests"] == container["resources"]["limits"]
            assert {"secretRef": {"name": "tulu-object-store"}} in container["envFrom"]
        if doc["kind"] == "RayJob":
            assert doc["spec"]["entrypoint"].startswith("python -m tulu_pipeline.curation.ray_job --params ")
    params = next(d for d in plain if d["kind"] == "ConfigMap")
    job_params = json.loads(params["data"]["params.json"])
    from tulu_pipeline.curation.config import CurationConfig
    from tulu_pipeline.curation.ray_job import STAGES
    assert job_params["stage"] in STAGES
    CurationConfig(**job_params["config"])  # the params parse as a curation config

    path = tmp_path / "kuberay-core.yaml"
    path.write_text(yaml.safe_dump_all(plain + templates))
    cli = Path(sys.executable).with_name("kubernetes-validate")
    if not cli.exists():
        pytest.fail("kubernetes-validate is not installed: it is in the `dev` extra")
    result = subprocess.run([str(cli), "--strict", "--kubernetes-version", "1.30.0", str(path)], check=False,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "WARN" not in output, output
    assert output.count("passed for resource") == len(plain) + len(templates), output


def test_a_failing_shard_publishes_nothing_and_stops_the_shards_not_yet_started(
        raw_home: Path, ray_local, tmp_path: Path) -> None:
    store = _copy(raw_home, "failing")
    ran = tmp_path / "ran"
    ran.mkdir()

    def fail(step: str, shard: int) -> None:
        if shard == 2:
            raise ValueError(f"injected failure in {step} shard {shard}")
        (ran / str(shard)).touch()
        time.sleep(0.3)  # the driver sees the failure while most shards are still queued

    config = _config("ray", shard_rows=50)
    shards = -(-sum(store.dataset_info(raw_dataset_name(s)).rows for s in TRAIN) // 50)
    with pytest.raises(Exception, match="injected failure in normalize shard 2"):
        normalize_prompts_ray(store, config, "run-1", shard_hook=fail)
    assert store.latest_version("normalized_prompts") is None
    assert not _events(store, "normalized_prompts")
    assert not store.fs.find(store.path(RAY_DIR))  # the other shards' files are gone too
    # The queued shards saw the abort marker and returned without running (no ray.cancel: it can crash
    # the driver when it races a task's completion).
    assert shards >= 20 and 0 < len(list(ran.iterdir())) < shards / 2


def test_components_on_the_workers_match_a_union_find(tmp_path) -> None:
    """The star rounds and labelling tasks, run in-process over 3 partitions: a long path with ids in
    random order (the most rounds), a 1,000-node star, random sparse graphs and isolated pairs."""
    import random

    from tulu_pipeline.curation import ray_executor as rx

    rng = random.Random(5)
    ids = [f"r{i:05d}" for i in range(3_000)]
    rng.shuffle(ids)
    edges = list(zip(ids[:300], ids[1:300]))                       # a path of 300 nodes
    edges += [(ids[300], ids[k]) for k in range(301, 1_300)]        # a star of 1,000
    pool = ids[1_300:2_800]
    edges += [(rng.choice(pool), rng.choice(pool)) for _ in range(1_200)]  # random sparse graph
    edges += list(zip(ids[2_800::2], ids[2_801::2]))                # pairs
    edges = sorted({tuple(sorted(e)) for e in edges if e[0] != e[1]})
    homes = {node: rng.randrange(4) for edge in edges for node in edge}

    store, staging, partitions = Store(str(tmp_path / "home")), "_ray/cc", 3
    reducers = [rx.Shard(p, "", "", "", 0, 0) for p in range(partitions)]
    rx._write_edges(store, rx._shard_file(staging, 0, "cc-000.parquet"), edges, partitions)
    for p in (1, 2):
        rx._write_edges(store, rx._shard_file(staging, p, "cc-000.parquet"), [], partitions)
    for p in range(partitions):
        nodes = [{"partition": rx._partition(n, partitions), "row_id": n, "shard": s}
                 for n, s in homes.items() if p == 0]
        rx._write_partitioned(store, rx._shard_file(staging, p, "nodes.parquet"), nodes, rx.NODE_SCHEMA)
    round_, large = 0, True
    while not all([rx._star_round(store, r, staging, round_=round_, partitions=partitions, large=large)["stars"]
                   for r in reducers]):
        round_, large = round_ + 1, not large
        assert round_ < 60
    for r in reducers:
        rx._label_nodes(store, r, staging, round_=round_, partitions=partitions)
    labels = {}
    for shard in range(4):
        table = rx._read_partition(store, [rx._shard_file(staging, p, "labels.parquet") for p in range(partitions)],
                                   shard)
        for row in table.to_pylist():
            assert homes[row["row_id"]] == shard
            labels[row["row_id"]] = row["cluster"]

    parent = {n: n for n in homes}

    def find(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert labels == {n: find(n) for n in homes}  # each cluster named by its least row id
    assert len(set(labels.values())) > 100 and round_ > 2


def test_an_empty_pool_publishes_an_empty_dataset_quarantine_and_ledger(tmp_path, ray_local) -> None:
    results = {}
    for executor in ("local", "ray"):
        store = Store(str(tmp_path / executor))
        store.write_dataset("normalized_prompts", "empty", iter([]), ROW_SCHEMA)
        result = pipeline.deduplicate_prompts(store, CurationConfig(executor=executor), "run-1")
        assert list(store.iter_rows("deduplicated_prompts")) == []
        assert list(store.iter_jsonl_parts(stages.quarantine_dir("deduplicated_prompts", result.version))) == []
        results[executor] = (result.version, result.dataset.rows, result.ledger_events, result.stats)
    assert results["ray"] == results["local"]
    assert results["local"][1:3] == (0, 0)


def test_bucket_reducers_follow_the_pool_and_each_holds_about_the_configured_records(tmp_path, ray_local) -> None:
    """With few band records allowed per reducer, the band shuffle uses more bucket reducers than
    partitions (a power of two), each holding about the configured number, and the answers are the local
    path's: chains, a 1,000-row cluster and cross-source duplicates over 16 shards."""
    pools, _ = _planted_pool([])
    rows = pools["code_alpaca"] + pools["hh_rlhf_harmless"]
    homes = {name: Store(str(tmp_path / name)) for name in ("local", "ray")}
    for store in homes.values():
        store.write_dataset("normalized_prompts", "planted", (rows[i:i + 500] for i in range(0, len(rows), 500)),
                            ROW_SCHEMA)
    per_reducer = 1_000
    settings = RaySettings(shard_rows=128, partition_rows=1, shuffle_partitions=4,
                           max_band_records_per_reducer=per_reducer)
    config = CurationConfig(train_sources=list(pools), executor="ray", ray=settings)
    local = pipeline.deduplicate_prompts(homes["local"], config.model_copy(update={"executor": "local"}), "run-1")
    events: list[dict] = []
    result = deduplicate_prompts_ray(homes["ray"], config, "run-1", progress=events.append)

    assert (result.version, result.dataset.rows, result.quarantined, result.ledger_events, result.stats,
            result.samples, result.text_lengths) == (local.version, local.dataset.rows, local.quarantined,
                                                     local.ledger_events, local.stats, local.samples,
                                                     local.text_lengths)
    on_ray, in_process = homes["ray"], homes["local"]
    assert list(on_ray.iter_rows("deduplicated_prompts")) == list(in_process.iter_rows("deduplicated_prompts"))
    rel = stages.quarantine_dir("deduplicated_prompts", local.version)
    assert list(on_ray.iter_jsonl_parts(rel)) == list(in_process.iter_jsonl_parts(rel))
    assert _events(on_ray) == _events(in_process)
    assert local.stats["near_duplicates"] >= 1_000

    # 16 shards, and shuffle_partitions caps the later shuffles' partitions at 4.
    assert len(plan_shards(on_ray, {"normalized_prompts": "planted"}, 128)) >= 15
    assert result.ray_metrics["partitions"] == 4
    clusters = next(e for e in events if e.get("step") == "clusters")
    reducers = clusters["bucket_reducers"]
    assert reducers == result.ray_metrics["bucket_reducers"]
    assert reducers > 4 and reducers & (reducers - 1) == 0  # more than the partitions, a power of two
    assert reducers // 2 < clusters["bucket_records"] / per_reducer <= reducers  # the least that holds them
    # What each reducer received, from the pool: every band record, by its bucket's slot & (reducers - 1).
    from tulu_pipeline.curation import ray_executor as rx

    dedup = Deduplicator(config.dedup, MemorySink())
    buckets: Counter = Counter()
    for row in rows:
        digest, minhash = dedup.signature(row)
        buckets.update(rx._buckets(digest, minhash.hashvalues, lsh_bands(config.dedup)))
    expected, hot = [0] * reducers, [0] * reducers
    for bucket, size in buckets.items():
        r = rx._partition(bucket, rx.BAND_SLOTS) & (reducers - 1)
        expected[r] += size
        hot[r] += size if size >= 100 else 0  # the buckets the 1,000 variants share (one per band)
    received = {u["shard"]: u["rows"] for u in result.ray_metrics["usage"] if u["step"] == "buckets"}
    assert [received.get(r, 0) for r in range(reducers)] == expected
    assert sum(expected) == clusters["bucket_records"] <= reducers * per_reducer  # the bound holds on average
    # A bucket is never split, so a reducer also holds all of its largest buckets' records: here the
    # cluster's shared buckets. Without them, no reducer gets more than the configured records.
    assert max(e - h for e, h in zip(expected, hot)) <= per_reducer
    assert max(expected) <= 4 * per_reducer


def test_the_bucket_reducers_are_the_least_power_of_two_over_partitions_and_records() -> None:
    from tulu_pipeline.curation.ray_executor import BAND_SLOTS, _bucket_reducers

    assert _bucket_reducers(0, 1, 4_000_000) == 1
    assert _bucket_reducers(240_000, 5, 4_000_000) == 8  # the partitions decide on a small pool
    assert _bucket_reducers(24_360, 4, 1_000) == 32      # records / per reducer (25) decide past them
    assert _bucket_reducers(32_000, 4, 1_000) == 32 and _bucket_reducers(32_001, 4, 1_000) == 64
    assert _bucket_reducers(12 * 10**9, 256, 4_000_000) == 4_096
    assert _bucket_reducers(10**15, 256, 4_000_000) == BAND_SLOTS  # capped at the slots


def test_the_shuffle_partitions_follow_the_pools_rows_up_to_the_shards_and_the_cap() -> None:
    from tulu_pipeline.curation.ray_executor import Shard, _shuffle_partitions

    def shards(count: int, rows: int) -> list[Shard]:
        return [Shard(i, "d", "v", "p", 0, rows) for i in range(count)]

    settings = RaySettings()  # one partition per 50,000 rows, at most 256
    assert _shuffle_partitions([], settings) == 1
    assert _shuffle_partitions(shards(401, 5_000), settings) == 41      # 2M rows in small shards: the rows decide
    assert _shuffle_partitions(shards(40, 50_000), settings) == 40      # default shards: one per shard
    assert _shuffle_partitions(shards(20_000, 50_000), settings) == 256  # 10^9 rows: the cap
    assert _shuffle_partitions(shards(3, 100_000), settings) == 3       # never more than the shards
    assert _shuffle_partitions(shards(16, 128), RaySettings(partition_rows=1, shuffle_partitions=4)) == 4
