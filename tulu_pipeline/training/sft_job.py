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

import sys
from typing import Any

from tulu_pipeline.storage import Store
from tulu_pipeline.training.sft_config import sft_config
from tulu_pipeline.training.remote import train_where_stored
from tulu_pipeline.jobs import Job, JobOutcome, floats, ints, job_main, png_markdown, require, rows_split_by_id, typed
from tulu_pipeline.progress import Reporter
from tulu_pipeline.training.sft import LOSS_CURVE_FILE, SFTResult, run_sft

WORK_DIR_ENV = "TULU_SFT_WORK_DIR"
REQUIRED = ("tulu_home", "base_model_dir", "checkpoint_dir")


def load_rows(store: Store, params: dict[str, Any], reporter: Reporter) -> tuple[list[dict], list[dict]]:
    """The mix's rows split into training and held-out rows by ``heldout_row_ids``."""
    return rows_split_by_id(store, params.get("mix_dataset") or "sft_mix", params.get("mix_version"),
                            params.get("heldout_row_ids") or [], reporter)


def run_job(params: dict[str, Any], reporter: Reporter) -> tuple[SFTResult, str]:
    """Load the mix, train, publish; returns the result and the checkpoint's location (path or URL)."""
    require(params, REQUIRED, "sft_job")
    store = Store(str(params["tulu_home"]))
    config = sft_config(params.get("preset") or "cpu_demo", **(params.get("config") or {}))
    train, heldout = load_rows(store, params, reporter)
    base_rel, checkpoint_rel = params["base_model_dir"], params["checkpoint_dir"]
    manifest_extra = dict(params.get("manifest_extra") or {})
    manifest_extra.setdefault("mix_dataset", params.get("mix_dataset") or "sft_mix")
    manifest_extra.setdefault("mix_version", params.get("mix_version"))
    manifest_extra.setdefault("heldout_row_ids", sorted(params.get("heldout_row_ids") or []))

    result = train_where_stored(
        store, base_rel, checkpoint_rel, WORK_DIR_ENV, "sft", reporter, model_name="base_model",
        run=lambda base, output: run_sft(train, heldout, base, output, config, reporter=reporter,
                                           manifest_extra=manifest_extra))
    return result, store.uri(checkpoint_rel)


def materialization_metadata(result: SFTResult, location: str) -> dict[str, Any]:
    """Final metrics as dagster-pipes metadata."""
    m = result.metrics
    png = result.loss_curve_path.read_bytes() if result.loss_curve_path.exists() else b""
    return {
        "checkpoint_path": typed(location, "path"),
        "loss_curve_path": typed(f"{location.rstrip('/')}/{LOSS_CURVE_FILE}", "path"),
        "loss_curve": png_markdown(png, "loss curve"),
        "train_loss": typed(m.get("train_loss", []), "json"),
        # {"loss": paired_delta}; {} for a checkpoint published before the effect was measured
        "heldout_effect": typed(m.get("heldout_effect", {}), "json"),
        "config": typed(result.manifest.get("config", {}), "json"),
        **{k: v for k, v in (("fingerprint", result.manifest.get("fingerprint")),
                             ("base_model_sha256", result.manifest.get("base_model_sha256"))) if v is not None},
        "reused_existing_checkpoint": result.reused,
        **floats(m, ("initial_loss", "final_loss", "heldout_loss_before", "heldout_loss_after", "tokens_per_s",
                     "packing_efficiency", "train_s", "wall_s")),
        **ints(m, ("tokens", "steps", "resumed_from_step", "train_rows", "heldout_rows", "dropped_rows",
                   "truncated_rows")),
    }


def _run(params: dict[str, Any], reporter: Reporter) -> JobOutcome:
    result, location = run_job(params, reporter)
    return JobOutcome(materialization_metadata(result, location), data_version=result.manifest["fingerprint"][:16])


JOB = Job("tulu_pipeline.training.sft_job", _run, result_event="sft_result",
          hidden=("loss_curve", "train_loss", "config"), worker=run_job)


def main(argv: list[str] | None = None) -> int:
    return job_main(JOB, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
