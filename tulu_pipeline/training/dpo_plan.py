"""What the DPO stage needs before it runs (content-addressed ids, job extras), and its ledger entries after."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tulu_pipeline.hashing import json_hash
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.provenance.ledger import LedgerWriter
from tulu_pipeline.templates.lineage import lineage_hashes
from tulu_pipeline.storage import Store
from tulu_pipeline.preference.schema import PAIRS_DATASET
from tulu_pipeline.training.dpo import DPO_CODE_VERSION, TRAINED_PAIRS_FILE
from tulu_pipeline.training.dpo_reference import REFERENCE_CODE_VERSION
from tulu_pipeline.training.dpo_config import dpo_config

JOB_MODULE = "tulu_pipeline.training.dpo_job"


@dataclass(frozen=True)
class SFTCheckpointRef:
    """A published SFT checkpoint: its id, directory (relative to TULU_HOME) and manifest fingerprint."""

    checkpoint_id: str
    checkpoint_dir: str
    fingerprint: str
    weights_sha256: str | None


def _hash(prefix: str, payload: dict[str, Any]) -> str:
    return prefix + json_hash(payload)


def sft_checkpoint_ref(store: Store, checkpoint_id: str | None = None) -> SFTCheckpointRef:
    """``models/<checkpoint_id>`` if given, else the most recently published ``models/sft-*`` checkpoint
    (the asset passes the id of sft_checkpoint's latest materialization when Dagster knows one)."""
    if checkpoint_id:
        candidates = [checkpoint_id]
    else:
        candidates = [name for name in store.listdir("models")
                      if name.startswith("sft-") and store.exists("models", name, MANIFEST_FILE)]
        if not candidates:
            raise FileNotFoundError(f"no published SFT checkpoint (models/sft-*/{MANIFEST_FILE}) under {store.url}; "
                                    "materialize sft_checkpoint first")
        # newest manifest wins; the id breaks ties so the choice is deterministic
        candidates.sort(key=lambda name: (store.fs.modified(store.path("models", name, MANIFEST_FILE)), name))
        candidates = candidates[-1:]
    chosen = candidates[0]
    rel = f"models/{chosen}"
    if not store.exists(rel, MANIFEST_FILE):
        raise FileNotFoundError(f"{store.uri(rel)} has no {MANIFEST_FILE}: not a finished SFT checkpoint")
    manifest = store.read_json(f"{rel}/{MANIFEST_FILE}")
    return SFTCheckpointRef(chosen, rel, manifest["fingerprint"], manifest.get("base_model_sha256"))


def pairs_version_or_fail(store: Store, pairs_dataset: str = PAIRS_DATASET) -> str:
    version = store.latest_version(pairs_dataset)
    if version is None:
        raise FileNotFoundError(f"{pairs_dataset} has not been materialized under {store.url}")
    return version


def reference_logprobs_version(pairs_version: str, reference: SFTCheckpointRef, max_length: int,
                               precision: str | bool) -> str:
    """Content address of the reference log-probs: pairs, reference checkpoint (id + fingerprint), max_length and
    the configured precision (``bf16``: True, False or "auto"). "auto" resolves where the job runs, so each row
    also records the dtype it was scored in and `run_dpo` recomputes rows scored in another dtype than it trains in.
    """
    return _hash("", {"code": REFERENCE_CODE_VERSION, "pairs": pairs_version, "reference": reference.checkpoint_id,
                      "reference_fingerprint": reference.fingerprint, "max_length": max_length,
                      "precision": precision})[:16]


@dataclass(frozen=True)
class ReferencePlan:
    version: str
    pairs_version: str
    reference: SFTCheckpointRef
    extras: dict[str, Any]


def reference_logprobs_plan(store: Store, preset: str, overrides: dict[str, Any],
                            sft_checkpoint_id: str | None = None) -> ReferencePlan:
    """The ``reference_logprobs`` version and the job extras that compute it."""
    config = dpo_config(preset, **overrides)
    pairs_version = pairs_version_or_fail(store)
    reference = sft_checkpoint_ref(store, sft_checkpoint_id)
    version = reference_logprobs_version(pairs_version, reference, config.max_length, config.bf16)
    extras = {"task": "reference_logprobs", "tulu_home": store.url, "pairs_dataset": PAIRS_DATASET,
              "pairs_version": pairs_version, "reference_dir": reference.checkpoint_dir, "reference_version": version,
              "preset": preset, "config": config.model_dump(mode="json")}
    return ReferencePlan(version, pairs_version, reference, extras)


@dataclass(frozen=True)
class DPOPlan:
    """One DPO run: its content-addressed id and the extras handed to the training process."""

    version: str
    checkpoint_id: str
    checkpoint_dir: str
    pairs_version: str
    reference: SFTCheckpointRef
    reference_version: str
    extras: dict[str, Any]


def dpo_checkpoint_id(code_version: str, config: dict[str, Any], pairs_version: str,
                      reference: SFTCheckpointRef) -> str:
    """``dpo-<hash>`` of the training code version, full config, pairs version and reference checkpoint."""
    return _hash("dpo-", {"code": code_version, "config": config, "pairs": pairs_version,
                          "reference": reference.checkpoint_id, "reference_fingerprint": reference.fingerprint})


def dpo_checkpoint_plan(store: Store, preset: str, overrides: dict[str, Any],
                        sft_checkpoint_id: str | None = None) -> DPOPlan:
    """The checkpoint id and job extras of a DPO run from the SFT checkpoint on the latest pairs."""
    reference_plan = reference_logprobs_plan(store, preset, overrides, sft_checkpoint_id)
    config = dpo_config(preset, **overrides)
    checkpoint_id = dpo_checkpoint_id(DPO_CODE_VERSION, config.model_dump(mode="json"),
                                      reference_plan.pairs_version, reference_plan.reference)
    checkpoint_dir = f"models/{checkpoint_id}"
    extras = {
        **reference_plan.extras,
        "task": "train",
        "checkpoint_dir": checkpoint_dir,
        "manifest_extra": {
            "checkpoint_id": checkpoint_id, "pairs_dataset": PAIRS_DATASET,
            "pairs_version": reference_plan.pairs_version,
            "reference_checkpoint": reference_plan.reference.checkpoint_id,
            "reference_checkpoint_fingerprint": reference_plan.reference.fingerprint,
            "reference_logprobs_version": reference_plan.version, "preset": preset,
        },
    }
    return DPOPlan(checkpoint_id.removeprefix("dpo-"), checkpoint_id, checkpoint_dir, reference_plan.pairs_version,
                   reference_plan.reference, reference_plan.version, extras)


def trained_pair_ids(store: Store, checkpoint_dir: str, manifest: dict[str, Any]) -> set[str]:
    """The pairs that reached at least one micro-batch of the run (the trainer writes them out)."""
    name = manifest.get("trained_pair_ids_file") or TRAINED_PAIRS_FILE
    if not store.exists(f"{checkpoint_dir}/{name}"):
        raise FileNotFoundError(f"{checkpoint_dir}: no {name}; was training complete?")
    return set(store.read_bytes(f"{checkpoint_dir}/{name}").decode().split())


def record_dpo_ledger(store: Store, plan: DPOPlan, manifest: dict[str, Any], run_id: str) -> dict[str, int]:
    """Ledger events on each pair's prompt row: ``trained_on`` (pairs the trainer saw), ``evaluated``
    (held-out pairs), ``not_trained`` (left out, or not reached within max_steps). Returns counts per event."""
    trained = trained_pair_ids(store, plan.checkpoint_dir, manifest)
    dropped = manifest.get("dropped_pairs") or {}
    counts = {"trained_on": 0, "evaluated": 0, "not_trained": 0}
    with LedgerWriter(store, "dpo", "dpo_checkpoint", plan.version, run_id) as ledger:
        for pair in store.iter_rows(PAIRS_DATASET, plan.pairs_version):
            pair_id, row_id = pair["pair_id"], pair["prompt_row_id"]
            related = [plan.checkpoint_id, pair_id]
            details = {"checkpoint": plan.checkpoint_id, "pairs_version": plan.pairs_version, "origin": pair.get("origin"),
                       "chosen_model": pair.get("chosen_model"), "rejected_model": pair.get("rejected_model"),
                       "template_lineage": lineage_hashes(manifest.get("template_lineage"))}
            if pair.get("split") == "heldout":
                event, decision, reason = "evaluated", "heldout_preference", None
            elif pair_id in trained:
                event, decision, reason = "trained_on", "trained", None
            else:
                event, decision = "not_trained", "left_out"
                reason = dropped.get(pair_id) or "not reached within max_steps"
            ledger.record(row_id, event, decision=decision, reason=reason, related_ids=related, details=details)
            counts[event] += 1
    return counts
