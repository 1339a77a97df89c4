"""Rebuild what a checkpoint was made from, starting from its ``training_manifest.json``.

The manifest holds the canonical mix config, the mix hash, the training config and preset, the base
model hash and the row-id hashes. The mix hash is sha256 over (sampler version, mix config, input
versions), so the input version is found *from the manifest alone*: it is the stored
``decontaminated_prompts`` version for which `mix_hash` reproduces the recorded hash (or the
manifest's ``mix_inputs``, when the trainer records them). Sampling is a pure function of the config
and the set of eligible row ids, so re-running `eligible_ids_by_source` and `sample_mix` on that
version must give the same training and held-out ids; `reproduce_plan` checks that against the
manifest's row-id hashes and recomputes the checkpoint id from the training config.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from tulu_pipeline.audit.reports import decontamination_status, load_checkpoint_manifest
from tulu_pipeline.data.ingest import source_version
from tulu_pipeline.data.registry import get_source, registry_version
from tulu_pipeline.mixing.config import MixConfig
from tulu_pipeline.mixing.publish import SOURCE_DATASET
from tulu_pipeline.mixing.sample import MixSample, eligible_ids_by_source, mix_hash, row_ids_hash, sample_mix
from tulu_pipeline.provenance.ledger import Ledger
from tulu_pipeline.storage import TMP_MARKER, Store
from tulu_pipeline.training.sft_config import SFT_PRESETS
from tulu_pipeline.training.sft_plan import sft_checkpoint_id

REPRODUCE_DIR = "reports/reproduce"


class ReproduceError(ValueError):
    """A checkpoint whose inputs cannot be found or no longer reproduce."""


@dataclass(frozen=True)
class RebuiltMix:
    mix: MixConfig
    inputs: dict[str, str]
    resolved_by: str  # "manifest" (mix_inputs recorded) or "mix_hash_search"
    sample: MixSample


def resolve_mix_inputs(store: Store, manifest: dict[str, Any]) -> tuple[MixConfig, dict[str, str], str]:
    """The mix config and the input versions whose mix hash is the manifest's."""
    if not manifest.get("mix") or not manifest.get("mix_hash"):
        raise ReproduceError("training_manifest.json lacks the mix config or mix_hash (manifest_extra of the plan)")
    mix = MixConfig.model_validate(manifest["mix"])
    recorded = manifest["mix_hash"]
    if manifest.get("mix_inputs"):
        inputs = {str(k): str(v) for k, v in manifest["mix_inputs"].items()}
        if mix_hash(mix, inputs) != recorded:
            raise ReproduceError(f"mix_inputs {inputs} and the mix config hash to {mix_hash(mix, inputs)}, "
                                 f"not the recorded {recorded} (sampler code changed?)")
        return mix, inputs, "manifest"
    versions = [v for v in store.listdir(posixpath.join("data", SOURCE_DATASET))
                if v != "LATEST" and TMP_MARKER not in v]
    found = [v for v in versions if mix_hash(mix, {SOURCE_DATASET: v}) == recorded]
    if not found:
        raise ReproduceError(
            f"no stored {SOURCE_DATASET} version reproduces mix hash {recorded} with this mix config "
            f"({len(versions)} versions tried): the input version was deleted, or the sampler code version changed")
    return mix, {SOURCE_DATASET: found[0]}, "mix_hash_search"


def rebuild_mix(store: Store, manifest: dict[str, Any]) -> RebuiltMix:
    """Re-sample the mix of a manifest from its stored input version (reads the pool once; writes nothing)."""
    mix, inputs, how = resolve_mix_inputs(store, manifest)
    version = inputs[SOURCE_DATASET]
    wanted = set(mix.sources)
    available = eligible_ids_by_source(r for r in store.iter_rows(SOURCE_DATASET, version) if r["source"] in wanted)
    return RebuiltMix(mix, inputs, how, sample_mix(available, mix))


def _checkpoint_id(manifest: dict[str, Any]) -> str | None:
    """The id `training.plan.sft_checkpoint_plan` gives this code version, config, mix and base model."""
    needed = ("sft_code_version", "config", "mix_hash", "base_model_sha256")
    if any(manifest.get(k) is None for k in needed):
        return None
    return sft_checkpoint_id(manifest["sft_code_version"], manifest["config"], manifest["mix_hash"],
                             manifest["base_model_sha256"])


def _overrides(preset: str | None, config: dict[str, Any] | None) -> dict[str, Any] | None:
    if config is None:
        return None
    try:
        base = SFT_PRESETS[preset].model_dump(mode="json")
    except (ImportError, KeyError):
        return dict(config)
    return {k: v for k, v in config.items() if base.get(k) != v}


def _lineage(store: Store, row_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Data asset versions the mix's rows went through, from the ledger (sources and curation stages)."""
    rows = Ledger(store).query(
        "SELECT asset_key, asset_version, list(DISTINCT run_id ORDER BY run_id) AS run_ids, "
        "count(DISTINCT row_id) AS rows FROM events "
        "WHERE stage IN ('sources', 'curation', 'decontamination') GROUP BY ALL ORDER BY asset_key, asset_version",
        row_ids=row_ids)
    lineage: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        entry = {"version": r["asset_version"], "rows": r["rows"], "run_ids": r["run_ids"]}
        if r["asset_key"].startswith("raw/"):
            try:
                entry["current_registry_version"] = source_version(get_source(r["asset_key"].removeprefix("raw/")))
            except KeyError:
                entry["current_registry_version"] = None
        lineage.setdefault(r["asset_key"], []).append(entry)
    return lineage


def reproduce_plan(store: Store, checkpoint_id: str) -> dict[str, Any]:
    """Configs and data versions that rebuild ``checkpoint_id``, with the rebuilt mix verified."""
    manifest = load_checkpoint_manifest(store, checkpoint_id)
    rebuilt = rebuild_mix(store, manifest)
    sample = rebuilt.sample
    train_hash, heldout_hash = row_ids_hash(sample.train_ids), row_ids_hash(sample.heldout)
    recorded_heldout = manifest.get("heldout_row_ids")
    recomputed_id = _checkpoint_id(manifest)
    verified = {
        "mix_hash": mix_hash(rebuilt.mix, rebuilt.inputs) == manifest["mix_hash"],
        "train_row_ids_hash": train_hash == manifest.get("train_row_ids_hash"),
        "heldout_row_ids_hash": heldout_hash == manifest.get("heldout_row_ids_hash"),
        "heldout_row_ids": sorted(sample.heldout) == sorted(recorded_heldout) if recorded_heldout is not None else None,
        "checkpoint_id": recomputed_id == checkpoint_id if recomputed_id else None,
    }
    decontam_version = rebuilt.inputs[SOURCE_DATASET]
    status = decontamination_status(store, decontam_version)
    preset, config = manifest.get("preset"), manifest.get("config")
    overrides = _overrides(preset, config)
    return {
        "checkpoint_id": checkpoint_id,
        "identical": all(v is not False for v in verified.values()),
        "verified": verified,
        "inputs_resolved_by": rebuilt.resolved_by,
        "data": {
            "inputs": rebuilt.inputs,
            "decontamination": {k: status.get(k) for k in ("checks", "checks_passed", "ngram", "threshold",
                                                           "include_response")}
            | {"benchmarks": sorted(status.get("benchmarks") or {})},
            "lineage": _lineage(store, sample.train_ids + sample.heldout),
            "registry_version": registry_version(),
        },
        "mix": {"config": rebuilt.mix.canonical(), "mix_hash": manifest["mix_hash"],
                "counts": sample.counts, "train_rows": sample.n_train, "heldout_rows": sample.n_heldout,
                "train_row_ids_hash": train_hash, "heldout_row_ids_hash": heldout_hash},
        "training": {"preset": preset, "config": config, "overrides": overrides,
                     "base_model_sha256": manifest.get("base_model_sha256"),
                     "sft_code_version": manifest.get("sft_code_version"), "seed": manifest.get("seed"),
                     "checkpoint_id_recomputed": recomputed_id},
        "run_config": {"ops": {"sft_mix": {"config": {"mix": posixpath.join(REPRODUCE_DIR, checkpoint_id,
                                                                             "mix.yaml")}},
                               "sft_checkpoint": {"config": {"preset": preset, "overrides": overrides or {}}}}},
    }


def write_reproduction(store: Store, plan: dict[str, Any]) -> dict[str, str]:
    """Write ``reports/reproduce/<checkpoint>/{plan.json, mix.yaml, run_config.yaml}``; returns their locations."""
    import yaml

    base = posixpath.join(REPRODUCE_DIR, plan["checkpoint_id"])
    run_config = json.loads(json.dumps(plan["run_config"]))
    run_config["ops"]["sft_mix"]["config"]["mix"] = store.uri(base, "mix.yaml")
    return {
        "plan": store.write_json(f"{base}/plan.json", plan),
        "mix": store.write_bytes(f"{base}/mix.yaml", yaml.safe_dump(plan["mix"]["config"], sort_keys=False).encode()),
        "run_config": store.write_bytes(f"{base}/run_config.yaml",
                                        yaml.safe_dump(run_config, sort_keys=False).encode()),
    }
