"""One forward pass per judge prompt: next-token log-probabilities of the rating candidates "1".."5".

`LoglikelihoodJudge` needs, for each aspect prompt, the log-probability of each single-token rating. The
generic ``loglikelihood(requests)`` of a backend scores every (prompt, rating) pair with its own forward
pass, five passes for one distribution; `NextTokenScorer` reads all five from the logits of one pass.
It wraps a local transformers backend through its public attributes (``model``, ``encoder``,
``batch_size``, ``device``, ``pad_token_id``, ``max_positions``) and gives the same numbers as
``loglikelihood`` (tested); a backend with its own ``next_token_logprobs`` is used as it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from tulu_pipeline.generation.base import Messages


def supports_next_token_adapter(backend: Any) -> bool:
    return all(hasattr(backend, name) for name in ("model", "encoder", "batch_size", "device", "pad_token_id"))


class NextTokenScorer:
    """`loglikelihood` passed through, plus `next_token_logprobs` computed from one forward pass per prompt."""

    def __init__(self, backend: Any):
        if not supports_next_token_adapter(backend):
            raise TypeError(f"{type(backend).__name__} exposes no local model to score next tokens with")
        self.backend = backend
        self.model_id = getattr(backend, "model_id", "judge")
        parameters = inspect.signature(backend.model.forward).parameters
        self._keep_last = "logits_to_keep" in parameters  # else full logits: batch x width x vocab floats

    def loglikelihood(self, requests: list[tuple[Messages, str]]) -> list[tuple[float, int]]:
        return self.backend.loglikelihood(requests)

    def next_token_logprobs(self, contexts: Sequence[Messages], candidates: Sequence[str]) -> list[list[float]]:
        """For each chat prompt, the log-probability of each single-token candidate as the next token."""
        import torch

        backend = self.backend
        ids = []
        for candidate in candidates:
            tokens = backend.encoder.continuation_ids(candidate)
            if len(tokens) != 1:
                raise ValueError(f"candidate {candidate!r} is {len(tokens)} tokens; next-token scoring needs one")
            ids.append(tokens[0])
        prompts = [backend.encoder.prompt_ids(messages) for messages in contexts]
        limit = getattr(backend, "max_positions", None)
        results: list[list[float]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda k: (-len(prompts[k]), k))  # similar lengths batch together
        for start in range(0, len(order), backend.batch_size):
            chunk = order[start:start + backend.batch_size]
            width = max(len(prompts[k]) for k in chunk)
            if limit and width > limit:
                raise ValueError(f"a judge prompt of {width} tokens exceeds the model's {limit}-token context")
            input_ids = torch.full((len(chunk), width), int(backend.pad_token_id), dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, k in enumerate(chunk):  # left padding: every prompt ends in the last column
                input_ids[r, width - len(prompts[k]):] = torch.tensor(prompts[k])
                attention[r, width - len(prompts[k]):] = 1
            input_ids, attention = input_ids.to(backend.device), attention.to(backend.device)
            positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
            kwargs = {"logits_to_keep": 1} if self._keep_last else {}
            with torch.inference_mode():
                logits = backend.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                       use_cache=False, **kwargs).logits[:, -1, :]
                picked = torch.log_softmax(logits.float(), dim=-1)[:, ids]
            for r, k in enumerate(chunk):
                results[k] = [float(x) for x in picked[r]]
        return results


def judge_scorer(backend: Any) -> Any:
    """The scorer a `LoglikelihoodJudge` should use for ``backend``: the backend itself when it scores next
    tokens natively (or has no local model), else a `NextTokenScorer` around it."""
    if hasattr(backend, "next_token_logprobs") or not supports_next_token_adapter(backend):
        return backend
    return NextTokenScorer(backend)
