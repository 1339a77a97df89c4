"""The compute launcher: training, generation and evaluation entrypoints run in their own process
through dagster-pipes, as local subprocesses or as Kubernetes GPU Jobs, with the same entrypoint.

Assets call ``launcher.run(context, module, extras)`` (optionally ``gpus=``, ``nproc_per_node=``,
``nodes=``, ``kind="train"|"generate"|"eval"``) and never ask where they run: the deployment's
resource set (`resources.resources_for`) decides.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from resources.k8s_spec import (
    DEFAULT_HOME_MOUNT,
    GPU_RESOURCE,
    GpuPodSpec,
    Toleration,
    entrypoint_command,
    headless_service,
    job_manifest,
    job_name,
    pod_spec,
)
from resources.pipes_messages import CompleteLineTempFileMessageReader
from tulu_pipeline.settings import repo_root
from tulu_pipeline.storage import Store
from tulu_pipeline.training.dpo_config import dpo_config
from tulu_pipeline.training.memory_plan import MemoryPlan, ModelShape, fits, plan_run, refusal_message
from tulu_pipeline.training.rlvr_config import rlvr_training_config
from tulu_pipeline.training.sft_config import sft_config
from tulu_pipeline.vllm_runtime import engine_env, require_vllm_python

StageKind = Literal["train", "generate", "eval"]
BACKEND_JOBS = ("tulu_pipeline.generation.job", "tulu_pipeline.preference.judge_job")
RLVR_JOB = "tulu_pipeline.training.rlvr_job"
# Training jobs the memory check plans: module -> (stage, the extras key naming the starting model's directory)
TRAINING_JOBS = {"tulu_pipeline.training.sft_job": ("sft", "base_model_dir"),
                 "tulu_pipeline.training.dpo_job": ("dpo", "reference_dir"),
                 RLVR_JOB: ("rlvr", "start_model_dir")}
STAGE_CONFIGS = {"sft": sft_config, "dpo": dpo_config, "rlvr": rlvr_training_config}


def needs_vllm(module: str, extras: dict[str, Any]) -> bool:
    """Whether job ``module`` with ``extras`` builds a vLLM engine: a generation or judge job whose ``backend``
    kind is ``vllm``, or a GRPO job whose resolved config (``preset`` + ``config``) has ``use_vllm``."""
    if module in BACKEND_JOBS:
        backend = extras.get("backend")
        if isinstance(backend, str):
            backend = json.loads(backend)
        return isinstance(backend, dict) and backend.get("kind") == "vllm"
    if module == RLVR_JOB:
        return rlvr_training_config(extras.get("preset") or "cpu_demo", **(extras.get("config") or {})).use_vllm
    return False


def _secret_ref(name: str, ref: str) -> tuple[str, str, str]:
    secret, _, key = ref.partition("/")
    if not secret or not key:
        raise ValueError(f"secret_env[{name!r}] must be '<Secret name>/<key>', got {ref!r}")
    return name, secret, key


class ComputeLauncher(dg.ConfigurableResource):
    """Runs ``python -m <module>`` with dagster-pipes and returns the completed invocation.

    ``gpus`` (per node), ``nproc_per_node`` (workers per node; ``torchrun`` when above one),
    ``nodes`` and ``kind`` (the stage's pod profile) are hints: each launcher honours what it can.
    """

    def run(self, context: dg.AssetExecutionContext, module: str, extras: dict[str, Any], *,
            gpus: int | None = None, nproc_per_node: int | None = None, nodes: int | None = None,
            kind: StageKind | None = None) -> dg.PipesClientCompletedInvocation:
        raise NotImplementedError  # abstract: LocalLauncher and K8sLauncher implement it


class LocalLauncher(ComputeLauncher):
    """A child process on this machine (PipesSubprocessClient); a terminated run terminates it too.

    Jobs that build a vLLM engine (`needs_vllm`) run with ``vllm_python``,
    the interpreter that has vLLM (the checkout's ``.venv-vllm`` by default), the others with ``python``.
    """

    python: str = Field(default_factory=lambda: sys.executable, description="interpreter for the entrypoint")
    vllm_python: str | None = Field(default=None, description="interpreter for vLLM jobs (default: "
                                    "$TULU_VLLM_PYTHON or <repo>/.venv-vllm/bin/python)")
    extra_env: dict[str, str] = Field(default_factory=dict, description="extra environment for the child process")

    def command(self, module: str, nproc_per_node: int | None = None, nodes: int | None = None,
                python: str | None = None) -> list[str]:
        """``python -m module``, or a standalone ``torchrun`` for several local workers."""
        python = python or self.python
        if nodes and nodes > 1:
            raise ValueError(f"{module}: {nodes} nodes need the Kubernetes launcher (TULU_DEPLOYMENT=k8s)")
        if nproc_per_node and nproc_per_node > 1:
            return [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", "--standalone",
                    "-m", module]
        return [python, "-m", module]

    def interpreter(self, module: str, extras: dict[str, Any]) -> str:
        """The python that runs ``module`` with ``extras``; FileNotFoundError if a vLLM job has none."""
        if not needs_vllm(module, extras):
            return self.python
        return self.vllm_python or str(require_vllm_python())

    def run(self, context, module, extras, *, gpus=None, nproc_per_node=None, nodes=None, kind=None):
        # GPUs are whatever this machine has; only an explicit worker count changes the command.
        python = self.interpreter(module, extras)
        env = {**os.environ, **self.extra_env}
        if python != self.python:
            env = engine_env(env)
        client = dg.PipesSubprocessClient(cwd=str(repo_root()), forward_termination=True,
                                          message_reader=CompleteLineTempFileMessageReader())
        return client.run(command=self.command(module, nproc_per_node, nodes, python), context=context,
                          extras=extras, env=env)


class TolerationConfig(dg.Config):
    """A pod toleration."""

    key: str
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = "NoSchedule"


class StageProfile(dg.Config):
    """Per-stage overrides of the launcher's pod settings; unset fields inherit the launcher's."""

    image: str | None = Field(default=None, description="e.g. a vLLM-ready image for generation")
    gpus: int | None = Field(default=None, ge=0)
    nodes: int | None = Field(default=None, ge=1)
    nproc_per_node: int | None = Field(default=None, ge=1)
    cpu: str | None = None
    memory: str | None = None
    cpu_limit: str | None = None
    memory_limit: str | None = None
    shm_size: str | None = None
    node_selector: dict[str, str] | None = None
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    backoff_limit: int | None = Field(default=None, ge=0)


class K8sLauncher(ComputeLauncher):
    """A Kubernetes Job per stage, built from the typed GPU pod settings below, followed through Pipes
    with a bounded wait that ends on the pod's failure reason (`resources.k8s_pipes`)."""

    image: str = Field(description="trainer image (k8s/Dockerfile.trainer)")
    namespace: str = "tulu"
    service_account: str = "tulu-pipeline"
    gpus: int = Field(default=1, ge=0, description="GPUs per node")
    nodes: int = Field(default=1, ge=1, description="pods of an Indexed Job; >1 adds a headless Service")
    nproc_per_node: int | None = Field(default=None, ge=1, description="torchrun workers per node (default: gpus)")
    cpu: str = "8"
    memory: str = "64Gi"
    cpu_limit: str | None = Field(default=None, description="default: the request")
    memory_limit: str | None = Field(default=None, description="default: the request")
    shm_size: str = "16Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[TolerationConfig] = Field(
        default_factory=lambda: [TolerationConfig(key=GPU_RESOURCE)],
        description="applied only to pods that request GPUs")
    env_secrets: list[str] = Field(default_factory=lambda: ["tulu-object-store"])
    secret_env: dict[str, str] = Field(
        default_factory=lambda: {"TULU_JUDGE_API_KEY": "tulu-judge/api-key"},
        description="env var -> '<Secret>/<key>' (optional secretKeyRef), e.g. the LLM judge's API key")
    extra_env: dict[str, str] = Field(default_factory=dict)  # "env" alone reads as an EnvVar to Dagster
    home_pvc: str | None = Field(default=None, description="ReadWriteMany claim mounted as TULU_HOME")
    home_mount_path: str = DEFAULT_HOME_MOUNT
    image_pull_secrets: list[str] = Field(default_factory=list)
    priority_class_name: str | None = None
    active_deadline_seconds: int = Field(default=86_400, ge=1)
    backoff_limit: int = Field(default=0, ge=0, description="Job retries; Dagster's retry policy is the usual place")
    ttl_seconds_after_finished: int = Field(default=3_600, ge=0)
    profiles: dict[str, StageProfile] = Field(default_factory=dict, description="per kind: train, generate, eval")
    poll_interval_s: float = Field(default=5.0, gt=0)
    start_timeout_s: float = Field(default=900.0, gt=0, description="longest a pod may stay pending")
    deadline_grace_s: float = Field(default=120.0, ge=0)
    log_drain_timeout_s: float = Field(default=30.0, ge=0)
    kubeconfig_file: str | None = None
    kube_context: str | None = None
    gpu_memory_gb: float | None = Field(
        default=None, gt=0, description="memory of each GPU (GiB); when set, a training Job (SFT, DPO, RLVR) is "
        "planned as `tulu plan` plans it (FSDP over its GPUs) and refused before it is created if it does not fit")

    def gpu_spec(self, kind: str | None = None, *, gpus: int | None = None, nproc_per_node: int | None = None,
                 nodes: int | None = None) -> GpuPodSpec:
        """The resolved spec of a stage: call arguments over the ``kind`` profile over the launcher's fields."""
        if kind is not None and kind not in ("train", "generate", "eval"):
            raise ValueError(f"kind must be train, generate or eval, got {kind!r}")
        unknown = set(self.profiles) - {"train", "generate", "eval"}
        if unknown:
            raise ValueError(f"K8sLauncher.profiles has unknown stage kinds {sorted(unknown)}")
        profile = self.profiles.get(kind or "train") or StageProfile()

        def pick(call: Any, name: str, default: Any) -> Any:
            for value in (call, getattr(profile, name)):
                if value is not None:
                    return value
            return default

        n_gpus = pick(gpus, "gpus", self.gpus)
        return GpuPodSpec(
            image=pick(None, "image", self.image),
            gpus=n_gpus,
            nodes=pick(nodes, "nodes", self.nodes),
            nproc_per_node=pick(nproc_per_node, "nproc_per_node", self.nproc_per_node),
            cpu_request=pick(None, "cpu", self.cpu),
            cpu_limit=pick(None, "cpu_limit", self.cpu_limit),
            memory_request=pick(None, "memory", self.memory),
            memory_limit=pick(None, "memory_limit", self.memory_limit),
            shm_size=pick(None, "shm_size", self.shm_size),
            node_selector=dict(pick(None, "node_selector", self.node_selector)),
            tolerations=tuple(Toleration(t.key, t.operator, t.value, t.effect) for t in self.tolerations)
            if n_gpus else (),
            service_account=self.service_account,
            env_secrets=tuple(self.env_secrets),
            secret_env=tuple(_secret_ref(name, ref) for name, ref in self.secret_env.items()),
            home_pvc=self.home_pvc,
            home_mount_path=self.home_mount_path,
            active_deadline_seconds=pick(None, "active_deadline_seconds", self.active_deadline_seconds),
            backoff_limit=pick(None, "backoff_limit", self.backoff_limit),
            ttl_seconds_after_finished=self.ttl_seconds_after_finished,
            image_pull_secrets=tuple(self.image_pull_secrets),
            priority_class_name=self.priority_class_name,
        )

    def pod_env(self) -> dict[str, str]:
        """Plain env for every pod: the deployment, TULU_HOME as the code server sees it, extra_env."""
        env = {"TULU_DEPLOYMENT": "k8s"}
        if os.environ.get("TULU_HOME"):
            env["TULU_HOME"] = os.environ["TULU_HOME"]
        return {**env, **self.extra_env}

    def pod_spec(self, kind: str | None = None, module: str = "tulu_pipeline.training.sft_job") -> dict[str, Any]:
        """The PodSpec (camelCase) a single-node stage of ``kind`` runs with, without the Pipes env."""
        spec = self.gpu_spec(kind, nodes=1)
        return pod_spec(spec, entrypoint_command(module, spec), self.pod_env(), namespace=self.namespace)

    def manifests(self, name: str, kind: str, spec: GpuPodSpec, module: str, env: dict[str, str],
                  labels: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The Job (and, for several nodes, its headless Service) of one stage run."""
        job = job_manifest(name, self.namespace, kind, spec, entrypoint_command(module, spec),
                           {**self.pod_env(), **env}, labels)
        service = headless_service(name, self.namespace, kind, spec) if spec.nodes > 1 else None
        return job, service

    def api_clients(self) -> tuple[Any, Any]:
        """(BatchV1Api, CoreV1Api): in-cluster config inside a pod, else the kubeconfig."""
        import kubernetes

        if os.environ.get("KUBERNETES_SERVICE_HOST") and not self.kubeconfig_file:
            kubernetes.config.load_incluster_config()
        else:
            kubernetes.config.load_kube_config(config_file=self.kubeconfig_file, context=self.kube_context)
        return kubernetes.client.BatchV1Api(), kubernetes.client.CoreV1Api()

    def memory_plan(self, module: str, extras: dict[str, Any], spec: GpuPodSpec) -> MemoryPlan | None:
        """The planner's answer for a training job on ``spec``'s GPUs, from the starting model's ``config.json``
        under TULU_HOME and the job's config; None without ``gpu_memory_gb``, without GPUs, for other jobs and for
        DPO's reference scoring (inference)."""
        if self.gpu_memory_gb is None or not spec.gpus or module not in TRAINING_JOBS:
            return None
        stage, model_key = TRAINING_JOBS[module]
        if stage == "dpo" and extras.get("task") != "train":
            return None
        model_dir = str(extras[model_key])
        config_path = f"{model_dir}/config.json"
        store = Store(str(extras["tulu_home"]))
        if not store.exists(config_path):
            raise FileNotFoundError(f"memory check of {module}: no {config_path} under {store.url}")
        shape = ModelShape.from_config(store.read_json(config_path), model_dir)
        preset = extras.get("preset") or "cpu_demo"
        config = STAGE_CONFIGS[stage](preset, **(extras.get("config") or {}))
        return plan_run(shape, stage, config, gpus=spec.gpus, nodes=spec.nodes, gpu_memory_gb=self.gpu_memory_gb,
                        preset=preset)

    def run(self, context, module, extras, *, gpus=None, nproc_per_node=None, nodes=None, kind=None):
        from resources.k8s_pipes import PipesK8sJobClient

        stage = kind or "train"
        spec = self.gpu_spec(stage, gpus=gpus, nproc_per_node=nproc_per_node, nodes=nodes)
        plan = self.memory_plan(module, extras, spec)
        if plan is not None and not fits(plan):
            raise dg.Failure(description=refusal_message(plan), metadata={
                "reason": "DoesNotFit", "planned_gib": round(plan.total_bytes / 2**30, 2),
                "gpu_memory_gb": self.gpu_memory_gb, "gpus": spec.gpus, "nodes": spec.nodes})
        run_id = context.run.run_id
        op_context = getattr(context, "op_execution_context", context)
        name = job_name(stage, run_id, op_context.op.name)
        labels = {"dagster/run-id": run_id}
        batch_api, core_api = self.api_clients()
        client = PipesK8sJobClient(batch_api, core_api, poll_interval_s=self.poll_interval_s,
                                   start_timeout_s=self.start_timeout_s, deadline_grace_s=self.deadline_grace_s,
                                   log_drain_timeout_s=self.log_drain_timeout_s)
        return client.run(context=context, extras=extras, namespace=self.namespace,
                          build=lambda pipes_env: self.manifests(name, stage, spec, module, dict(pipes_env), labels))
