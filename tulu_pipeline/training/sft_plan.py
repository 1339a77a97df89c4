"""What an SFT run needs before it starts, and the ledger entries it leaves after it ends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tulu_pipeline.data.registry import registry_version
from tulu_pipeline.hashing import json_hash
from tulu_pipeline.mixing.publish import MIX_DATASET, mix_info_path
from tulu_pipeline.provenance.ledger import LedgerWriter
from tulu_pipeline.storage import Store
from tulu_pipeline.templates.lineage import lineage_hashes
from tulu_pipeline.training.sft_config import sft_config


@dataclass(frozen=True)
class SFTPlan:
    """One SFT run: its content-addressed id and the extras handed to the training process."""

    version: str
    checkpoint_id: str
    checkpoint_dir: str
    mix_version: str
    extras: dict[str, Any]


def sft_checkpoint_id(code_version: str, config: dict[str, Any], mix_version: str, base_sha256: str) -> str:
    """``sft-<hash>`` of the training code version, the full config, the mix and the base weights."""
    payload = {"code": code_version, "config": config, "mix": mix_version, "base": base_sha256}
    return "sft-" + json_hash(payload)


def sft_checkpoint_plan(store: Store, preset: str, overrides: dict[str, Any], base_model_dir: str) -> SFTPlan:
    """The checkpoint id hashes the training code version, full config, mix and base weights."""
    from tulu_pipeline.training.sft import SFT_CODE_VERSION

    config = sft_config(preset, **overrides)
    mix_version = store.latest_version(MIX_DATASET)
    if mix_version is None:
        raise FileNotFoundError(f"{MIX_DATASET} has not been materialized under {store.url}")
    mix = store.read_json(mix_info_path(mix_version))
    base_info = f"{base_model_dir}/tulu_model.json"
    if not store.exists(base_info):
        raise FileNotFoundError(f"{base_model_dir}: no converted base model; materialize base_model first")
    base_sha = store.read_json(base_info)["weights_sha256"]
    checkpoint_id = sft_checkpoint_id(SFT_CODE_VERSION, config.model_dump(mode="json"), mix_version, base_sha)
    version = checkpoint_id.removeprefix("sft-")
    checkpoint_dir = f"models/{checkpoint_id}"
    extras = {
        "tulu_home": store.url,
        "mix_dataset": MIX_DATASET,
        "mix_version": mix_version,
        "heldout_row_ids": mix["heldout_row_ids"],
        "base_model_dir": base_model_dir,
        "preset": preset,
        "checkpoint_dir": checkpoint_dir,
        "config": config.model_dump(mode="json"),
        "manifest_extra": {
            "checkpoint_id": checkpoint_id, "mix_hash": mix_version, "mix": mix["mix"], "mix_inputs": mix["inputs"],
            "registry_version": registry_version(),
            "train_row_ids_hash": mix["train_row_ids_hash"], "heldout_row_ids_hash": mix["heldout_row_ids_hash"],
            "base_model_sha256": base_sha, "preset": preset,
        },
    }
    return SFTPlan(version, checkpoint_id, checkpoint_dir, mix_version, extras)


def trained_row_ids(store: Store, checkpoint_dir: str, manifest: dict[str, Any]) -> set[str]:
    """The rows that reached at least one micro-batch of the run (the trainer writes them out)."""
    name = manifest.get("trained_row_ids_file")
    if not name or not store.exists(f"{checkpoint_dir}/{name}"):
        raise FileNotFoundError(f"{checkpoint_dir}: the manifest names no trained-row list; was training complete?")
    return set(store.read_bytes(f"{checkpoint_dir}/{name}").decode().split())


def record_trained_on(store: Store, plan: SFTPlan, manifest: dict[str, Any], run_id: str) -> int:
    """``trained_on`` (row → checkpoint) for every row the trainer actually saw; ``evaluated`` for the
    held-out slice; ``not_trained`` for mix rows the run never reached (``max_steps``) or left out as
    too long. Returns the number of trained rows."""
    heldout = set(plan.extras["heldout_row_ids"])
    trained = trained_row_ids(store, plan.checkpoint_dir, manifest)
    too_long = set(manifest.get("dropped_row_ids") or [])
    count = 0
    with LedgerWriter(store, "sft", "sft_checkpoint", plan.version, run_id) as ledger:
        for row in store.iter_rows(MIX_DATASET, plan.mix_version):
            row_id = row["row_id"]
            details = {"checkpoint": plan.checkpoint_id, "mix_hash": plan.mix_version,
                       "template_lineage": lineage_hashes(manifest.get("template_lineage"))}
            if row_id in heldout:
                ledger.record(row_id, "evaluated", decision="heldout_loss", related_ids=[plan.checkpoint_id],
                              details=details)
            elif row_id in trained:
                ledger.record(row_id, "trained_on", decision="trained", related_ids=[plan.checkpoint_id],
                              details={**details, "epochs": manifest["config"].get("num_epochs"),
                                       "max_steps": manifest["config"].get("max_steps")})
                count += 1
            else:
                reason = "too long for max_length" if row_id in too_long else "not reached within max_steps"
                ledger.record(row_id, "not_trained", decision="left_out", reason=reason,
                              related_ids=[plan.checkpoint_id], details=details)
    return count
