"""The SFT job: ``python -m tulu_pipeline.training.sft_job``, run by the compute launcher in its own process.

Under Dagster (PipesSubprocessClient locally, the Kubernetes launcher in a pod) it reads its parameters
from the pipes context's extras, streams every logging step as a JSON ``log.info`` line
(``{"event": "sft_metrics", "step", "loss", "learning_rate", "tokens_per_s", ...}``) and ends with
``report_asset_materialization`` carrying the final metrics, the loss-curve plot and the checkpoint path.
Without Dagster, ``--params params.json`` (the same fields) runs it directly and prints the metadata.
Under ``torchrun`` (several GPUs) every rank trains; only rank 0 opens the Pipes session, reports and publishes.

Parameters (extras):

- ``tulu_home``: the fsspec root (local path or URL);
- ``mix_dataset`` (default ``sft_mix``), ``mix_version`` (default: the latest);
- ``heldout_row_ids``: rows of the mix measured but never trained on;
- ``base_model_dir``, ``checkpoint_dir``: paths relative to ``tulu_home`` (``models/base_model``,
  ``models/sft-<hash>``);
- ``preset`` (optional, default ``cpu_demo``) and ``config`` (a dict of `SFTTrainingConfig` fields
  overriding the preset);
- ``manifest_extra``: copied into ``training_manifest.json`` (``mix_hash`` is part of the run fingerprint).

A local ``tulu_home`` trains in place: ``<checkpoint_dir>/_checkpoints`` makes a re-run after a crash resume.
An object-store ``tulu_home`` trains in a local work directory (``$TULU_SFT_WORK_DIR``, default the system
temp dir; mount a persistent volume there for resumption across pods), downloads the base model there,
then uploads the finished checkpoint with ``training_manifest.json`` last (its presence marks a complete
upload).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from tulu_pipeline.storage import Store
from tulu_pipeline.training.sft_config import sft_config
from tulu_pipeline.training.remote import download_model, upload_checkpoint, work_dir
from tulu_pipeline.progress import (
    NullReporter,
    PipesReporter,
    PrintReporter,
    Reporter,
)
from tulu_pipeline.training.sft import LOSS_CURVE_FILE, SFTResult, run_sft

WORK_DIR_ENV = "TULU_SFT_WORK_DIR"
REQUIRED = ("tulu_home", "base_model_dir", "checkpoint_dir")


def load_rows(store: Store, params: dict[str, Any], reporter: Reporter) -> tuple[list[dict], list[dict]]:
    """The mix's rows split into training and held-out rows by ``heldout_row_ids``."""
    name = params.get("mix_dataset") or "sft_mix"
    heldout_ids = set(params.get("heldout_row_ids") or [])
    train, heldout = [], []
    for row in store.iter_rows(name, params.get("mix_version")):
        (heldout if row["row_id"] in heldout_ids else train).append(row)
    missing = len(heldout_ids) - len(heldout)
    if missing:
        reporter.log(f"{missing} held-out row ids are not in {name}; measuring on the {len(heldout)} found")
    return train, heldout


def run_job(params: dict[str, Any], reporter: Reporter) -> tuple[SFTResult, str]:
    """Load the mix, train, publish; returns the result and the checkpoint's location (path or URL)."""
    missing = [key for key in REQUIRED if not params.get(key)]
    if missing:
        raise ValueError(f"sft_job parameters lack {missing}")
    store = Store(str(params["tulu_home"]))
    config = sft_config(params.get("preset") or "cpu_demo", **(params.get("config") or {}))
    train, heldout = load_rows(store, params, reporter)
    base_rel, checkpoint_rel = params["base_model_dir"], params["checkpoint_dir"]
    manifest_extra = dict(params.get("manifest_extra") or {})
    manifest_extra.setdefault("mix_dataset", params.get("mix_dataset") or "sft_mix")
    manifest_extra.setdefault("mix_version", params.get("mix_version"))
    manifest_extra.setdefault("heldout_row_ids", sorted(params.get("heldout_row_ids") or []))

    if store.is_local:
        result = run_sft(train, heldout, store.path(base_rel), store.path(checkpoint_rel), config,
                         reporter=reporter, manifest_extra=manifest_extra)
        return result, store.uri(checkpoint_rel)

    work = work_dir(WORK_DIR_ENV, "sft", checkpoint_rel)
    base_local = download_model(store, base_rel, work / "base_model", reporter)
    result = run_sft(train, heldout, base_local, work / "checkpoint", config, reporter=reporter,
                     manifest_extra=manifest_extra)
    upload_checkpoint(store, result.checkpoint_dir, checkpoint_rel, reporter)
    return result, store.uri(checkpoint_rel)


def materialization_metadata(result: SFTResult, location: str) -> dict[str, Any]:
    """Final metrics as dagster-pipes metadata (plain values are inferred; typed ones are {raw_value, type})."""
    m = result.metrics
    png = result.loss_curve_path.read_bytes() if result.loss_curve_path.exists() else b""
    curve_uri = f"{location.rstrip('/')}/{LOSS_CURVE_FILE}"
    metadata: dict[str, Any] = {
        "checkpoint_path": {"raw_value": location, "type": "path"},
        "loss_curve_path": {"raw_value": curve_uri, "type": "path"},
        "loss_curve": {"raw_value": f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})",
                       "type": "md"},
        "train_loss": {"raw_value": m.get("train_loss", []), "type": "json"},
        "config": {"raw_value": result.manifest.get("config", {}), "type": "json"},
        "fingerprint": result.manifest.get("fingerprint"),
        "base_model_sha256": result.manifest.get("base_model_sha256"),
        "reused_existing_checkpoint": result.reused,
    }
    for key in ("initial_loss", "final_loss", "heldout_loss_before", "heldout_loss_after", "tokens_per_s",
                "packing_efficiency", "train_s", "wall_s"):
        value = m.get(key)
        metadata[key] = {"raw_value": float(value), "type": "float"} if value is not None else None
    for key in ("tokens", "steps", "resumed_from_step", "train_rows", "heldout_rows", "dropped_rows",
                "truncated_rows"):
        metadata[key] = int(m.get(key) or 0)
    return {k: v for k, v in metadata.items() if v is not None}


def _print_summary(metadata: dict[str, Any]) -> None:
    plain = {k: (v["raw_value"] if isinstance(v, dict) and "raw_value" in v else v) for k, v in metadata.items()
             if k not in ("loss_curve", "train_loss", "config")}
    print(json.dumps({"event": "sft_result", **plain}, sort_keys=True, default=str), flush=True)


def pipes_extras() -> dict[str, Any]:
    """The step's extras, read from the Pipes context without opening a session (no messages are sent)."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader

    with PipesDefaultContextLoader().load_context(PipesEnvVarParamsLoader().load_context_params()) as data:
        return dict(data.get("extras") or {})


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = argparse.ArgumentParser(prog="python -m tulu_pipeline.training.sft_job", description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, help="JSON file with the job parameters (runs without Dagster)")
    args = parser.parse_args(argv)

    if args.params is not None:
        params = json.loads(args.params.read_text(encoding="utf-8"))
        reporter = PrintReporter()
        result, location = run_job(params, reporter)
        _print_summary(materialization_metadata(result, location))
        return 0

    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        parser.error("not launched by Dagster (no pipes context): pass --params params.json")
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun workers: one Pipes session (rank 0's) per step
        run_job(pipes_extras(), NullReporter())
        return 0
    with open_dagster_pipes() as context:
        reporter = PipesReporter(context)
        result, location = run_job(dict(context.extras), reporter)
        metadata = materialization_metadata(result, location)
        context.report_asset_materialization(metadata=metadata, data_version=result.manifest["fingerprint"][:16])
    return 0


if __name__ == "__main__":
    sys.exit(main())
