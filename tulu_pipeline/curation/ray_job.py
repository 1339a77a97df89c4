"""The Ray curation job: ``python -m tulu_pipeline.curation.ray_job``, run by the compute launcher.

It is the driver of one curation stage on Ray (`ray_executor`): it connects to the cluster named by
the configuration (``ray.address``, else ``$RAY_ADDRESS``, else a local Ray it starts), runs the stage,
and publishes exactly what the in-process stage would. Under Dagster (dagster-pipes) every finished
shard is a ``context.log.info`` JSON line (``{"event": "curation_progress", "stage", "step",
"shards_done", "shards", "rows_done", "elapsed_s"}``) and the run ends with
``report_asset_materialization`` carrying rows/s, task CPU seconds, shards, workers and peak worker
memory. The full `StageResult` (samples, text lengths, stats) is written to
``reports/ray_jobs/<run_id>/<stage>.json`` for the asset to build the same metadata as the local path.
Without Dagster, ``--params params.json`` (the same fields) runs it directly, e.g. as a KubeRay
RayJob entrypoint (k8s/ray-curation-job.yaml), and prints the metrics.

Parameters (extras): ``tulu_home``; ``stage`` (``normalized_prompts``, ``deduplicated_prompts`` or
``decontaminated_prompts``); ``run_id``; ``config`` (a `CurationConfig` dump; its executor is forced
to ``ray``).
"""

from __future__ import annotations

import json
import posixpath
import sys
from dataclasses import asdict
from typing import Any

from tulu_pipeline.curation.config import CurationConfig
from tulu_pipeline.curation.stages import StageResult
from tulu_pipeline.jobs import Job, JobOutcome, job_main, require
from tulu_pipeline.progress import Reporter
from tulu_pipeline.storage import DatasetInfo, Store

STAGES = ("normalized_prompts", "deduplicated_prompts", "decontaminated_prompts")
MODULE = "tulu_pipeline.curation.ray_job"


def result_path(run_id: str, stage: str) -> str:
    """Where the job leaves the `StageResult` of ``stage`` for run ``run_id``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return posixpath.join("reports", "ray_jobs", safe, f"{stage}.json")


def save_stage_result(store: Store, run_id: str, result: Any) -> str:
    payload = {k: v for k, v in asdict(result).items()}
    payload["ray_metrics"] = {k: v for k, v in getattr(result, "ray_metrics", {}).items() if k != "usage"}
    return store.write_bytes(result_path(run_id, result.name),
                             json.dumps(payload, ensure_ascii=False, default=str).encode())


def load_stage_result(store: Store, run_id: str, stage: str):
    """The `StageResult` a job published for ``stage`` (with its ``ray_metrics``)."""
    payload = json.loads(store.read_bytes(result_path(run_id, stage)))
    metrics = payload.pop("ray_metrics", {})
    payload["dataset"] = DatasetInfo(**{**payload["dataset"], "parts": tuple(payload["dataset"]["parts"])})
    payload["text_lengths"] = {int(length): n for length, n in payload["text_lengths"].items()}  # JSON keys
    result = StageResult(**payload)
    result.ray_metrics = metrics
    return result


def job_metrics(result: Any) -> dict[str, Any]:
    """Throughput and resource use of the run, as materialization metadata."""
    metrics = dict(getattr(result, "ray_metrics", {}))
    usage = metrics.pop("usage", [])
    rows_in = sum(u["rows"] for u in usage if u["step"] in ("normalize", "signatures", "decontaminate"))
    wall = metrics.get("wall_s") or 0.0
    return {
        **{f"ray_{k}": v for k, v in metrics.items()},
        "ray_rows_per_s": round(rows_in / wall, 1) if wall else 0.0,
        "ray_cpu_ms_per_row": round(1000 * metrics.get("task_cpu_s", 0.0) / rows_in, 4) if rows_in else 0.0,
    }


def run_stage(params: dict[str, Any], progress=None):
    """Run one stage on Ray and save its result; returns the `StageResult`."""
    from tulu_pipeline.curation import pipeline  # Ray and the stages load only in the job (assets import MODULE)

    require(params, ("tulu_home", "stage", "run_id"), "ray_job")
    stage = params["stage"]
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    store = Store(str(params["tulu_home"]))
    config = CurationConfig(**{**(params.get("config") or {}), "executor": "ray"})
    result = pipeline.run_stage(stage, store, config, params["run_id"], progress=progress)
    save_stage_result(store, params["run_id"], result)
    return result


def _run(params: dict[str, Any], reporter: Reporter) -> JobOutcome:
    result = run_stage(params, progress=lambda event: reporter.log(json.dumps(event, sort_keys=True)))
    metrics = job_metrics(result)
    return JobOutcome({"rows": result.dataset.rows, "version": result.version, **metrics},
                      data_version=result.version, asset_key=result.name,
                      summary={"stage": result.name, "version": result.version, "rows": result.dataset.rows, **metrics})


JOB = Job(MODULE, _run, result_event="curation_result")


def main(argv: list[str] | None = None) -> int:
    return job_main(JOB, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
