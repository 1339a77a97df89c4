"""tulu-pipeline: a Tülu-3-style post-training factory with row-level provenance.

The library is importable and testable without Dagster; `assets/` and `resources/` wrap it.
"""

__version__ = "0.1.0"
