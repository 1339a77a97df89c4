"""A Dagster Pipes client for Kubernetes Jobs that always ends, with the pod's reason.

dagster-k8s's ``PipesK8sClient`` (0.29) starts a bare pod and waits in
``DagsterKubernetesClient.wait_for_pod``. When the pod is deleted, its log stream ends, the client
then waits for the pod to reach Terminated, finds no pod, and sits in the "waiting for pod to launch"
loop until ``pod_launch_timeout`` (a day by default): dagster-io/dagster#22453. Pending pods that can
never be scheduled wait up to five hours for readiness.

This client runs the stage as a ``batch/v1`` Job (for ``backoffLimit``, ``activeDeadlineSeconds``, TTL
and Indexed multi-node Jobs) and keeps one bounded loop in the calling thread: every poll reads the
Job and its pods and classifies them. It ends with `dagster.Failure` as soon as

- the Job reports Failed (``BackoffLimitExceeded``, ``DeadlineExceeded``, ...);
- a pod is deleted or disappears (``PodDeleted``), or the Job itself is deleted (``JobDeleted``);
- a pod fails (``OOMKilled``, ``Evicted``, ``Error`` with its exit code, ``DeadlineExceeded``) and the
  Job has no retries left;
- a container cannot start (``ImagePullBackOff``, ``ErrImagePull``, ``InvalidImageName``);
- no pod runs within ``start_timeout_s`` (``Unschedulable`` with the scheduler's message, or the
  container's waiting reason such as ``CreateContainerConfigError``);
- the wall clock passes the Job's deadline plus a grace period, whatever the API says;
- the API keeps failing for ``max_api_errors`` polls in a row.

Logs of the leader pod (completion index 0) stream in a background thread and carry the Pipes
messages (stderr), as with ``PipesK8sClient``; the thread never decides the outcome, so a hung log
stream cannot hang the step. The Job (and a multi-node Job's Service) is deleted when the step ends,
successfully or not; ``ttlSecondsAfterFinished`` covers a code server that dies first.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import kubernetes
import urllib3
from dagster._core.pipes.client import (
    PipesContextInjector,
    PipesMessageReader,
    PipesParams,
)
from dagster._core.pipes.context import PipesMessageHandler
from dagster._core.pipes.utils import (
    PipesEnvContextInjector,
    extract_message_or_forward_to_stdout,
    open_pipes_session,
)
from dagster_pipes import PipesDefaultMessageWriter, PipesExtras

from resources.k8s_spec import COMPLETION_INDEX_ANNOTATION, MAIN_CONTAINER

log = logging.getLogger(__name__)

IMAGE_ERRORS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
                          "RegistryUnavailable"})
# Waiting reasons that are part of a normal start; anything else is shown if the start times out.
STARTING = frozenset({"ContainerCreating", "PodInitializing", None})
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class PodProblem:
    """Why a pod did not (or will not) succeed."""

    reason: str
    message: str
    pod: str
    fatal: bool  # True: no Job retry can help (image errors, deletion)


def _condition(job: Any, *types: str) -> Any | None:
    for condition in (job.status and job.status.conditions) or []:
        if condition.type in types and condition.status == "True":
            return condition
    return None


def _container_statuses(pod: Any) -> list[Any]:
    status = pod.status
    if status is None:
        return []
    return [*(status.init_container_statuses or []), *(status.container_statuses or [])]


def pod_problem(pod: Any) -> PodProblem | None:
    """The failure a pod shows, if any: deletion, eviction, OOM kill, bad exit, image errors, deadline."""
    name = pod.metadata.name
    status = pod.status
    phase = status.phase if status else None
    if pod.metadata.deletion_timestamp is not None and phase not in ("Succeeded", "Failed"):
        return PodProblem("PodDeleted", f"pod {name} was deleted while {phase or 'pending'}", name, fatal=True)
    if status is not None and status.reason == "Evicted":
        return PodProblem("Evicted", status.message or "evicted by the kubelet", name, fatal=False)
    for container in _container_statuses(pod):
        state = container.state
        if state is None:
            continue
        if state.waiting is not None and state.waiting.reason in IMAGE_ERRORS:
            return PodProblem(state.waiting.reason, state.waiting.message or f"cannot pull {container.image}", name,
                              fatal=True)
        terminated = state.terminated
        if terminated is not None and terminated.exit_code != 0:
            reason = terminated.reason or "Error"
            detail = f"container {container.name} exited with code {terminated.exit_code}"
            if reason == "OOMKilled":
                detail += " (out of memory: raise the memory limit or lower the batch size)"
            if terminated.message:
                detail += f": {terminated.message.strip()}"
            return PodProblem(reason, detail, name, fatal=False)
    if phase == "Failed":
        return PodProblem(status.reason or "PodFailed", status.message or f"pod {name} failed", name, fatal=False)
    return None


def start_problem(pod: Any) -> str:
    """Why a pod is still not running: the scheduler's condition or a container's waiting reason."""
    parts = []
    for condition in (pod.status and pod.status.conditions) or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            parts.append(f"{condition.reason or 'Unschedulable'}: {condition.message or ''}".strip())
    for container in _container_statuses(pod):
        waiting = container.state and container.state.waiting
        if waiting is not None and waiting.reason not in STARTING:
            parts.append(f"{waiting.reason}: {waiting.message or ''}".strip())
    return "; ".join(parts)


def _is_leader(pod: Any) -> bool:
    annotations = pod.metadata.annotations or {}
    return annotations.get(COMPLETION_INDEX_ANNOTATION, "0") == "0"


def _since_seconds(last_key: str | None, buffer_s: int = 10) -> int | None:
    """How far back a reconnect re-reads: past the last line seen (duplicates are skipped by timestamp)."""
    if last_key is None:
        return None
    seen = datetime.fromisoformat(last_key[:26]).replace(tzinfo=UTC)
    return max(1, int((datetime.now(UTC) - seen).total_seconds()) + buffer_s)


def _timestamp_key(timestamp: str) -> str:
    """RFC 3339 with nanoseconds, made sortable (the kubelet drops trailing zeros of the fraction)."""
    stamp = timestamp.rstrip("Z")
    whole, _, fraction = stamp.partition(".")
    return f"{whole}.{fraction.ljust(9, '0')}"


class PipesK8sJobLogReader(PipesMessageReader):
    """Pipes messages come from the leader pod's stderr, read by `PodLogFollower`."""

    def __init__(self) -> None:
        self.handler: PipesMessageHandler | None = None

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[PipesParams]:
        self.handler = handler
        try:
            yield {PipesDefaultMessageWriter.STDIO_KEY: PipesDefaultMessageWriter.STDERR}
        finally:
            self.handler = None

    def no_messages_debug_text(self) -> str:
        return "Read messages from the stderr of the Kubernetes Job's leader pod (completion index 0)."


class PodLogFollower(threading.Thread):
    """Follows one pod's container log: Pipes messages go to the handler, other lines to stdout and a tail.

    Reconnects (deduplicating by timestamp) when the stream drops while the pod lives; ends when the
    container exits, the pod is gone or `stop` is called.
    """

    def __init__(self, core_api: Any, pod: str, namespace: str, on_line: Callable[[str], None],
                 reconnects: int = 5, reconnect_wait_s: float = 1.0, read_timeout_s: float = 600.0) -> None:
        super().__init__(name=f"logs-{pod}", daemon=True)
        self.core_api, self.pod, self.namespace, self.on_line = core_api, pod, namespace, on_line
        self.reconnects, self.reconnect_wait_s, self.read_timeout_s = reconnects, reconnect_wait_s, read_timeout_s
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.error: str | None = None
        self._stopped = threading.Event()
        self._response: Any = None

    def run(self) -> None:
        last_key: str | None = None
        errors = 0
        while not self._stopped.is_set():
            try:
                self._response = self.core_api.read_namespaced_pod_log(
                    self.pod, self.namespace, container=MAIN_CONTAINER, follow=True, timestamps=True,
                    since_seconds=_since_seconds(last_key), _preload_content=False,
                    # A silent connection is re-opened rather than trusted forever (training can be
                    # quiet for minutes, so this is a read timeout, not a deadline).
                    _request_timeout=(30, self.read_timeout_s))
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                pending = ""
                for chunk in self._response:
                    pending += decoder.decode(chunk)
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        last_key = self._handle(line, last_key)
                pending += decoder.decode(b"", final=True)
                if pending:
                    last_key = self._handle(pending, last_key)
                # The API server may close a follow stream while the container still runs: only an
                # exited container (or a vanished pod) ends the stream for good.
                if not self._container_running():
                    return
            except Exception as error:  # noqa: BLE001 - the watcher, not this thread, decides the outcome
                if self._stopped.is_set():
                    return
                self.error = f"{type(error).__name__}: {error}"
                timeout = isinstance(error, urllib3.exceptions.ReadTimeoutError)
                errors += 0 if timeout else 1
                log.info("log stream of %s broke (%d errors): %s", self.pod, errors, self.error)
                if errors > self.reconnects:
                    return
            self._stopped.wait(self.reconnect_wait_s)

    def _container_running(self) -> bool:
        try:
            pods = self.core_api.list_namespaced_pod(self.namespace, field_selector=f"metadata.name={self.pod}").items
        except Exception:  # noqa: BLE001 - cannot tell: stop here, the watcher still decides the outcome
            return False
        for pod in pods:
            for status in _container_statuses(pod):
                if status.name == MAIN_CONTAINER and status.state is not None and status.state.running is not None:
                    return True
        return False

    def _handle(self, line: str, last_key: str | None) -> str | None:
        line = line.rstrip("\r")
        timestamp, _, message = line.partition(" ")
        key = _timestamp_key(timestamp) if timestamp[:1].isdigit() else None
        if key is None:
            message = line
        elif last_key is not None and key <= last_key:
            return last_key  # already seen before a reconnect
        if not message.lstrip().startswith('{"__dagster_pipes_version"'):
            self.tail.append(message)
        self.on_line(message)
        return key or last_key

    def stop(self) -> None:
        """Ends the stream from another thread (used only after the outcome is known)."""
        self._stopped.set()
        response = self._response
        for method in ("shutdown", "close", "release_conn"):
            try:
                getattr(response, method, lambda: None)()
            except Exception as error:  # noqa: BLE001 - best effort on a stream that is already going away
                log.debug("closing the log stream of %s: %s", self.pod, error)


class PipesK8sJobClient(dg.PipesClient):
    """Runs a Kubernetes Job through Pipes with a bounded, reason-reporting wait (see the module doc)."""

    def __init__(self, batch_api: Any, core_api: Any, *, poll_interval_s: float = 5.0, start_timeout_s: float = 900.0,
                 deadline_grace_s: float = 120.0, log_drain_timeout_s: float = 30.0, max_api_errors: int = 12,
                 delete_on_finish: bool = True, context_injector: PipesContextInjector | None = None,
                 sleeper: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.batch_api, self.core_api = batch_api, core_api
        self.poll_interval_s, self.start_timeout_s = poll_interval_s, start_timeout_s
        self.deadline_grace_s, self.log_drain_timeout_s = deadline_grace_s, log_drain_timeout_s
        self.max_api_errors, self.delete_on_finish = max_api_errors, delete_on_finish
        self.context_injector = context_injector or PipesEnvContextInjector()
        self.message_reader = PipesK8sJobLogReader()
        self.sleeper, self.clock = sleeper, clock

    def run(self, *, context: dg.OpExecutionContext | dg.AssetExecutionContext, extras: PipesExtras | None = None,
            namespace: str, build: Callable[[Mapping[str, str]], tuple[dict[str, Any], dict[str, Any] | None]],
            ) -> dg.PipesClientCompletedInvocation:
        """Create the Job that ``build(pipes_env)`` returns (and its Service), follow it, clean up.

        ``build`` receives the Pipes bootstrap env vars and returns ``(job_manifest, service_or_None)``.
        """
        with open_pipes_session(context=context, extras=extras, context_injector=self.context_injector,
                                message_reader=self.message_reader) as session:
            job, service = build(session.get_bootstrap_env_vars())
            name = job["metadata"]["name"]
            created: list[tuple[str, str]] = []
            try:
                try:
                    if service is not None:
                        self.core_api.create_namespaced_service(namespace, service)
                        created.append(("service", service["metadata"]["name"]))
                    self.batch_api.create_namespaced_job(namespace, job)
                    created.append(("job", name))
                except kubernetes.client.ApiException as error:
                    # 403: RBAC (k8s/rbac.yaml); 422: an invalid manifest; 409: a name clash.
                    raise dg.Failure(
                        description=f"Kubernetes rejected the Job {namespace}/{name}: {error.status} {error.reason}: "
                                    f"{(error.body or '')[:2000]}",
                        metadata={"reason": "JobRejected", "status": error.status or 0, "job": name,
                                  "namespace": namespace}) from None
                context.log.info(f"created Kubernetes Job {namespace}/{name} (image "
                                 f"{job['spec']['template']['spec']['containers'][0]['image']})")
                deadline = float(job["spec"].get("activeDeadlineSeconds") or 0)
                _JobWatch(self, context, name, namespace, deadline).wait()
            finally:
                if self.delete_on_finish:
                    self._delete(context, namespace, created)
        return dg.PipesClientCompletedInvocation(session)

    def _delete(self, context: Any, namespace: str, created: list[tuple[str, str]]) -> None:
        for kind, name in reversed(created):
            try:
                if kind == "job":
                    # Background propagation removes the Job's pods too (the default orphans them).
                    self.batch_api.delete_namespaced_job(name, namespace, propagation_policy="Background")
                else:
                    self.core_api.delete_namespaced_service(name, namespace)
            except kubernetes.client.ApiException as error:
                if error.status != 404:
                    context.log.warning(f"could not delete {kind} {namespace}/{name}: {error.status} {error.reason}")
            except Exception as error:  # noqa: BLE001 - never hide the step's own outcome; the TTL cleans up
                context.log.warning(f"could not delete {kind} {namespace}/{name}: {type(error).__name__}: {error}")


class _JobWatch:
    """One Job's bounded wait: the loop described in the module docstring."""

    def __init__(self, client: PipesK8sJobClient, context: Any, name: str, namespace: str, deadline_s: float) -> None:
        self.client, self.context, self.name, self.namespace = client, context, name, namespace
        self.started = client.clock()
        self.hard_deadline = self.started + deadline_s + client.deadline_grace_s if deadline_s else None
        self.follower: PodLogFollower | None = None
        self.seen: dict[str, Any] = {}  # pod name -> last seen pod
        self.failed: dict[str, PodProblem] = {}  # pods whose failure was already counted
        self.attempt_started = self.started

    # -- outcome ----------------------------------------------------------------------------------
    def fail(self, reason: str, message: str, pod: str | None = None) -> dg.Failure:
        tail = self._log_tail(pod)
        events = self._events(pod) if pod else []
        description = f"Kubernetes Job {self.namespace}/{self.name} failed: {reason}: {message}"
        if events:
            description += "\nEvents:\n" + "\n".join(f"  {e}" for e in events)
        if tail:
            description += "\nLast log lines:\n" + "\n".join(f"  {line}" for line in tail[-15:])
        metadata: dict[str, Any] = {"reason": reason, "message": message, "job": self.name, "namespace": self.namespace}
        if pod:
            metadata["pod"] = pod
        if tail:
            metadata["log_tail"] = dg.MetadataValue.text("\n".join(tail))
        self.context.log.error(description)
        return dg.Failure(description=description, metadata=metadata, allow_retries=reason not in IMAGE_ERRORS)

    def _log_tail(self, pod: str | None) -> list[str]:
        """The failed pod's last log lines: from the follower, or read once if it never streamed."""
        follower = self.follower
        if follower is not None and follower.pod == pod:
            follower.join(min(2.0, self.client.log_drain_timeout_s))  # let the last lines arrive
            if follower.tail:
                return list(follower.tail)
        if pod is None:
            return list(follower.tail) if follower else []
        try:
            raw = self.client.core_api.read_namespaced_pod_log(
                pod, self.namespace, container=MAIN_CONTAINER, tail_lines=LOG_TAIL_LINES, _preload_content=False)
            text = raw.data.decode("utf-8", errors="replace")
        except Exception:  # noqa: BLE001 - the pod may be gone; the reason is still reported
            return list(follower.tail) if follower else []
        return [line for line in text.splitlines() if not line.lstrip().startswith('{"__dagster_pipes_version"')]

    def _events(self, pod: str) -> list[str]:
        try:
            items = self.client.core_api.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.name={pod}").items
        except Exception:  # noqa: BLE001 - events only enrich the message
            return []
        return [f"{e.type or ''} {e.reason}: {e.message}".strip() for e in items[-5:]]

    # -- the loop --------------------------------------------------------------------------------
    def wait(self) -> None:
        api_errors = 0
        try:
            while True:
                now = self.client.clock()
                if self.hard_deadline is not None and now > self.hard_deadline:
                    raise self.fail("DeadlineExceeded", "the Job outlived activeDeadlineSeconds plus "
                                    f"{self.client.deadline_grace_s:.0f}s of grace", self._leader_name())
                try:
                    job = self.client.batch_api.read_namespaced_job(self.name, self.namespace)
                    pods = self.client.core_api.list_namespaced_pod(
                        self.namespace, label_selector=f"tulu/job={self.name}").items
                    api_errors = 0
                except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError) as error:
                    if getattr(error, "status", None) == 404:
                        raise self.fail("JobDeleted", "the Job was deleted while the step waited for it",
                                        self._leader_name()) from None
                    api_errors += 1
                    if api_errors >= self.client.max_api_errors:
                        detail = (f"{error.status} {error.reason}" if isinstance(error, kubernetes.client.ApiException)
                                  else f"{type(error).__name__}: {error}")
                        raise self.fail("KubernetesAPIError", f"{api_errors} failed polls in a row, last: "
                                        f"{detail}") from None
                    self.client.sleeper(self.client.poll_interval_s)
                    continue
                if self._step(job, pods, now):
                    self._drain()
                    return
                self.client.sleeper(self.client.poll_interval_s)
        finally:
            if self.follower is not None and self.follower.is_alive():
                self.follower.stop()

    def _step(self, job: Any, pods: list[Any], now: float) -> bool:
        """One poll: True when the Job completed; raises Failure when it cannot."""
        current = {pod.metadata.name: pod for pod in pods}
        if _condition(job, "Complete", "SuccessCriteriaMet") is not None:
            self.seen.update(current)
            return True
        failed = _condition(job, "Failed", "FailureTarget")
        if failed is not None:
            problem = next((p for p in (pod_problem(pod) for pod in pods) if p), None)
            problem = problem or next(iter(self.failed.values()), None) or self._vanished(current)
            reason, message = failed.reason or "JobFailed", failed.message or ""
            if problem:
                message = f"{problem.message} (pod {problem.pod}; Job {reason}: {message})"
                # Out of retries, the pod's own reason (OOMKilled, Evicted...) is what to act on.
                reason = problem.reason if reason == "BackoffLimitExceeded" else reason
            raise self.fail(reason, message, problem.pod if problem else self._leader_name())
        vanished = self._vanished(current)
        if vanished is not None:
            raise self.fail(vanished.reason, vanished.message, vanished.pod)
        self.seen.update(current)
        for pod in pods:
            name = pod.metadata.name
            if name in self.failed:
                continue
            problem = pod_problem(pod)
            if problem is None:
                continue
            if problem.fatal:
                raise self.fail(problem.reason, problem.message, name)
            self.failed[name] = problem
            retries = int(job.spec.backoff_limit or 0) if job.spec else 0
            if len(self.failed) > retries:
                raise self.fail(problem.reason, problem.message, name)
            self.context.log.warning(f"pod {name} failed ({problem.reason}: {problem.message}); the Job retries "
                                     f"({len(self.failed)} of backoffLimit {retries} used)")
            self.attempt_started = now
            self._stop_follower()
        self._follow_leader(pods, now)
        return False

    def _vanished(self, current: dict[str, Any]) -> PodProblem | None:
        """A pod seen before that is gone without having succeeded or failed: someone deleted it."""
        for gone in sorted(set(self.seen) - set(current) - set(self.failed)):
            phase = (self.seen[gone].status and self.seen[gone].status.phase) or "Pending"
            if phase != "Succeeded":
                return PodProblem("PodDeleted", f"pod {gone} disappeared while {phase}", gone, fatal=True)
        return None

    def _leader_name(self) -> str | None:
        return self.follower.pod if self.follower else next(iter(self.seen), None)

    def _follow_leader(self, pods: list[Any], now: float) -> None:
        live = [p for p in pods if _is_leader(p) and p.metadata.name not in self.failed]
        leader = max(live, key=lambda p: str(p.metadata.creation_timestamp or ""), default=None)
        phase = leader.status.phase if leader is not None and leader.status else None
        if leader is not None and phase in ("Running", "Succeeded", "Failed"):
            if self.follower is None or self.follower.pod != leader.metadata.name:
                self._stop_follower()
                self.context.log.info(f"pod {leader.metadata.name} is {phase}; streaming its logs")
                self.follower = PodLogFollower(self.client.core_api, leader.metadata.name, self.namespace,
                                               self._on_line)
                self.follower.start()
            return
        if now - self.attempt_started > self.client.start_timeout_s:
            waiting = [p for p in pods if p.metadata.name not in self.failed]
            detail = "; ".join(f"{p.metadata.name}: {start_problem(p) or (p.status and p.status.phase) or 'no status'}"
                               for p in waiting) or "the Job created no pod"
            reason = "Unschedulable" if "Unschedulable" in detail else "StartTimeout"
            raise self.fail(reason, f"no pod running after {self.client.start_timeout_s:.0f}s ({detail})",
                            waiting[0].metadata.name if waiting else None)

    def _on_line(self, line: str) -> None:
        handler = self.client.message_reader.handler
        if handler is not None:
            extract_message_or_forward_to_stdout(handler, line)

    def _stop_follower(self) -> None:
        if self.follower is not None:
            self.follower.stop()
            self.follower = None

    def _drain(self) -> None:
        """After success, let the log stream deliver the last Pipes messages (bounded)."""
        if self.follower is None:
            # The pod finished between two polls: its log is still there until the Job is deleted.
            leaders = [p for p in self.seen.values() if _is_leader(p)]
            if not leaders:
                return
            self.follower = PodLogFollower(self.client.core_api, leaders[-1].metadata.name, self.namespace,
                                           self._on_line)
            self.follower.start()
        self.follower.join(self.client.log_drain_timeout_s)
        if self.follower.is_alive():
            self.context.log.warning(f"the log stream of {self.follower.pod} did not end within "
                                     f"{self.client.log_drain_timeout_s:.0f}s after the Job completed")
