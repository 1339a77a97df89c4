"""Run untrusted Python (model-written code for HumanEval/MBPP) in a confined subprocess.

Isolation is layered, so that losing one layer (a kernel without namespaces, a container that is
not root) still leaves the others:

1. **Process group and timeouts.** The child starts its own session (``setsid``); a wall-clock
   timeout kills the whole group with SIGKILL, and the group is killed again after every run, so
   nothing it started outlives it.
2. **Resource limits** (``setrlimit`` before ``exec``, soft = hard so the child cannot raise them):
   ``RLIMIT_CPU`` (CPU seconds; SIGXCPU then SIGKILL), ``RLIMIT_AS`` (address space),
   ``RLIMIT_NPROC`` (processes of its user: no fork bombs), ``RLIMIT_FSIZE`` (largest file it may
   write, stdout included), ``RLIMIT_NOFILE`` and ``RLIMIT_CORE`` = 0.
3. **Unprivileged user.** Run as root (containers), the child drops to ``nobody`` (uid 65534) after
   the limits are set, so ``RLIMIT_NPROC`` applies (root ignores it) and files outside its temp dir
   are read-only to it. The interpreter must then be one ``nobody`` can execute; one is probed once
   (``sys.executable``, then ``/usr/bin/python3``); when none is, this layer is skipped and reported.
4. **No network.** The child enters a new network namespace (``unshare(CLONE_NEWNET)``; without
   root, together with ``CLONE_NEWUSER``), which has no interfaces but a downed loopback. Where the
   kernel refuses, this layer is skipped and reported.
5. **An audit hook** (PEP 578) installed before the program runs raises ``PermissionError`` on
   socket creation/connect/bind, ``os.system``, ``subprocess``, ``fork``/``exec``/``spawn``,
   signals to other processes, ``ctypes`` loading, and on any write, rename or delete outside the
   temp dir. It is the layer that works everywhere; it is not a security boundary on its own
   (native code can bypass it), which is why layers 1-4 exist.
6. **A fresh environment.** A new temp dir is the cwd, ``HOME`` and ``TMPDIR``; the environment is
   cleared (only ``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` and a fixed ``PYTHONHASHSEED``); the
   interpreter runs isolated (``-I``: no user site, no ``PYTHON*`` variables) with stdin closed.

`run_python(code, limits)` returns a `SandboxResult`; a program that breaks any limit ends as a
failed run with the reason, never as an exception in the caller.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NOBODY_UID = 65534
NOBODY_GID = 65534
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# The guard runs first in the child: it installs the audit hook, then executes the program.
GUARD = r'''
import os, sys

ROOT = os.path.realpath(sys.argv[1])
PROGRAM = sys.argv[2]
DENY = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "os.setuid", "os.setgid", "os.setresuid", "os.chroot", "os.putenv", "os.unsetenv",
    "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
    "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.call_function",
    "mmap.__new__", "resource.setrlimit", "resource.prlimit",
    "webbrowser.open", "urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect",
})
# events whose first (and for renames, second) argument is a path that must stay inside ROOT
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.chmod": 1, "os.chown": 1,
               "os.truncate": 1, "os.symlink": 2, "os.link": 2, "os.utime": 1, "shutil.rmtree": 1,
               "shutil.move": 2, "shutil.copyfile": 2, "os.chdir": 1}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _inside(path):
    if isinstance(path, int):  # an already-open descriptor: it was checked when opened
        return True
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return real == ROOT or real.startswith(ROOT + os.sep)


def _hook(event, args):
    if event in DENY:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, None])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                  (isinstance(flags, int) and flags & WRITE_FLAGS)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
    elif event in PATH_EVENTS:
        for path in args[:PATH_EVENTS[event]]:
            if path is not None and not _inside(path):
                raise PermissionError(f"sandbox: {event} on {path!r} outside the sandbox directory is not allowed")


with open(PROGRAM, "r", encoding="utf-8") as handle:
    SOURCE = handle.read()
CODE = compile(SOURCE, "program.py", "exec")
if sys.argv[3] == "1":
    sys.addaudithook(_hook)
del handle
exec(CODE, {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run (defaults fit HumanEval/MBPP tests on a CPU)."""

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512
    max_processes: int = 8  # per user: with the privilege drop, concurrent sandboxes share it
    file_size_mb: int = 8
    open_files: int = 64
    output_chars: int = 10_000
    audit_hook: bool = True  # off only to test the operating-system layers on their own


@dataclass(frozen=True)
class SandboxResult:
    """What happened: ``status`` is ``ok`` (exit 0), ``error`` (non-zero exit), ``timeout`` (wall clock),
    ``cpu_limit``, ``file_size_limit`` or ``killed`` (another signal); ``reason`` says why in one line."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    reason: str
    pid: int
    layers: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _libc():
    return ctypes.CDLL(None, use_errno=True)


@functools.lru_cache(maxsize=1)
def _network_flags() -> int | None:
    """The unshare flags that give a child its own empty network namespace here, or None."""
    candidates = [CLONE_NEWNET] if os.geteuid() == 0 else []
    candidates.append(CLONE_NEWUSER | CLONE_NEWNET)
    for flags in candidates:
        # probed in a throwaway interpreter: unshare changes the caller for good
        probe = f"import ctypes, sys; sys.exit(0 if ctypes.CDLL(None).unshare({flags}) == 0 else 1)"
        try:
            done = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return flags
    return None


@functools.lru_cache(maxsize=1)
def _unprivileged_python() -> str | None:
    """An interpreter that ``nobody`` can run (only probed when we are root)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        if not candidate or not Path(candidate).exists():
            continue
        try:
            done = subprocess.run([candidate, "-I", "-c", "pass"], preexec_fn=_drop_privileges,
                                  capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, cwd="/",
                                  check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return candidate
    return None


def _drop_privileges() -> None:
    os.setgroups([])
    os.setgid(NOBODY_GID)
    os.setuid(NOBODY_UID)


def sandbox_layers() -> dict[str, bool]:
    """Which optional layers are available on this machine (the others are always on)."""
    root = os.geteuid() == 0
    return {
        "process_group": True, "rlimits": True, "audit_hook": True, "clean_env": True,
        "network_namespace": _network_flags() is not None,
        "unprivileged_user": (not root) or _unprivileged_python() is not None,
    }


def _child_setup(limits: SandboxLimits, net_flags: int | None, unshare: Any, drop: bool) -> None:
    """Runs in the child between fork and exec (after setsid). ``unshare`` was looked up in the parent:
    no dynamic loading happens between fork and exec, where another thread may hold the loader's lock."""
    if net_flags is not None and unshare(net_flags) != 0:
        os._exit(126)
    mb = 1024 * 1024
    for name, value in ((resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1)),
                        (resource.RLIMIT_AS, (limits.memory_mb * mb,) * 2),
                        (resource.RLIMIT_FSIZE, (limits.file_size_mb * mb,) * 2),
                        (resource.RLIMIT_NOFILE, (limits.open_files,) * 2),
                        (resource.RLIMIT_CORE, (0, 0)),
                        (resource.RLIMIT_NPROC, (limits.max_processes,) * 2)):
        resource.setrlimit(name, value)
    if drop:
        _drop_privileges()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Execute ``code`` as a Python program in the sandbox and report how it ended."""
    limits = limits or SandboxLimits()
    root_user = os.geteuid() == 0
    python = _unprivileged_python() if root_user else sys.executable
    drop = root_user and python is not None
    python = python or sys.executable
    net_flags = _network_flags()
    unshare = _libc().unshare if net_flags is not None else None
    layers = {**sandbox_layers()}

    work = Path(tempfile.mkdtemp(prefix="tulu-sandbox-"))
    logs = Path(tempfile.mkdtemp(prefix="tulu-sandbox-logs-"))  # outside the child's reach
    try:
        (work / "guard.py").write_text(GUARD, encoding="utf-8")
        (work / "program.py").write_text(code, encoding="utf-8")
        if drop:
            os.chown(work, NOBODY_UID, NOBODY_GID)
            for child in work.iterdir():
                os.chown(child, NOBODY_UID, NOBODY_GID)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
            if drop:
                os.chown(logs, NOBODY_UID, NOBODY_GID)
            proc = subprocess.Popen(
                [python, "-I", "-B", str(work / "guard.py"), str(work), str(work / "program.py"),
                 "1" if limits.audit_hook else "0"],
                cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                start_new_session=True,
                # limits, namespaces and the user change must happen between fork and exec; nothing is loaded there
                preexec_fn=lambda: _child_setup(limits, net_flags, unshare, drop),  # noqa: PLW1509
            )
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # whatever it left behind goes too
            proc.wait()
        wall = time.monotonic() - start
        stdout = (logs / "stdout").read_bytes()[: limits.output_chars * 4].decode("utf-8", "replace")
        stderr = (logs / "stderr").read_bytes()[-limits.output_chars * 4:].decode("utf-8", "replace")
        stdout, stderr = stdout[: limits.output_chars], stderr[-limits.output_chars:]
        rc = proc.returncode
        if timed_out:
            status, reason = "timeout", f"wall-clock limit of {limits.wall_s:g} s exceeded"
        elif rc == 0:
            status, reason = "ok", "exited 0"
        elif rc == -signal.SIGXCPU:
            status, reason = "cpu_limit", f"CPU limit of {limits.cpu_s} s exceeded"
        elif rc == -signal.SIGXFSZ:
            status, reason = "file_size_limit", f"file size limit of {limits.file_size_mb} MB exceeded"
        elif rc == -signal.SIGKILL:  # the CPU hard limit, one second after SIGXCPU was ignored
            status, reason = "killed", f"killed by SIGKILL (CPU hard limit of {limits.cpu_s + 1} s)"
        elif rc is not None and rc < 0:
            status, reason = "killed", f"killed by {signal.Signals(-rc).name}"
        elif rc == 126 and not stderr:
            status, reason = "error", "sandbox setup failed in the child (network namespace)"
        else:
            status, reason = "error", _last_line(stderr) or f"exited {rc}"
        return SandboxResult(status, rc, stdout, stderr, round(wall, 3), reason, proc.pid, layers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


__all__ = ["SandboxLimits", "SandboxResult", "run_python", "sandbox_layers"]
