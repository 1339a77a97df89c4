"""Kubernetes manifests for training, generation and evaluation jobs, built from a typed GPU spec.

Everything here is a plain function from a frozen `GpuPodSpec` to camelCase manifest dicts (what
``kubectl apply`` and the API server take), so the same builders serve the launcher, the tests and
``kubernetes-validate``. No Dagster and no cluster access.

A stage runs as a ``batch/v1`` Job: a Job, unlike a bare pod, carries ``backoffLimit``,
``activeDeadlineSeconds`` and ``ttlSecondsAfterFinished``, and an Indexed Job with a headless Service
gives every node of a multi-node run a stable DNS name (``<job>-<index>.<service>``) for the
``torchrun`` rendezvous.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import Any

MAIN_CONTAINER = "main"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_HOME_MOUNT = "/mnt/tulu-home"
APP_LABEL = "tulu-pipeline"
STAGE_KINDS = ("train", "generate", "eval")
# A Job's pods get the hostname <job>-<index>, which must stay a DNS label (63 characters).
MAX_JOB_NAME = 52


@dataclass(frozen=True)
class Toleration:
    """A pod toleration (for GPU nodes usually ``nvidia.com/gpu`` Exists NoSchedule)."""

    key: str
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = "NoSchedule"

    def manifest(self) -> dict[str, str]:
        return {k: v for k, v in (("key", self.key), ("operator", self.operator), ("value", self.value),
                                  ("effect", self.effect)) if v is not None}


GPU_TOLERATION = Toleration(GPU_RESOURCE)


@dataclass(frozen=True)
class GpuPodSpec:
    """Everything a stage's pods need, resolved (launcher defaults merged with a stage profile).

    ``gpus`` is per node; ``nproc_per_node`` defaults to it (one worker per GPU, ``torchrun``
    when more than one worker or node). ``home_pvc`` mounts a ReadWriteMany claim at
    ``home_mount_path`` and points ``TULU_HOME`` there; without it ``TULU_HOME`` is the
    object-store URL from the environment and ``env_secrets`` carry its credentials.
    """

    image: str
    gpus: int = 1
    nodes: int = 1
    nproc_per_node: int | None = None
    cpu_request: str = "8"
    cpu_limit: str | None = None
    memory_request: str = "64Gi"
    memory_limit: str | None = None
    shm_size: str = "16Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = (GPU_TOLERATION,)
    service_account: str = "tulu-pipeline"
    env_secrets: tuple[str, ...] = ("tulu-object-store",)
    # (env var, Secret, key): single keys as env vars, optional so a missing Secret does not block a pod.
    secret_env: tuple[tuple[str, str, str], ...] = (("TULU_JUDGE_API_KEY", "tulu-judge", "api-key"),)
    home_pvc: str | None = None
    home_mount_path: str = DEFAULT_HOME_MOUNT
    run_as_user: int = 1000
    active_deadline_seconds: int = 86_400
    backoff_limit: int = 0
    ttl_seconds_after_finished: int = 3_600
    rendezvous_port: int = 29_500
    image_pull_secrets: tuple[str, ...] = ()
    priority_class_name: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.gpus < 0:
            problems.append(f"gpus must be >= 0, got {self.gpus}")
        if self.nodes < 1:
            problems.append(f"nodes must be >= 1, got {self.nodes}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            problems.append(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.gpus and self.nproc_per_node and self.nproc_per_node > self.gpus:
            problems.append(f"nproc_per_node={self.nproc_per_node} exceeds the {self.gpus} GPUs per node")
        if self.active_deadline_seconds < 1 or self.backoff_limit < 0 or self.ttl_seconds_after_finished < 0:
            problems.append("active_deadline_seconds must be >= 1; backoff_limit and ttl_seconds_after_finished >= 0")
        if problems:
            raise ValueError("invalid GPU pod spec: " + "; ".join(problems))

    @property
    def workers_per_node(self) -> int:
        return self.nproc_per_node or max(self.gpus, 1)

    @property
    def distributed(self) -> bool:
        return self.nodes > 1 or self.workers_per_node > 1


def job_name(kind: str, run_id: str, step: str, rng: random.Random | None = None) -> str:
    """A DNS-safe Job name: stage kind, run id prefix, step name and a random suffix (retries differ)."""
    slug = re.sub(r"[^a-z0-9-]", "", step.lower().replace("_", "-")).strip("-")
    suffix = "".join((rng or random).choice(string.ascii_lowercase + string.digits) for _ in range(5))
    head = f"tulu-{kind}-{run_id[:8].lower()}-{slug}"[: MAX_JOB_NAME - 6].rstrip("-")
    return f"{head}-{suffix}"


def entrypoint_command(module: str, spec: GpuPodSpec) -> list[str]:
    """``python -m module``, or ``torchrun`` (as ``torch.distributed.run``) for several workers or nodes.

    Multi-node rendezvous uses the env vars `job_manifest` sets from the Job's completion index;
    Kubernetes expands ``$(VAR)`` in a container command from the container's own env.
    """
    if not spec.distributed:
        return ["python", "-m", module]
    launcher = ["python", "-m", "torch.distributed.run", f"--nproc_per_node={spec.workers_per_node}"]
    if spec.nodes == 1:
        return [*launcher, "--standalone", "-m", module]
    return [*launcher, f"--nnodes={spec.nodes}", "--node_rank=$(NODE_RANK)", "--master_addr=$(MASTER_ADDR)",
            "--master_port=$(MASTER_PORT)", "-m", module]


def labels_for(name: str, kind: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP_LABEL, "app.kubernetes.io/component": kind, "tulu/job": name,
            **(extra or {})}


def container_resources(spec: GpuPodSpec) -> dict[str, dict[str, str]]:
    requests = {"cpu": spec.cpu_request, "memory": spec.memory_request}
    limits = {"cpu": spec.cpu_limit or spec.cpu_request, "memory": spec.memory_limit or spec.memory_request}
    if spec.gpus:
        # Extended resources must have requests == limits; stating both documents the pool size.
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(spec.gpus)
    return {"requests": requests, "limits": limits}


def pod_spec(spec: GpuPodSpec, command: list[str], env: dict[str, str], *, service: str | None = None,
             job: str | None = None, namespace: str = "tulu") -> dict[str, Any]:
    """The PodSpec of one node: GPUs, /dev/shm in memory, TULU_HOME storage, secrets as env, non-root.

    ``env`` holds plain values (the Pipes bootstrap variables among them); a multi-node pod also gets
    its node rank from the Job's completion index and the leader's stable DNS name.
    """
    env_list: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in env.items()]
    env_list += [{"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
                 for name, secret, key in spec.secret_env if name not in env]
    volume_mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
    if spec.home_pvc:
        volume_mounts.append({"name": "tulu-home", "mountPath": spec.home_mount_path})
        volumes.append({"name": "tulu-home", "persistentVolumeClaim": {"claimName": spec.home_pvc}})
        env_list = [e for e in env_list if e["name"] != "TULU_HOME"]
        env_list.append({"name": "TULU_HOME", "value": spec.home_mount_path})
    if spec.nodes > 1:
        if not (service and job):
            raise ValueError("a multi-node pod needs its Job name and headless Service")
        env_list += [
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
                "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
            {"name": "MASTER_ADDR", "value": f"{job}-0.{service}.{namespace}.svc"},
            {"name": "MASTER_PORT", "value": str(spec.rendezvous_port)},
        ]
    container: dict[str, Any] = {
        "name": MAIN_CONTAINER,
        "image": spec.image,
        "command": list(command),
        "env": env_list,
        "resources": container_resources(spec),
        "volumeMounts": volume_mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    if spec.env_secrets:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in spec.env_secrets]
    if spec.nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": spec.rendezvous_port}]
    body: dict[str, Any] = {
        "serviceAccountName": spec.service_account,
        "restartPolicy": "Never",  # the Job's backoffLimit decides about retries, not the kubelet
        "securityContext": {"runAsNonRoot": True, "runAsUser": spec.run_as_user, "runAsGroup": spec.run_as_user,
                            "fsGroup": spec.run_as_user, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if spec.node_selector:
        body["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        body["tolerations"] = [t.manifest() for t in spec.tolerations]
    if spec.image_pull_secrets:
        body["imagePullSecrets"] = [{"name": name} for name in spec.image_pull_secrets]
    if spec.priority_class_name:
        body["priorityClassName"] = spec.priority_class_name
    if spec.nodes > 1 and service:
        body["subdomain"] = service  # <job>-<index>.<service> resolves through the headless Service
    return body


def job_manifest(name: str, namespace: str, kind: str, spec: GpuPodSpec, command: list[str], env: dict[str, str],
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``batch/v1`` Job of a stage; Indexed with one pod per node when ``spec.nodes > 1``."""
    all_labels = labels_for(name, kind, labels)
    service = name if spec.nodes > 1 else None
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "activeDeadlineSeconds": spec.active_deadline_seconds,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
        "template": {"metadata": {"labels": all_labels},
                     "spec": pod_spec(spec, command, env, service=service, job=name, namespace=namespace)},
    }
    if spec.nodes > 1:
        # All nodes must run at once for the rendezvous; a pod that fails fails the whole attempt.
        job_spec.update(completionMode="Indexed", completions=spec.nodes, parallelism=spec.nodes)
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": namespace, "labels": all_labels}, "spec": job_spec}


def headless_service(name: str, namespace: str, kind: str, spec: GpuPodSpec) -> dict[str, Any]:
    """The headless Service that gives a multi-node Job's pods their DNS names."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels_for(name, kind)},
        "spec": {"clusterIP": "None", "selector": {"tulu/job": name},
                 # Workers must find each other before they are "ready": there is no readiness probe.
                 "publishNotReadyAddresses": True,
                 "ports": [{"name": "rendezvous", "port": spec.rendezvous_port,
                            "targetPort": spec.rendezvous_port}]},
    }
