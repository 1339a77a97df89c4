"""Dagster resources, chosen once per deployment (``TULU_DEPLOYMENT=local|k8s``)."""

from __future__ import annotations

import os
from typing import Any

import yaml

from resources.compute import ComputeLauncher, K8sLauncher, LocalLauncher, StageProfile
from resources.generation import GenerationResource, JudgeResource
from resources.storage import DataBundle, TuluStorage

DEPLOYMENTS = ("local", "k8s")
K8S_LAUNCHER_ENV = "TULU_K8S_LAUNCHER"


def k8s_launcher_from_env() -> K8sLauncher:
    """The Kubernetes launcher configured by the environment (the Helm values set it).

    ``TULU_K8S_LAUNCHER`` holds the launcher's fields as a YAML/JSON mapping (GPU counts, node selector,
    stage profiles, deadlines...); ``TULU_TRAINER_IMAGE`` and ``TULU_K8S_NAMESPACE`` set the image and
    namespace when the mapping does not.
    """
    raw = os.environ.get(K8S_LAUNCHER_ENV, "").strip()
    fields: dict[str, Any] = {}
    if raw:
        loaded = yaml.safe_load(raw)
        if not isinstance(loaded, dict):
            raise ValueError(f"{K8S_LAUNCHER_ENV} must be a YAML mapping of K8sLauncher fields, got {raw[:80]!r}")
        fields = loaded
    fields.setdefault("image", os.environ.get("TULU_TRAINER_IMAGE", "tulu-pipeline/trainer:0.1.0"))
    fields.setdefault("namespace", os.environ.get("TULU_K8S_NAMESPACE", "tulu"))
    try:
        return K8sLauncher(**fields)
    except Exception as error:
        raise ValueError(f"{K8S_LAUNCHER_ENV} does not describe a valid K8sLauncher: {error}") from error


def resources_for(deployment: str) -> dict[str, object]:
    """The resource set of a deployment; assets never ask where they run."""
    if deployment not in DEPLOYMENTS:
        raise ValueError(f"TULU_DEPLOYMENT must be one of {DEPLOYMENTS}, got {deployment!r}")
    # Both deployments read their locations from the environment: locally the defaults point into the
    # checkout, on Kubernetes the Helm values set TULU_HOME to an object-store URL.
    if deployment == "k8s":
        # Generation and judging run in GPU pods: vLLM by default, an API judge when TULU_JUDGE_KIND=openai
        # (its key comes from the Secret mapped to TULU_JUDGE_API_KEY, never from a file).
        launcher: ComputeLauncher = k8s_launcher_from_env()
        generation = GenerationResource(kind=os.environ.get("TULU_GENERATION_KIND", "vllm"), device="cuda")
        judge = JudgeResource(kind=os.environ.get("TULU_JUDGE_KIND", "local"),
                              model=os.environ.get("TULU_JUDGE_MODEL", "models/base_model"),
                              base_url=os.environ.get("TULU_JUDGE_BASE_URL") or None,
                              api_key_env="TULU_JUDGE_API_KEY", device="cuda")
    else:
        launcher, generation, judge = LocalLauncher(), GenerationResource(), JudgeResource()
    return {"storage": TuluStorage(), "data_bundle": DataBundle(), "launcher": launcher,
            "generation": generation, "judge": judge}


__all__ = [
    "DEPLOYMENTS",
    "K8S_LAUNCHER_ENV",
    "ComputeLauncher",
    "DataBundle",
    "GenerationResource",
    "JudgeResource",
    "K8sLauncher",
    "LocalLauncher",
    "StageProfile",
    "TuluStorage",
    "k8s_launcher_from_env",
    "resources_for",
]
