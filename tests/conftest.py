"""Shared fixtures: a temporary TULU_HOME and the real data bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from tulu_pipeline.settings import data_dir
from tulu_pipeline.storage import Store


@pytest.fixture(scope="session")
def bundle() -> Path:
    """The staged public datasets (../shared/data or $TULU_DATA_DIR)."""
    root = data_dir()
    if not (root / "MANIFEST.json").exists():
        pytest.fail(f"data bundle not found at {root}: set TULU_DATA_DIR")
    return root


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A fresh TULU_HOME for one test."""
    return Store(str(tmp_path / "tulu_home"))
