"""The compute launcher: training, generation and evaluation entrypoints run in their own process
through dagster-pipes, as local subprocesses or as Kubernetes GPU pods, with the same entrypoint."""

from __future__ import annotations

import os
import sys
from typing import Any

import dagster as dg
from pydantic import Field

from tulu_pipeline.settings import repo_root


class ComputeLauncher(dg.ConfigurableResource):
    """Runs ``python -m <module>`` with dagster-pipes and returns the completed invocation."""

    def run(self, context: dg.AssetExecutionContext, module: str, extras: dict[str, Any]) -> dg.PipesClientCompletedInvocation:
        raise NotImplementedError  # abstract: LocalLauncher and K8sLauncher implement it


class LocalLauncher(ComputeLauncher):
    """A child process on this machine (PipesSubprocessClient); a terminated run terminates it too."""

    python: str = Field(default_factory=lambda: sys.executable, description="interpreter for the entrypoint")
    extra_env: dict[str, str] = Field(default_factory=dict, description="extra environment for the child process")

    def run(self, context, module, extras):
        client = dg.PipesSubprocessClient(cwd=str(repo_root()), forward_termination=True)
        return client.run(command=[self.python, "-m", module], context=context, extras=extras,
                          env={**os.environ, **self.extra_env})


class K8sLauncher(ComputeLauncher):
    """A pod per run (PipesK8sClient) built from the typed GPU pod settings below."""

    image: str = Field(description="trainer image (k8s/Dockerfile.trainer)")
    namespace: str = "tulu"
    service_account: str = "tulu-pipeline"
    gpus: int = Field(default=1, ge=0)
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = "16Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    env_secrets: list[str] = Field(default_factory=lambda: ["tulu-object-store"])
    extra_env: dict[str, str] = Field(default_factory=dict)  # "env" alone reads as an EnvVar to Dagster

    def pod_spec(self) -> dict[str, Any]:
        """The base pod spec: GPU limits, /dev/shm as memory, secrets as env, a non-root security context."""
        resources = {"requests": {"cpu": self.cpu, "memory": self.memory}, "limits": {"cpu": self.cpu, "memory": self.memory}}
        if self.gpus:
            resources["limits"]["nvidia.com/gpu"] = str(self.gpus)
            resources["requests"]["nvidia.com/gpu"] = str(self.gpus)
        spec: dict[str, Any] = {
            "service_account_name": self.service_account,
            "restart_policy": "Never",
            "security_context": {"run_as_non_root": True, "run_as_user": 1000, "fs_group": 1000},
            "containers": [{
                "resources": resources,
                "env_from": [{"secret_ref": {"name": name}} for name in self.env_secrets],
                "volume_mounts": [{"name": "dshm", "mount_path": "/dev/shm"}],
                "security_context": {"allow_privilege_escalation": False, "capabilities": {"drop": ["ALL"]}},
            }],
            "volumes": [{"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": self.shm_size}}],
        }
        if self.node_selector:
            spec["node_selector"] = dict(self.node_selector)
        if self.gpus:
            spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        return spec

    def run(self, context, module, extras):
        from dagster_k8s import PipesK8sClient

        return PipesK8sClient().run(
            context=context, image=self.image, command=["python", "-m", module], namespace=self.namespace,
            env={"TULU_DEPLOYMENT": "k8s", **self.extra_env}, base_pod_spec=self.pod_spec(), extras=extras,
        )
