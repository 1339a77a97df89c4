"""Acceptance tests of the evaluation sandbox: hostile completions end as failed samples within the
limits, leave a canary file outside the sandbox untouched and leave no process behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tulu_pipeline.evaluation.sandbox import SandboxLimits, run_python, sandbox_layers

LIMITS = SandboxLimits(wall_s=6.0, cpu_s=2, memory_mb=256, max_processes=8)


def _live_session_members(sid: int) -> list[int]:
    """Processes (not yet-reaped zombies) still in the sandbox's session."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            alive.append(int(entry.name))
    return alive


@pytest.fixture()
def canary(tmp_path_factory):
    directory = tmp_path_factory.mktemp("outside")
    path = directory / "canary.txt"
    path.write_text("untouched\n")
    os.chmod(directory, 0o755)  # others (the sandbox user) may look, not write
    yield path
    assert path.read_text() == "untouched\n"
    assert sorted(p.name for p in directory.iterdir()) == ["canary.txt"]


def _hostile(canary: Path) -> dict[str, str]:
    target = str(canary)
    return {
        "os_system": f"import os\nos.system('echo pwned > {target}')\n",
        "subprocess": f"import subprocess\nsubprocess.run(['rm', '-f', '{target}'])\n",
        "infinite_loop": "while True:\n    pass\n",
        "sleep_forever": "import time\ntime.sleep(3600)\n",
        "unbounded_allocation": "blocks = []\nwhile True:\n    blocks.append(bytearray(50_000_000))\n",
        "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
        "socket": "import socket\ns = socket.create_connection(('93.184.216.34', 80), timeout=2)\n",
        "loopback_server": "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n",
        "write_outside": f"open('{target}', 'w').write('pwned')\n",
        "delete_outside": f"import os\nos.remove('{target}')\n",
        "huge_output_file": "with open('big.bin', 'wb') as f:\n    while True:\n        f.write(b'x' * 1_000_000)\n",
    }


@pytest.mark.parametrize("name", list(_hostile(Path("/x"))))
def test_hostile_completion_fails_within_limits(name, canary):
    # Within limits: the sandbox's own wall clock ends what the others do not (a hang here is caught by
    # pytest-timeout); how long each takes is measured by benchmarks/sandbox.py, not asserted on a busy machine.
    result = run_python(_hostile(canary)[name], LIMITS)
    assert not result.ok, (name, result)
    _wait_empty(result.pid)


def test_expected_failure_reasons(canary):
    # a generous wall clock, so that the CPU limit is what ends it even on a busy machine
    cpu_bound = SandboxLimits(**{**LIMITS.__dict__, "wall_s": 120.0, "cpu_s": 1})
    assert run_python("while True:\n    pass\n", cpu_bound).status in ("cpu_limit", "killed")
    assert run_python("import time\ntime.sleep(3600)\n", LIMITS).status == "timeout"
    assert "MemoryError" in run_python(_hostile(canary)["unbounded_allocation"], LIMITS).reason
    assert "os.system is not allowed" in run_python(_hostile(canary)["os_system"], LIMITS).reason
    assert "os.fork is not allowed" in run_python(_hostile(canary)["fork_bomb"], LIMITS).reason


def test_well_behaved_program_passes_in_its_own_directory():
    code = ("import os, collections\n"
            "open('scratch.txt', 'w').write('hi')\n"
            "P = collections.namedtuple('P', 'a b')\n"
            "print(open('scratch.txt').read(), P(1, 2).b, os.environ['HOME'] == os.getcwd(), sorted(os.environ))\n")
    result = run_python(code, LIMITS)
    assert result.ok, result
    assert result.stdout.split()[:3] == ["hi", "2", "True"]
    assert "TULU_HOME" not in result.stdout and "PATH" in result.stdout  # environment cleared
    assert run_python("assert 1 + 1 == 3\n", LIMITS).reason == "AssertionError"


def test_operating_system_layers_hold_without_the_audit_hook(canary):
    """With the Python-level hook off, namespaces, limits and the unprivileged user still contain it."""
    layers = sandbox_layers()
    raw = SandboxLimits(**{**LIMITS.__dict__, "audit_hook": False})
    if layers["network_namespace"]:
        result = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n", raw)
        assert not result.ok
        assert "Network is unreachable" in result.reason  # an empty namespace: not even loopback is up
    bomb = run_python("import os\nwhile True:\n    os.fork()\n", raw)
    assert not bomb.ok
    _wait_empty(bomb.pid)
    if os.geteuid() == 0 and layers["unprivileged_user"]:
        result = run_python(f"open('{canary}', 'w').write('pwned')\n", raw)
        assert not result.ok and "Permission denied" in result.reason


def _wait_empty(sid: int) -> None:
    """Until the sandbox's session has no live process: killed members take a moment to leave /proc (no
    deadline here; pytest-timeout fails a test whose processes never go)."""
    while _live_session_members(sid):
        time.sleep(0.1)
