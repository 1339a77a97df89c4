"""The RLVR job: ``python -m tulu_pipeline.training.rlvr_job``, run by the compute launcher in its own process.

Like `tulu_pipeline.training.sft_job`: under Dagster it reads its parameters from the pipes context's extras,
streams every logging step as a JSON ``log.info`` line (``{"event": "grpo_metrics", "step", "reward_mean",
"accuracy", "kl", ...}``; the event name is the shared training-metrics one) and ends with
``report_asset_materialization`` carrying the reward curve and final metrics. Without Dagster,
``--params params.json`` (the same fields) runs it directly and prints the metadata.

Parameters (extras):

- ``tulu_home``: the fsspec root (local path or URL);
- ``prompts_dataset`` (default ``rlvr_prompts``), ``prompts_version`` (default: the latest);
- ``heldout_row_ids``: prompts measured (greedy verifier accuracy) but never trained on;
- ``start_model_dir``, ``checkpoint_dir``: paths relative to ``tulu_home`` (``models/sft-<hash>`` or
  ``models/dpo-<hash>``; ``models/rlvr-<hash>``);
- ``preset`` (default ``cpu_demo``) and ``config`` (`RLVRTrainingConfig` fields overriding the preset);
- ``verifier_module`` (default ``tulu_pipeline.rewards``): a module with ``verify(task, response, *,
  ground_truth, constraints)`` returning an object with ``ok`` (the reward is ``correct_reward`` when ok, else 0);
- ``manifest_extra``: copied into ``training_manifest.json`` (``prompts_version`` is part of the run fingerprint).

A local ``tulu_home`` trains in place (``<checkpoint_dir>/_checkpoints`` makes a re-run after a crash resume); an
object-store one trains in ``$TULU_GRPO_WORK_DIR`` (default the system temp dir) and uploads the finished
checkpoint with ``training_manifest.json`` last.
"""

from __future__ import annotations

import sys
from typing import Any

from tulu_pipeline.jobs import Job, JobOutcome, floats, ints, job_main, png_markdown, require, rows_split_by_id, typed
from tulu_pipeline.progress import Reporter
from tulu_pipeline.storage import Store
from tulu_pipeline.training.rlvr import REWARD_CURVE_FILE, TRAINING_METRICS_FILE, RLVRResult, run_rlvr
from tulu_pipeline.training.rlvr_rollouts import DEFAULT_VERIFIER_MODULE, verifier_from_module
from tulu_pipeline.training.rlvr_config import rlvr_training_config
from tulu_pipeline.training.remote import train_where_stored

WORK_DIR_ENV = "TULU_GRPO_WORK_DIR"
REQUIRED = ("tulu_home", "start_model_dir", "checkpoint_dir")


def load_prompts(store: Store, params: dict[str, Any], reporter: Reporter) -> tuple[list[dict], list[dict]]:
    """The prompt set's rows split into training and held-out rows by ``heldout_row_ids``."""
    return rows_split_by_id(store, params.get("prompts_dataset") or "rlvr_prompts", params.get("prompts_version"),
                            params.get("heldout_row_ids") or [], reporter)


def run_job(params: dict[str, Any], reporter: Reporter) -> tuple[RLVRResult, str]:
    """Load the prompts, train, publish; returns the result and the checkpoint's location (path or URL)."""
    require(params, REQUIRED, "rlvr_job")
    store = Store(str(params["tulu_home"]))
    config = rlvr_training_config(params.get("preset") or "cpu_demo", **(params.get("config") or {}))
    verifier = verifier_from_module(params.get("verifier_module") or DEFAULT_VERIFIER_MODULE, config.correct_reward)
    train, heldout = load_prompts(store, params, reporter)
    start_rel, checkpoint_rel = params["start_model_dir"], params["checkpoint_dir"]
    manifest_extra = dict(params.get("manifest_extra") or {})
    manifest_extra.setdefault("prompts_dataset", params.get("prompts_dataset") or "rlvr_prompts")
    manifest_extra.setdefault("prompts_version", params.get("prompts_version"))
    manifest_extra.setdefault("verifier_module", params.get("verifier_module") or DEFAULT_VERIFIER_MODULE)

    result = train_where_stored(
        store, start_rel, checkpoint_rel, WORK_DIR_ENV, "grpo", reporter, model_name="start_model",
        run=lambda start, output: run_rlvr(train, heldout, start, output, config, reporter=reporter,
                                           manifest_extra=manifest_extra, verifier=verifier))
    return result, store.uri(checkpoint_rel)


def materialization_metadata(result: RLVRResult, location: str) -> dict[str, Any]:
    """Final metrics as dagster-pipes metadata."""
    m = result.metrics
    png = result.reward_curve_path.read_bytes() if result.reward_curve_path.exists() else b""
    panels = result.training_metrics_path.read_bytes() if result.training_metrics_path.exists() else b""
    metadata: dict[str, Any] = {
        "checkpoint_path": typed(location, "path"),
        "reward_curve_path": typed(f"{location.rstrip('/')}/{REWARD_CURVE_FILE}", "path"),
        "reward_curve": png_markdown(png, "reward curve"),
        "training_metrics_path": typed(f"{location.rstrip('/')}/{TRAINING_METRICS_FILE}", "path"),
        "training_metrics": png_markdown(panels, "per-step training metrics"),
        "reward_per_step": typed(m.get("reward_per_step", []), "json"),
        "heldout_accuracy_change_ci95": typed(m.get("heldout_accuracy_change_ci95"), "json"),
        **({"heldout_reward_change_ci95": typed(m["heldout_reward_change_ci95"], "json")}
           if m.get("heldout_reward_change_ci95") is not None else {}),
        "config": typed(result.manifest.get("config", {}), "json"),
        **{k: v for k, v in (("fingerprint", result.manifest.get("fingerprint")),
                             ("start_model_sha256", result.manifest.get("start_model_sha256"))) if v is not None},
        "reused_existing_checkpoint": result.reused,
        **floats(m, ("mean_reward", "reward_first_steps", "reward_last_steps", "heldout_accuracy_before",
                     "heldout_accuracy_after", "heldout_reward_before", "heldout_reward_after",
                     "heldout_reward_change", "train_s", "wall_s")),
        **ints(m, ("steps", "resumed_from_step", "prompt_rows", "heldout_rows", "trained_rows_seen")),
    }
    return metadata


def _run(params: dict[str, Any], reporter: Reporter) -> JobOutcome:
    result, location = run_job(params, reporter)
    return JobOutcome(materialization_metadata(result, location), data_version=result.manifest["fingerprint"][:16])


def _worker(params: dict[str, Any], reporter: Reporter) -> None:
    """A torchrun rank other than 0 (``sharding.strategy="fsdp"``): trains its share; rank 0 publishes and reports."""
    run_job(params, reporter)


JOB = Job("tulu_pipeline.training.rlvr_job", _run, result_event="grpo_result", metrics_event="grpo_metrics",
          hidden=("reward_curve", "training_metrics", "reward_per_step", "config", "heldout_accuracy_change_ci95"),
          worker=_worker)


def main(argv: list[str] | None = None) -> int:
    return job_main(JOB, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
