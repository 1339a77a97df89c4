"""Which backend to build, as data: `BackendSpec` travels in job parameters (JSON) and resources build it."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tulu_pipeline.generation.base import GenerationBackend

LOCAL_KINDS = ("transformers", "vllm")


class BackendSpec(BaseModel):
    """A generation backend: ``kind`` and the model it serves.

    ``model`` is a model directory for the local kinds (relative paths are relative to TULU_HOME, e.g.
    ``models/base_model``) and the served model name for ``openai``. ``model_id`` is what completions
    record (default: ``model``). ``extra`` holds kind-specific keyword arguments (``gpu_memory_utilization``,
    ``max_model_len``, ``concurrency``, ``timeout_s``, ``chat_template``...).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str = Field(min_length=1)
    model_id: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    batch_size: int = Field(default=8, ge=1)
    device: str = "auto"
    dtype: str = "auto"
    max_retries: int = Field(default=3, ge=0)
    trust_remote_code: bool = False
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> BackendSpec:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("kind 'openai' needs base_url (e.g. http://localhost:8000/v1)")
        return self

    @property
    def resolved_model_id(self) -> str:
        return self.model_id or self.model


def resolve_model_path(model: str, store: Any = None) -> Path:
    """A local model directory under TULU_HOME (``store``): relative paths resolve inside it, and a path that
    leaves it (``..``, or an absolute path elsewhere) is a `StorePathError`. Without a store (library use)
    the path is taken as given."""
    if store is None:
        return Path(model)
    if Path(model).is_absolute():
        if store.is_local and Path(model).resolve().is_relative_to(Path(store.root).resolve()):
            return Path(model)
        from tulu_pipeline.storage import StorePathError

        raise StorePathError(f"model path {model!r} is outside TULU_HOME ({store.url}); put the model under "
                             "TULU_HOME and give its relative path")
    if not store.is_local:
        raise ValueError(f"model {model!r} is under a remote TULU_HOME ({store.url}); local backends need a local "
                         "directory: download it first and pass its absolute path")
    return Path(store.path(posixpath.normpath(model)))


def build_backend(spec: BackendSpec, store: Any = None) -> GenerationBackend:
    """The backend ``spec`` describes (models load now; vLLM is imported only for ``kind='vllm'``)."""
    extra = dict(spec.extra)
    if spec.kind == "transformers":
        from tulu_pipeline.generation.transformers_backend import TransformersBackend

        return TransformersBackend(resolve_model_path(spec.model, store), spec.resolved_model_id, device=spec.device,
                                   dtype=spec.dtype, batch_size=spec.batch_size,
                                   trust_remote_code=spec.trust_remote_code, **extra)
    if spec.kind == "vllm":
        from tulu_pipeline.generation.vllm_backend import VLLMBackend

        return VLLMBackend(resolve_model_path(spec.model, store), spec.resolved_model_id, dtype=spec.dtype,
                           trust_remote_code=spec.trust_remote_code, **extra)
    from tulu_pipeline.generation.openai_backend import OpenAICompatBackend

    return OpenAICompatBackend(spec.base_url or "", spec.model, model_id=spec.resolved_model_id,
                               api_key_env=spec.api_key_env, max_retries=spec.max_retries, **extra)


class BackendPool:
    """Local transformers backends kept loaded across calls in one process: an evaluation run scores one
    checkpoint on every benchmark, with the same judge, so each model loads once instead of once per benchmark.

    A backend is reused only for an equal spec under the same TULU_HOME whose model files are unchanged (their
    sizes and modification times); the least recently used beyond ``size`` is closed. Other kinds are built
    afresh every time (``owns`` says which ones the caller must close)."""

    def __init__(self, size: int = 3):
        self.size = size
        self._loaded: dict[tuple, GenerationBackend] = {}

    @staticmethod
    def key(spec: BackendSpec, store: Any) -> tuple | None:
        """What identifies a loaded model: the spec, TULU_HOME and the model files (None: not pooled)."""
        if spec.kind != "transformers":
            return None
        path = resolve_model_path(spec.model, store)
        files = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))
        return spec.model_dump_json(), str(getattr(store, "url", None)), str(path.resolve()), files

    def get(self, spec: BackendSpec, store: Any = None) -> GenerationBackend:
        """A loaded backend for ``spec``: a kept one when it matches, else a new one (kept when pooled)."""
        key = self.key(spec, store)
        if key is None:
            return build_backend(spec, store)
        if key in self._loaded:
            self._loaded[key] = self._loaded.pop(key)  # most recently used last
            return self._loaded[key]
        backend = build_backend(spec, store)
        self._loaded[key] = backend
        while len(self._loaded) > self.size:
            self._loaded.pop(next(iter(self._loaded))).close()
        return backend

    def owns(self, backend: Any) -> bool:
        return any(backend is kept for kept in self._loaded.values())

    def close(self) -> None:
        while self._loaded:
            self._loaded.popitem()[1].close()


# the process's pool: evaluation steps running in one process (`tulu-evaluate`, a run's in-process executor)
# share their models
shared_backends = BackendPool()
