"""Dagster resources, chosen once per deployment (``TULU_DEPLOYMENT=local|k8s``)."""

from __future__ import annotations

import os

from resources.compute import ComputeLauncher, K8sLauncher, LocalLauncher
from resources.storage import DataBundle, TuluStorage

DEPLOYMENTS = ("local", "k8s")


def resources_for(deployment: str) -> dict[str, object]:
    """The resource set of a deployment; assets never ask where they run."""
    if deployment not in DEPLOYMENTS:
        raise ValueError(f"TULU_DEPLOYMENT must be one of {DEPLOYMENTS}, got {deployment!r}")
    # Both deployments read their locations from the environment: locally the defaults point into the
    # checkout, on Kubernetes the Helm values set TULU_HOME to an object-store URL.
    if deployment == "k8s":
        launcher: ComputeLauncher = K8sLauncher(image=os.environ.get("TULU_TRAINER_IMAGE", "tulu-pipeline/trainer:0.1.0"),
                                                namespace=os.environ.get("TULU_K8S_NAMESPACE", "tulu"))
    else:
        launcher = LocalLauncher()
    return {"storage": TuluStorage(), "data_bundle": DataBundle(), "launcher": launcher}


__all__ = ["ComputeLauncher", "DataBundle", "K8sLauncher", "LocalLauncher", "TuluStorage", "resources_for", "DEPLOYMENTS"]
