"""Helpers for the browser test: a `dagster dev` server in its own process group, its GraphQL API, a
headless Chromium (Debian's, driven by Python playwright), and reading the rendered asset graph."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
]
INSTALL_HINT = "install chromium: apt-get install -y chromium"


def require_browser() -> str:
    """Path of the system Chromium, once playwright is importable. Without them the test fails in CI (`CI` or
    `TULU_REQUIRE_BROWSER=1` set, as `.ci/run` does) and is skipped elsewhere."""
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright Python package is missing: pip install -e '.[dev]' (never `playwright install`)"
    executable = os.environ.get("TULU_CHROMIUM") or next(
        (path for name in CHROMIUM_CANDIDATES if (path := shutil.which(name))), None)
    if missing is None and not (executable and Path(executable).exists()):
        looked = os.environ.get("TULU_CHROMIUM") or ", ".join(CHROMIUM_CANDIDATES)
        missing = f"no Chromium executable found (looked for {looked}); {INSTALL_HINT}"
    if missing:
        if os.environ.get("CI", "").lower() not in ("", "0", "false") or os.environ.get("TULU_REQUIRE_BROWSER") == "1":
            pytest.fail(missing, pytrace=False)
        pytest.skip(missing)
    return executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5, diagnostics=lambda: ""):
    """Poll `predicate` until it returns something truthy; bounded by `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnostics()}")
        time.sleep(interval)


@dataclass
class DagsterDev:
    """`dagster dev` on a free port, started in a new session so teardown can kill the whole group."""

    repo: Path
    env: dict[str, str]
    log_path: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, dagster_bin: Path) -> None:
        self.port = self.port or free_port()
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [str(dagster_bin), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=self.repo, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_default_interrupt_signals,
        )

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return "--- dagster dev log (tail) ---\n" + self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"dagster dev exited with {self.process.returncode}\n{self.log_tail()}")

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def wait_ready(self, location: str, timeout: float) -> None:
        """The webserver answers /server_info and the code location is loaded (or fail with its error)."""
        def server_up() -> bool:
            self._alive()
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5) as response:
                    return response.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                return False

        wait_until(server_up, timeout, f"{self.url}/server_info", diagnostics=self.log_tail)

        def location_loaded() -> bool:
            self._alive()
            try:
                data = self.graphql("""{ workspaceOrError { __typename ... on Workspace { locationEntries {
                name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }""")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                return False
            entries = {e["name"]: e for e in data["workspaceOrError"].get("locationEntries", [])}
            entry = entries.get(location)
            if not entry or entry["loadStatus"] != "LOADED":
                return False
            loaded = entry["locationOrLoadError"] or {}
            if loaded.get("__typename") == "PythonError":
                raise RuntimeError(f"code location {location!r} failed to load:\n{loaded.get('message')}")
            return loaded.get("__typename") == "RepositoryLocation"

        wait_until(location_loaded, timeout, f"code location {location!r} to load", diagnostics=self.log_tail)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the whole process group (webserver, daemon, code servers, runs), then SIGKILL."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the leader's pid is the group id

        def group_gone() -> bool:
            self.process.poll()  # reap the leader
            return not _group_members(pgid)

        for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                wait_until(group_gone, grace, f"process group {pgid} to exit", interval=0.2)
                break
            except TimeoutError:
                continue
        self.process.wait(timeout=10)
        self._log.close()


def _default_interrupt_signals() -> None:
    """In the child: SIGINT and SIGTERM back to their defaults. A shell that starts jobs in the background
    ignores SIGINT, and `dagster dev` maps SIGTERM to its SIGINT handler: it would then ignore both."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(stat.parent.name))
    return members


# --- the rendered asset graph --------------------------------------------------------------------------

_POINT = re.compile(r"(-?\d+(?:\.\d+)?)[ ,](-?\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    width: float
    height: float


def graph_node_boxes(page, names: list[str]) -> dict[str, Box]:
    """SVG-space boxes of the asset nodes drawn with these (full, untruncated) names."""
    boxes = {}
    for name in names:
        node = page.locator("svg foreignObject:not(.group)").filter(
            has=page.get_by_text(name, exact=True))
        attrs = node.first.evaluate(
            "e => ['x', 'y', 'width', 'height'].map(a => parseFloat(e.getAttribute(a)))")
        boxes[name] = Box(*attrs)
    return boxes


def graph_edges(page, boxes: dict[str, Box], tolerance: float = 12) -> set[tuple[str, str]]:
    """Edges drawn between the given nodes (left-to-right layout): each path starts on the right side of
    its upstream node and ends, at its arrowhead, on the left side of its downstream node."""
    def at(x: float, y: float, side: str) -> str | None:
        for name, box in boxes.items():
            edge_x = box.x + box.width if side == "right" else box.x
            if abs(x - edge_x) <= tolerance and box.y <= y <= box.y + box.height:
                return name
        return None

    edges = set()
    for d in page.locator("svg path[marker-end]").evaluate_all("els => els.map(e => e.getAttribute('d'))"):
        points = _POINT.findall(d or "")
        if len(points) < 2:
            continue
        (x0, y0), (x1, y1) = map(float, points[0]), map(float, points[-1])
        upstream, downstream = at(x0, y0, "right"), at(x1, y1, "left")
        if upstream and downstream:
            edges.add((upstream, downstream))
    return edges


def graph_scale(page) -> float:
    """Current zoom of the asset graph (the scale of the transform around its <svg>)."""
    return page.locator("svg:has(foreignObject)").first.evaluate(
        "e => new DOMMatrixReadOnly(getComputedStyle(e.parentElement).transform).a")


def fit_graph(page, min_scale: float = 0.7, min_size: tuple[int, int] = (1600, 1000),
              max_size: tuple[int, int] = (3840, 2400)) -> float:
    """Grow the viewport (never below `min_size`) until the whole graph fits at `min_scale` or more, so its
    nodes are drawn in full (Dagster draws name-only, truncated nodes below a zoom of 0.6), then zoom to
    fit (what double-clicking the background does) and wait for the zoom to settle. Returns the scale."""
    svg = page.locator("svg:has(foreignObject)").first
    graph_w, graph_h = svg.evaluate("e => [e.width.baseVal.value, e.height.baseVal.value]")
    area = svg.evaluate("e => e.parentElement.parentElement.getBoundingClientRect().toJSON()")
    viewport = page.viewport_size
    width = min(max_size[0], max(min_size[0], int(viewport["width"] + graph_w * min_scale - area["width"]) + 1))
    height = min(max_size[1], max(min_size[1], int(viewport["height"] + graph_h * min_scale - area["height"]) + 1))
    if (width, height) != (viewport["width"], viewport["height"]):
        page.set_viewport_size({"width": width, "height": height})
    svg.locator("xpath=..").dispatch_event("dblclick")

    readings: list[float] = []

    def settled():  # the zoom animation is over: the same scale for the last half second
        readings.append(round(graph_scale(page), 4))
        recent = readings[-5:]
        return len(recent) == 5 and len(set(recent)) == 1 and recent[0] >= 0.6 and recent[0]

    return wait_until(settled, 30, "the asset graph to zoom to fit (at 0.6 or more)", interval=0.1,
                      diagnostics=lambda: f"scales: {readings[-10:]}")
