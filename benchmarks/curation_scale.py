"""Curation on Ray: rows/s with 1 and 2 workers on this machine, per-row CPU cost and peak memory per
worker, and the quantities the 1-billion-row model in CURATION_AT_SCALE.md is built from.

Data: the bundled training pools (all six, 19,977 rows; ``--quick``: code_alpaca, hh_rlhf_harmless,
self_instruct_seed and fine_grained_rlhf_qa, about 5,000 rows) and every bundled eval benchmark,
ingested once into a temporary TULU_HOME. Each configuration then curates a fresh copy of it:

- ``local``: the three stages in this process (the baseline; `executor: local`);
- ``ray_1`` / ``ray_2``: the same stages as Ray Data pipelines on a local Ray started with 1 and
  2 CPUs (one worker process per CPU), ``--shard-rows`` rows per task.

Per stage and configuration: end-to-end wall time and rows/s (rows read by the stage), the CPU
seconds spent inside shard tasks per row (what a cluster pays per row, without the driver), the
driver's publish time (replaying shard events into one ledger and writing the dataset: sequential
by design), the peak RSS of any worker process, and for dedup the LSH bucket records per row (the
shuffle volume) and the share of rows that fell into a candidate cluster; for decontamination the
size of the eval index put in the object store. The outputs of every configuration are checked
identical to the local run's (rows and ledger event counts).

    .venv/bin/python benchmarks/curation_scale.py [--quick] [--shard-rows 2500]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tulu_pipeline.curation import pipeline
from tulu_pipeline.curation.stages import build_eval_index
from tulu_pipeline.curation.config import CurationConfig, RaySettings
from tulu_pipeline.curation.ray_executor import (
    decontaminate_prompts_ray,
    deduplicate_prompts_ray,
    normalize_prompts_ray,
)
from tulu_pipeline.data.ingest import ingest_source
from tulu_pipeline.data.registry import registry
from tulu_pipeline.settings import data_dir
from tulu_pipeline.storage import Store

QUICK_TRAIN = ["code_alpaca", "hh_rlhf_harmless", "self_instruct_seed", "fine_grained_rlhf_qa"]
STEP_OF = {"normalized_prompts": "normalize", "deduplicated_prompts": "signatures",
           "decontaminated_prompts": "decontaminate"}
RESULTS = Path(__file__).resolve().parent / "results" / "curation_scale.json"


def ingest(home: Path, train: list[str] | None) -> None:
    store = Store(str(home))
    for spec in registry():
        if spec.role == "eval" or (spec.role == "train" and (train is None or spec.id in train)):
            ingest_source(spec, store, "bench-ingest", root=data_dir())


def run_local(home: Path, config: CurationConfig) -> dict:
    store = Store(str(home))
    stages = {}
    for name, fn in (("normalized_prompts", pipeline.normalize_prompts),
                     ("deduplicated_prompts", pipeline.deduplicate_prompts),
                     ("decontaminated_prompts", pipeline.decontaminate_prompts)):
        kwargs = {}
        if name == "decontaminated_prompts":  # built once, outside the timing, as on Ray
            started = time.perf_counter()
            kwargs["index"] = build_eval_index(store, config)
            stages["eval_index_build_s"] = round(time.perf_counter() - started, 3)
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn(store, config, "bench", **kwargs)
        wall = time.perf_counter() - wall
        rows_in = result.stats.get("rows_in", result.stats.get("rows"))
        stages[name] = {"wall_s": round(wall, 3), "rows_in": rows_in, "rows_out": result.dataset.rows,
                        "rows_per_s": round(rows_in / wall, 1), "ledger_events": result.ledger_events,
                        "cpu_ms_per_row": round(1000 * (time.process_time() - cpu) / rows_in, 4)}
    stages["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return stages


def _warm_up() -> int:
    import tulu_pipeline.curation.ray_executor  # noqa: F401  (numpy, pyarrow, datasketch, the library)

    time.sleep(0.2)  # long enough that every worker gets a task
    return os.getpid()


def run_ray(home: Path, config: CurationConfig, workers: int, object_store_mb: int) -> dict:
    import ray

    global _warm
    _warm = ray.remote(num_cpus=1)(_warm_up)
    started = time.perf_counter()
    ray.init(num_cpus=workers, object_store_memory=object_store_mb * 2**20, include_dashboard=False,
             log_to_driver=False)
    try:
        store = Store(str(home))
        stages = {"ray_start_s": round(time.perf_counter() - started, 3)}
        # Start every worker process and import the curation code there before timing anything.
        started = time.perf_counter()
        ray.get([_warm.remote() for _ in range(4 * workers)])
        stages["worker_warmup_s"] = round(time.perf_counter() - started, 3)
        for name, fn in (("normalized_prompts", normalize_prompts_ray),
                         ("deduplicated_prompts", deduplicate_prompts_ray),
                         ("decontaminated_prompts", decontaminate_prompts_ray)):
            events: list[dict] = []
            index_bytes = None
            kwargs = {}
            if name == "decontaminated_prompts":
                index = build_eval_index(store, config)
                index_bytes = len(pickle.dumps(index[0], protocol=5))
                kwargs["index"] = index
            wall = time.perf_counter()
            result = fn(store, config, "bench", progress=events.append, **kwargs)
            wall = time.perf_counter() - wall
            usage = result.ray_metrics["usage"]
            rows_in = sum(u["rows"] for u in usage if u["step"] == STEP_OF[name])
            task_cpu = sum(u["cpu_s"] for u in usage)
            publish_at = next(e["elapsed_s"] for e in events if e.get("step") == "publish")
            entry = {
                "wall_s": round(wall, 3), "rows_in": rows_in, "rows_out": result.dataset.rows,
                "rows_per_s": round(rows_in / wall, 1), "ledger_events": result.ledger_events,
                "shards": len({u["shard"] for u in usage if u["step"] == STEP_OF[name]}),
                "task_cpu_ms_per_row": round(1000 * task_cpu / rows_in, 4),
                "task_cpu_ms_per_row_by_step": {
                    step: round(1000 * sum(u["cpu_s"] for u in usage if u["step"] == step) / rows_in, 4)
                    for step in dict.fromkeys(u["step"] for u in usage)},
                "driver_publish_s": round(result.ray_metrics["wall_s"] - publish_at, 3),
                "worker_processes": len({u["pid"] for u in usage}),
                # Share of the workers' time inside shard tasks (the rest: scheduling, the driver).
                "parallel_efficiency": round(sum(u["wall_s"] for u in usage) / (workers * wall), 3),
                "peak_worker_rss_mb": result.ray_metrics["peak_worker_rss_mb"],
            }
            clusters = next((e for e in events if e.get("step") == "clusters"), None)
            if clusters is not None:
                entry["bucket_records_per_row"] = round(clusters["bucket_records"] / rows_in, 2)
                entry["candidate_row_share"] = round(clusters["candidate_rows"] / rows_in, 5)
                entry["clusters"] = clusters["clusters"]
            if index_bytes is not None:
                entry["eval_index_bytes"] = index_bytes
                entry["eval_items"] = len(index[0].items)
                entry["eval_indexed_ngrams"] = index[0].summary()["indexed_ngrams"]
            stages[name] = entry
        stages["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return stages
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 small training pools (about 5,000 rows)")
    parser.add_argument("--shard-rows", type=int, default=2_500, help="rows per Ray task")
    parser.add_argument("--object-store-mb", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    train = QUICK_TRAIN if args.quick else None
    load_start = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="curation-scale-"))
    try:
        raw = work / "raw"
        ingest(raw, train)
        config = CurationConfig(train_sources=train, ray=RaySettings(shard_rows=args.shard_rows))
        runs = {}
        for name in ("local", "ray_1", "ray_2"):
            home = work / name
            shutil.copytree(raw, home)
            print(f"running {name} ...", file=sys.stderr, flush=True)
            if name == "local":
                runs[name] = run_local(home, config)
            else:
                runs[name] = run_ray(home, config.model_copy(update={"executor": "ray"}), int(name[-1]),
                                     args.object_store_mb)
            shutil.rmtree(home)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    stages = ("normalized_prompts", "deduplicated_prompts", "decontaminated_prompts")
    for name in ("ray_1", "ray_2"):
        for stage in stages:
            same = (runs[name][stage]["rows_out"], runs[name][stage]["ledger_events"]) == \
                   (runs["local"][stage]["rows_out"], runs["local"][stage]["ledger_events"])
            runs[name][stage]["same_output_as_local"] = same
    summary = {
        stage: {
            "local_rows_per_s": runs["local"][stage]["rows_per_s"],
            "ray_1_rows_per_s": runs["ray_1"][stage]["rows_per_s"],
            "ray_2_rows_per_s": runs["ray_2"][stage]["rows_per_s"],
            "speedup_2_over_1": round(runs["ray_2"][stage]["rows_per_s"] / runs["ray_1"][stage]["rows_per_s"], 2),
            "task_cpu_ms_per_row": runs["ray_2"][stage]["task_cpu_ms_per_row"],
        } for stage in stages
    }
    report = {
        "benchmark": "curation_scale",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    # The machine is shared: wall times (not CPU per row) stretch with the load.
                    "load_average_start": load_start, "load_average_end": list(os.getloadavg())},
        "ray_version": __import__("ray").__version__,
        "rows": runs["local"]["normalized_prompts"]["rows_in"],
        "train_sources": train or "all",
        "shard_rows": args.shard_rows,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
