"""Storage and data-bundle resources."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from tulu_pipeline.settings import data_dir, tulu_home
from tulu_pipeline.storage import Store


class TuluStorage(dg.ConfigurableResource):
    """TULU_HOME: the fsspec root (local directory or object-store URL) holding every artifact."""

    root: str = Field(default_factory=tulu_home, description="fsspec URL or path; defaults to $TULU_HOME or <repo>/.tulu")

    def store(self) -> Store:
        return Store(self.root)


class DataBundle(dg.ConfigurableResource):
    """Where the staged public datasets live (their MANIFEST.json pins every file's sha256)."""

    data_dir: str = Field(default_factory=lambda: str(data_dir()), description="defaults to $TULU_DATA_DIR or ../shared/data")
    download_missing: bool = Field(default=False, description="fetch a missing file from its upstream location")

    def path(self) -> Path:
        return Path(self.data_dir)
