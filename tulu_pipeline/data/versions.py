"""Content versions of the staged source files, for observation and change detection.

A source's data version is the sha256 of its file's bytes. Hashing the whole bundle on every sensor tick would
waste a core, so a file is re-hashed only when its size or modification time differs from the last look
(the previous versions travel in the sensor cursor).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping

from tulu_pipeline.data.registry import SourceSpec, sha256_file


@dataclass(frozen=True)
class FileVersion:
    """What one look at a source file saw. ``sha256`` is None when the file is missing."""

    sha256: str | None
    size: int
    mtime_ns: int
    pinned_sha256: str

    @property
    def matches_manifest(self) -> bool:
        return self.sha256 == self.pinned_sha256

    def to_json(self) -> dict:
        return asdict(self)


def look_at_sources(specs: Iterable[SourceSpec], root: Path,
                    previous: Mapping[str, FileVersion] | None = None) -> dict[str, FileVersion]:
    """Every source file's version; unchanged (size, mtime) files reuse the previous hash."""
    previous = previous or {}
    seen: dict[str, FileVersion] = {}
    for spec in specs:
        path = spec.local_path(root)
        try:
            stat = path.stat()
        except FileNotFoundError:
            seen[spec.id] = FileVersion(None, 0, 0, spec.sha256)
            continue
        before = previous.get(spec.id)
        if before and before.sha256 and (before.size, before.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            sha = before.sha256
        else:
            sha = sha256_file(path)
        seen[spec.id] = FileVersion(sha, stat.st_size, stat.st_mtime_ns, spec.sha256)
    return seen


def changed_sources(before: Mapping[str, FileVersion], after: Mapping[str, FileVersion]) -> list[str]:
    """Ids whose content changed, appeared or disappeared between two looks, sorted."""
    ids = set(before) | set(after)
    return sorted(i for i in ids
                  if (before.get(i).sha256 if i in before else None) != (after.get(i).sha256 if i in after else None))


def dump_versions(versions: Mapping[str, FileVersion]) -> str:
    """A sensor cursor: JSON, sorted, so an unchanged bundle gives an unchanged cursor."""
    return json.dumps({k: v.to_json() for k, v in sorted(versions.items())}, sort_keys=True)


def load_versions(cursor: str | None) -> dict[str, FileVersion]:
    if not cursor:
        return {}
    return {k: FileVersion(**v) for k, v in json.loads(cursor).items()}
