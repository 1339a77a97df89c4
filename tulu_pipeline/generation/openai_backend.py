"""Generation through any OpenAI-compatible chat-completions server (``vllm serve``, a hosted API).

One ``POST {base_url}/chat/completions`` per prompt with ``n``, ``seed`` (``params.request_seed(i)``),
``stop``, ``max_tokens``, ``temperature`` and ``top_p``; up to ``concurrency`` requests in flight. The API
key is read from the environment variable ``api_key_env`` at call time (none set: no Authorization header,
which a local ``vllm serve`` accepts); it is never logged, recorded or put into an exception. 429, 5xx and
connection errors are retried with exponential backoff (honouring ``Retry-After``); other 4xx are not.

Token counts: ``usage.prompt_tokens`` is the prompt's; ``usage.completion_tokens`` covers all ``n``
choices, so with ``n > 1`` each choice is given an even share (exact for ``n == 1``).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tulu_pipeline.generation.base import (
    Completion,
    LogLikelihoodUnsupported,
    Messages,
    SamplingParams,
)
from tulu_pipeline.generation.chat import validate_messages

RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))
FINISH_REASONS = {"stop": "stop", "length": "length", "eos": "stop", "end_turn": "stop", "max_tokens": "length"}


class GenerationHTTPError(RuntimeError):
    """A chat-completions request failed (after retries where retrying made sense)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class OpenAICompatBackend:
    """`GenerationBackend` over an OpenAI-compatible HTTP server (see the module docstring)."""

    def __init__(self, base_url: str, model: str, model_id: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60, max_retries: int = 3, concurrency: int = 4, backoff_s: float = 1.0):
        import httpx

        if concurrency < 1 or max_retries < 0:
            raise ValueError(f"concurrency must be >= 1 and max_retries >= 0, got {concurrency}, {max_retries}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.model_id = model_id or model
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff_s = backoff_s
        self._httpx = httpx
        self._client = httpx.Client(timeout=timeout_s)

    def __repr__(self) -> str:  # never shows the key: it is not an attribute
        return f"OpenAICompatBackend(url={self.url!r}, model={self.model!r}, key_env={self.api_key_env!r})"

    def _headers(self) -> tuple[dict[str, str], str]:
        key = os.environ.get(self.api_key_env) or ""
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers, key

    @staticmethod
    def _redact(text: str, secret: str) -> str:
        return text.replace(secret, "[redacted]") if secret else text

    def _post(self, body: dict[str, Any], where: str) -> dict[str, Any]:
        httpx = self._httpx
        last = ""
        for attempt in range(self.max_retries + 1):
            headers, key = self._headers()
            retry_after = None
            try:
                response = self._client.post(self.url, json=body, headers=headers)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                last = f"{type(exc).__name__}: {self._redact(str(exc), key)}"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise GenerationHTTPError(f"{where}: {self.url} returned invalid JSON: {exc}", 200) from None
                detail = self._redact(response.text[:500], key)
                last = f"HTTP {response.status_code}: {detail}"
                if response.status_code not in RETRY_STATUS:
                    hint = f" (is ${self.api_key_env} set and valid?)" if response.status_code in (401, 403) else ""
                    raise GenerationHTTPError(f"{where}: POST {self.url} failed with {last}{hint}", response.status_code)
                retry_after = response.headers.get("retry-after")
            if attempt < self.max_retries:
                delay = self.backoff_s * (2 ** attempt) * (0.5 + random.random() / 2)
                if retry_after:
                    try:
                        delay = max(delay, min(float(retry_after), 60.0))
                    except ValueError:
                        pass
                time.sleep(delay)
        raise GenerationHTTPError(f"{where}: POST {self.url} failed after {self.max_retries + 1} attempts; "
                                  f"last error: {last}")

    def _request(self, index: int, messages: Messages, params: SamplingParams) -> list[Completion]:
        where = f"request {index}"
        validate_messages(messages, where)
        greedy = params.greedy
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "n": params.n,
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if greedy else params.temperature,
            "top_p": 1.0 if greedy else params.top_p,
            "seed": params.request_seed(index),
        }
        if params.stop:
            body["stop"] = list(params.stop)
        data = self._post(body, where)
        try:
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            usage = data.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            total = int(usage.get("completion_tokens") or 0)
            texts = [(c["message"].get("content") or "", c.get("finish_reason")) for c in choices]
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise GenerationHTTPError(f"{where}: {self.url} returned an unexpected body ({exc!r}); expected "
                                      "OpenAI chat-completions JSON with choices[].message.content") from None
        if len(texts) != params.n:
            raise GenerationHTTPError(f"{where}: expected {params.n} choices, got {len(texts)}")
        shares = [total // params.n + (1 if j < total % params.n else 0) for j in range(params.n)]
        meta = params.to_json()
        return [Completion(text=text, model_id=self.model_id, finish_reason=FINISH_REASONS.get(str(reason), "stop"),
                           prompt_tokens=prompt_tokens, completion_tokens=shares[j], seed=params.request_seed(index),
                           params=meta, index=j)
                for j, (text, reason) in enumerate(texts)]

    def generate(self, prompts: Sequence[Messages], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order."""
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(lambda item: self._request(item[0], item[1], params), enumerate(prompts)))

    def loglikelihood(self, requests: Sequence[tuple[Messages, str]]) -> list[tuple[float, int]]:
        raise LogLikelihoodUnsupported(
            f"OpenAICompatBackend ({self.url}) cannot score continuations: chat completions return no prompt "
            "log-probabilities; use the transformers or vllm backend for log-likelihood evaluation")

    def close(self) -> None:
        self._client.close()
