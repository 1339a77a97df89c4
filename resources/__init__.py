"""Dagster resources, chosen once per deployment (``TULU_DEPLOYMENT=local|k8s``)."""

from __future__ import annotations

from resources.storage import DataBundle, TuluStorage

DEPLOYMENTS = ("local", "k8s")


def resources_for(deployment: str) -> dict[str, object]:
    """The resource set of a deployment; assets never ask where they run."""
    if deployment not in DEPLOYMENTS:
        raise ValueError(f"TULU_DEPLOYMENT must be one of {DEPLOYMENTS}, got {deployment!r}")
    # Both deployments read their locations from the environment: locally the defaults point into the
    # checkout, on Kubernetes the Helm values set TULU_HOME to an object-store URL.
    return {"storage": TuluStorage(), "data_bundle": DataBundle()}


__all__ = ["DataBundle", "TuluStorage", "resources_for", "DEPLOYMENTS"]
