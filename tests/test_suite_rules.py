"""The suite's own rules (tests/conftest.py), checked on a scratch suite run by a fresh pytest: where every test
must run, a skip fails unless the test is marked `cuda` on a machine without CUDA, a module skipped at collection
fails, and marked tests get their longer timeouts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
SCRATCH = '''
import pytest


def test_plain_skip():
    pytest.skip("a library is missing")


@pytest.mark.skipif(True, reason="a condition")
def test_skipif():
    pass


@pytest.mark.cuda
def test_needs_cuda():
    import torch

    assert torch.cuda.is_available()


def test_passes():
    pass


@pytest.mark.integration
def test_integration_bound(request):
    assert request.node.get_closest_marker("timeout").args == (1200,)


@pytest.mark.slow
@pytest.mark.integration
def test_slow_bound(request):
    assert request.node.get_closest_marker("timeout").args == (2400,)


@pytest.mark.integration
@pytest.mark.timeout(5)
def test_own_bound(request):
    assert request.node.get_closest_marker("timeout").args == (5,)
'''


def _run_scratch(tmp_path: Path, require_all: bool, module_skip: bool = False) -> subprocess.CompletedProcess:
    suite = tmp_path / ("strict" if require_all else "lenient")
    suite.mkdir()
    shutil.copy(TESTS / "conftest.py", suite / "conftest.py")
    (suite / "test_scratch.py").write_text(SCRATCH)
    if module_skip:
        (suite / "test_module_skip.py").write_text('import pytest\npytest.importorskip("no_such_module_here")\n')
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TULU_REQUIRE_ALL", "PYTEST_ADDOPTS")}
    if require_all:
        env["TULU_REQUIRE_ALL"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                           "-o", "addopts=", str(suite)], cwd=suite, env=env, capture_output=True, text=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.integration
def test_skips_fail_where_every_test_must_run_except_cuda_only(tmp_path):
    strict = _run_scratch(tmp_path, require_all=True)
    out = strict.stdout
    assert strict.returncode == 1, out
    assert "FAILED" in out and "test_plain_skip" in out and "a library is missing" in out
    assert "test_skipif" in out and "a condition" in out
    assert "skipped where every test must run" in out
    if not _cuda():
        assert "SKIPPED" in out and "CUDA-only" in out  # the one skip allowed
    assert "4 passed" in out  # the bounds: integration 1200 s, slow 2400 s, an explicit one kept

    lenient = _run_scratch(tmp_path, require_all=False)
    assert lenient.returncode == 0, lenient.stdout
    assert "a library is missing" in lenient.stdout and "a condition" in lenient.stdout  # listed by -rs


@pytest.mark.integration
def test_a_module_skipped_at_collection_fails_where_every_test_must_run(tmp_path):
    result = _run_scratch(tmp_path, require_all=True, module_skip=True)
    assert result.returncode != 0
    assert "test_module_skip.py skipped at collection" in result.stdout
    assert "no_such_module_here" in result.stdout
