"""The compute launcher: local subprocesses through Pipes, and Kubernetes pods built offline."""


import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import dagster as dg
import kubernetes
import yaml
from dagster_k8s.pipes import build_pod_body

from resources import K8sLauncher, LocalLauncher, resources_for


def _validate(tmp_path: Path, manifest: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", **manifest}))
    cli = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    return subprocess.run([cli, "--strict", "--kubernetes-version", "1.30.0", str(path)],
                          capture_output=True, text=True)


def test_gpu_pod_spec_is_a_valid_pod(tmp_path: Path) -> None:
    launcher = K8sLauncher(image="tulu-pipeline/trainer:0.1.0", gpus=2, node_selector={"gpu": "h100"})
    pod = build_pod_body("tulu-sft", launcher.image, ["python", "-m", "tulu_pipeline.training.sft_job"],
                         {"TULU_DEPLOYMENT": "k8s"}, None, launcher.pod_spec())
    manifest = kubernetes.client.ApiClient().sanitize_for_serialization(pod)
    result = _validate(tmp_path, manifest)
    assert result.returncode == 0 and "WARN" not in result.stdout + result.stderr, result.stdout + result.stderr
    spec = manifest["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]
    assert spec["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert spec["nodeSelector"] == {"gpu": "h100"} and spec["serviceAccountName"] == "tulu-pipeline"
    assert container["envFrom"] == [{"secretRef": {"name": "tulu-object-store"}}]


def test_k8s_launcher_hands_the_pod_to_pipes() -> None:
    launcher = K8sLauncher(image="img:1", gpus=1)
    with mock.patch("dagster_k8s.PipesK8sClient") as client_cls:
        launcher.run(context=mock.sentinel.context, module="tulu_pipeline.training.sft_job", extras={"a": 1})
    kwargs = client_cls.return_value.run.call_args.kwargs
    assert kwargs["image"] == "img:1" and kwargs["namespace"] == "tulu"
    assert kwargs["command"] == ["python", "-m", "tulu_pipeline.training.sft_job"]
    assert kwargs["extras"] == {"a": 1} and kwargs["env"]["TULU_DEPLOYMENT"] == "k8s"
    assert kwargs["base_pod_spec"] == launcher.pod_spec()


def test_deployments_choose_launchers(monkeypatch) -> None:
    assert isinstance(resources_for("local")["launcher"], LocalLauncher)
    monkeypatch.setenv("TULU_TRAINER_IMAGE", "registry/trainer:7")
    launcher = resources_for("k8s")["launcher"]
    assert isinstance(launcher, K8sLauncher) and launcher.image == "registry/trainer:7"


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
