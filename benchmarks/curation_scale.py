"""Curation on Ray at growing pool sizes: per stage, the driver's seconds per million rows (the parallel
publish should keep them flat: O(shards)), worker CPU per row, shuffle bytes per row, and peak
memory per worker and on the driver; for 1, 2 (4) local workers and synthetic pools of 20k, 200k (2M)
rows. CURATION_AT_SCALE.md models 10⁹ rows from these figures.

Data: a synthetic pool (seeded) of ~600-character prompts in two training sources (code_alpaca and
hh_rlhf_harmless), 3% exact and 3% near duplicates of earlier rows (half across the sources), and
every bundled eval benchmark as the decontamination target (its index built outside the timing).
Per pool size and worker count, a fresh copy runs the three stages on a local Ray started with that
many CPUs (one worker process per CPU, warmed up first), ``--shard-rows`` rows per task.

Per stage and run:

- ``driver_cpu_s_per_m_rows``: CPU seconds of the driver process during the stage (Ray's task
  submission and Ray Data's shuffle scheduling in the driver included) per million rows read;
  ``driver_publish_s_per_m_rows``: wall seconds from the last task's end to the stage's return (the
  commit of the parts);
- ``worker_cpu_ms_per_row``: CPU inside shard tasks per row (contention does not inflate it);
- ``shuffle_bytes_per_row``: bytes handed from one step to the next (dedup: the band records' Arrow
  bytes, shuffled through the object store by Ray Data, then files under TULU_HOME for the candidate
  graph rounds, labels, range-cut runs, cluster members and decisions; decontamination with
  ``--index-parts K``: the texts sent to each of the K index parts plus the verified windows back);
  ``shuffle_bytes_per_row_by_step`` splits them by step (``signatures``: the band records);
- dedup's ``bucket_reducers`` (they follow the band records: ``ray.max_band_records_per_reducer``) and
  ``max_bucket_reducer_records``, the most band records one of them received; ``partitions``, the
  reducers of the shuffles through files (they follow the rows: ``ray.partition_rows``);
- ``driver_cpu_ms_per_task``: the driver's CPU per task of the stage (what a larger pool multiplies);
- ``peak_worker_rss_mb``; ``driver_rss_mb``: the driver's resident memory after the stage.

The smallest pool is also curated in process (``executor: local``) and each stage's rows and ledger
events are checked equal (the tests check every field).

    .venv/bin/python benchmarks/curation_scale.py [--rows 20000 200000] [--workers 1 2] [--shard-rows 5000]
        [--index-parts 0 3]   # 0: the eval index broadcast (default); K: split by n-gram hash into K parts
        [--max-band-records-per-reducer 4000000] [--partition-rows 50000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tulu_pipeline.curation import pipeline
from tulu_pipeline.curation.config import CurationConfig, RaySettings
from tulu_pipeline.curation.ray_executor import (
    decontaminate_prompts_ray,
    deduplicate_prompts_ray,
    normalize_prompts_ray,
)
from tulu_pipeline.curation.stages import build_eval_index
from tulu_pipeline.data.ingest import ingest_source
from tulu_pipeline.data.registry import registry
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.process_memory import peak_rss_mb
from tulu_pipeline.settings import data_dir
from tulu_pipeline.storage import Store

SOURCES = ["code_alpaca", "hh_rlhf_harmless"]
STAGES = ("normalized_prompts", "deduplicated_prompts", "decontaminated_prompts")
STEP_OF = {"normalized_prompts": "normalize", "deduplicated_prompts": "signatures",
           "decontaminated_prompts": "decontaminate"}
RESULTS = Path(__file__).resolve().parent / "results" / "curation_scale.json"


def synthetic_pool(store: Store, rows: int, seed: int = 0) -> None:
    """``rows`` prompts of ~90 words (~600 characters) over a 20,000-word vocabulary; 3% exact and 3%
    near (one word replaced) copies of earlier rows, half of them in the other source."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"{chr(97 + i % 26)}{w:x}" for i, w in enumerate(rng.integers(4096, 2**20, 20_000))])
    texts: list[str] = []
    kinds = rng.random(rows)
    for i in range(rows):
        if i > 10 and kinds[i] < 0.03:
            texts.append(texts[int(rng.integers(0, i))])
        elif i > 10 and kinds[i] < 0.06:
            words = texts[int(rng.integers(0, i))].split()
            words[int(rng.integers(0, len(words)))] = "changed"
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(vocab[rng.integers(0, len(vocab), int(rng.integers(60, 120)))]))
    pools: dict[str, list[dict]] = {s: [] for s in SOURCES}
    for i, text in enumerate(texts):
        source = SOURCES[int(rng.integers(0, 2))]
        pool = pools[source]
        pool.append({"row_id": f"{source}-{len(pool):08d}", "source": source, "source_key": f"synthetic:{i}",
                     "license": "cc0", "messages": [{"role": "user", "content": text},
                                                    {"role": "assistant", "content": "ok"}],
                     "ground_truth": None, "constraints": None, "eval_id": None, "extra": None})
    for source, pool in pools.items():
        store.write_dataset(f"raw/{source}", f"synthetic-{rows}",
                            (pool[i:i + 10_000] for i in range(0, len(pool), 10_000)),
                            ROW_SCHEMA)


def _warm_up() -> int:
    import tulu_pipeline.curation.ray_executor  # noqa: F401  (numpy, pyarrow, datasketch, the library)

    time.sleep(0.2)  # long enough that every worker gets a task
    return os.getpid()


def _rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def _output_digest(store: Store, name: str, version: str) -> str:
    """Digest of a stage's published rows, in order (and of the decontamination quarantine)."""
    digest = hashlib.blake2b(digest_size=16)
    names = [(name, version)] + ([("decontamination_quarantine", version)] if name == "decontaminated_prompts" else [])
    for dataset, v in names:
        for row in store.iter_rows(dataset, v):
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def run_ray(home: Path, config: CurationConfig, workers: int, object_store_mb: int) -> dict:
    import ray

    warm = ray.remote(num_cpus=1)(_warm_up)
    ray.init(num_cpus=workers, object_store_memory=object_store_mb * 2**20, include_dashboard=False,
             log_to_driver=False)
    try:
        store = Store(str(home))
        ray.get([warm.remote() for _ in range(4 * workers)])  # worker processes started and imported
        stages: dict = {}
        for name, fn in (("normalized_prompts", normalize_prompts_ray),
                         ("deduplicated_prompts", deduplicate_prompts_ray),
                         ("decontaminated_prompts", decontaminate_prompts_ray)):
            events: list[dict] = []
            kwargs = {"index": build_eval_index(store, config)} if name == "decontaminated_prompts" else {}
            if kwargs:
                stages["eval_index_table_mb"] = round(kwargs["index"][0].table_bytes() / 2**20, 1)
            cpu, wall = time.process_time(), time.perf_counter()
            result = fn(store, config, "bench", progress=events.append, **kwargs)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            usage = result.ray_metrics["usage"]
            rows_in = sum(u["rows"] for u in usage if u["step"] == STEP_OF[name])
            publish_at = [e["elapsed_s"] for e in events if e.get("step") == "publish"][-1]
            per_m = 1e6 / rows_in
            entry = {
                "rows_in": rows_in, "rows_out": result.dataset.rows, "ledger_events": result.ledger_events,
                "output_digest": _output_digest(store, name, result.version),
                "wall_s": round(wall, 3), "rows_per_s": round(rows_in / wall, 1),
                "shards": len({u["shard"] for u in usage if u["step"] == STEP_OF[name]}),
                "tasks": len(usage),
                "driver_cpu_s": round(cpu, 3), "driver_cpu_s_per_m_rows": round(cpu * per_m, 2),
                "driver_cpu_ms_per_task": round(1000 * cpu / len(usage), 2),
                "driver_publish_s": round(result.ray_metrics["wall_s"] - publish_at, 3),
                "driver_publish_s_per_m_rows": round((result.ray_metrics["wall_s"] - publish_at) * per_m, 2),
                "worker_cpu_ms_per_row": round(1000 * sum(u["cpu_s"] for u in usage) / rows_in, 4),
                "worker_cpu_ms_per_row_by_step": _by_step(usage, "cpu_s", 1000 / rows_in, 4),
                "shuffle_bytes_per_row": round(sum(u["shuffle_bytes"] for u in usage) / rows_in, 1),
                "shuffle_bytes_per_row_by_step": _by_step(usage, "shuffle_bytes", 1 / rows_in, 1),
                "peak_worker_rss_mb": result.ray_metrics["peak_worker_rss_mb"],
                "driver_rss_mb": _rss_mb(),
            }
            clusters = next((e for e in events if e.get("step") == "clusters"), None)
            if clusters is not None:
                entry.update(bucket_records_per_row=round(clusters["bucket_records"] / rows_in, 2),
                             candidate_row_share=round(clusters["candidate_rows"] / rows_in, 5),
                             clusters=clusters["clusters"], component_rounds=clusters["component_rounds"],
                             bucket_reducers=clusters["bucket_reducers"],
                             partitions=result.ray_metrics["partitions"],
                             max_bucket_reducer_records=max((u["rows"] for u in usage if u["step"] == "buckets"),
                                                            default=0))
            stages[name] = entry
        stages["driver_peak_rss_mb"] = round(peak_rss_mb() or 0.0, 1)
        return stages
    finally:
        ray.shutdown()


def run_local(home: Path, config: CurationConfig) -> dict:
    store = Store(str(home))
    out = {}
    for name, fn in (("normalized_prompts", pipeline.normalize_prompts),
                     ("deduplicated_prompts", pipeline.deduplicate_prompts),
                     ("decontaminated_prompts", pipeline.decontaminate_prompts)):
        wall = time.perf_counter()
        result = fn(store, config, "bench")
        out[name] = {"rows_out": result.dataset.rows, "ledger_events": result.ledger_events,
                     "output_digest": _output_digest(store, name, result.version),
                     "wall_s": round(time.perf_counter() - wall, 3)}
    return out


def _by_step(usage: list[dict], field: str, scale: float, digits: int) -> dict[str, float]:
    """``field`` summed per step of the run, times ``scale`` (per row), in step order."""
    return {step: round(scale * sum(u[field] for u in usage if u["step"] == step), digits)
            for step in dict.fromkeys(u["step"] for u in usage)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shard-rows", type=int, default=5_000, help="rows per Ray task")
    parser.add_argument("--object-store-mb", type=int, default=500)
    parser.add_argument("--max-band-records-per-reducer", type=int,
                        default=RaySettings().max_band_records_per_reducer,
                        help="ray.max_band_records_per_reducer (smaller: more bucket reducers)")
    parser.add_argument("--partition-rows", type=int, default=RaySettings().partition_rows,
                        help="ray.partition_rows: pool rows per partition of dedup's shuffles through files")
    parser.add_argument("--index-parts", type=int, nargs="+", default=[0],
                        help="0: broadcast the eval index; K: split it by n-gram hash into K actor-held parts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    load_start = list(os.getloadavg())
    config = CurationConfig(train_sources=SOURCES, ray=RaySettings(
        shard_rows=args.shard_rows, max_band_records_per_reducer=args.max_band_records_per_reducer,
        partition_rows=args.partition_rows))
    work = Path(tempfile.mkdtemp(prefix="curation-scale-"))
    runs: dict = {}
    try:
        evals = work / "evals"
        for spec in registry():
            if spec.role == "eval":
                ingest_source(spec, Store(str(evals)), "bench-ingest", root=data_dir())
        for rows in sorted(args.rows):
            raw = work / f"raw-{rows}"
            shutil.copytree(evals, raw)
            synthetic_pool(Store(str(raw)), rows)
            for workers, parts in ((w, k) for w in args.workers for k in args.index_parts):
                home = work / f"ray-{rows}-{workers}-{parts}"
                shutil.copytree(raw, home)
                print(f"{rows} rows, {workers} workers, {parts} index parts ...", file=sys.stderr, flush=True)
                ray_settings = config.ray.model_copy(
                    update={"eval_index_max_bytes": 1, "eval_index_shards": parts} if parts else {})
                name = f"{rows}_rows_{workers}_workers" + (f"_{parts}_index_parts" if parts else "")
                runs[name] = {
                    "rows": rows, "workers": workers, "index_parts": parts,
                    **run_ray(home, config.model_copy(update={"executor": "ray", "ray": ray_settings}), workers,
                              args.object_store_mb)}
                shutil.rmtree(home)
            if rows == min(args.rows):
                home = work / f"local-{rows}"
                shutil.copytree(raw, home)
                local = run_local(home, config)
                for run in (r for r in runs.values() if r["rows"] == rows):
                    for stage in STAGES:
                        run[stage]["same_output_as_local"] = \
                            (run[stage]["rows_out"], run[stage]["ledger_events"]) == \
                            (local[stage]["rows_out"], local[stage]["ledger_events"])
                        run[stage]["same_output_as_local"] &= \
                            run[stage]["output_digest"] == local[stage]["output_digest"]
                shutil.rmtree(home)
            shutil.rmtree(raw)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {
        stage: {key: {name: run[stage][key] for name, run in runs.items()}
                for key in ("driver_cpu_s_per_m_rows", "driver_cpu_ms_per_task", "driver_publish_s_per_m_rows",
                            "worker_cpu_ms_per_row",
                            "shuffle_bytes_per_row", "peak_worker_rss_mb", "driver_rss_mb")}
        for stage in STAGES
    }
    report = {
        "benchmark": "curation_scale",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    # The machine is shared: wall times (not CPU per row) stretch with the load.
                    "load_average_start": load_start, "load_average_end": list(os.getloadavg())},
        "ray_version": __import__("ray").__version__,
        "shard_rows": args.shard_rows,
        "max_band_records_per_reducer": args.max_band_records_per_reducer,
        "partition_rows": args.partition_rows,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    tmp.rename(args.out)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
