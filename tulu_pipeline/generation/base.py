"""One interface for every generation backend: transformers (CPU default), vLLM (GPU extra), and any
OpenAI-compatible HTTP server. Stages (policy completions, the judge, evaluation, RLVR rollouts) only see
`GenerationBackend`, so switching backends is configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

Messages = list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings recorded with every completion. ``seed`` makes sampling reproducible: request i of a
    batch uses ``seed + i`` for its ``n`` samples, so results do not depend on batch size or backend batching."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass(frozen=True)
class Completion:
    """One sampled response: the text, why it stopped (``stop`` | ``length``), token counts, and where it
    came from (``model_id`` and the exact sampling params and seed)."""

    text: str
    model_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seed: int
    params: dict[str, Any] = field(default_factory=dict)


class GenerationBackend(Protocol):
    """Generates ``params.n`` completions for each chat prompt, in prompt order (``result[i]`` has
    ``params.n`` completions for ``prompts[i]``)."""

    model_id: str

    def generate(self, prompts: Sequence[Messages], params: SamplingParams) -> list[list[Completion]]: ...

    def close(self) -> None: ...
