"""Shared fixtures (a temporary TULU_HOME, the real data bundle) and the suite's rules.

Rules enforced here for every test module, present and future:
- Order: the longest modules first (MODULE_SECONDS), then the other modules with `slow` tests, then the rest.
  Under `make test` (`-n 2 --dist loadfile`) each module runs whole on one worker, so its module fixtures are
  built once, and longest-first keeps one worker from finishing a long module alone at the end.
- Bounds: every test has a pytest-timeout (the `timeout` ini default); `integration` and `slow` tests get the
  longer bounds below unless they set their own `@pytest.mark.timeout`.
- No silent skips: where skips are forbidden (`CI` set, or `TULU_REQUIRE_ALL=1` as `.ci/run` sets), a skipped test
  or module is reported as a failure, except a test marked `cuda` on a machine without CUDA.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from tulu_pipeline.settings import data_dir
from tulu_pipeline.storage import Store

# Two xdist workers on two cores: one compute thread per worker and per process it starts (torch reads these at
# import, and subprocesses inherit them). With torch's default of one thread per core, two trainers running side
# by side oversubscribe the cores and OpenMP's spinning threads slow both several-fold (measured: the CPU demo
# test 151 s beside light tests, 474 s beside the e2e job).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_threads, "1")

# Seconds. The ini default (pyproject `timeout`) bounds unmarked tests; these bound the marked ones. They are
# backstops sized for a loaded 2-core machine, not expectations: a test that needs them is a bug to look at.
MARKER_TIMEOUTS = {"integration": 1200, "slow": 2400}


def skips_forbidden() -> bool:
    """True where every test must run (CI): a skip is then a failure unless it is a CUDA-only skip."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or os.environ.get("TULU_REQUIRE_ALL", "").strip().lower() in ("1", "true", "yes")


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    import torch  # only for `cuda` tests, at run time: collection stays free of torch

    return torch.cuda.is_available()


# Rough seconds per module on one of two busy xdist workers, rounded from the `--durations` lists of the runs in
# benchmarks/results/test_suite.md (idle 2-core machine): only the order matters; a module not listed sorts by
# its `slow` marker.
MODULE_SECONDS = {
    "tests/test_pipeline_e2e.py": 600,
    "tests/test_vllm_engine.py": 620,  # + the sharded export served by vLLM (~60 s)
    "tests/test_sft.py": 200,
    "tests/test_sft_demo.py": 190,
    "tests/test_ui_browser.py": 160,
    "tests/test_training_sharded.py": 200,  # + the sharded SFT kill -9/resume launches (~70 s)
    "tests/test_rlvr_sharded.py": 120,  # measured 104-137 s at load average ~7
    "tests/test_dpo_resume.py": 95,
    "tests/test_sharding.py": 90,
    "tests/test_curation_assets.py": 60,
    "tests/test_dpo.py": 50,
    "tests/test_ray_curation.py": 45,
    "tests/test_base_model.py": 40,
    "tests/test_rlvr_training.py": 40,
    "tests/test_rlvr_options.py": 40,
    "tests/test_crash_safety.py": 35,
    "tests/test_decontam_rule.py": 35,
}


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Longest modules first (each stays whole, in its own order; sort is stable): the workers take the long ones
    # early instead of one worker finishing a long module alone at the end.
    slow_modules = {_module(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (-MODULE_SECONDS.get(_module(item), 0), _module(item) not in slow_modules))
    for item in items:
        if item.get_closest_marker("timeout") is None:
            bounds = [seconds for marker, seconds in MARKER_TIMEOUTS.items() if item.get_closest_marker(marker)]
            if bounds:
                item.add_marker(pytest.mark.timeout(max(bounds)))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None and not cuda_available():
        pytest.skip("CUDA-only: no CUDA device on this machine")


def _forbidden_skip_message(reason: str) -> str:
    return (f"skipped where every test must run (CI / TULU_REQUIRE_ALL=1): {reason}\n"
            "Only tests marked `cuda` may skip, on a machine without CUDA; install what is missing instead "
            "(docs/testing.md).")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if (report.skipped and not hasattr(report, "wasxfail") and skips_forbidden()
            and not (item.get_closest_marker("cuda") is not None and not cuda_available())):
        report.longrepr = _forbidden_skip_message(_skip_reason(report))
        report.outcome = "failed"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    if report.skipped and skips_forbidden():
        report.longrepr = _forbidden_skip_message(
            f"{collector.nodeid} skipped at collection: {_skip_reason(report)} (mark hardware-only tests `cuda`)")
        report.outcome = "failed"
    return report


@pytest.fixture(scope="session")
def bundle() -> Path:
    """The staged public datasets (../shared/data or $TULU_DATA_DIR)."""
    root = data_dir()
    if not (root / "MANIFEST.json").exists():
        pytest.fail(f"data bundle not found at {root}: set TULU_DATA_DIR")
    return root


@pytest.fixture(scope="session")
def converted_base_model(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2-135M converted from the embedded GGUF once per run and shared by every xdist worker (a lock lets
    the first convert; the others reuse). Treat it as read-only: copy it to place it elsewhere."""
    import fcntl

    from tulu_pipeline.models.base_model import prepare_base_model

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' common base directory
    (root / "converted").mkdir(exist_ok=True)
    with open(root / "converted.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return prepare_base_model(root / "converted" / "smollm2")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A fresh TULU_HOME for one test."""
    return Store(str(tmp_path / "tulu_home"))
