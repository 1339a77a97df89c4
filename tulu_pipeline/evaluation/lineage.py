"""Checkpoints under TULU_HOME, their parents and their order (base → SFT → DPO → RLVR).

A checkpoint is a directory ``models/<checkpoint_id>/`` with a ``training_manifest.json``; the base model
is ``models/base_model``. A manifest names the checkpoint a run started from under one of
`PARENT_KEYS`; an SFT manifest that names none started from the base model.
"""

from __future__ import annotations

from typing import Any

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.storage import Store

BASE_MODEL_ID = "base_model"
PARENT_KEYS = ("start_checkpoint", "parent_checkpoint", "init_checkpoint", "policy_checkpoint", "reference_checkpoint")
STAGE_RANK = {"base": 0, "sft": 1, "dpo": 2, "rlvr": 3}


def stage_of(checkpoint_id: str) -> str:
    if checkpoint_id == BASE_MODEL_ID:
        return "base"
    prefix = checkpoint_id.split("-", 1)[0]
    return prefix if prefix in STAGE_RANK else "other"


def read_manifest(store: Store, checkpoint_id: str) -> dict[str, Any] | None:
    rel = f"models/{checkpoint_id}/{MANIFEST_FILE}"
    return store.read_json(rel) if store.exists(rel) else None


def parent_of(store: Store, checkpoint_id: str) -> str | None:
    """The checkpoint this one was trained from (None for the base model or an unknown start)."""
    if checkpoint_id == BASE_MODEL_ID:
        return None
    manifest = read_manifest(store, checkpoint_id) or {}
    for key in PARENT_KEYS:
        value = manifest.get(key)
        if isinstance(value, dict):
            value = value.get("checkpoint_id") or value.get("id")
        if isinstance(value, str) and value:
            return value.rstrip("/").rsplit("/", 1)[-1]  # tolerate "models/<id>" paths
    return BASE_MODEL_ID if stage_of(checkpoint_id) == "sft" else None


def list_checkpoints(store: Store) -> list[str]:
    """Every complete checkpoint (its manifest exists) plus the base model, in lineage order."""
    found = [name for name in store.listdir("models") if store.exists("models", name, MANIFEST_FILE)]
    if store.exists("models", BASE_MODEL_ID) and BASE_MODEL_ID not in found:
        found.append(BASE_MODEL_ID)
    return lineage_order(store, found)


def lineage_order(store: Store, checkpoint_ids: list[str]) -> list[str]:
    """Stage order (base, SFT, DPO, RLVR), then depth below the base, then id: stable and readable."""
    def depth(cid: str) -> int:
        seen, n = {cid}, 0
        while (parent := parent_of(store, cid)) and parent not in seen:
            seen.add(parent)
            cid, n = parent, n + 1
        return n

    return sorted(set(checkpoint_ids), key=lambda c: (STAGE_RANK.get(stage_of(c), 9), depth(c), c))


def ancestors(store: Store, checkpoint_id: str) -> list[str]:
    """The chain from a checkpoint's parent up to the base model (nearest first)."""
    chain, seen, current = [], {checkpoint_id}, checkpoint_id
    while (parent := parent_of(store, current)) and parent not in seen:
        chain.append(parent)
        seen.add(parent)
        current = parent
    return chain
