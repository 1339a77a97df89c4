"""What an RLVR (GRPO) run needs before it starts, and the ledger entries it leaves after it ends.

The start checkpoint is the newest DPO checkpoint under ``models/`` (a directory whose ``training_manifest.json``
has a ``checkpoint_id`` starting ``dpo-``), else the newest SFT checkpoint (``sft-``); "newest" is the manifest's
modification time (the manifest is written last, when the checkpoint is complete).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tulu_pipeline.data.registry import registry_version
from tulu_pipeline.hashing import json_hash
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.provenance.ledger import LedgerWriter
from tulu_pipeline.rlvr.prompts import RLVR_DATASET, rlvr_info_path, row_task
from tulu_pipeline.storage import Store
from tulu_pipeline.templates.lineage import lineage_hashes
from tulu_pipeline.training.rlvr_config import rlvr_training_config

START_KINDS = ("dpo", "sft")  # in order of preference


@dataclass(frozen=True)
class StartCheckpoint:
    """The checkpoint RLVR starts from."""

    checkpoint_id: str
    checkpoint_dir: str  # relative to TULU_HOME
    kind: str  # dpo | sft
    fingerprint: str


@dataclass(frozen=True)
class RLVRPlan:
    """One RLVR run: its content-addressed id and the extras handed to the training process."""

    version: str
    checkpoint_id: str
    checkpoint_dir: str
    dataset_version: str
    start: StartCheckpoint
    extras: dict[str, Any]


def _modified(store: Store, rel: str) -> float:
    try:
        stamp = store.fs.modified(store.path(rel))
        return stamp.timestamp()
    except (NotImplementedError, OSError, AttributeError):
        info = store.fs.info(store.path(rel))
        return float(info.get("mtime") or info.get("created") or 0.0)


def find_start_checkpoint(store: Store) -> StartCheckpoint:
    """The newest complete DPO checkpoint, else the newest complete SFT checkpoint."""
    found: dict[str, list[tuple[float, StartCheckpoint]]] = {kind: [] for kind in START_KINDS}
    for name in store.listdir("models"):
        rel = f"models/{name}/{MANIFEST_FILE}"
        if not store.exists(rel):
            continue
        try:
            manifest = store.read_json(rel)
        except (json.JSONDecodeError, OSError):
            continue
        checkpoint_id = str(manifest.get("checkpoint_id") or name)
        kind = checkpoint_id.split("-", 1)[0]
        if kind in found:
            found[kind].append((_modified(store, rel), StartCheckpoint(
                checkpoint_id, f"models/{name}", kind, str(manifest.get("fingerprint") or ""))))
    for kind in START_KINDS:
        if found[kind]:
            return max(found[kind], key=lambda item: (item[0], item[1].checkpoint_id))[1]
    raise FileNotFoundError(f"no DPO or SFT checkpoint (models/*/{MANIFEST_FILE} with a checkpoint_id starting "
                            f"'dpo-' or 'sft-') under {store.url}; materialize sft_checkpoint first")


def start_checkpoint_by_id(store: Store, checkpoint_id: str) -> StartCheckpoint:
    """A named DPO or SFT checkpoint (``models/<checkpoint_id>/``); it must be complete (have its manifest)."""
    kind = checkpoint_id.split("-", 1)[0]
    if kind not in START_KINDS:
        raise ValueError(f"RLVR starts from a DPO or SFT checkpoint ('dpo-...' or 'sft-...'), got {checkpoint_id!r}")
    rel = f"models/{checkpoint_id}/{MANIFEST_FILE}"
    if not store.exists(rel):
        raise FileNotFoundError(f"{store.uri(rel)} does not exist: {checkpoint_id} is missing or incomplete")
    manifest = store.read_json(rel)
    return StartCheckpoint(checkpoint_id, f"models/{checkpoint_id}", kind, str(manifest.get("fingerprint") or ""))


def rlvr_checkpoint_id(code_version: str, config: dict[str, Any], dataset_version: str, start: StartCheckpoint) -> str:
    """``rlvr-<hash>`` of the training code version, the full config, the prompt set and the start checkpoint."""
    payload = {"code": code_version, "config": config, "prompts": dataset_version,
               "start": [start.checkpoint_id, start.fingerprint]}
    return "rlvr-" + json_hash(payload)


def rlvr_checkpoint_plan(store: Store, preset: str, overrides: dict[str, Any], dataset_version: str | None = None,
                         verifier_module: str | None = None, start_checkpoint_id: str | None = None) -> RLVRPlan:
    """Plan a run on ``rlvr_prompts@dataset_version`` (default: the latest) from ``start_checkpoint_id`` (default:
    `find_start_checkpoint`, the newest DPO checkpoint on disk, else the newest SFT one)."""
    from tulu_pipeline.training.rlvr import RLVR_TRAINING_CODE_VERSION
    config = rlvr_training_config(preset, **overrides)
    dataset_version = dataset_version or store.latest_version(RLVR_DATASET)
    if dataset_version is None:
        raise FileNotFoundError(f"{RLVR_DATASET} has not been materialized under {store.url}")
    info = store.read_json(rlvr_info_path(dataset_version))
    start = start_checkpoint_by_id(store, start_checkpoint_id) if start_checkpoint_id else find_start_checkpoint(store)
    checkpoint_id = rlvr_checkpoint_id(RLVR_TRAINING_CODE_VERSION, config.model_dump(mode="json"), dataset_version, start)
    checkpoint_dir = f"models/{checkpoint_id}"
    extras: dict[str, Any] = {
        "tulu_home": store.url,
        "prompts_dataset": RLVR_DATASET,
        "prompts_version": dataset_version,
        "heldout_row_ids": info["heldout_row_ids"],
        "start_model_dir": start.checkpoint_dir,
        "preset": preset,
        "checkpoint_dir": checkpoint_dir,
        "config": config.model_dump(mode="json"),
        "manifest_extra": {
            # <x>_dataset/<x>_version, *inputs and start_checkpoint (a string) are what
            # tulu_pipeline.data.coverage walks from a checkpoint back to its decontaminated data.
            "checkpoint_id": checkpoint_id, "prompts_dataset": RLVR_DATASET, "prompts_version": dataset_version,
            "prompt_counts": info["counts"], "prompt_inputs": info["inputs"],
            "start_checkpoint": start.checkpoint_id,
            "start_checkpoint_info": {"kind": start.kind, "dir": start.checkpoint_dir,
                                      "fingerprint": start.fingerprint},
            "registry_version": registry_version(), "preset": preset,
        },
    }
    if verifier_module:
        extras["verifier_module"] = verifier_module
    return RLVRPlan(checkpoint_id.removeprefix("rlvr-"), checkpoint_id, checkpoint_dir, dataset_version, start, extras)


def record_rlvr_events(store: Store, plan: RLVRPlan, manifest: dict[str, Any], run_id: str) -> dict[str, int]:
    """``trained_on`` (row -> checkpoint) for every prompt the run sampled rollouts for; ``evaluated`` for the
    held-out prompts (greedy accuracy before/after); ``not_trained`` for prompts never reached within
    ``max_steps`` or too long. Returns the count of each event."""
    heldout = set(plan.extras["heldout_row_ids"])
    name = manifest.get("trained_row_ids_file")
    if not name or not store.exists(f"{plan.checkpoint_dir}/{name}"):
        raise FileNotFoundError(f"{plan.checkpoint_dir}: the manifest names no trained-row list; was training complete?")
    trained = set(store.read_bytes(f"{plan.checkpoint_dir}/{name}").decode().split())
    too_long = set(manifest.get("too_long_row_ids") or [])
    counts = {"trained_on": 0, "evaluated": 0, "not_trained": 0}
    base = {"checkpoint": plan.checkpoint_id, "dataset_version": plan.dataset_version,
            "start_checkpoint": plan.start.checkpoint_id,
            "template_lineage": lineage_hashes(manifest.get("template_lineage"))}
    with LedgerWriter(store, "rlvr", "rlvr_checkpoint", plan.version, run_id) as ledger:
        for row in store.iter_rows(plan.extras["prompts_dataset"], plan.dataset_version):
            row_id = row["row_id"]
            details = {**base, "task": row_task(row)}
            if row_id in heldout:
                ledger.record(row_id, "evaluated", decision="heldout_accuracy", related_ids=[plan.checkpoint_id],
                              details=details)
                counts["evaluated"] += 1
            elif row_id in trained:
                ledger.record(row_id, "trained_on", decision="trained", related_ids=[plan.checkpoint_id],
                              details={**details, "method": "grpo", "max_steps": manifest["config"].get("max_steps")})
                counts["trained_on"] += 1
            else:
                reason = "too long for max_prompt_length" if row_id in too_long else "not sampled within max_steps"
                ledger.record(row_id, "not_trained", decision="left_out", reason=reason,
                              related_ids=[plan.checkpoint_id], details=details)
                counts["not_trained"] += 1
    return counts
