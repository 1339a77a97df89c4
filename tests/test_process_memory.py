"""Peak memory is the process's own: a child of a large parent does not inherit the parent's high-water mark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tulu_pipeline.process_memory import peak_rss_bytes, rss_bytes

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def test_peak_follows_a_large_allocation_and_stays_after_it_is_freed() -> None:
    # in a fresh process: a pytest worker's own peak may already be far above anything allocated here
    script = """
from tulu_pipeline.process_memory import peak_rss_bytes, rss_bytes
before = peak_rss_bytes()
block = bytearray(256 * 2**20)
block[::4096] = b"\\x01" * len(range(0, len(block), 4096))
during = rss_bytes()
del block
print(before, during, peak_rss_bytes(), rss_bytes())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    before, during, after, now = (int(v) for v in out.stdout.split())
    assert during >= before + 200 * MIB and after >= before + 200 * MIB
    assert now < after


def test_a_child_of_a_large_parent_reports_its_own_peak() -> None:
    block = bytearray(768 * MIB)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))
    del block
    assert peak_rss_bytes() > 700 * MIB
    # subprocess spawns with vfork: getrusage's ru_maxrss in the child would be the parent's 768 MiB peak here
    out = subprocess.run([sys.executable, "-c", "from tulu_pipeline.process_memory import peak_rss_bytes; "
                          "import resource; print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
    own_peak, inherited_kib = int(out[0]), int(out[1])
    assert own_peak < 200 * MIB
    assert inherited_kib * 1024 > 700 * MIB  # what the old measurement read: why process_memory exists
