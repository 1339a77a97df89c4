"""Which evaluation benchmarks a checkpoint's training data was decontaminated against.

A checkpoint is trained on datasets (its manifest names them), which descend from one or more
``decontaminated_prompts`` versions; each of those records the eval source versions it was checked against
(its ``inputs``). A checkpoint's ancestors (the SFT checkpoint a DPO run started from, ...) count too: their
data is in the weights. Comparing that set with the current eval registry tells which benchmarks the
weights were never decontaminated against, e.g. a benchmark added after training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from tulu_pipeline.data.ingest import source_version
from tulu_pipeline.data.registry import SourceSpec, registry
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.storage import Store

DECONTAMINATED = "decontaminated_prompts"
# Manifest keys that name the checkpoint a run started from or was measured against.
PARENT_KEYS = ("start_checkpoint", "reference_checkpoint", "parent_checkpoint", "init_checkpoint")


@dataclass
class Coverage:
    """The eval sources a checkpoint's data was decontaminated against, and the current ones it was not."""

    checkpoint_id: str
    decontaminated_versions: list[str] = field(default_factory=list)
    covered: dict[str, str] = field(default_factory=dict)  # eval source id -> version checked against
    missing: list[str] = field(default_factory=list)  # current eval sources never checked against
    stale: list[str] = field(default_factory=list)  # checked against an older version of the source

    @property
    def complete(self) -> bool:
        return bool(self.decontaminated_versions) and not self.missing and not self.stale

    def missing_benchmarks(self, specs: Iterable[SourceSpec]) -> list[str]:
        by_id = {s.id: s.benchmark for s in specs}
        return sorted({by_id.get(i) or i for i in self.missing + self.stale})


def dataset_refs(manifest: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(dataset, version) pairs a manifest names: ``<x>_dataset`` + ``<x>_version`` keys and ``*inputs`` maps."""
    for key, value in manifest.items():
        if key.endswith("_dataset") and isinstance(value, str):
            version = manifest.get(key[: -len("_dataset")] + "_version")
            if isinstance(version, str):
                yield value, version
        elif key.endswith("inputs") and isinstance(value, dict):
            yield from ((k, v) for k, v in value.items() if isinstance(k, str) and isinstance(v, str))


def _decontaminated_versions(store: Store, name: str, version: str, seen: set[tuple[str, str]]) -> set[str]:
    if (name, version) in seen:
        return set()
    seen.add((name, version))
    if name == DECONTAMINATED:
        return {version}
    found: set[str] = set()
    info_rel = f"{store.dataset_dir(name, version)}/_dataset.json"
    if store.exists(info_rel):
        info = store.read_json(info_rel)
        for ref in dataset_refs(info):
            found |= _decontaminated_versions(store, *ref, seen)
    return found


def checkpoint_decontaminated_versions(store: Store, checkpoint_id: str) -> set[str]:
    """Every ``decontaminated_prompts`` version upstream of a checkpoint and its ancestor checkpoints."""
    found: set[str] = set()
    seen: set[tuple[str, str]] = set()
    pending, visited = [checkpoint_id], set()
    while pending:
        current = pending.pop()
        if current in visited or not store.exists("models", current, MANIFEST_FILE):
            continue
        visited.add(current)
        manifest = store.read_json(f"models/{current}/{MANIFEST_FILE}")
        for ref in dataset_refs(manifest):
            found |= _decontaminated_versions(store, *ref, seen)
        pending += [manifest[k] for k in PARENT_KEYS if isinstance(manifest.get(k), str)]
    return found


def eval_coverage(store: Store, checkpoint_id: str, specs: Iterable[SourceSpec] | None = None) -> Coverage:
    """Compare the eval versions a checkpoint's data was checked against with the current eval registry."""
    specs = [s for s in (specs if specs is not None else registry()) if s.role == "eval"]
    coverage = Coverage(checkpoint_id, sorted(checkpoint_decontaminated_versions(store, checkpoint_id)))
    checked: dict[str, set[str]] = {}
    for version in coverage.decontaminated_versions:
        info = store.read_json(f"{store.dataset_dir(DECONTAMINATED, version)}/_dataset.json")
        for name, eval_version in dict(dataset_refs(info)).items():
            if name.startswith("raw/"):
                checked.setdefault(name.removeprefix("raw/"), set()).add(eval_version)
    for spec in specs:
        versions = checked.get(spec.id)
        if not versions:
            coverage.missing.append(spec.id)
        elif source_version(spec) not in versions:
            coverage.stale.append(spec.id)
        else:
            coverage.covered[spec.id] = source_version(spec)
    return coverage


__all__ = ["Coverage", "checkpoint_decontaminated_versions", "dataset_refs", "eval_coverage"]
