"""Resident memory of the current process, read from ``/proc/self/status``.

Peak memory is ``VmHWM``, the high-water mark of this process's own address space. ``getrusage().ru_maxrss`` is
not used: Linux carries it across ``execve`` from the address space that was replaced, and ``subprocess`` spawns
with vfork, so a child started by a large parent (a pytest worker, a Dagster run) would report the parent's peak.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int | None:
    try:
        text = _STATUS.read_text(encoding="ascii")
    except OSError:  # pragma: no cover - not Linux
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    return None  # pragma: no cover - every Linux kernel since 2.6 has both keys


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes, or None where ``/proc`` is not available."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def rss_bytes() -> int | None:
    """This process's current resident set size in bytes, or None where ``/proc`` is not available."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_mb() -> float | None:
    """``peak_rss_bytes`` in MiB."""
    peak = peak_rss_bytes()
    return None if peak is None else peak / 2**20
