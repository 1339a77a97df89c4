"""Template-lineage checks across stages: does a checkpoint (or an evaluation) use the chat template, tokenizer
and label masking of everything it consumed tokenized (its mix, reference log-probs, start checkpoint)?"""

from __future__ import annotations

from typing import Any

from tulu_pipeline.data.coverage import PARENT_KEYS
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.mixing.publish import mix_info_path
from tulu_pipeline.templates.lineage import lineage_hashes, lineage_mismatches
from tulu_pipeline.training.dpo_reference import REFERENCE_DATASET


def _read(store: Any, rel: str) -> Any | None:
    return store.read_json(rel) if store.exists(rel) else None


def checkpoint_lineage(store: Any, checkpoint_id: str) -> dict[str, Any] | None:
    """The template lineage recorded in ``models/<checkpoint_id>``'s manifest (None: not recorded)."""
    manifest = _read(store, f"models/{checkpoint_id}/{MANIFEST_FILE}") or {}
    return manifest.get("template_lineage")


def parent_lineages(store: Any, checkpoint_id: str) -> dict[str, dict[str, Any] | None]:
    """``{parent name: lineage}`` of what a checkpoint consumed tokenized: its SFT mix, its reference
    log-probs, and the checkpoints it started from or was scored against."""
    manifest = _read(store, f"models/{checkpoint_id}/{MANIFEST_FILE}")
    if manifest is None:
        raise FileNotFoundError(f"no checkpoint {checkpoint_id!r} under {store.url} (expected models/{checkpoint_id}/{MANIFEST_FILE})")
    parents: dict[str, dict[str, Any] | None] = {}
    if manifest.get("mix_hash"):
        parents[f"sft_mix@{manifest['mix_hash']}"] = (_read(store, mix_info_path(manifest["mix_hash"])) or {}).get(
            "template_lineage")
    if manifest.get("reference_logprobs_version"):
        version = manifest["reference_logprobs_version"]
        parents[f"reference_logprobs@{version}"] = _read(
            store, f"{store.dataset_dir(REFERENCE_DATASET, version)}/template_lineage.json")
    for key in PARENT_KEYS:
        parent = manifest.get(key)
        if isinstance(parent, str) and parent and store.exists(f"models/{parent}/{MANIFEST_FILE}"):
            parents.setdefault(parent, checkpoint_lineage(store, parent))
    return parents


def check_checkpoint_lineage(store: Any, checkpoint_id: str) -> dict[str, Any]:
    """``{passed, description, problems, lineage, parents}``: does the checkpoint's template lineage match every
    parent's? (An SFT checkpoint's parent is its mix, not the base model: the base model's own template is
    SmolLM2's ChatML, which SFT replaces with Tülu's on purpose.)"""
    lineage = checkpoint_lineage(store, checkpoint_id)
    parents = parent_lineages(store, checkpoint_id)
    problems = [p for name, parent in parents.items() for p in lineage_mismatches(lineage, parent, checkpoint_id, name)]
    if not parents:
        problems.append(f"{checkpoint_id}: its manifest names no tokenized parent (mix, reference log-probs, start checkpoint)")
    return {"passed": not problems, "problems": problems,
            "description": "; ".join(problems) if problems else
            f"{checkpoint_id} tokenized like {', '.join(parents)} (template, tokenizer and label masking)",
            "lineage": lineage_hashes(lineage), "parents": {n: lineage_hashes(p) for n, p in parents.items()}}


def check_evaluation_lineage(summary: dict[str, Any], store: Any, checkpoint_id: str) -> dict[str, Any]:
    """The same comparison for an evaluation (its published ``summary``) against the checkpoint it evaluated.
    The base model has no training lineage: it is evaluated with its own template, which passes."""
    lineage = summary.get("template_lineage")
    parent = checkpoint_lineage(store, checkpoint_id)
    if parent is None and not store.exists(f"models/{checkpoint_id}/{MANIFEST_FILE}"):
        return {"passed": True, "problems": [], "lineage": lineage_hashes(lineage), "parents": {},
                "description": f"{checkpoint_id} is not a trained checkpoint: nothing to compare its template with"}
    name = f"eval/{summary.get('benchmark')}"
    problems = lineage_mismatches(lineage, parent, name, checkpoint_id)
    return {"passed": not problems, "problems": problems, "lineage": lineage_hashes(lineage),
            "parents": {checkpoint_id: lineage_hashes(parent)},
            "description": "; ".join(problems) if problems else f"{name} prompted {checkpoint_id} as it was trained"}
