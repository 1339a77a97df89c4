"""The DPO job: ``python -m tulu_pipeline.training.dpo_job``, run by the compute launcher in its own process.

Two tasks (extras ``task``), each a dagster-pipes materialization of its asset:

- ``reference_logprobs``: scores every pair of ``pairs_dataset@pairs_version`` with the reference model
  (``reference_dir``, the SFT checkpoint) and publishes ``data/reference_logprobs/<reference_version>/``
  (`reference_schema`, each row with the dtype it was scored in). An existing dataset of that version is reused,
  never recomputed; a training run in another dtype recomputes the numbers it needs itself (`run_dpo`).
- ``train``: `run_dpo` from ``reference_dir`` on the pairs with ``split == "train"``, held-out metrics on
  ``split == "heldout"``, reference log-probs read from ``reference_logprobs@reference_version`` (required),
  checkpoint published at ``checkpoint_dir``.

Other extras: ``tulu_home`` (fsspec root), ``preset`` and ``config`` (`DPOTrainingConfig` overrides),
``manifest_extra`` (copied into ``training_manifest.json``). Metrics stream as JSON ``log.info`` lines like
the SFT job's. Without Dagster, ``--params params.json`` runs a task directly and prints the metadata.

A local ``tulu_home`` works in place (``<checkpoint_dir>/_checkpoints`` makes a re-run resume); an object
store is worked through a local directory (``$TULU_DPO_WORK_DIR``, default the system temp dir): models are
downloaded there and the checkpoint uploaded with ``training_manifest.json`` last.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tulu_pipeline.jobs import Job, JobOutcome, floats, ints, job_main, png_markdown, require, typed
from tulu_pipeline.progress import Reporter
from tulu_pipeline.templates.lineage import lineage_hashes, template_lineage
from tulu_pipeline.storage import Store
from tulu_pipeline.preference.schema import PAIRS_DATASET
from tulu_pipeline.training.dpo import DPOResult, run_dpo
from tulu_pipeline.training.dpo_pairs import tulu_tokenizer
from tulu_pipeline.training.dpo_reference import REFERENCE_DATASET, compute_reference_logprobs, reference_schema
from tulu_pipeline.training.dpo_config import dpo_config
from tulu_pipeline.training.remote import download_model, upload_checkpoint, work_dir

WORK_DIR_ENV = "TULU_DPO_WORK_DIR"
TASKS = ("reference_logprobs", "train")


def load_pairs(store: Store, params: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The pairs split into training and held-out pairs by their ``split`` field."""
    name = params.get("pairs_dataset") or PAIRS_DATASET
    train, heldout = [], []
    for pair in store.iter_rows(name, params.get("pairs_version")):
        split = pair.get("split")
        if split not in ("train", "heldout"):
            raise ValueError(f"{name}: pair {pair.get('pair_id')} has split {split!r}; expected 'train' or 'heldout'")
        (train if split == "train" else heldout).append(pair)
    return train, heldout


def local_model_dir(store: Store, rel: str, reporter: Reporter) -> Path:
    """``rel`` as a local directory: itself on a local store, else a download into the work directory."""
    if store.is_local:
        return Path(store.path(rel))
    return download_model(store, rel, work_dir(WORK_DIR_ENV, "dpo", rel), reporter)


def run_reference_task(params: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Publish (or reuse) ``reference_logprobs@reference_version``; returns its metadata."""
    store = Store(str(params["tulu_home"]))
    version = params["reference_version"]
    rel = f"{store.dataset_dir(REFERENCE_DATASET, version)}/_dataset.json"
    reused = store.exists(rel)
    if reused:
        reporter.log(f"{REFERENCE_DATASET}@{version} already exists; not recomputing")
    else:
        config = dpo_config(params.get("preset") or "cpu_demo", **(params.get("config") or {}))
        train, heldout = load_pairs(store, params)
        model_dir = local_model_dir(store, params["reference_dir"], reporter)
        rows = compute_reference_logprobs([*train, *heldout], model_dir, config, reporter)
        store.write_rows(REFERENCE_DATASET, version, rows, reference_schema())
        store.write_json(reference_lineage_path(store, version), template_lineage(tulu_tokenizer(model_dir)))
    lineage_rel = reference_lineage_path(store, version)
    lineage = store.read_json(lineage_rel) if store.exists(lineage_rel) else None
    rows = list(store.iter_rows(REFERENCE_DATASET, version))
    dropped = [row["pair_id"] for row in rows if row["dropped_reason"]]
    return {
        "path": typed(store.uri(store.dataset_dir(REFERENCE_DATASET, version)), "path"),
        "reference_version": version,
        "reused_existing": reused,
        "pairs": len(rows),
        "dropped_pairs": len(dropped),
        "truncated_pairs": sum(1 for row in rows if row["truncated"]),
        "dtype": ", ".join(sorted({str(row.get("dtype")) for row in rows})),  # what training must match to reuse them
        "dropped_pair_ids": typed(dropped[:50], "json"),
        "template_lineage": typed(lineage_hashes(lineage), "json"),
    }


def reference_lineage_path(store: Store, version: str) -> str:
    """Sidecar of ``reference_logprobs@version``: the template lineage its pairs were tokenized with."""
    return f"{store.dataset_dir(REFERENCE_DATASET, version)}/template_lineage.json"


def run_train_task(params: dict[str, Any], reporter: Reporter) -> tuple[DPOResult, str]:
    """Train and publish; returns the result and the checkpoint's location (path or URL)."""
    store = Store(str(params["tulu_home"]))
    config = dpo_config(params.get("preset") or "cpu_demo", **(params.get("config") or {}))
    train, heldout = load_pairs(store, params)
    version = params["reference_version"]
    if not store.exists(f"{store.dataset_dir(REFERENCE_DATASET, version)}/_dataset.json"):
        raise FileNotFoundError(f"{REFERENCE_DATASET}@{version} is missing under {store.url}: materialize "
                                "reference_logprobs with the same preset and config first")
    reference = list(store.iter_rows(REFERENCE_DATASET, version))
    model_dir = local_model_dir(store, params["reference_dir"], reporter)
    checkpoint_rel = params["checkpoint_dir"]
    manifest_extra = dict(params.get("manifest_extra") or {})
    manifest_extra.setdefault("pairs_dataset", params.get("pairs_dataset") or PAIRS_DATASET)
    manifest_extra.setdefault("pairs_version", params.get("pairs_version"))
    manifest_extra.setdefault("reference_logprobs_version", version)
    output = Path(store.path(checkpoint_rel)) if store.is_local else work_dir(WORK_DIR_ENV, "dpo", checkpoint_rel) / "checkpoint"
    result = run_dpo(train, heldout, model_dir, output, config, reference_logprobs=reference, reporter=reporter,
                     manifest_extra=manifest_extra)
    if not store.is_local:
        upload_checkpoint(store, result.checkpoint_dir, checkpoint_rel)
        reporter.log(f"uploaded the checkpoint to {store.uri(checkpoint_rel)}")
    return result, store.uri(checkpoint_rel)


def materialization_metadata(result: DPOResult, location: str) -> dict[str, Any]:
    """Final metrics as dagster-pipes metadata."""
    m = result.metrics
    png = result.loss_curve_path.read_bytes() if result.loss_curve_path.exists() else b""
    heldout = {f"heldout_{key}_{side}": (m.get(f"heldout_{side}") or {}).get(key)
               for side in ("before", "after") for key in ("preference_accuracy", "reward_accuracy", "mean_margin")}
    return {
        "checkpoint_path": typed(location, "path"),
        "loss_curve": png_markdown(png, "loss curve"),
        "heldout_before": typed(m.get("heldout_before", {}), "json"),
        "heldout_after": typed(m.get("heldout_after", {}), "json"),
        # {metric: paired_delta}; {} for a checkpoint published before the effect was measured
        "heldout_effect": typed(m.get("heldout_effect", {}), "json"),
        "config": typed(result.manifest.get("config", {}), "json"),
        "fingerprint": result.manifest.get("fingerprint"),
        "base_model_sha256": result.manifest.get("base_model_sha256"),
        "reused_existing_checkpoint": result.reused,
        **floats(heldout, heldout),
        **floats(m, ("initial_loss", "final_loss", "train_s", "wall_s")),
        **ints(m, ("steps", "resumed_from_step", "train_pairs", "heldout_pairs", "dropped_pairs", "truncated_pairs")),
    }


def run_task(params: dict[str, Any], reporter: Reporter) -> tuple[dict[str, Any], str | None]:
    """Run ``params["task"]``; returns its metadata and data version."""
    task = params.get("task") or "train"
    if task not in TASKS:
        raise ValueError(f"dpo_job: task {task!r}; expected one of {TASKS}")
    require(params, ("tulu_home", "reference_dir", "reference_version",
                     *(("checkpoint_dir",) if task == "train" else ())), f"dpo_job ({task})")
    if task == "reference_logprobs":
        return run_reference_task(params, reporter), params["reference_version"]
    result, location = run_train_task(params, reporter)
    return materialization_metadata(result, location), result.manifest["fingerprint"][:16]


def run_worker(params: dict[str, Any], reporter: Reporter) -> None:
    """A torchrun rank other than 0: trains its share of the batch; rank 0 publishes and reports."""
    if (params.get("task") or "train") == "train":
        run_train_task(params, reporter)
    else:
        run_task(params, reporter)


JOB = Job("tulu_pipeline.training.dpo_job", lambda params, reporter: JobOutcome(*run_task(params, reporter)),
          result_event="dpo_result", metrics_event="dpo_metrics", hidden=("loss_curve", "config"), worker=run_worker)


def main(argv: list[str] | None = None) -> int:
    return job_main(JOB, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
