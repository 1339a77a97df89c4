"""The curation stages on Ray: the same library steps, shard by shard on a Ray cluster, as Ray tasks,
with the band-bucket shuffle through Ray Data.

`pipeline.normalize_prompts` / `deduplicate_prompts` / `decontaminate_prompts` call into this module
when ``CurationConfig.executor == "ray"``; they publish the same datasets, quarantines and ledger
events (same row ids, decisions, order and ``seq``) as the in-process path.

**Shards.** An input dataset is cut into shards of ``ray.shard_rows`` rows (`plan_shards`, from
the Parquet footers only), in the order the local path reads it. A task processes one shard with
the library step (`Normalizer`, `Decontaminator`, `Deduplicator.signature`) and writes its outputs
under ``_ray/<stage>/<version>/<run_id>/`` in TULU_HOME, each file written atomically under a name
fixed by the shard index, so a task re-run by Ray (``max_retries``) replaces its files.

**Parallel publish.** Each publishing task writes its part of the output dataset, of the quarantine
and of the ledger. Every step records exactly one event per row it reads, so the ``seq`` of a
part's first event is the prefix sum of the rows before it, known before the tasks run (dedup:
after the ranges are counted); its events carry the driver's `LedgerWriter` run and timestamp
(`EventPart`). The driver's work is O(parts): it renames the parts listed in the task results into
the dataset (`Store.commit_dataset`, one directory rename with ``_dataset.json``), the quarantine
(`Store.commit_jsonl_parts`) and the ledger run (`LedgerWriter.adopt_parts`, published by its
commit), and merges the shards' stats, samples and text lengths. Read in order, the parts are the
local path's rows and events.

**Global near-duplicate removal** (`deduplicate_prompts_ray`) keeps the local keep rule exactly:

1. per shard, every row's sha256 and MinHash (`Deduplicator.signature`) are written beside the
   shard with the shard sorted in `dedup_order`, one record per LSH band (``bucket`` = hash of band
   index and band values; the digest without near dedup) is emitted, and a sample of its order keys
   is returned; the driver cuts the keep order into publish ranges at quantiles of the samples;
2. the shuffle: each signature task returns its band records (with the bucket's slot, a hash of
   the bucket mod ``BAND_SLOTS``) as an Arrow table that stays in the object store, not in
   TULU_HOME. The number of bucket reducers follows the pool: once the signatures are done the
   driver knows the band records, and takes R, the least power of two that is at least the
   partitions and the records / ``ray.max_band_records_per_reducer`` (`_bucket_reducers`), so the
   reducers hold at most that many records on average (~220 MB of Arrow by default) however large
   the pool (one bucket is never split: a bucket shared by many rows all lands in one reducer, on
   top of its share). Ray Data adds each record's reducer, ``slot & (R - 1)`` (a vectorized
   ``map_batches``), and groups by it (``groupby(...).map_groups``, its hash shuffle through the
   object store, spilled by Ray past the object store's memory); each reducer turns every bucket
   with two or more rows into edges of the candidate-pair graph (its edges, sorted sets, do not
   depend on the order the shuffle delivers them in). The edges and their nodes are written as
   files under the reducer's index, partitioned by node hash, for the later steps, whose shuffles
   still go through TULU_HOME (the first component round reads R files, the later ones
   ``partitions``: one per ``ray.partition_rows`` rows of the pool, at most
   ``ray.shuffle_partitions``). Its connected components are computed on the workers, by rounds of
   large-star / small-star (`_star_round`, each a shuffle of the edges by node hash) until every
   component is a star around its least row id, which names the cluster; the labels go back
   partitioned by each row's home shard, so the driver never holds one entry per candidate row;
3. per shard, the sorted rows are cut into the publish ranges (and counted per range), and the
   members of each cluster, with their signatures, are partitioned by cluster and resolved by a
   `Deduplicator` fed in `dedup_order`: two rows can only interact when they share a band, so
   running the rule over the clusters gives the decisions the single pass gives;
4. one task per range merges its rows from every shard in `dedup_order`, records every decision
   with `Deduplicator.apply` and writes its part of the kept rows, quarantine and ledger.

**Decontamination** builds the eval n-gram index once on the driver and puts it in the object
store; each worker process reads it once (numpy buffers are shared, not copied) and streams its
shard through `Decontaminator` in batches, so a worker holds one shard at most. An index over
``ray.eval_index_max_bytes`` is split by n-gram hash (`EvalIndex.partition`) into parts, one actor
each; a shard task sends each batch's texts to every part, gets back the windows that equal one of
the part's n-grams and scores their union with the head (`ShardedEvalIndex`): the same matches,
with no worker holding more than one part.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tulu_pipeline.curation.config import CurationConfig, RaySettings
from tulu_pipeline.curation.decontaminate import (
    DecontamConfig,
    Decontaminator,
    DecontamStats,
    ShardedEvalIndex,
    EvalIndex,
)
from tulu_pipeline.curation.dedup import (
    DedupConfig,
    Deduplicator,
    dedup_order_key,
    source_ranks,
    lsh_bands,
)
from tulu_pipeline.curation.normalize import NormalizeConfig, Normalizer
from tulu_pipeline.curation.stages import (
    QUARANTINE_SCHEMA,
    EventSampler,
    StageResult,
    build_eval_index,
    decontamination_version,
    dropped_record,
    input_version,
    quarantine_dir,
    quarantine_record,
    stage_version,
    train_specs,
)
from tulu_pipeline.data.ingest import raw_dataset_name
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.process_memory import peak_rss_mb
from tulu_pipeline.provenance.ledger import EventPart, LedgerWriter, MemorySink
from tulu_pipeline.storage import Store

RAY_DIR = "_ray"  # per-run shard outputs under TULU_HOME, removed once the stage is published
_ABORTED = "_aborted"  # marker in a run's staging dir: a shard failed, tasks not yet started return at once
_ABORT_WAIT_S = 600  # how long a failed run waits for its running tasks before removing the staging dir

# progress(event): one dict per finished shard (and per dedup step); the Pipes job streams them to Dagster.
Progress = Callable[[dict[str, Any]], None]
# shard_hook(step, shard_index): runs in the worker once a shard's outputs are published (fault tests).
ShardHook = Callable[[str, int], None]


class _NoSink:
    def record(self, *args: Any, **kwargs: Any) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Ray session
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_session(settings: RaySettings) -> Iterator[None]:
    """Connect to ``settings.address`` (or ``$RAY_ADDRESS``), or start a local Ray for the block.

    A Ray already initialized in this process (a test fixture, a Ray job's driver) is used as is and
    left running; one started here is shut down when the block exits.
    """
    import ray

    if ray.is_initialized():
        _configure_data_context()
        yield
        return
    address = settings.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=settings.num_cpus, object_store_memory=settings.object_store_memory,
                 include_dashboard=False, log_to_driver=False)
    try:
        _configure_data_context()
        yield
    finally:
        ray.shutdown()


def _configure_data_context() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the sorted pool must reach the driver in order
    ctx.enable_progress_bars = False  # the Pipes job reports progress itself


def _remote_args(settings: RaySettings) -> dict[str, Any]:
    # A shard that kills every worker (out of memory) must fail the run, not be retried forever (Ray
    # Data's default for its tasks; max_retries is only accepted there as a raw remote arg).
    return {"num_cpus": 1, "max_retries": settings.max_retries}


@contextlib.contextmanager
def _quiet_remote_args() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        yield


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of one Parquet part of a published dataset."""

    index: int
    dataset: str
    version: str
    part: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(store: Store, inputs: dict[str, str], shard_rows: int) -> list[Shard]:
    """Shards of at most ``shard_rows`` rows over ``inputs``, in the order the local path reads them.

    Only Parquet footers are read here; a worker reads the row groups its shard overlaps.
    """
    shards: list[Shard] = []
    for name, version in inputs.items():
        info = store.dataset_info(name, version)
        for part in info.parts:
            with store.fs.open(store.path(store.dataset_dir(name, version), part), "rb") as handle:
                rows = pq.ParquetFile(handle).metadata.num_rows
            for start in range(0, rows, shard_rows):
                shards.append(Shard(len(shards), name, version, part, start, min(rows, start + shard_rows)))
    return shards


def read_shard(store: Store, shard: Shard) -> Iterator[dict[str, Any]]:
    """The rows of ``shard``, one overlapping row group at a time."""
    with store.fs.open(store.path(store.dataset_dir(shard.dataset, shard.version), shard.part), "rb") as handle:
        parquet = pq.ParquetFile(handle)
        offset = 0
        for group in range(parquet.metadata.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            lo, hi = max(shard.start, offset), min(shard.stop, offset + size)
            if lo < hi:
                yield from parquet.read_row_group(group).slice(lo - offset, hi - lo).to_pylist()
            offset += size
            if offset >= shard.stop:
                break


def _shard_of(item: dict[str, Any]) -> Shard:
    return Shard(**{k: item[k] for k in Shard.__dataclass_fields__})


def _shard_file(staging: str, index: int, kind: str) -> str:
    return posixpath.join(staging, f"shard-{index:06d}.{kind}")


def _write_parquet(store: Store, rel: str, rows: Iterable[dict[str, Any]], schema: pa.Schema,
                   batch_size: int = 5_000) -> int:
    count = 0
    with store.atomic_open(rel, "wb") as handle:
        writer = pq.ParquetWriter(handle, schema)
        try:
            batch: list[dict[str, Any]] = []
            for row in rows:
                batch.append(row)
                if len(batch) >= batch_size:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    count, batch = count + len(batch), []
            if batch or not count:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
        finally:
            writer.close()
    return count


def _read_parquet(store: Store, rel: str) -> Iterator[dict[str, Any]]:
    with store.fs.open(store.path(rel), "rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=5_000):
            yield from batch.to_pylist()


def _write_jsonl(store: Store, rel: str, records: Iterable[dict[str, Any]]) -> None:
    with store.atomic_open(rel, "wb") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True, default=str).encode() + b"\n")


def _sizes(store: Store, *rels: str) -> int:
    """Bytes of the intermediate files a task wrote for a later step (the shuffle volume)."""
    return sum(store.fs.size(store.path(rel)) for rel in rels)


def _worker_usage(started_cpu: float, started_wall: float) -> dict[str, Any]:
    """CPU and wall seconds of this task, and the worker process's peak resident memory."""
    return {"cpu_s": time.process_time() - started_cpu, "wall_s": time.perf_counter() - started_wall,
            "peak_rss_mb": peak_rss_mb(), "pid": os.getpid()}


# ---------------------------------------------------------------------------------------------
# running shard tasks
# ---------------------------------------------------------------------------------------------
class _Run:
    """One stage's Ray run: its staging directory, settings and progress reporting."""

    def __init__(self, store: Store, config: CurationConfig, stage: str, version: str, run_id: str,
                 progress: Progress | None, shard_hook: ShardHook | None):
        self.store, self.config, self.stage, self.version = store, config, stage, version
        self.staging = posixpath.join(RAY_DIR, stage, version, "".join(c if c.isalnum() or c in "-_." else "_"
                                                                        for c in run_id))
        self.progress, self.shard_hook = progress, shard_hook
        self.usage: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}  # figures of the run's plan (e.g. dedup's bucket reducers), in metrics
        self.started = time.perf_counter()

    def report(self, **event: Any) -> None:
        if self.progress is not None:
            self.progress({"event": "curation_progress", "stage": self.stage,
                           "elapsed_s": round(time.perf_counter() - self.started, 3), **event})

    def _task_kwargs(self, step: str, fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"fn": fn, "root": self.store.url, "staging": self.staging, "step": step, "hook": self.shard_hook,
                "kwargs": kwargs}

    def _collect(self, step: str, results: Iterable[dict[str, Any]], total: int) -> list[dict[str, Any]]:
        """The tasks' results as they finish, each recorded in ``usage`` and reported; in shard order."""
        done: list[dict[str, Any]] = []
        rows = 0
        for result in results:
            done.append(result)
            rows += result["rows_in"]
            self.usage.append({"step": step, "shard": result["shard"], "rows": result["rows_in"],
                               "shuffle_bytes": result.get("shuffle_bytes", 0), **result["usage"]})
            self.report(step=step, shards_done=len(done), shards=total, rows_done=rows)
        return sorted(done, key=lambda r: r["shard"])

    def map_shards(self, step: str, shards: list[Shard], fn: Callable[..., dict[str, Any]],
                   **kwargs: Any) -> list[dict[str, Any]]:
        """Run ``fn(shard item, ...)`` once per shard as a Ray task; results in shard order."""
        return self._run_tasks(step, shards, fn, kwargs, tables=False)[0]

    def map_shards_to_tables(self, step: str, shards: list[Shard], fn: Callable[..., dict[str, Any]],
                             **kwargs: Any) -> tuple[list[dict[str, Any]], list[Any]]:
        """`map_shards` for a step whose tasks also output an Arrow table (``result["table"]``), left in the
        object store. Returns the results and the tables' object refs, both in shard order; the driver owns
        the refs, so Ray rebuilds a lost table by re-running its task."""
        return self._run_tasks(step, shards, fn, kwargs, tables=True)

    def _run_tasks(self, step: str, shards: list[Shard], fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any],
                   *, tables: bool) -> tuple[list[dict[str, Any]], list[Any]]:
        # Plain Ray tasks, not a Ray Data map: a Dataset execution costs the driver ~7-13 ms of CPU per
        # task, a task ~0.3 ms (benchmarks/CURATION_AT_SCALE.md), and the driver's time is what limits
        # a billion-row pool. The step's arguments go to the object store once, not once per task.
        import ray

        if not shards:
            return [], []
        shared = ray.put(self._task_kwargs(step, fn, kwargs))
        task = ray.remote(_table_task if tables else _plain_task).options(
            num_returns=2 if tables else 1, **_remote_args(self.config.ray))
        refs = [task.remote(asdict(shard), shared) for shard in shards]
        results = [ref[0] for ref in refs] if tables else refs

        def finished() -> Iterator[dict[str, Any]]:
            pending = results
            while pending:
                # All that finished within a second: one wait per second, not one per task, over all the refs.
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
                for result in ray.get(ready):
                    yield json.loads(result)

        try:
            return self._collect(step, finished(), len(shards)), [ref[1] for ref in refs] if tables else []
        except BaseException:
            # A failed shard fails the run. The others stop cooperatively (a task not yet started sees the
            # marker and returns at once; a running one finishes its shard) before the staging dir goes:
            # ray.cancel can crash the driver when it races a task's completion (ray-project/ray#54846).
            self.store.write_bytes(f"{self.staging}/{_ABORTED}", b"")
            ray.wait(results, num_returns=len(results), timeout=_ABORT_WAIT_S)
            raise

    def map_groups(self, step: str, tables: list[Any], groups: int, schema: pa.Schema,
                   fn: Callable[..., dict[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
        """Run ``fn(group)`` once per group ``slot & (groups - 1)`` of the rows of ``tables`` (object refs
        to Arrow tables with a ``slot`` column in ``range(BAND_SLOTS)``; ``groups`` a power of two up to
        ``BAND_SLOTS``), grouped by Ray Data's shuffle through the object store; ``fn`` gets its group as
        the ``table`` keyword (with a ``group`` column added). Results in group order; a group with no rows
        is never a group, so ``fn`` runs for it on the driver with an empty table of ``schema`` (its outputs
        must exist for the next step)."""
        import ray.data

        assert groups & (groups - 1) == 0 and 0 < groups <= BAND_SLOTS, groups
        results: list[dict[str, Any]] = []
        if tables:
            with _quiet_remote_args():
                remote = _remote_args(self.config.ray)
                # Batches of up to a reducer's share of records: Ray Data bundles several shards' tables
                # into one map task, and its driver-side cost is per task (~9 ms a table unbundled, ~1.5 ms
                # bundled; benchmarks/CURATION_AT_SCALE.md).
                ds = ray.data.from_arrow_refs(tables).map_batches(
                    _group_column, batch_format="pyarrow", fn_kwargs={"groups": groups},
                    batch_size=self.config.ray.max_band_records_per_reducer,
                    udf_modifying_row_count=False, **remote,
                ).groupby("group", num_partitions=groups).map_groups(
                    _group_task, batch_format="pyarrow", fn_kwargs=self._task_kwargs(step, fn, kwargs), **remote)
                results = self._collect(step, (json.loads(row["result"]) for row in ds.iter_rows()), groups)
        seen = {r["shard"] for r in results}
        for p in range(groups):
            if p not in seen:
                fn(self.store, Shard(p, "", "", "", 0, 0), self.staging, table=schema.empty_table(), **kwargs)
        return results

    def parts(self, results: list[dict[str, Any]], kind: str, count: str) -> list[tuple[str, int]]:
        """Each shard's staged ``kind`` file with its row count (``result[count]``), in shard order."""
        return [(_shard_file(self.staging, r["shard"], kind), r[count]) for r in results]

    def publish(self, ledger: LedgerWriter, results: list[dict[str, Any]], dataset: str, rows_file: str,
                inputs: Any) -> Any:
        """Commit the shards' ledger parts, then their rows as ``dataset`` (one rename each): O(shards) work."""
        ledger.adopt_parts(self.parts(results, "events.parquet", "events"))
        return self.store.commit_dataset(dataset, self.version, self.parts(results, rows_file, "rows_out"),
                                         ROW_SCHEMA, inputs=inputs)

    def cleanup(self) -> None:
        if self.store.exists(self.staging):
            self.store.fs.rm(self.store.path(self.staging), recursive=True)

    def metrics(self) -> dict[str, Any]:
        """Per-shard CPU, wall time and worker memory of this run (benchmarks and Pipes metadata)."""
        cpu = sum(u["cpu_s"] for u in self.usage)
        return {"wall_s": round(time.perf_counter() - self.started, 3), "task_cpu_s": round(cpu, 3),
                "shards": len({(u["step"], u["shard"]) for u in self.usage}),
                "workers": len({u["pid"] for u in self.usage}),
                "peak_worker_rss_mb": round(max((u["peak_rss_mb"] for u in self.usage), default=0.0), 1),
                **self.counts}


def _run_task(shard: Shard, *, fn: Callable[..., dict[str, Any]], root: str, staging: str, step: str,
              hook: ShardHook | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    result = fn(Store(root), shard, staging, **kwargs)
    if hook is not None:
        hook(step, shard.index)
    result.update(shard=shard.index, usage=_worker_usage(started_cpu, started_wall))
    return result


def _shard_task(item: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    shard = _shard_of(item)
    if Store(task["root"]).exists(task["staging"], _ABORTED):
        return {"aborted": True, "shard": shard.index}  # another shard failed: the run is being cleaned up
    return _run_task(shard, **task)


def _plain_task(item: dict[str, Any], task: dict[str, Any]) -> str:
    # JSON, as the group tasks' results are (Ray Data infers block schemas from values): one decoding.
    return json.dumps(_shard_task(item, task), default=str)


def _table_task(item: dict[str, Any], task: dict[str, Any]) -> tuple[str, pa.Table | None]:
    result = _shard_task(item, task)
    table = None if result.get("aborted") else result.pop("table")
    return json.dumps(result, default=str), table


def _group_column(batch: pa.Table, *, groups: int) -> pa.Table:
    """The group key of `_Run.map_groups`, vectorized: ``group = slot & (groups - 1)``."""
    return batch.append_column("group", pc.bit_wise_and(batch.column("slot"), pa.scalar(groups - 1, pa.int32())))


def _group_task(group: pa.Table, **task: Any) -> pa.Table:
    """One group of `_Run.map_groups`: the task of group ``group["group"][0]``."""
    index = group.column("group")[0].as_py()
    task["kwargs"] = {**task["kwargs"], "table": group}
    result = _run_task(Shard(index, "", "", "", 0, 0), **task)
    return pa.table({"result": [json.dumps(result, default=str)]})


def _add_counts(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Sum nested dicts of counts (stats of several shards)."""
    for key, value in part.items():
        if isinstance(value, dict):
            total[key] = _add_counts(total.get(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def _sorted_dicts(value: Any) -> Any:
    return {k: _sorted_dicts(v) for k, v in sorted(value.items())} if isinstance(value, dict) else value


def _seq_offsets(counts: Iterable[int]) -> list[int]:
    """The ``seq`` of each part's first event: the prefix sum of the parts' event counts."""
    offsets, total = [], 0
    for count in counts:
        offsets.append(total)
        total += count
    return offsets


def _write_events(store: Store, rel: str, spec: EventPart, first_seq: int, events: list[dict[str, Any]],
                  rows: int, what: str) -> int:
    # seq comes from a prefix sum over rows planned before the tasks ran: it holds because every
    # step records exactly one event per row it reads.
    if len(events) != rows:
        raise RuntimeError(f"{what}: {len(events)} ledger events for {rows} rows; the step must record exactly "
                           "one event per row for the shards' seq ranges to line up")
    return replace(spec, first_seq=first_seq).write(store, rel, events)


def _summaries(results: list[dict[str, Any]], size: int = 5) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The first ``size`` output rows over the parts in part order, and the rows per text length summed
    (what `EventSampler` gives the local path)."""
    samples = list(chain.from_iterable(r["samples"] for r in results))[:size]
    lengths: Counter[int] = Counter()
    for result in results:
        lengths.update({int(length): n for length, n in result["lengths"]})
    return samples, dict(lengths)


def _summary(sampler: EventSampler) -> dict[str, Any]:
    return {"samples": sampler.samples, "lengths": sorted(sampler.lengths.items())}


# ---------------------------------------------------------------------------------------------
# normalization
# ---------------------------------------------------------------------------------------------
def _normalize_shard(store: Store, shard: Shard, staging: str, *, config: dict[str, Any], events: EventPart,
                     offsets: list[int]) -> dict[str, Any]:
    sink = MemorySink()
    normalizer = Normalizer(NormalizeConfig(**config), sink)
    sampler = EventSampler()
    rows_out = _write_parquet(store, _shard_file(staging, shard.index, "rows.parquet"),
                              sampler(normalizer(read_shard(store, shard))), ROW_SCHEMA)
    _write_jsonl(store, _shard_file(staging, shard.index, "dropped.jsonl"),
                 (dropped_record(d) for d in normalizer.dropped))
    count = _write_events(store, _shard_file(staging, shard.index, "events.parquet"), events, offsets[shard.index],
                          sink.events, shard.rows, f"normalize shard {shard.index}")
    return {"rows_in": normalizer.stats["rows_in"], "rows_out": rows_out, "dropped": len(normalizer.dropped),
            "events": count, "stats": normalizer.stats, **_summary(sampler)}


def normalize_prompts_ray(store: Store, config: CurationConfig, run_id: str, progress: Progress | None = None,
                          shard_hook: ShardHook | None = None):
    """`pipeline.normalize_prompts` on Ray: one task per shard of the raw training datasets, each writing its
    part of the dataset, quarantine and ledger; the driver commits the parts."""
    specs = train_specs(config)
    inputs = {raw_dataset_name(s.id): input_version(store, raw_dataset_name(s.id)) for s in specs}
    version = stage_version("normalized_prompts", config.normalize.model_dump(), inputs)
    run = _Run(store, config, "normalized_prompts", version, run_id, progress, shard_hook)
    try:
        with LedgerWriter(store, "curation", "normalized_prompts", version, run_id) as ledger:
            with ray_session(config.ray):
                shards = plan_shards(store, inputs, config.ray.shard_rows)
                results = run.map_shards("normalize", shards, _normalize_shard, config=config.normalize.model_dump(),
                                         events=ledger.part_spec(0), offsets=_seq_offsets(s.rows for s in shards))
            run.report(step="publish")
            info = run.publish(ledger, results, "normalized_prompts", "rows.parquet", inputs)
            quarantine = store.commit_jsonl_parts(quarantine_dir("normalized_prompts", version),
                                                  run.parts(results, "dropped.jsonl", "dropped"))
    finally:
        run.cleanup()
    stats: dict[str, Any] = {"rows_in": 0, "rows_out": 0, "changed": 0, "dropped_by_reason": {}, "changes": {}}
    for result in results:
        _add_counts(stats, result["stats"])
    samples, lengths = _summaries(results)
    result = StageResult("normalized_prompts", version, info, _sorted_dicts(stats), samples, lengths,
                         ledger.count, quarantine, sum(r["dropped"] for r in results), inputs)
    _attach_metrics(result, run)
    return result


def _attach_metrics(result: Any, run: _Run) -> None:
    # Kept apart from `stats` (which must equal the local path's): how the run went on Ray.
    result.ray_metrics = {**run.metrics(), "rows": result.dataset.rows, "usage": run.usage}


# ---------------------------------------------------------------------------------------------
# deduplication
# ---------------------------------------------------------------------------------------------
SIGNATURE_SCHEMA = pa.schema([
    pa.field("row_id", pa.string()), pa.field("source", pa.string()), pa.field("rank", pa.int64()),
    pa.field("ground_truth", pa.string()), pa.field("digest", pa.binary()), pa.field("hashvalues", pa.binary()),
])
# Band records: ``slot`` is a hash of the bucket mod BAND_SLOTS; the bucket reducer of a record is
# ``slot & (R - 1)`` for R (a power of two) reducers chosen from the pool's band records (`_bucket_reducers`).
BAND_SLOTS = 1 << 16
BUCKET_SCHEMA = pa.schema([pa.field("slot", pa.int32()), pa.field("bucket", pa.binary()),
                           pa.field("row_id", pa.string()), pa.field("shard", pa.int32())])
MEMBER_SCHEMA = SIGNATURE_SCHEMA.append(pa.field("cluster", pa.string())).append(pa.field("partition", pa.int32()))
# Candidate-pair graph, each undirected edge stored twice, partitioned by hash of its first end ``a``.
EDGE_SCHEMA = pa.schema([pa.field("partition", pa.int32()), pa.field("a", pa.string()), pa.field("b", pa.string())])
NODE_SCHEMA = pa.schema([pa.field("partition", pa.int32()), pa.field("row_id", pa.string()),
                         pa.field("shard", pa.int32())])
# A candidate row's cluster (the least row id of its component), partitioned by the row's shard.
LABEL_SCHEMA = pa.schema([pa.field("partition", pa.int32()), pa.field("row_id", pa.string()),
                          pa.field("cluster", pa.string())])
MAX_STAR_ROUNDS = 200  # large-star/small-star converges in O(log^2 n) rounds; this only stops a bug
DECISION_SCHEMA = pa.schema([pa.field("row_id", pa.string()), pa.field("duplicate_of", pa.string()),
                             pa.field("kind", pa.string()), pa.field("jaccard", pa.float64()),
                             pa.field("partition", pa.int32())])
RANGED_SCHEMA = ROW_SCHEMA.append(pa.field("partition", pa.int32()))
KEY_SAMPLES = 64  # keys per shard from which the publish ranges are cut


def _buckets(digest: bytes, hashvalues: np.ndarray | None, bands: tuple[int, int]) -> list[bytes]:
    """The LSH buckets a row falls in: one per band (or its digest without near dedup)."""
    if hashvalues is None:
        return [digest]
    b, r = bands
    # Same bands as datasketch's MinHashLSH (values [i*r, (i+1)*r)); the band index keeps bands apart.
    return [hashlib.blake2b(i.to_bytes(2, "little") + hashvalues[i * r:(i + 1) * r].tobytes(),
                            digest_size=16).digest() for i in range(b)]


def _partition(key: bytes | str, partitions: int) -> int:
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") % partitions


def _write_partitioned(store: Store, rel: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """Rows sorted by ``partition``, one row group per partition, so a reducer reads only its own."""
    rows.sort(key=lambda r: r["partition"])
    with store.atomic_open(rel, "wb") as handle:
        writer = pq.ParquetWriter(handle, schema)
        try:
            start = 0
            while start < len(rows):
                stop = start
                while stop < len(rows) and rows[stop]["partition"] == rows[start]["partition"]:
                    stop += 1
                writer.write_table(pa.Table.from_pylist(rows[start:stop], schema=schema))
                start = stop
            if not rows:
                writer.write_table(schema.empty_table())
        finally:
            writer.close()


def _read_partition(store: Store, rels: list[str], partition: int) -> pa.Table | None:
    """Rows of ``partition`` from every shard's partitioned file (row groups of other partitions skipped)."""
    tables = []
    for rel in rels:
        with store.fs.open(store.path(rel), "rb") as handle:
            table = pq.read_table(handle, filters=[("partition", "=", partition)])
        if table.num_rows:
            tables.append(table)
    return pa.concat_tables(tables) if tables else None


def _signature_shard(store: Store, shard: Shard, staging: str, *, config: dict[str, Any]) -> dict[str, Any]:
    """Per row: sha256 and MinHash (`Deduplicator.signature`) and the shard's rows as a run sorted in
    `dedup_order` (the driver merges the runs), both written beside the shard; its band records, each
    with its bucket's slot, returned as an Arrow table (``table``) for the shuffle through the object store."""
    dedup_config = DedupConfig(**config)
    dedup = Deduplicator(dedup_config, _NoSink())
    ranks = source_ranks(dedup_config.source_priority)
    bands = lsh_bands(dedup_config) if dedup_config.near_duplicates else (0, 0)
    rows = sorted(read_shard(store, shard), key=lambda row: dedup_order_key(row, ranks))
    signatures: list[dict[str, Any]] = []
    buckets: dict[str, list[Any]] = {"slot": [], "bucket": [], "row_id": []}
    for row in rows:
        digest, minhash = dedup.signature(row)
        values = None if minhash is None else minhash.hashvalues
        signatures.append({"row_id": row["row_id"], "source": row["source"], "rank": dedup_order_key(row, ranks)[0],
                           "ground_truth": row.get("ground_truth"), "digest": digest,
                           "hashvalues": b"" if values is None else values.astype("<u8").tobytes()})
        for key in _buckets(digest, values, bands):
            buckets["slot"].append(_partition(key, BAND_SLOTS))
            buckets["bucket"].append(key)
            buckets["row_id"].append(row["row_id"])
    _write_parquet(store, _shard_file(staging, shard.index, "sorted.parquet"), rows, ROW_SCHEMA)
    _write_parquet(store, _shard_file(staging, shard.index, "signatures.parquet"), signatures, SIGNATURE_SCHEMA)
    table = pa.table({**buckets, "shard": [shard.index] * len(buckets["row_id"])}, schema=BUCKET_SCHEMA)
    step = max(1, len(rows) // KEY_SAMPLES)
    return {"rows_in": len(rows), "bucket_records": table.num_rows, "table": table,
            "shuffle_bytes": table.nbytes,  # band records put in the object store, not written to TULU_HOME
            "key_sample": [dedup_order_key(row, ranks) for row in rows[::step]]}


def _shuffle_partitions(shards: list[Shard], settings: RaySettings) -> int:
    """Partitions of dedup's shuffles through files: one per ``partition_rows`` rows of the pool, at most
    ``shuffle_partitions`` and the shards. Following the rows, not the shards, keeps the shards × partitions
    ranged reads per row the same for small shards as for the default ones."""
    rows = sum(s.rows for s in shards)
    return max(1, min(len(shards), settings.shuffle_partitions, -(-rows // settings.partition_rows)))


def _bucket_reducers(records: int, partitions: int, per_reducer: int) -> int:
    """Bucket reducers for ``records`` band records: the least power of two at least ``partitions`` and
    ``records / per_reducer`` (so reducers hold ``per_reducer`` records or fewer on average), at most
    BAND_SLOTS."""
    need = max(1, partitions, -(-records // per_reducer))
    return min(BAND_SLOTS, 1 << (need - 1).bit_length())


def _write_edges(store: Store, rel: str, edges: Iterable[tuple[str, str]], partitions: int) -> int:
    """Undirected ``edges`` (each once) stored both ways, partitioned by their first end."""
    rows = [{"partition": _partition(x, partitions), "a": x, "b": y}
            for a, b in edges for x, y in ((a, b), (b, a))]
    _write_partitioned(store, rel, rows, EDGE_SCHEMA)
    return len(rows) // 2


def _bucket_edges(store: Store, shard: Shard, staging: str, *, table: pa.Table, partitions: int) -> dict[str, Any]:
    """Bucket reducer ``shard.index`` (its band records from every shard, ``table``, grouped by Ray Data):
    every bucket with two or more rows ties them to its first (the candidate-pair graph, round 0 of the
    components), and each such row's home shard is recorded, both written under the reducer's index and
    partitioned by node hash into ``partitions``. The output does not depend on the order of ``table``'s
    rows (sets, sorted), so not on the shuffle."""
    reducer = shard.index
    edges: set[tuple[str, str]] = set()
    homes: dict[str, int] = {}
    records = table.num_rows
    if records:
        grouped = table.group_by("bucket").aggregate([("row_id", "list"), ("shard", "list")])
        for ids, shards in zip(grouped.column("row_id_list").to_pylist(), grouped.column("shard_list").to_pylist()):
            if len(set(ids)) < 2:
                continue
            homes.update(zip(ids, shards))
            ids = sorted(set(ids))
            edges.update((ids[0], other) for other in ids[1:])
    count = _write_edges(store, _shard_file(staging, reducer, "cc-000.parquet"), sorted(edges), partitions)
    nodes = [{"partition": _partition(r, partitions), "row_id": r, "shard": s} for r, s in sorted(homes.items())]
    _write_partitioned(store, _shard_file(staging, reducer, "nodes.parquet"), nodes, NODE_SCHEMA)
    return {"rows_in": records, "edges": count,
            "shuffle_bytes": _sizes(store, _shard_file(staging, reducer, "cc-000.parquet"),
                                    _shard_file(staging, reducer, "nodes.parquet"))}


def _neighbours(store: Store, staging: str, round_: int, partition: int, partitions: int,
                bucket_reducers: int | None = None) -> dict[str, set[str]]:
    """Each node of ``partition`` and its neighbours in the graph of ``round_`` (round 0 written by the
    ``bucket_reducers`` bucket reducers, default ``partitions``; later rounds by the ``partitions`` rounds)."""
    sources = (bucket_reducers or partitions) if round_ == 0 else partitions
    table = _read_partition(store, [_shard_file(staging, p, f"cc-{round_:03d}.parquet") for p in range(sources)],
                            partition)
    graph: dict[str, set[str]] = {}
    if table is not None:
        for a, b in zip(table.column("a").to_pylist(), table.column("b").to_pylist()):
            graph.setdefault(a, set()).add(b)
    return graph


def _star_round(store: Store, shard: Shard, staging: str, *, round_: int, partitions: int,
                large: bool, bucket_reducers: int | None = None) -> dict[str, Any]:
    """One round of the large-star / small-star connected components (Kiveris et al., 2014) over the nodes
    of partition ``shard.index``: reads the graph of ``round_`` and writes that of ``round_ + 1``.

    Large star links every larger neighbour of ``u`` to the least of ``u`` and its neighbours; small star
    links ``u`` and its smaller neighbours to the least of them. Components never change; alternated,
    the rounds end with every component a star around its least row id. ``stars`` says whether the
    graph read was already that (every node a centre with larger neighbours only, or a leaf with one
    smaller neighbour), i.e. whether the components are done.
    """
    graph = _neighbours(store, staging, round_, shard.index, partitions, bucket_reducers)
    edges: set[tuple[str, str]] = set()
    stars = True
    for u, around in graph.items():
        least = min(around)
        stars = stars and (least > u or len(around) == 1)
        if large:
            m = min(least, u)
            edges.update((v, m) for v in around if v > u)
        else:
            smaller = [v for v in around if v < u]
            m = min(smaller, default=u)
            edges.update((v, m) for v in [*smaller, u] if v != m)
    count = _write_edges(store, _shard_file(staging, shard.index, f"cc-{round_ + 1:03d}.parquet"),
                         sorted(edges), partitions)
    return {"rows_in": len(graph), "edges": count, "stars": stars,
            "shuffle_bytes": _sizes(store, _shard_file(staging, shard.index, f"cc-{round_ + 1:03d}.parquet"))}


def _label_nodes(store: Store, shard: Shard, staging: str, *, round_: int, partitions: int,
                 bucket_reducers: int | None = None) -> dict[str, Any]:
    """Reducer of partition ``shard.index`` once the graph of ``round_`` is stars: each candidate row's
    cluster is its star's centre; labels are written partitioned by the row's home shard. The nodes were
    written by the ``bucket_reducers`` bucket reducers (default ``partitions``)."""
    graph = _neighbours(store, staging, round_, shard.index, partitions, bucket_reducers)
    table = _read_partition(store, [_shard_file(staging, p, "nodes.parquet")
                                    for p in range(bucket_reducers or partitions)], shard.index)
    labels = []
    if table is not None:
        homes = dict(zip(table.column("row_id").to_pylist(), table.column("shard").to_pylist()))
        labels = [{"partition": homes[u], "row_id": u, "cluster": min(min(around), u)}
                  for u, around in sorted(graph.items())]
    _write_partitioned(store, _shard_file(staging, shard.index, "labels.parquet"), labels, LABEL_SCHEMA)
    return {"rows_in": len(labels), "clusters": sum(1 for label in labels if label["cluster"] == label["row_id"]),
            "shuffle_bytes": _sizes(store, _shard_file(staging, shard.index, "labels.parquet"))}


def _range_of(key: Any, boundaries: list[tuple[int, str, str]]) -> int:
    """The publish range of a `dedup_order_key`: ranges are cut at ``boundaries`` (each starts one)."""
    return bisect.bisect_right(boundaries, tuple(key))


def _split_shard(store: Store, shard: Shard, staging: str, *, partitions: int,
                 boundaries: list[tuple[int, str, str]], priority: list[str]) -> dict[str, Any]:
    """The shard's sorted run cut into publish ranges (one row group each) and its rows counted per range;
    the signatures of its rows that have a candidate cluster, partitioned by cluster."""
    found = _read_partition(store, [_shard_file(staging, p, "labels.parquet") for p in range(partitions)],
                            shard.index)
    clusters = {} if found is None else dict(zip(found.column("row_id").to_pylist(),
                                                 found.column("cluster").to_pylist()))
    ranks = source_ranks(priority)
    rows = list(_read_parquet(store, _shard_file(staging, shard.index, "sorted.parquet")))
    counts = [0] * (len(boundaries) + 1)
    for row in rows:
        row["partition"] = _range_of(dedup_order_key(row, ranks), boundaries)
        counts[row["partition"]] += 1
    _write_partitioned(store, _shard_file(staging, shard.index, "ranges.parquet"), rows, RANGED_SCHEMA)
    members = [{**row, "cluster": clusters[row["row_id"]], "partition": _partition(clusters[row["row_id"]], partitions)}
               for row in _read_parquet(store, _shard_file(staging, shard.index, "signatures.parquet"))
               if row["row_id"] in clusters]
    _write_partitioned(store, _shard_file(staging, shard.index, "members.parquet"), members, MEMBER_SCHEMA)
    return {"rows_in": len(rows), "range_counts": counts,
            "shuffle_bytes": _sizes(store, _shard_file(staging, shard.index, "ranges.parquet"),
                                    _shard_file(staging, shard.index, "members.parquet"))}


def _resolve_clusters(store: Store, shard: Shard, staging: str, *, shard_count: int, config: dict[str, Any],
                      boundaries: list[tuple[int, str, str]]) -> dict[str, Any]:
    """Reducer of partition ``shard.index``: the keep rule over its clusters' rows, in `dedup_order`.

    One `Deduplicator` serves every cluster of the partition: rows of different clusters share no
    LSH band (identical texts share all of them), so they never meet in its index, and the rule's
    tie-break by keep order is the global one.
    """
    partition = shard.index
    table = _read_partition(store, [_shard_file(staging, i, "members.parquet") for i in range(shard_count)], partition)
    rows = [] if table is None else sorted(table.to_pylist(), key=lambda r: (r["rank"], r["source"], r["row_id"]))
    dedup = Deduplicator(DedupConfig(**config), _NoSink())
    template = dedup._template
    for row in rows:
        minhash = None
        if template is not None:
            minhash = template.copy()
            minhash.hashvalues = np.frombuffer(row["hashvalues"], dtype="<u8").astype(np.uint64)
        dedup.decide({"row_id": row["row_id"], "source": row["source"], "ground_truth": row["ground_truth"]},
                     row["digest"], minhash)
    keys = {r["row_id"]: (r["rank"], r["source"], r["row_id"]) for r in rows}
    dropped = [{**{k: d[k] for k in ("row_id", "duplicate_of", "kind", "jaccard")},
                "partition": _range_of(keys[d["row_id"]], boundaries)} for d in dedup.dropped]
    _write_partitioned(store, _shard_file(staging, partition, "decisions.parquet"), dropped, DECISION_SCHEMA)
    return {"rows_in": len(rows), "clusters": len({r["cluster"] for r in rows}), "dropped": len(dropped),
            "shuffle_bytes": _sizes(store, _shard_file(staging, partition, "decisions.parquet"))}


_OBJECTS: dict[str, Any] = {}


def _object(ref: Any) -> Any:
    """``ray.get(ref)`` once per worker process (the eval index, the cluster map)."""
    import ray

    key = ref.hex()
    if key not in _OBJECTS:
        _OBJECTS.clear()  # one stage's object at a time
        _OBJECTS[key] = ray.get(ref)
    return _OBJECTS[key]


def _publish_range(store: Store, shard: Shard, staging: str, *, shard_count: int, reducers: int,
                   config: dict[str, Any], events: EventPart, offsets: list[int]) -> dict[str, Any]:
    """Publisher of range ``shard.index``: its rows from every shard, in `dedup_order`, each kept or dropped
    as the resolvers decided; writes its part of the dataset, the quarantine and the ledger."""
    part = shard.index
    dedup_config = DedupConfig(**config)
    ranks = source_ranks(dedup_config.source_priority)
    table = _read_partition(store, [_shard_file(staging, i, "ranges.parquet") for i in range(shard_count)], part)
    rows = [] if table is None else sorted(table.drop_columns(["partition"]).to_pylist(),
                                           key=lambda row: dedup_order_key(row, ranks))
    found = _read_partition(store, [_shard_file(staging, p, "decisions.parquet") for p in range(reducers)], part)
    decisions = {} if found is None else {d["row_id"]: (d["duplicate_of"], d["kind"], d["jaccard"])
                                          for d in found.to_pylist()}
    sink = MemorySink()
    dedup = Deduplicator(dedup_config, sink)
    sampler = EventSampler()
    kept = sampler(row for row in rows if dedup.apply(row, decisions.get(row["row_id"])))
    rows_out = _write_parquet(store, _shard_file(staging, part, "kept.parquet"), kept, ROW_SCHEMA)
    _write_jsonl(store, _shard_file(staging, part, "dropped.jsonl"), dedup.dropped)
    count = _write_events(store, _shard_file(staging, part, "events.parquet"), events, offsets[part], sink.events,
                          len(rows), f"dedup range {part}")
    return {"rows_in": len(rows), "rows_out": rows_out, "dropped": len(dedup.dropped), "events": count,
            "stats": dedup.stats, **_summary(sampler)}


def _range_boundaries(samples: Iterable[list[Any]], ranges: int) -> list[tuple[int, str, str]]:
    """Keys that cut the pool into about ``ranges`` ranges of equal size, from the shards' key samples."""
    keys = sorted({tuple(k) for k in samples})
    if ranges <= 1 or not keys:
        return []
    return sorted({keys[len(keys) * i // ranges] for i in range(1, ranges)})


def deduplicate_prompts_ray(store: Store, config: CurationConfig, run_id: str, progress: Progress | None = None,
                            shard_hook: ShardHook | None = None):
    """`pipeline.deduplicate_prompts` on Ray: near duplicates found across every shard (module docstring)."""
    inputs = {"normalized_prompts": input_version(store, "normalized_prompts")}
    version = stage_version("deduplicated_prompts", config.dedup.model_dump(), inputs)
    run = _Run(store, config, "deduplicated_prompts", version, run_id, progress, shard_hook)
    dedup_config = config.dedup.model_dump()
    try:
        with LedgerWriter(store, "curation", "deduplicated_prompts", version, run_id) as ledger:
            with ray_session(config.ray):
                shards = plan_shards(store, inputs, config.ray.shard_rows)
                partitions = _shuffle_partitions(shards, config.ray)
                run.counts["partitions"] = partitions
                # A reducer is a task over one partition: the same shard machinery, indexed by partition.
                reducers = [Shard(p, "", "", "", 0, 0) for p in range(partitions)]
                signed, bands = run.map_shards_to_tables("signatures", shards, _signature_shard,
                                                         config=dedup_config)
                boundaries = _range_boundaries(chain.from_iterable(r["key_sample"] for r in signed), partitions)
                ranges = [Shard(p, "", "", "", 0, 0) for p in range(len(boundaries) + 1)]
                # The shuffle: Ray Data groups the band records by bucket reducer through the object store,
                # with as many reducers as the pool's band records need (a reducer's memory stays bounded).
                band_records = sum(r["bucket_records"] for r in signed)
                bucket_reducers = _bucket_reducers(band_records, partitions, config.ray.max_band_records_per_reducer)
                run.counts["bucket_reducers"] = bucket_reducers
                run.map_groups("buckets", bands, bucket_reducers, BUCKET_SCHEMA, _bucket_edges, partitions=partitions)
                del bands  # the object store frees the band records
                # Connected components on the workers: star rounds until every component is a star.
                round_, large = 0, True
                while True:
                    done = run.map_shards("components", reducers, _star_round, round_=round_,
                                          partitions=partitions, large=large, bucket_reducers=bucket_reducers)
                    if all(r["stars"] for r in done):
                        break
                    round_, large = round_ + 1, not large
                    if round_ > MAX_STAR_ROUNDS:
                        raise RuntimeError(f"connected components did not converge in {MAX_STAR_ROUNDS} rounds")
                labelled = run.map_shards("labels", reducers, _label_nodes, round_=round_, partitions=partitions,
                                          bucket_reducers=bucket_reducers)
                run.report(step="clusters", bucket_records=band_records, bucket_reducers=bucket_reducers,
                           candidate_rows=sum(r["rows_in"] for r in labelled),
                           clusters=sum(r["clusters"] for r in labelled), component_rounds=round_ + 1)
                split = run.map_shards("split", shards, _split_shard, partitions=partitions, boundaries=boundaries,
                                       priority=list(config.dedup.source_priority))
                run.map_shards("resolve", reducers, _resolve_clusters, shard_count=len(shards), config=dedup_config,
                               boundaries=boundaries)
                range_rows = [sum(r["range_counts"][p] for r in split) for p in range(len(ranges))]
                results = run.map_shards("publish", ranges, _publish_range, shard_count=len(shards),
                                         reducers=partitions, config=dedup_config, events=ledger.part_spec(0),
                                         offsets=_seq_offsets(range_rows))
            run.report(step="publish", duplicates=sum(r["dropped"] for r in results))
            info = run.publish(ledger, results, "deduplicated_prompts", "kept.parquet", inputs)
            quarantine = store.commit_jsonl_parts(quarantine_dir("deduplicated_prompts", version),
                                                  run.parts(results, "dropped.jsonl", "dropped"))
    finally:
        run.cleanup()
    stats: dict[str, Any] = {"rows_in": 0, "kept": 0, "exact_duplicates": 0, "near_duplicates": 0, "per_source": {}}
    for result in results:
        _add_counts(stats, result["stats"])
    samples, lengths = _summaries(results)
    result = StageResult("deduplicated_prompts", version, info, stats, samples, lengths,
                         ledger.count, quarantine, sum(r["dropped"] for r in results), inputs)
    _attach_metrics(result, run)
    return result


# ---------------------------------------------------------------------------------------------
# decontamination
# ---------------------------------------------------------------------------------------------
MAX_INDEX_PARTS = 1024


class _IndexPart:
    """Actor holding one part of a partitioned eval index: the join's reducer for its n-grams."""

    def __init__(self, part: EvalIndex):
        self.part = part

    def windows(self, texts: list[str], query: Any) -> Any:
        return self.part.verified_windows(texts, query)


class _ActorParts:
    """`ShardLookup` over `_IndexPart` actors: one copy of the texts, every part asked at once."""

    def __init__(self, actors: list[Any]):
        self.actors = actors
        self.shuffle_bytes = 0  # texts sent to the parts (read once by each) and windows sent back

    def __call__(self, texts: list[str], query: Any) -> list[Any]:
        import ray

        texts_ref = ray.put(texts)
        windows = ray.get([actor.windows.remote(texts_ref, query) for actor in self.actors])
        sent = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        self.shuffle_bytes += sent * len(self.actors) + sum(w.nbytes for w in windows)
        return windows


def _decontaminate_shard(store: Store, shard: Shard, staging: str, *, index_ref: list[Any], parts: list[Any],
                         config: dict[str, Any], events: EventPart, offsets: list[int]) -> dict[str, Any]:
    index: EvalIndex | ShardedEvalIndex = _object(index_ref[0])
    lookup = _ActorParts(parts) if parts else None
    if lookup is not None:  # the head of a partitioned index: the parts are the actors
        index = ShardedEvalIndex(index, lookup)
    sink = MemorySink()
    step = Decontaminator(index, DecontamConfig(**config), sink)
    sampler = EventSampler()
    rows_out = _write_parquet(store, _shard_file(staging, shard.index, "rows.parquet"),
                              sampler(step(read_shard(store, shard))), ROW_SCHEMA)
    _write_parquet(store, _shard_file(staging, shard.index, "quarantine.parquet"),
                   (quarantine_record(e) for e in step.quarantine), QUARANTINE_SCHEMA)
    count = _write_events(store, _shard_file(staging, shard.index, "events.parquet"), events, offsets[shard.index],
                          sink.events, shard.rows, f"decontaminate shard {shard.index}")
    stats = step.stats
    return {"rows_in": stats.rows, "rows_out": rows_out, "clean": stats.clean, "quarantined": stats.quarantined,
            "events": count, "removed": [[s, b, n] for (s, b), n in sorted(stats.removed.items())],
            "eval_ids_hit": {b: sorted(ids) for b, ids in stats.eval_ids_hit.items()},
            "scanned": dict(stats.scanned), "shuffle_bytes": lookup.shuffle_bytes if lookup else 0,
            **_summary(sampler)}


def _index_parts(index: EvalIndex, settings: RaySettings) -> tuple[EvalIndex, list[Any], list[Any]]:
    """The index to put in the object store, the actors of its parts (none: the whole index is broadcast)
    and the parts' object refs (held while the actors may restart from them)."""
    import ray

    size = index.table_bytes()
    if size <= settings.eval_index_max_bytes:
        return index, [], []
    shards = settings.eval_index_shards or -(-size // settings.eval_index_max_bytes)
    if shards > MAX_INDEX_PARTS:  # one actor a part: a mistyped byte limit must not start millions
        raise ValueError(f"the eval index ({size:,} bytes) would be split into {shards:,} parts with "
                         f"ray.eval_index_max_bytes={settings.eval_index_max_bytes:,}; expected at most "
                         f"{MAX_INDEX_PARTS} (raise the limit or set ray.eval_index_shards)")
    head, parts = index.partition(shards)
    # num_cpus=0: a part only answers lookups from shard tasks, which hold the CPUs (and wait on it).
    # A lookup has no side effect, so a part lost with its node is restarted and the lookup re-asked.
    actor = ray.remote(num_cpus=0, max_restarts=settings.max_retries,
                       max_task_retries=settings.max_retries)(_IndexPart)
    refs = [ray.put(part) for part in parts]
    return head, [actor.remote(ref) for ref in refs], refs


def decontaminate_prompts_ray(store: Store, config: CurationConfig, run_id: str,
                              index: tuple[EvalIndex, dict[str, str]] | None = None,
                              progress: Progress | None = None, shard_hook: ShardHook | None = None):
    """`pipeline.decontaminate_prompts` on Ray: the eval index shared through the object store; each task
    writes its part of the clean rows, the quarantine and the ledger, and the driver commits the parts."""
    import ray

    eval_index, eval_inputs = index or build_eval_index(store, config)
    inputs = {"deduplicated_prompts": input_version(store, "deduplicated_prompts"), **eval_inputs}
    version = decontamination_version(config, inputs)
    run = _Run(store, config, "decontaminated_prompts", version, run_id, progress, shard_hook)
    try:
        with LedgerWriter(store, "decontamination", "decontaminated_prompts", version, run_id) as ledger:
            with ray_session(config.ray):
                shards = plan_shards(store, {"deduplicated_prompts": inputs["deduplicated_prompts"]},
                                     config.ray.shard_rows)
                head, parts, part_refs = _index_parts(eval_index, config.ray)
                index_ref = ray.put(head)
                run.report(step="index", eval_items=len(eval_index.items), index_parts=len(parts))
                try:
                    results = run.map_shards("decontaminate", shards, _decontaminate_shard, index_ref=[index_ref],
                                             parts=parts, config=config.decontam.model_dump(),
                                             events=ledger.part_spec(0), offsets=_seq_offsets(s.rows for s in shards))
                finally:
                    for part in parts:
                        ray.kill(part)
                del index_ref, head, parts, part_refs
            run.report(step="publish")
            info = run.publish(ledger, results, "decontaminated_prompts", "rows.parquet", inputs)
            quarantine = store.commit_dataset("decontamination_quarantine", version,
                                              run.parts(results, "quarantine.parquet", "quarantined"),
                                              QUARANTINE_SCHEMA)
    finally:
        run.cleanup()
    stats = DecontamStats()
    for result in results:
        stats.rows += result["rows_in"]
        stats.clean += result["clean"]
        stats.quarantined += result["quarantined"]
        for source, benchmark, n in result["removed"]:
            stats.removed[(source, benchmark)] += n
        for benchmark, ids in result["eval_ids_hit"].items():
            stats.eval_ids_hit[benchmark].update(ids)
        stats.scanned.update(result["scanned"])
    stage_stats = {**stats.as_dict(), "eval_items": len(eval_index.items), "benchmarks": dict(eval_index.benchmarks),
                   "incremental": {"route": "full", "reason": "Ray runs scan in full"}}
    samples, lengths = _summaries(results)
    result = StageResult("decontaminated_prompts", version, info, stage_stats, samples, lengths,
                         ledger.count, quarantine.path, quarantine.rows, inputs)
    _attach_metrics(result, run)
    return result


__all__ = [
    "RAY_DIR",
    "Shard",
    "decontaminate_prompts_ray",
    "deduplicate_prompts_ray",
    "normalize_prompts_ray",
    "plan_shards",
    "ray_session",
    "read_shard",
]
