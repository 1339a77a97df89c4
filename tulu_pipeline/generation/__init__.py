"""Generation backends behind one interface (`base.GenerationBackend`): transformers (CPU default),
vLLM (the ``gpu`` extra) and OpenAI-compatible HTTP servers; `spec.BackendSpec` + `spec.build_backend` pick
one from configuration; ``python -m tulu_pipeline.generation.job`` runs a requests file through one.

Importing this package is cheap: the interface loads now; torch, transformers, vllm, httpx and pydantic
load only with the backend (or spec) that needs them, so a GPU image with just torch + transformers can
import the transformers backend.
"""

from __future__ import annotations

import importlib
from typing import Any

from tulu_pipeline.generation.base import (
    Completion,
    GenerationBackend,
    LogLikelihoodUnsupported,
    Messages,
    SamplingParams,
    sample_seed,
)

_LAZY = {
    "TransformersBackend": "tulu_pipeline.generation.transformers_backend",
    "VLLMBackend": "tulu_pipeline.generation.vllm_backend",
    "OpenAICompatBackend": "tulu_pipeline.generation.openai_backend",
    "GenerationHTTPError": "tulu_pipeline.generation.openai_backend",
    "ChatEncoder": "tulu_pipeline.generation.chat",
    "BackendSpec": "tulu_pipeline.generation.spec",
    "build_backend": "tulu_pipeline.generation.spec",
    "run_generation": "tulu_pipeline.generation.job",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackendSpec", "ChatEncoder", "Completion", "GenerationBackend", "GenerationHTTPError", "LogLikelihoodUnsupported",
    "Messages", "OpenAICompatBackend", "SamplingParams", "TransformersBackend", "VLLMBackend", "build_backend",
    "run_generation", "sample_seed",
]
