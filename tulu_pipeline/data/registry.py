"""The source registry: every staged dataset file as one typed row.

`sources.yaml` names each file and says how its records map to rows; the bundle's MANIFEST.json
(a copy ships as `manifest.json`) supplies format, license, sha256, row count and upstream location. `load_registry()` joins the two
and fails loudly when they disagree (a registry path missing from the manifest, or the reverse).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from tulu_pipeline.hashing import short_digest
from tulu_pipeline.settings import PACKAGE_DIR, data_dir as default_data_dir

REGISTRY_FILE = PACKAGE_DIR / "data" / "sources.yaml"
# A copy of the bundle's MANIFEST.json ships with the package, so the registry (and every file's
# sha256 and upstream location) is known even where the data bundle is absent and must be fetched.
MANIFEST_FILE = PACKAGE_DIR / "data" / "manifest.json"
FORMATS = ("jsonl", "jsonl.gz", "json", "csv")


class RegistryError(ValueError):
    """The registry table, the manifest or a data file disagree."""


class GroundTruthSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    field: str
    extract: Literal["gsm8k_final", "boxed"] | None = None


class MappingSpec(BaseModel):
    """How one record becomes a row; values are field paths (see sources.yaml)."""

    model_config = ConfigDict(extra="forbid")
    system: str | list[str] | None = None
    user: str | list[str] | None = None
    assistant: str | list[str] | None = None
    turns: str | None = None
    transcript: str | None = None
    rejected_transcript: str | None = None
    ground_truth: str | GroundTruthSpec | None = None
    constraints: list[str] = Field(default_factory=list)
    eval_id: str | None = None
    extra: list[str] = Field(default_factory=list)


class SourceEntry(BaseModel):
    """One row of sources.yaml."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z0-9_]+$")
    path: str
    role: Literal["train", "eval", "eval_reference"]
    suite: Literal["dev", "unseen"] | None = None
    benchmark: str | None = None
    records: str | None = None
    mapping: MappingSpec


@dataclass(frozen=True)
class SourceSpec:
    """A registry row joined with its manifest entry."""

    id: str
    path: str
    format: str
    role: str
    suite: str | None
    benchmark: str | None
    license: str
    sha256: str
    rows: int
    bytes: int
    upstream_repo: str
    upstream_commit: str
    upstream_path: str
    records: str | None
    mapping: MappingSpec
    notes: str = ""
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_non_commercial(self) -> bool:
        return "NC" in self.license.replace("-", " ").upper().split() or "BY-NC" in self.license.upper()

    @property
    def upstream_url(self) -> str | None:
        """Where the exact bytes can be downloaded, or None when the file was assembled from many files."""
        if "<" in self.upstream_path:  # e.g. MATH, concatenated from per-problem files
            return None
        return f"https://raw.githubusercontent.com/{self.upstream_repo}/{self.upstream_commit}/{self.upstream_path}"

    def local_path(self, root: Path | None = None) -> Path:
        return (root or default_data_dir()) / self.path

    def table_row(self) -> dict[str, Any]:
        """The flat registry-table view used in docs, metadata and `tulu sources`."""
        return {
            "id": self.id, "path": self.path, "format": self.format, "role": self.role,
            "suite": self.suite, "benchmark": self.benchmark, "license": self.license,
            "rows": self.rows, "sha256": self.sha256, "upstream": self.upstream_url or self.upstream_repo,
        }


def read_manifest(manifest_file: Path = MANIFEST_FILE) -> dict[str, dict[str, Any]]:
    """A data-bundle manifest (default: the copy shipped with the package), keyed by path."""
    if not manifest_file.exists():
        raise RegistryError(f"{manifest_file}: manifest not found (expected the data bundle's MANIFEST.json)")
    entries = json.loads(manifest_file.read_text())
    return {entry["path"]: entry for entry in entries}


def load_registry(manifest_file: Path = MANIFEST_FILE, registry_file: Path = REGISTRY_FILE) -> list[SourceSpec]:
    """All registered sources, in registry order, each checked against the manifest."""
    manifest = read_manifest(manifest_file)
    raw = yaml.safe_load(registry_file.read_text())
    specs: list[SourceSpec] = []
    seen_ids: set[str] = set()
    for index, item in enumerate(raw["sources"]):
        try:
            entry = SourceEntry.model_validate(item)
        except Exception as exc:  # pydantic's message names the bad column
            raise RegistryError(f"{registry_file}: source #{index} ({item.get('id')!r}) is invalid: {exc}") from exc
        if entry.id in seen_ids:
            raise RegistryError(f"{registry_file}: duplicate source id {entry.id!r}")
        seen_ids.add(entry.id)
        if entry.path not in manifest:
            raise RegistryError(f"{registry_file}: source {entry.id!r} path {entry.path!r} is not in MANIFEST.json")
        if entry.role == "eval" and (entry.suite is None or entry.benchmark is None):
            raise RegistryError(f"{registry_file}: eval source {entry.id!r} needs a suite and a benchmark")
        m = manifest[entry.path]
        if m["format"] not in FORMATS:
            raise RegistryError(f"MANIFEST.json: {entry.path} has unsupported format {m['format']!r}")
        specs.append(
            SourceSpec(
                id=entry.id, path=entry.path, format=m["format"], role=entry.role, suite=entry.suite,
                benchmark=entry.benchmark, license=m["license"], sha256=m["sha256"], rows=int(m["rows"]),
                bytes=int(m["bytes"]), upstream_repo=m["source_repo"], upstream_commit=m["commit"],
                upstream_path=m["original_path"], records=entry.records, mapping=entry.mapping,
                notes=m.get("notes", ""), manifest=m,
            )
        )
    unregistered = sorted(set(manifest) - {spec.path for spec in specs})
    if unregistered:
        raise RegistryError(f"{registry_file}: files in MANIFEST.json without a registry row: {unregistered}")
    return specs


def active_manifest_file() -> Path:
    """The manifest the registry reads: the data bundle's own MANIFEST.json when the bundle is present (it is
    the authority on its files, so an updated bundle re-pins its hashes), else the packaged copy (enough to fetch)."""
    bundled = default_data_dir() / "MANIFEST.json"
    return bundled if bundled.is_file() else MANIFEST_FILE


@lru_cache(maxsize=4)
def _registry_from(manifest_file: Path, mtime_ns: int) -> tuple[SourceSpec, ...]:
    return tuple(load_registry(manifest_file))


def registry() -> tuple[SourceSpec, ...]:
    """The packaged sources.yaml joined with the active manifest; re-read when the manifest file changes."""
    manifest = active_manifest_file()
    return _registry_from(manifest, manifest.stat().st_mtime_ns)


def get_source(source_id: str) -> SourceSpec:
    for spec in registry():
        if spec.id == source_id:
            return spec
    raise KeyError(f"unknown source {source_id!r}; known: {[s.id for s in registry()]}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(spec: SourceSpec, root: Path | None = None) -> Path:
    """The source file's path after checking that it exists and its sha256 matches the manifest."""
    path = spec.local_path(root)
    if not path.exists():
        raise RegistryError(
            f"{path}: source file for {spec.id!r} is missing (expected the bundle file; "
            f"`tulu sources fetch {spec.id}` downloads it from {spec.upstream_url or spec.upstream_repo})"
        )
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise RegistryError(
            f"{path}: sha256 mismatch for source {spec.id!r}: expected {spec.sha256} (MANIFEST.json), got {actual}"
        )
    return path


def fetch_source(spec: SourceSpec, root: Path | None = None, url: str | None = None) -> Path:
    """Download a missing source file from its upstream location and verify it before keeping it."""
    url = url or spec.upstream_url
    if url is None:
        raise RegistryError(
            f"source {spec.id!r} was assembled from many upstream files ({spec.upstream_path}); "
            "it cannot be downloaded as one file: copy the data bundle instead"
        )
    target = spec.local_path(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, tmp)
            tmp.close()
            actual = sha256_file(Path(tmp.name))
            if actual != spec.sha256:
                raise RegistryError(f"{url}: downloaded bytes have sha256 {actual}, expected {spec.sha256}")
            Path(tmp.name).replace(target)
        finally:
            Path(tmp.name).unlink(missing_ok=True)
    return target


def registry_version() -> str:
    """16 hex chars of sha256 over ``sources.yaml`` and the active manifest (names and bytes).

    Any change to a source's mapping, path, license or file hash changes it.
    """
    digest = hashlib.sha256()
    for path in (REGISTRY_FILE, active_manifest_file()):
        data = path.read_bytes()
        # lower-cased: the bundle's MANIFEST.json and its packaged copy manifest.json hash alike
        for piece in (path.name.lower().encode(), data):
            digest.update(len(piece).to_bytes(8, "big"))
            digest.update(piece)
    return short_digest(digest)
