"""The compute launcher: local subprocesses through Pipes, and Kubernetes Job manifests built offline.

Every rendered manifest is validated with ``kubernetes-validate --strict`` against the oldest supported
and the newest bundled Kubernetes schema; the unit tests pin down what the GPU spec puts where.
"""


import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from resources import (
    K8S_LAUNCHER_ENV,
    K8sLauncher,
    LocalLauncher,
    k8s_launcher_from_env,
    resources_for,
)
from resources.k8s_spec import (
    COMPLETION_INDEX_ANNOTATION,
    GpuPodSpec,
    headless_service,
    job_name,
    pod_spec,
)

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
PIPES_ENV = {"DAGSTER_PIPES_CONTEXT": "eJzLSM3JyQcABiwCFQ==", "DAGSTER_PIPES_MESSAGES": "eJyrVg=="}
SFT = "tulu_pipeline.training.sft_job"


def validate(tmp_path: Path, documents: list[dict]) -> str:
    """kubernetes-validate --strict on the documents; returns its output after checking every one passed."""
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    cli = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    command = [cli, "--strict"]
    for version in KUBERNETES_VERSIONS:
        command += ["--kubernetes-version", version]
    result = subprocess.run([*command, str(path)], check=False, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "WARN" not in output, output
    for doc in documents:
        for version in KUBERNETES_VERSIONS:
            minor = version.rsplit(".", 1)[0]
            resource = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
            assert f"passed for resource {resource} against version {minor}" in output, output
    return output


def gpu_launcher(**fields) -> K8sLauncher:
    return K8sLauncher(**{"image": "registry.example/tulu/trainer:1", **fields})


def rendered(launcher: K8sLauncher, kind: str = "train", **call) -> tuple[dict, dict | None]:
    spec = launcher.gpu_spec(kind, **call)
    return launcher.manifests(job_name(kind, "0123456789abcdef", "sft_checkpoint"), kind, spec, SFT, PIPES_ENV)


def container_of(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


# -- validation of every rendered shape ------------------------------------------------------------------
def test_every_rendered_job_validates_strictly(tmp_path: Path) -> None:
    launcher = gpu_launcher(
        gpus=8, node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, image_pull_secrets=["regcred"],
        priority_class_name="gpu-training", home_pvc="tulu-home", cpu_limit="16", memory_limit="96Gi",
        profiles={"generate": {"image": "registry.example/tulu/trainer-vllm:1", "gpus": 4, "shm_size": "32Gi"},
                  "eval": {"gpus": 1, "memory": "32Gi", "active_deadline_seconds": 7200}})
    documents = []
    for kind, call in [("train", {"gpus": 1}), ("train", {}), ("train", {"nodes": 4}), ("generate", {}),
                       ("eval", {}), ("eval", {"gpus": 0})]:
        job, service = rendered(launcher, kind, **call)
        job["metadata"]["name"] += f"-{len(documents)}"  # one file, distinct names
        documents.append(job)
        if service is not None:
            service["metadata"]["name"] += f"-{len(documents)}"
            documents.append(service)
    assert [d["kind"] for d in documents].count("Service") == 1
    validate(tmp_path, documents)


@pytest.mark.integration
def test_strict_validation_catches_a_misspelt_pod_field(tmp_path: Path) -> None:
    job, _ = rendered(gpu_launcher())
    job["spec"]["template"]["spec"]["nodeSelectors"] = {"pool": "gpu"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    cli = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    result = subprocess.run([cli, "--strict", "--kubernetes-version", "1.37.0", str(path)], capture_output=True,
                            check=False, text=True, timeout=120)
    assert result.returncode != 0 and "nodeSelectors" in result.stdout + result.stderr


# -- what the GPU spec puts where ------------------------------------------------------------------------
def test_single_gpu_job_spec() -> None:
    job, service = rendered(gpu_launcher(gpus=1, node_selector={"pool": "h100"}))
    assert service is None
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (0, 86400, 3600)
    assert "completionMode" not in spec
    pod = spec["template"]["spec"]
    container = container_of(job)
    assert container["command"] == ["python", "-m", SFT]
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"},
                                      "limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "tulu-pipeline"
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert container["envFrom"] == [{"secretRef": {"name": "tulu-object-store"}}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    judge = next(e for e in container["env"] if e["name"] == "TULU_JUDGE_API_KEY")
    assert judge["valueFrom"]["secretKeyRef"] == {"name": "tulu-judge", "key": "api-key", "optional": True}
    assert env["TULU_DEPLOYMENT"] == "k8s" and env["DAGSTER_PIPES_CONTEXT"] == PIPES_ENV["DAGSTER_PIPES_CONTEXT"]
    labels = spec["template"]["metadata"]["labels"]
    assert labels["tulu/job"] == job["metadata"]["name"] and labels["app.kubernetes.io/component"] == "train"


@pytest.mark.integration
def test_multi_gpu_uses_torchrun_with_one_worker_per_gpu() -> None:
    job, _ = rendered(gpu_launcher(gpus=8))
    assert container_of(job)["command"] == [
        "python", "-m", "torch.distributed.run", "--nproc_per_node=8", "--standalone", "-m", SFT]
    job, _ = rendered(gpu_launcher(gpus=8), nproc_per_node=4)
    assert "--nproc_per_node=4" in container_of(job)["command"]
    with pytest.raises(ValueError, match="exceeds the 2 GPUs"):
        gpu_launcher(gpus=2).gpu_spec(nproc_per_node=4)


def test_multi_node_is_an_indexed_job_with_a_headless_service() -> None:
    job, service = rendered(gpu_launcher(gpus=8, nodes=2))
    name = job["metadata"]["name"]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"tulu/job": name}
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    container = container_of(job)
    assert container["command"] == [
        "python", "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=2", "--node_rank=$(NODE_RANK)",
        "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)", "-m", SFT]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']")
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{name}.tulu.svc"
    assert len(f"{name}-1") <= 63  # the pod hostname is a DNS label


def test_stage_profiles_and_call_arguments_override_the_launcher() -> None:
    launcher = gpu_launcher(gpus=8, memory="64Gi", profiles={
        "generate": {"image": "registry.example/tulu/vllm:1", "gpus": 2, "shm_size": "32Gi"},
        "eval": {"gpus": 1, "memory": "16Gi", "active_deadline_seconds": 600}})
    train, generate, evaluate = (launcher.gpu_spec(k) for k in ("train", "generate", "eval"))
    assert (train.image, train.gpus, train.memory_request) == ("registry.example/tulu/trainer:1", 8, "64Gi")
    assert (generate.image, generate.gpus, generate.shm_size) == ("registry.example/tulu/vllm:1", 2, "32Gi")
    assert (evaluate.gpus, evaluate.memory_request, evaluate.active_deadline_seconds) == (1, "16Gi", 600)
    assert launcher.gpu_spec("generate", gpus=1).gpus == 1  # the asset's call wins
    with pytest.raises(ValueError, match="kind must be"):
        launcher.gpu_spec("finetune")
    with pytest.raises(ValueError, match="unknown stage kinds"):
        gpu_launcher(profiles={"sft": {"gpus": 1}}).gpu_spec()


def test_cpu_only_stage_has_no_gpu_request_or_toleration() -> None:
    job, _ = rendered(gpu_launcher(gpus=0))
    assert "nvidia.com/gpu" not in container_of(job)["resources"]["limits"]
    assert "tolerations" not in job["spec"]["template"]["spec"]


def test_home_pvc_mounts_the_claim_as_tulu_home(monkeypatch) -> None:
    monkeypatch.setenv("TULU_HOME", "/mnt/tulu-home")
    job, _ = rendered(gpu_launcher(home_pvc="tulu-home", env_secrets=[]))
    pod = job["spec"]["template"]["spec"]
    container = container_of(job)
    assert {"name": "tulu-home", "persistentVolumeClaim": {"claimName": "tulu-home"}} in pod["volumes"]
    assert {"name": "tulu-home", "mountPath": "/mnt/tulu-home"} in container["volumeMounts"]
    assert [e["value"] for e in container["env"] if e["name"] == "TULU_HOME"] == ["/mnt/tulu-home"]
    assert "envFrom" not in container


def test_limits_default_to_requests_and_can_be_raised() -> None:
    resources = container_of(rendered(gpu_launcher(cpu="4", memory="8Gi", memory_limit="12Gi"))[0])["resources"]
    assert resources["requests"]["memory"] == "8Gi" and resources["limits"]["memory"] == "12Gi"
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"] == "4"


def test_invalid_specs_are_rejected_with_the_reason() -> None:
    with pytest.raises(ValueError, match="nodes must be >= 1"):
        GpuPodSpec(image="x", nodes=0)
    with pytest.raises(ValueError, match="needs its Job name"):
        pod_spec(GpuPodSpec(image="x", nodes=2), ["python"], {})
    with pytest.raises(ValueError, match="must be '<Secret name>/<key>'"):
        gpu_launcher(secret_env={"OPENAI_API_KEY": "tulu-judge"}).gpu_spec()
    with pytest.raises(ValueError, match="backoff_limit"):
        GpuPodSpec(image="x", backoff_limit=-1)


def test_job_names_are_dns_labels_and_differ_per_attempt() -> None:
    names = {job_name("generate", "ABCDEF0123456789", "Judged_Completions.with.dots" * 3) for _ in range(5)}
    assert len(names) == 5
    for name in names:
        assert len(name) <= 52 and name.startswith("tulu-generate-abcdef01-")
        assert all(c.isalnum() and c.islower() or c.isdigit() or c == "-" for c in name)
    spec = GpuPodSpec(image="x", nodes=2)
    assert headless_service("n", "tulu", "train", spec)["spec"]["ports"][0]["port"] == 29500


# -- deployments -----------------------------------------------------------------------------------------
def test_deployments_choose_launchers(monkeypatch) -> None:
    assert isinstance(resources_for("local")["launcher"], LocalLauncher)
    monkeypatch.setenv("TULU_TRAINER_IMAGE", "registry/trainer:7")
    monkeypatch.delenv(K8S_LAUNCHER_ENV, raising=False)
    launcher = resources_for("k8s")["launcher"]
    assert isinstance(launcher, K8sLauncher) and launcher.image == "registry/trainer:7"
    with pytest.raises(ValueError, match="TULU_DEPLOYMENT must be one of"):
        resources_for("slurm")


def test_k8s_launcher_is_configured_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("TULU_TRAINER_IMAGE", "registry/trainer:7")
    monkeypatch.setenv(K8S_LAUNCHER_ENV, "gpus: 8\nnode_selector: {pool: h100}\n"
                                         "profiles:\n  generate: {image: registry/vllm:7, gpus: 4}\n")
    launcher = k8s_launcher_from_env()
    assert launcher.image == "registry/trainer:7" and launcher.gpus == 8
    assert launcher.gpu_spec("generate").image == "registry/vllm:7"
    monkeypatch.setenv(K8S_LAUNCHER_ENV, "gpus: many")
    with pytest.raises(ValueError, match=K8S_LAUNCHER_ENV):
        k8s_launcher_from_env()
    monkeypatch.setenv(K8S_LAUNCHER_ENV, "- not a mapping")
    with pytest.raises(ValueError, match="YAML mapping"):
        k8s_launcher_from_env()


def test_local_launcher_command() -> None:
    local = LocalLauncher(python="/usr/bin/python3")
    assert local.command(SFT) == ["/usr/bin/python3", "-m", SFT]
    assert local.command(SFT, nproc_per_node=2) == [
        "/usr/bin/python3", "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", SFT]
    with pytest.raises(ValueError, match="Kubernetes launcher"):
        local.command(SFT, nodes=2)


@pytest.mark.integration
def test_local_launcher_runs_a_pipes_entrypoint(tmp_path: Path) -> None:
    """A real child process reports a materialization with the extras it was given."""
    module = tmp_path / "echo_job.py"
    module.write_text(
        "from dagster_pipes import open_dagster_pipes\n"
        "with open_dagster_pipes() as pipes:\n"
        "    pipes.log.info('hello from the child')\n"
        "    pipes.report_asset_materialization(metadata={'seen': pipes.extras['value'] * 2})\n"
    )

    @dg.asset
    def echo(context: dg.AssetExecutionContext, launcher: LocalLauncher) -> dg.MaterializeResult:
        return launcher.run(context, "echo_job", extras={"value": 21}).get_materialize_result()

    result = dg.materialize([echo], resources={"launcher": LocalLauncher(extra_env={"PYTHONPATH": str(tmp_path)})})
    assert result.success
    assert result.asset_materializations_for_node("echo")[0].metadata["seen"].value == 42
