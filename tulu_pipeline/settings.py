"""Where things live: TULU_HOME (artifacts), the data bundle, and the Dagster instance home.

Every location is a setting with a default that works from a checkout:
- ``TULU_HOME``: fsspec URL or path for all artifacts (default ``<repo>/.tulu``).
- ``TULU_DATA_DIR``: the staged public datasets (default ``<repo>/../shared/data``).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The checkout this package lives in, or the working directory for a non-editable install."""
    candidate = PACKAGE_DIR.parent
    if (candidate / "pyproject.toml").exists():
        return candidate
    return Path.cwd()


def tulu_home() -> str:
    """The artifact root as an fsspec URL or local path (``TULU_HOME``)."""
    return os.environ.get("TULU_HOME") or str(repo_root() / ".tulu")


def data_dir() -> Path:
    """The staged dataset bundle (``TULU_DATA_DIR``, default ``../shared/data`` beside the checkout)."""
    configured = os.environ.get("TULU_DATA_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    return (repo_root().parent / "shared" / "data").resolve()
