"""The RLVR job: ``python -m tulu_pipeline.training.grpo_job``, run by the compute launcher in its own process.

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
- ``preset`` (default ``cpu_demo``) and ``config`` (`GRPOTrainingConfig` fields overriding the preset);
- ``verifier_module`` (default ``tulu_pipeline.rewards``): a module with ``verify(task, response, *,
  ground_truth, constraints)`` returning an object with ``ok`` (the reward is ``correct_reward`` when ok, else 0);
- ``manifest_extra``: copied into ``training_manifest.json`` (``prompts_version`` is part of the run fingerprint).

A local ``tulu_home`` trains in place (``<checkpoint_dir>/_checkpoints`` makes a re-run after a crash resume); an
object-store one trains in ``$TULU_GRPO_WORK_DIR`` (default the system temp dir) and uploads the finished
checkpoint with ``training_manifest.json`` last.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from tulu_pipeline.progress import PipesReporter, PrintReporter, Reporter
from tulu_pipeline.storage import Store
from tulu_pipeline.training.grpo import (
    DEFAULT_VERIFIER_MODULE,
    REWARD_CURVE_FILE,
    TRAINING_METRICS_FILE,
    GRPOResult,
    run_grpo,
    verifier_from_module,
)
from tulu_pipeline.training.grpo_config import grpo_config
from tulu_pipeline.training.remote import download_model, upload_checkpoint, work_dir

WORK_DIR_ENV = "TULU_GRPO_WORK_DIR"
REQUIRED = ("tulu_home", "start_model_dir", "checkpoint_dir")


def load_prompts(store: Store, params: dict[str, Any], reporter: Reporter) -> tuple[list[dict], list[dict]]:
    """The prompt set's rows split into training and held-out rows by ``heldout_row_ids``."""
    name = params.get("prompts_dataset") or "rlvr_prompts"
    heldout_ids = set(params.get("heldout_row_ids") or [])
    train, heldout = [], []
    for row in store.iter_rows(name, params.get("prompts_version")):
        (heldout if row["row_id"] in heldout_ids else train).append(row)
    missing = len(heldout_ids) - len(heldout)
    if missing:
        reporter.log(f"{missing} held-out row ids are not in {name}; measuring on the {len(heldout)} found")
    return train, heldout


def run_job(params: dict[str, Any], reporter: Reporter) -> tuple[GRPOResult, str]:
    """Load the prompts, train, publish; returns the result and the checkpoint's location (path or URL)."""
    missing = [key for key in REQUIRED if not params.get(key)]
    if missing:
        raise ValueError(f"grpo_job parameters lack {missing}")
    store = Store(str(params["tulu_home"]))
    config = grpo_config(params.get("preset") or "cpu_demo", **(params.get("config") or {}))
    verifier = verifier_from_module(params.get("verifier_module") or DEFAULT_VERIFIER_MODULE, config.correct_reward)
    train, heldout = load_prompts(store, params, reporter)
    start_rel, checkpoint_rel = params["start_model_dir"], params["checkpoint_dir"]
    manifest_extra = dict(params.get("manifest_extra") or {})
    manifest_extra.setdefault("prompts_dataset", params.get("prompts_dataset") or "rlvr_prompts")
    manifest_extra.setdefault("prompts_version", params.get("prompts_version"))
    manifest_extra.setdefault("verifier_module", params.get("verifier_module") or DEFAULT_VERIFIER_MODULE)

    if store.is_local:
        result = run_grpo(train, heldout, store.path(start_rel), store.path(checkpoint_rel), config,
                          reporter=reporter, manifest_extra=manifest_extra, verifier=verifier)
        return result, store.uri(checkpoint_rel)

    work = work_dir(WORK_DIR_ENV, "grpo", checkpoint_rel)
    start_local = download_model(store, start_rel, work / "start_model", reporter)
    result = run_grpo(train, heldout, start_local, work / "checkpoint", config, reporter=reporter,
                      manifest_extra=manifest_extra, verifier=verifier)
    upload_checkpoint(store, result.checkpoint_dir, checkpoint_rel, reporter)
    return result, store.uri(checkpoint_rel)


def materialization_metadata(result: GRPOResult, location: str) -> dict[str, Any]:
    """Final metrics as dagster-pipes metadata (plain values are inferred; typed ones are {raw_value, type})."""
    m = result.metrics
    png = result.reward_curve_path.read_bytes() if result.reward_curve_path.exists() else b""
    panels = result.training_metrics_path.read_bytes() if result.training_metrics_path.exists() else b""
    metadata: dict[str, Any] = {
        "checkpoint_path": {"raw_value": location, "type": "path"},
        "reward_curve_path": {"raw_value": f"{location.rstrip('/')}/{REWARD_CURVE_FILE}", "type": "path"},
        "reward_curve": {"raw_value": f"![reward curve](data:image/png;base64,{base64.b64encode(png).decode()})",
                         "type": "md"},
        "training_metrics_path": {"raw_value": f"{location.rstrip('/')}/{TRAINING_METRICS_FILE}", "type": "path"},
        "training_metrics": {"raw_value": "![per-step training metrics](data:image/png;base64,"
                                          f"{base64.b64encode(panels).decode()})", "type": "md"},
        "reward_per_step": {"raw_value": m.get("reward_per_step", []), "type": "json"},
        "heldout_accuracy_change_ci95": {"raw_value": m.get("heldout_accuracy_change_ci95"), "type": "json"},
        "heldout_reward_change_ci95": ({"raw_value": m["heldout_reward_change_ci95"], "type": "json"}
                                       if m.get("heldout_reward_change_ci95") is not None else None),
        "config": {"raw_value": result.manifest.get("config", {}), "type": "json"},
        "fingerprint": result.manifest.get("fingerprint"),
        "start_model_sha256": result.manifest.get("start_model_sha256"),
        "reused_existing_checkpoint": result.reused,
    }
    for key in ("mean_reward", "reward_first_steps", "reward_last_steps", "heldout_accuracy_before",
                "heldout_accuracy_after", "heldout_reward_before", "heldout_reward_after", "heldout_reward_change",
                "train_s", "wall_s"):
        value = m.get(key)
        metadata[key] = {"raw_value": float(value), "type": "float"} if value is not None else None
    for key in ("steps", "resumed_from_step", "prompt_rows", "heldout_rows", "trained_rows_seen"):
        metadata[key] = int(m.get(key) or 0)
    return {k: v for k, v in metadata.items() if v is not None}


def _print_summary(metadata: dict[str, Any]) -> None:
    plain = {k: (v["raw_value"] if isinstance(v, dict) and "raw_value" in v else v) for k, v in metadata.items()
             if k not in ("reward_curve", "training_metrics", "reward_per_step", "config",
                          "heldout_accuracy_change_ci95")}
    print(json.dumps({"event": "grpo_result", **plain}, sort_keys=True, default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = argparse.ArgumentParser(prog="python -m tulu_pipeline.training.grpo_job",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, help="JSON file with the job parameters (runs without Dagster)")
    args = parser.parse_args(argv)

    if args.params is not None:
        params = json.loads(args.params.read_text(encoding="utf-8"))
        result, location = run_job(params, PrintReporter(event="grpo_metrics"))
        _print_summary(materialization_metadata(result, location))
        return 0

    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        parser.error("not launched by Dagster (no pipes context): pass --params params.json")
    with open_dagster_pipes() as context:
        result, location = run_job(dict(context.extras), PipesReporter(context, event="grpo_metrics"))
        context.report_asset_materialization(metadata=materialization_metadata(result, location),
                                             data_version=result.manifest["fingerprint"][:16])
    return 0


if __name__ == "__main__":
    sys.exit(main())
