"""Thin Dagster definitions per stage: they call the library, attach metadata and declare checks."""
