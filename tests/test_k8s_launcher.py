"""End to end through the Kubernetes launcher against a fake Kubernetes API (no cluster).

`FakeCluster` implements the slice of ``BatchV1Api``/``CoreV1Api`` that the launcher calls and
answers with real ``kubernetes.client`` models (deserialized from API JSON, as the real client does).
Its Job controller "runs" a pod by starting the container's command as a local subprocess with
*only* the pod's env (plain values, ``envFrom`` Secrets, the downward-API completion index), so a
passing materialization proves the Job manifest carries everything the entrypoint needs. The pod's
stdout and stderr become its log, streamed with kubelet-style timestamps. Failure modes are
injected as the kubelet and the controllers would report them.
"""


import functools
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest

from resources import K8sLauncher, LocalLauncher
from resources.k8s_spec import COMPLETION_INDEX_ANNOTATION
from tulu_pipeline.settings import repo_root

pytestmark = pytest.mark.integration  # Dagster runs whose fake pods are subprocesses

PIPES_MODULE = '''
import os, sys, time
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.info("hello from the pod")
    print("plain stdout line from the pod", flush=True)
    marker = pipes.extras.get("hold_first_attempt")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        print("working", flush=True)
        time.sleep(60)
    if pipes.extras.get("hold"):
        print("working", flush=True)
        time.sleep(float(pipes.extras["hold"]))
    if pipes.extras.get("exit_code"):
        print("about to fail", flush=True)
        sys.exit(int(pipes.extras["exit_code"]))
    pipes.report_asset_materialization(metadata={
        "seen": pipes.extras["value"] * 2,
        "deployment": os.environ.get("TULU_DEPLOYMENT"),
        "secret_key_id": os.environ.get("AWS_ACCESS_KEY_ID"),
        "judge_key": os.environ.get("TULU_JUDGE_API_KEY", "unset"),
    })
'''


@functools.cache
def _api_client() -> Any:
    import kubernetes  # at first use, not at collection

    return kubernetes.client.ApiClient()


def model(body: dict[str, Any], kind: str) -> Any:
    """A kubernetes-client model from API JSON, exactly as the real client deserializes responses."""
    return _api_client().deserialize(SimpleNamespace(data=json.dumps(body)), kind)


def api_error(status: int, reason: str) -> Exception:
    """``kubernetes.client.ApiException``, as the real client raises it."""
    import kubernetes

    return kubernetes.client.ApiException(status=status, reason=reason)


def rfc3339nano() -> str:
    # The kubelet trims trailing zeros of the fraction; the launcher must still order them.
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return stamp + "Z"


class FakePod:
    def __init__(self, name: str, job: str, index: int, template: dict[str, Any]):
        self.name, self.job, self.index, self.template = name, job, index, template
        self.created = datetime.now(UTC).isoformat()
        self.phase = "Pending"
        self.status_reason: str | None = None
        self.status_message: str | None = None
        self.container_state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        self.conditions: list[dict[str, Any]] = []
        self.deleting = False
        self.process: subprocess.Popen | None = None
        self.log: list[bytes] = []
        self.log_done = threading.Event()
        self.ticks = 0
        self.counted = False  # the Job controller counts each failed pod once

    def body(self) -> dict[str, Any]:
        container = self.template["spec"]["containers"][0]
        metadata = {"name": self.name, "namespace": "tulu", "creationTimestamp": self.created,
                    "labels": dict(self.template["metadata"]["labels"]),
                    "annotations": {COMPLETION_INDEX_ANNOTATION: str(self.index)}}
        if self.deleting:
            metadata["deletionTimestamp"] = datetime.now(UTC).isoformat()
        return {"metadata": metadata, "spec": self.template["spec"],
                "status": {"phase": self.phase, "reason": self.status_reason, "message": self.status_message,
                           "conditions": self.conditions,
                           "containerStatuses": [{"name": container["name"], "image": container["image"],
                                                  "imageID": "", "ready": self.phase == "Running",
                                                  "restartCount": 0, "state": self.container_state}]}}

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class FakeCluster:
    """Jobs, pods, logs, events and Services in one namespace, driven forward by each poll."""

    def __init__(self, secrets: dict[str, dict[str, str]] | None = None):
        self.jobs: dict[str, dict[str, Any]] = {}
        self.job_status: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, FakePod] = {}
        self.services: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, str]]] = {}
        self.secrets = secrets if secrets is not None else {"tulu-object-store": {"AWS_ACCESS_KEY_ID": "fake-key"},
                                                            "tulu-judge": {"api-key": "fake-judge-key"}}
        self.created_jobs: list[dict[str, Any]] = []
        self.pod_names: list[str] = []  # every pod ever created
        self.created_pods: list[FakePod] = []  # the same pods, kept after deletion
        self.deleted: list[tuple[str, str, str | None]] = []
        self.inject: Any = None  # callable(cluster, pod) run on every tick of a running pod
        self.no_start: dict[str, Any] | None = None  # a pod that never runs: (waiting state, conditions)
        self.lock = threading.RLock()
        self.batch = SimpleNamespace(create_namespaced_job=self.create_job, read_namespaced_job=self.read_job,
                                     delete_namespaced_job=self.delete_job)
        self.core = SimpleNamespace(list_namespaced_pod=self.list_pods, read_namespaced_pod_log=self.read_log,
                                    list_namespaced_event=self.list_events,
                                    create_namespaced_service=self.create_service,
                                    delete_namespaced_service=self.delete_service)

    # -- BatchV1Api ---------------------------------------------------------------------------------
    def create_job(self, namespace: str, body: dict[str, Any]) -> Any:
        name = body["metadata"]["name"]
        with self.lock:
            self.created_jobs.append(json.loads(json.dumps(body)))
            self.jobs[name] = body
            self.job_status[name] = {"active": 0, "failed": 0, "succeeded": 0, "conditions": []}
            for index in range(int(body["spec"].get("completions") or 1)):
                self._new_pod(name, index)
        return model(body, "V1Job")

    def read_job(self, name: str, namespace: str) -> Any:
        with self.lock:
            if name not in self.jobs:
                raise api_error(404, "Not Found")
            self._tick(name)
            if name not in self.jobs:  # deleted by an injected event during this tick
                raise api_error(404, "Not Found")
            return model({**self.jobs[name], "status": self.job_status[name]}, "V1Job")

    def delete_job(self, name: str, namespace: str, propagation_policy: str | None = None) -> None:
        with self.lock:
            self.deleted.append(("job", name, propagation_policy))
            if self.jobs.pop(name, None) is None:
                raise api_error(404, "Not Found")
            for pod in [p for p in self.pods.values() if p.job == name]:
                self.remove_pod(pod.name)

    # -- CoreV1Api ----------------------------------------------------------------------------------
    def list_pods(self, namespace: str, label_selector: str = "", field_selector: str = "") -> Any:
        key, _, value = label_selector.partition("=")
        name = field_selector.removeprefix("metadata.name=") if field_selector else None
        with self.lock:
            items = [p.body() for p in self.pods.values()
                     if (p.name == name if name else p.template["metadata"]["labels"].get(key) == value)]
        return model({"items": items}, "V1PodList")

    def read_log(self, name: str, namespace: str, container: str | None = None, follow: bool = False,
                 timestamps: bool = False, since_seconds: int | None = None, tail_lines: int | None = None,
                 _preload_content: bool = True, _request_timeout: Any = None) -> Any:
        with self.lock:
            pod = self.pods.get(name)
            if pod is None:
                raise api_error(404, "Not Found")
            if container != pod.template["spec"]["containers"][0]["name"]:
                raise api_error(400, f"container {container} is not valid for pod {name}")
            if pod.process is None:
                raise api_error(400, f'container "{container}" in pod "{name}" is waiting to start')
        if not follow:  # a one-off read: the response's .data holds the (last) lines
            lines = [line.partition(b" ")[2] if not timestamps else line for line in pod.log]
            return SimpleNamespace(data=b"".join(lines[-tail_lines:] if tail_lines else lines))
        return FakeLogStream(pod)

    def list_events(self, namespace: str, field_selector: str = "") -> Any:
        name = field_selector.partition("=")[2]
        items = [{"metadata": {"name": f"{name}.{i}"}, "involvedObject": {"name": name}, **e}
                 for i, e in enumerate(self.events.get(name, []))]
        return model({"items": items}, "CoreV1EventList")

    def create_service(self, namespace: str, body: dict[str, Any]) -> None:
        self.services[body["metadata"]["name"]] = body

    def delete_service(self, name: str, namespace: str) -> None:
        self.deleted.append(("service", name, None))
        if self.services.pop(name, None) is None:
            raise api_error(404, "Not Found")

    # -- what a person or the kubelet does ----------------------------------------------------------
    def remove_pod(self, name: str) -> None:
        """``kubectl delete pod``: the container is killed, its log stream ends, the pod disappears."""
        with self.lock:
            pod = self.pods.pop(name, None)
        if pod:
            pod.kill()
            pod.log_done.set()

    def fail_pod(self, pod: FakePod, *, reason: str, exit_code: int, phase_reason: str | None = None,
                 message: str | None = None) -> None:
        pod.kill()
        pod.phase = "Failed"
        pod.status_reason, pod.status_message = phase_reason, message
        pod.container_state = {"terminated": {"exitCode": exit_code, "reason": reason}}

    # -- the Job controller and kubelet ---------------------------------------------------------------
    def _new_pod(self, job: str, index: int) -> FakePod:
        template = self.jobs[job]["spec"]["template"]
        pod = FakePod(f"{job}-{index}-{len(self.pod_names):05d}", job, index, template)
        self.pods[pod.name] = pod
        self.pod_names.append(pod.name)
        self.created_pods.append(pod)
        return pod

    def _tick(self, job: str) -> None:
        status = self.job_status[job]
        spec = self.jobs[job]["spec"]
        if status["conditions"]:
            return
        pods = [p for p in self.pods.values() if p.job == job]
        for pod in pods:
            pod.ticks += 1
            if pod.phase == "Pending" and self.no_start is not None:
                pod.container_state = {"waiting": self.no_start["waiting"]}
                pod.conditions = self.no_start.get("conditions", [])
            elif pod.phase == "Pending" and pod.ticks >= 2:
                self._start(pod)
            elif pod.phase == "Running":
                if self.inject is not None:
                    self.inject(self, pod)
                if pod.name not in self.pods or status["conditions"]:
                    continue  # deleted, or the Job was failed by the injected event
                code = pod.process.poll() if pod.process else None
                if pod.phase == "Running" and code is not None:
                    pod.phase = "Succeeded" if code == 0 else "Failed"
                    pod.container_state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0
                                                          else "Error"}}
        for pod in [p for p in pods if p.phase == "Failed" and not p.counted]:
            pod.counted = True
            status["failed"] += 1
            if status["failed"] > int(spec.get("backoffLimit", 6)):
                status["conditions"] = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                         "message": "Job has reached the specified backoff limit"}]
                return
            self._new_pod(job, pod.index)  # a replacement for the failed index
        done = {p.index for p in pods if p.phase == "Succeeded"}
        if len(done) == int(spec.get("completions") or 1):
            status["succeeded"] = len(pods)
            status["conditions"] = [{"type": "Complete", "status": "True"}]

    def _start(self, pod: FakePod) -> None:
        container = pod.template["spec"]["containers"][0]
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1"}
        for source in container.get("envFrom", []):
            secret = self.secrets.get(source["secretRef"]["name"])
            if secret is None:
                pod.container_state = {"waiting": {"reason": "CreateContainerConfigError",
                                                   "message": f'secret "{source["secretRef"]["name"]}" not found'}}
                return
            env.update(secret)
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = entry["value"]
            elif entry.get("valueFrom", {}).get("fieldRef"):
                env[entry["name"]] = str(pod.index)  # the completion index annotation
            elif ref := entry.get("valueFrom", {}).get("secretKeyRef"):
                value = self.secrets.get(ref["name"], {}).get(ref["key"])
                if value is None and not ref.get("optional"):
                    pod.container_state = {"waiting": {"reason": "CreateContainerConfigError",
                                                       "message": f'secret "{ref["name"]}" not found'}}
                    return
                if value is not None:
                    env[entry["name"]] = value
        command = [sys.executable if part == "python" else part for part in container["command"]]
        pod.process = subprocess.Popen(command, env=env, cwd=str(repo_root()), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)
        pod.phase = "Running"
        pod.container_state = {"running": {"startedAt": datetime.now(UTC).isoformat()}}
        threading.Thread(target=self._collect, args=(pod,), daemon=True).start()

    @staticmethod
    def _collect(pod: FakePod) -> None:
        assert pod.process is not None and pod.process.stdout is not None
        for line in pod.process.stdout:
            pod.log.append(f"{rfc3339nano()} ".encode() + line)
        pod.log_done.set()


class FakeLogStream:
    """``read_namespaced_pod_log(follow=True, _preload_content=False)``: chunks until the container ends."""

    def __init__(self, pod: FakePod):
        self.pod, self.closed = pod, False

    def __iter__(self):
        sent = 0
        while not self.closed:
            while sent < len(self.pod.log):
                # Split lines across chunks, as HTTP chunking does.
                line = self.pod.log[sent]
                yield line[: len(line) // 2]
                yield line[len(line) // 2:]
                sent += 1
            if self.pod.log_done.is_set() and sent >= len(self.pod.log):
                return
            time.sleep(0.01)

    def close(self) -> None:
        self.closed = True

    release_conn = close


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture
def cluster(monkeypatch) -> FakeCluster:
    fake = FakeCluster()
    monkeypatch.setattr(K8sLauncher, "api_clients", lambda self: (fake.batch, fake.core))
    yield fake
    for pod in list(fake.pods.values()):
        pod.kill()


@pytest.fixture
def pipes_module(tmp_path: Path) -> Path:
    (tmp_path / "fake_pod_job.py").write_text(PIPES_MODULE)
    return tmp_path


def launcher(pipes_dir: Path, **fields: Any) -> K8sLauncher:
    settings = {"image": "registry.example/tulu/trainer:1", "gpus": 1, "poll_interval_s": 0.05,
                "start_timeout_s": 5.0, "log_drain_timeout_s": 10.0, "extra_env": {"PYTHONPATH": str(pipes_dir)}}
    return K8sLauncher(**{**settings, **fields})


def materialize(resource: K8sLauncher | LocalLauncher, extras: dict[str, Any], **run_kwargs: Any):
    @dg.asset
    def trained(context: dg.AssetExecutionContext, launcher: K8sLauncher) -> dg.MaterializeResult:
        return launcher.run(context, "fake_pod_job", extras=extras, **run_kwargs).get_materialize_result()

    return dg.materialize([trained], resources={"launcher": resource}, raise_on_error=False)


def failure_of(result) -> tuple[str, dict[str, Any]]:
    assert not result.success
    (event,) = result.get_step_failure_events()
    data = event.step_failure_data.user_failure_data
    assert data is not None, event.step_failure_data.error
    return data.description, {k: v.value for k, v in data.metadata.items()}


def run_failing(cluster: FakeCluster, pipes_dir: Path, extras: dict[str, Any], **fields: Any):
    result = materialize(launcher(pipes_dir, **fields), extras)
    description, metadata = failure_of(result)
    # Bounded: each failure ends the step in a few polls. A held pod sleeps 60 s and then exits 0, so a launcher
    # that waited it out instead would leave a pod that finished on its own (and pytest-timeout bounds the test).
    if extras.get("hold"):
        finished = [p.name for p in cluster.created_pods if p.process is not None and p.process.returncode == 0]
        assert not finished, f"the step waited for held pods to finish: {finished}"
    assert cluster.jobs == {}, "the Job must be deleted when the step ends"
    return description, metadata


# -- success --------------------------------------------------------------------------------------------
def test_asset_materializes_through_a_kubernetes_job(cluster: FakeCluster, pipes_module: Path, capsys) -> None:
    result = materialize(launcher(pipes_module), {"value": 21}, kind="train")
    assert result.success
    metadata = result.asset_materializations_for_node("trained")[0].metadata
    # Reported by the "pod" through Pipes messages in its log: it saw the extras, the deployment and the
    # object-store Secret that envFrom injected.
    assert metadata["seen"].value == 42
    assert metadata["deployment"].value == "k8s"
    assert metadata["secret_key_id"].value == "fake-key"
    assert metadata["judge_key"].value == "fake-judge-key"  # optional secretKeyRef, resolved
    assert "plain stdout line from the pod" in capsys.readouterr().out  # non-Pipes lines are forwarded

    (job,) = cluster.created_jobs
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600 and job["spec"]["activeDeadlineSeconds"] == 86400
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/tulu/trainer:1"
    assert container["command"] == ["python", "-m", "fake_pod_job"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES", "TULU_DEPLOYMENT"} <= set(env)
    assert job["metadata"]["name"].startswith("tulu-train-")
    assert cluster.deleted == [("job", job["metadata"]["name"], "Background")]


def test_job_retry_after_a_failed_pod_still_succeeds(cluster: FakeCluster, pipes_module: Path) -> None:
    """With backoffLimit 1 the first pod's OOM kill is a warning and the replacement pod's result counts."""
    def oom_first_pod(cluster: FakeCluster, pod: FakePod) -> None:
        if pod.name.endswith("-00000") and any(b"working" in line for line in pod.log):
            cluster.fail_pod(pod, reason="OOMKilled", exit_code=137)

    cluster.inject = oom_first_pod
    marker = pipes_module / "first-attempt"
    result = materialize(launcher(pipes_module, backoff_limit=1), {"value": 5, "hold_first_attempt": str(marker)})
    assert result.success
    assert result.asset_materializations_for_node("trained")[0].metadata["seen"].value == 10
    assert len(cluster.created_jobs) == 1 and len(cluster.pod_names) == 2
    assert next(iter(cluster.job_status.values()))["failed"] == 1


# -- failures: each ends the asset with the pod's reason, within a bounded time ---------------------------
def test_pod_deleted_while_running_fails_instead_of_hanging(cluster: FakeCluster, pipes_module: Path) -> None:
    """dagster-io/dagster#22453: PipesK8sClient waits a day for a deleted pod; this launcher stops."""
    def delete_once_working(cluster: FakeCluster, pod: FakePod) -> None:
        if any(b"working" in line for line in pod.log):
            cluster.inject = None
            cluster.remove_pod(pod.name)
            cluster._new_pod(pod.job, pod.index)  # the Job controller replaces it: still not a success

    cluster.inject = delete_once_working
    description, metadata = run_failing(cluster, pipes_module, {"value": 1, "hold": 60})
    assert metadata["reason"] == "PodDeleted"
    assert "disappeared while Running" in description
    assert "working" in metadata["log_tail"]  # the logs streamed before the deletion are kept


def test_pod_marked_for_deletion_fails(cluster: FakeCluster, pipes_module: Path) -> None:
    def mark(cluster: FakeCluster, pod: FakePod) -> None:
        if any(b"working" in line for line in pod.log):
            pod.deleting = True

    cluster.inject = mark
    _, metadata = run_failing(cluster, pipes_module, {"value": 1, "hold": 60})
    assert metadata["reason"] == "PodDeleted"


def test_oom_killed_pod_fails_with_the_reason(cluster: FakeCluster, pipes_module: Path) -> None:
    def oom(cluster: FakeCluster, pod: FakePod) -> None:
        if any(b"working" in line for line in pod.log):
            cluster.fail_pod(pod, reason="OOMKilled", exit_code=137)

    cluster.inject = oom
    description, metadata = run_failing(cluster, pipes_module, {"value": 1, "hold": 60})
    assert metadata["reason"] == "OOMKilled"
    assert "BackoffLimitExceeded" in description and "exited with code 137" in description


def test_evicted_pod_fails_with_the_kubelet_message(cluster: FakeCluster, pipes_module: Path) -> None:
    def evict(cluster: FakeCluster, pod: FakePod) -> None:
        if any(b"working" in line for line in pod.log):
            cluster.fail_pod(pod, reason="ContainerStatusUnknown", exit_code=137, phase_reason="Evicted",
                             message="The node was low on resource: ephemeral-storage.")

    cluster.inject = evict
    description, metadata = run_failing(cluster, pipes_module, {"value": 1, "hold": 60})
    assert metadata["reason"] == "Evicted"
    assert "Evicted" in description and "low on resource: ephemeral-storage" in description


def test_nonzero_exit_fails_with_the_exit_code_and_log_tail(cluster: FakeCluster, pipes_module: Path) -> None:
    description, metadata = run_failing(cluster, pipes_module, {"value": 1, "exit_code": 3})
    assert "exited with code 3" in description
    assert "about to fail" in metadata["log_tail"]


def test_image_pull_backoff_fails_at_once(cluster: FakeCluster, pipes_module: Path) -> None:
    cluster.no_start = {"waiting": {"reason": "ImagePullBackOff",
                                    "message": 'Back-off pulling image "registry.example/tulu/trainer:1"'}}
    description, metadata = run_failing(cluster, pipes_module, {"value": 1}, start_timeout_s=60.0)
    assert metadata["reason"] == "ImagePullBackOff"
    assert "Back-off pulling image" in description


def test_deadline_exceeded_fails_with_the_job_condition(cluster: FakeCluster, pipes_module: Path) -> None:
    def deadline(cluster: FakeCluster, pod: FakePod) -> None:
        if any(b"working" in line for line in pod.log):
            cluster.job_status[pod.job]["conditions"] = [{
                "type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline"}]
            cluster.remove_pod(pod.name)

    cluster.inject = deadline
    description, metadata = run_failing(cluster, pipes_module, {"value": 1, "hold": 60})
    assert metadata["reason"] == "DeadlineExceeded"
    assert "active longer than specified deadline" in description


def test_wall_clock_deadline_bounds_a_job_the_api_never_ends(cluster: FakeCluster, pipes_module: Path) -> None:
    """Even if the cluster never enforces activeDeadlineSeconds, the step ends after it plus the grace."""
    description, metadata = run_failing(cluster, pipes_module, {"value": 1, "hold": 60},
                                        active_deadline_seconds=1, deadline_grace_s=1.0)
    assert metadata["reason"] == "DeadlineExceeded" and "plus 1s of grace" in description


def test_unschedulable_pod_fails_after_the_start_timeout(cluster: FakeCluster, pipes_module: Path) -> None:
    cluster.no_start = {"waiting": {"reason": "ContainerCreating"}, "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}
    description, metadata = run_failing(cluster, pipes_module, {"value": 1}, start_timeout_s=0.5)
    assert metadata["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in description


def test_missing_secret_is_reported_after_the_start_timeout(pipes_module: Path, monkeypatch) -> None:
    fake = FakeCluster(secrets={})
    monkeypatch.setattr(K8sLauncher, "api_clients", lambda self: (fake.batch, fake.core))
    description, metadata = run_failing(fake, pipes_module, {"value": 1}, start_timeout_s=0.5)
    assert metadata["reason"] == "StartTimeout"
    assert 'CreateContainerConfigError: secret "tulu-object-store" not found' in description


def test_job_deleted_while_running_fails(cluster: FakeCluster, pipes_module: Path) -> None:
    def delete_job(cluster: FakeCluster, pod: FakePod) -> None:
        if any(b"working" in line for line in pod.log):
            cluster.inject = None
            with cluster.lock:
                cluster.jobs.pop(pod.job)
                cluster.remove_pod(pod.name)

    cluster.inject = delete_job
    _, metadata = run_failing(cluster, pipes_module, {"value": 1, "hold": 60})
    assert metadata["reason"] == "JobDeleted"


# -- multi-node -----------------------------------------------------------------------------------------
def test_multi_node_job_runs_every_rank_and_reads_the_leader(cluster: FakeCluster, tmp_path: Path) -> None:
    """Two Indexed pods: each gets its NODE_RANK from the completion index; rank 0 speaks Pipes."""
    (tmp_path / "fake_pod_job.py").write_text(
        "import os\n"
        "from dagster_pipes import open_dagster_pipes\n"
        "rank = os.environ['NODE_RANK']\n"
        "with open_dagster_pipes() as pipes:\n"
        "    if rank == '0':\n"
        "        pipes.report_asset_materialization(metadata={'rank': rank, 'master': os.environ['MASTER_ADDR']})\n"
    )
    # torchrun is not what this test is about: run the module directly on each node.
    launcher_ = launcher(tmp_path, gpus=0, nodes=2, nproc_per_node=1)
    original = K8sLauncher.manifests

    def single_process(self, name, kind, spec, module, env, labels=None):
        job, service = original(self, name, kind, spec, module, env, labels)
        job["spec"]["template"]["spec"]["containers"][0]["command"] = ["python", "-m", module]
        return job, service

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(K8sLauncher, "manifests", single_process)
        result = materialize(launcher_, {"value": 1})
    assert result.success
    metadata = result.asset_materializations_for_node("trained")[0].metadata
    (job,) = cluster.created_jobs
    name = job["metadata"]["name"]
    assert metadata["rank"].value == "0" and metadata["master"].value == f"{name}-0.{name}.tulu.svc"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert ("service", name, None) in cluster.deleted and cluster.services == {}


# -- the local launcher takes the same keyword arguments --------------------------------------------------
def test_local_launcher_accepts_the_same_call(pipes_module: Path) -> None:
    result = materialize(LocalLauncher(extra_env={"PYTHONPATH": str(pipes_module)}), {"value": 4},
                         gpus=1, kind="eval")
    assert result.success
    assert result.asset_materializations_for_node("trained")[0].metadata["seen"].value == 8


# -- the upstream hang, and the pieces of the fix ---------------------------------------------------------
def test_upstream_wait_for_pod_keeps_waiting_for_a_deleted_pod() -> None:
    """dagster-io/dagster#22453, reproduced on dagster-k8s's own wait loop with simulated time.

    After the log stream ends (the pod was deleted), ``PipesK8sClient.run`` calls
    ``wait_for_pod(Terminated)``; with no pod it loops "waiting for pod to launch" until the
    one-day ``pod_launch_timeout``. Ten simulated hours later it is still waiting.
    """
    from dagster_k8s.client import DagsterKubernetesClient, WaitForPodState

    clock = {"now": 0.0}

    class StillWaiting(Exception):
        pass

    def sleeper(seconds: float) -> None:
        clock["now"] += seconds
        if clock["now"] > 10 * 3600:
            raise StillWaiting

    core = SimpleNamespace(list_namespaced_pod=lambda **_: model({"items": []}, "V1PodList"))
    client = DagsterKubernetesClient(batch_api=None, core_api=core, logger=lambda _: None, sleeper=sleeper,
                                     timer=lambda: clock["now"])
    with pytest.raises(StillWaiting):
        client.wait_for_pod("deleted-pod", "tulu", wait_for_state=WaitForPodState.Terminated)


def test_interrupted_step_deletes_its_job(cluster: FakeCluster, pipes_module: Path) -> None:
    """A terminated Dagster run interrupts the step while it waits; the GPU Job must not outlive it."""
    from dagster._core.errors import DagsterExecutionInterruptedError

    def terminate_run(cluster: FakeCluster, pod: FakePod) -> None:
        if any(b"working" in line for line in pod.log):
            cluster.inject = None
            raise DagsterExecutionInterruptedError  # what Dagster raises in a step when its run is terminated

    cluster.inject = terminate_run
    result = materialize(launcher(pipes_module), {"value": 1, "hold": 60})
    assert not result.success
    (job,) = cluster.created_jobs
    assert cluster.jobs == {} and cluster.pods == {}
    assert cluster.deleted == [("job", job["metadata"]["name"], "Background")]


class BrokenThenReplayingLogs:
    """A log API whose first stream breaks mid-way; the reconnect replays lines already delivered."""

    LINES = tuple(f"2026-11-26T01:00:0{i}.5Z line {i}\n".encode() for i in range(6))

    def __init__(self) -> None:
        self.calls: list[int | None] = []

    def read_namespaced_pod_log(self, name, namespace, container=None, follow=False, timestamps=False,
                                since_seconds=None, _preload_content=True, _request_timeout=None):
        self.calls.append(since_seconds)
        if len(self.calls) == 1:
            def broken():
                yield from self.LINES[:3]
                raise ConnectionResetError("connection reset by peer")
            return broken()
        return iter(self.LINES[1:])  # since_seconds re-reads some history


def test_log_follower_reconnects_without_duplicates() -> None:
    from resources.k8s_pipes import PodLogFollower

    seen: list[str] = []
    api = BrokenThenReplayingLogs()
    follower = PodLogFollower(api, "pod", "tulu", seen.append, reconnect_wait_s=0.01)
    follower.start()
    follower.join(10)
    assert seen == [f"line {i}" for i in range(6)]
    assert api.calls[0] is None and api.calls[1] is not None
    assert "ConnectionResetError" in (follower.error or "")


def test_timestamps_without_trailing_zeros_still_order() -> None:
    from resources.k8s_pipes import _timestamp_key

    stamps = ["2026-11-26T01:00:00.1Z", "2026-11-26T01:00:00.09Z", "2026-11-26T01:00:00.123456789Z",
              "2026-11-26T01:00:00Z"]
    ordered = sorted(stamps, key=_timestamp_key)
    assert ordered == ["2026-11-26T01:00:00Z", "2026-11-26T01:00:00.09Z", "2026-11-26T01:00:00.1Z",
                       "2026-11-26T01:00:00.123456789Z"]


def test_rejected_job_fails_with_the_api_message(cluster: FakeCluster, pipes_module: Path, monkeypatch) -> None:
    def forbidden(namespace: str, body: dict[str, Any]) -> None:
        error = api_error(403, "Forbidden")
        error.body = 'jobs.batch is forbidden: User "system:serviceaccount:tulu:default" cannot create resource'
        raise error

    monkeypatch.setattr(cluster.batch, "create_namespaced_job", forbidden)
    description, metadata = failure_of(materialize(launcher(pipes_module), {"value": 1}))
    assert metadata["reason"] == "JobRejected" and metadata["status"] == 403
    assert "cannot create resource" in description and cluster.deleted == []


def test_log_stream_closed_by_the_server_while_running_is_reopened() -> None:
    """The API server may end a follow stream early; the follower re-opens it while the container runs."""
    from resources.k8s_pipes import PodLogFollower

    running = {"state": {"running": {}}}
    statuses = [running, running, {"state": {"terminated": {"exitCode": 0}}}]
    lines = [f"2026-11-26T01:00:0{i}Z line {i}\n".encode() for i in range(3)]

    class Api:
        opened = 0

        def read_namespaced_pod_log(self, *args, **kwargs):
            Api.opened += 1
            return iter(lines[: Api.opened])  # each stream ends early, repeating what was sent

        def list_namespaced_pod(self, namespace, field_selector=""):
            state = statuses.pop(0)
            return model({"items": [{"metadata": {"name": "pod"}, "status": {"containerStatuses": [
                {"name": "main", "image": "x", "imageID": "", "ready": True, "restartCount": 0, **state}]}}]},
                "V1PodList")

    seen: list[str] = []
    follower = PodLogFollower(Api(), "pod", "tulu", seen.append, reconnect_wait_s=0.01)
    follower.start()
    follower.join(10)
    assert not follower.is_alive()
    assert seen == ["line 0", "line 1", "line 2"] and Api.opened == 3


def test_an_unreachable_api_fails_after_bounded_retries(cluster: FakeCluster, pipes_module: Path,
                                                        monkeypatch) -> None:
    def unreachable(name: str, namespace: str) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(cluster.batch, "read_namespaced_job", unreachable)
    description, metadata = failure_of(materialize(launcher(pipes_module), {"value": 1}))
    assert metadata["reason"] == "KubernetesAPIError"
    assert "12 failed polls in a row" in description and "Connection refused" in description
    assert cluster.jobs == {}  # deleted all the same


# -- the memory check before a training Job ------------------------------------------------------------------
def training_extras(home: Path, model_config: str, preset: str) -> dict[str, Any]:
    """An SFT job's extras whose starting model under ``home`` has a shipped ``config.json`` (no weights)."""
    from tulu_pipeline.training.memory_plan import CONFIG_DIR
    from tulu_pipeline.training.sft_config import sft_config

    model_dir = home / "models" / "base_model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text((CONFIG_DIR / f"{model_config}.json").read_text())
    return {"tulu_home": str(home), "base_model_dir": "models/base_model", "preset": preset,
            "config": sft_config(preset).model_dump(mode="json")}


def test_a_training_job_that_does_not_fit_is_refused_before_any_job_is_created(
        cluster: FakeCluster, pipes_module: Path, tmp_path: Path) -> None:
    extras = training_extras(tmp_path / "home", "llama-3.1-8b", "tulu3_8b")

    @dg.asset
    def sft_checkpoint(context: dg.AssetExecutionContext, launcher: K8sLauncher) -> dg.MaterializeResult:
        return launcher.run(context, "tulu_pipeline.training.sft_job", extras=extras).get_materialize_result()

    result = dg.materialize([sft_checkpoint], resources={"launcher": launcher(pipes_module, gpu_memory_gb=80)},
                            raise_on_error=False)
    description, metadata = failure_of(result)
    assert metadata["reason"] == "DoesNotFit" and metadata["gpu_memory_gb"] == 80 and metadata["planned_gib"] > 80
    for remedy in ("does not fit", "what would fit", "FSDP over", "CPU offload", "LoRA"):
        assert remedy in description, remedy
    assert cluster.created_jobs == [] and cluster.pod_names == []


def test_the_memory_check_plans_training_jobs_only(pipes_module: Path, tmp_path: Path) -> None:
    from tulu_pipeline.training.memory_plan import fits

    extras = training_extras(tmp_path / "home", "smollm2-135m", "cpu_demo")
    checked = launcher(pipes_module, gpu_memory_gb=80)
    spec = checked.gpu_spec("train")
    plan = checked.memory_plan("tulu_pipeline.training.sft_job", extras, spec)
    assert plan is not None and fits(plan) and plan.parameter_count == 134_515_008
    assert checked.memory_plan("fake_pod_job", extras, spec) is None  # not a training job
    assert launcher(pipes_module).memory_plan("tulu_pipeline.training.sft_job", extras, spec) is None  # no limit set
    big = training_extras(tmp_path / "home8", "llama-3.1-8b", "tulu3_8b")
    eight = launcher(pipes_module, gpus=8, gpu_memory_gb=80)
    assert fits(eight.memory_plan("tulu_pipeline.training.sft_job", big, eight.gpu_spec("train")))  # FSDP over 8
    with pytest.raises(FileNotFoundError, match="no models/missing/config.json"):
        checked.memory_plan("tulu_pipeline.training.sft_job", {**extras, "base_model_dir": "models/missing"}, spec)
