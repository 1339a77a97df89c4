"""One interface for every generation backend: transformers (CPU default), vLLM (GPU extra), and any
OpenAI-compatible HTTP server. Stages (policy completions, the judge, evaluation, RLVR rollouts) only see
`GenerationBackend`, so switching backends is configuration."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

Messages = list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings recorded with every completion. ``seed`` makes sampling reproducible: request i of a
    batch uses ``seed + i`` for its ``n`` samples, so results do not depend on batch size or backend batching.
    ``temperature == 0`` means greedy decoding (``top_p`` and the seed are then irrelevant)."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, (str, list)):  # a bare string would be split into characters below
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop must be non-empty strings, got {list(self.stop)!r}")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SamplingParams:
        """Inverse of `to_json`; unknown keys are an error (a typo must not silently sample differently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SamplingParams fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**{**data, "stop": tuple(data.get("stop") or ())})

    def request_seed(self, index: int) -> int:
        """The seed of request ``index`` of a call (``seed + index``)."""
        return self.seed + index


def sample_seed(request_seed: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of a request, for backends that draw each sample from its own
    generator (transformers): a stable 63-bit hash of both, so samples of neighbouring requests never share
    a stream (``seed + j`` would make sample 1 of request i equal sample 0 of request i + 1)."""
    digest = hashlib.sha256(f"{request_seed}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class Completion:
    """One sampled response: the text, why it stopped (``stop`` | ``length``), token counts, and where it
    came from (``model_id`` and the exact sampling params and seed). ``seed`` is the request's seed
    (`SamplingParams.request_seed`), shared by its ``n`` samples; ``index`` is the sample's position among them.
    ``completion_tokens`` counts every generated token, including the EOS or the tokens of a stop string
    (which the text leaves out)."""

    text: str
    model_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    index: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class GenerationBackend(Protocol):
    """Generates ``params.n`` completions for each chat prompt, in prompt order (``result[i]`` has
    ``params.n`` completions for ``prompts[i]``)."""

    model_id: str

    def generate(self, prompts: Sequence[Messages], params: SamplingParams) -> list[list[Completion]]: ...

    def close(self) -> None: ...


class LogLikelihoodUnsupported(NotImplementedError):
    """The backend cannot score continuations (e.g. a chat-completions HTTP API returns no prompt log-probs)."""


def generate_many(backend: Any, requests: Sequence[tuple[Sequence[Messages], SamplingParams]],
                  ) -> list[list[list[Completion]]]:
    """Several ``generate`` calls: in shared batches where the backend can (``backend.generate_many``), else
    one after the other. Result ``k`` is ``backend.generate(*requests[k])``."""
    many = getattr(backend, "generate_many", None)
    if callable(many):
        return many(requests)
    return [backend.generate(prompts, params) for prompts, params in requests]
