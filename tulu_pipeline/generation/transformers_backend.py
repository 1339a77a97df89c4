"""Generation with a transformers model: the CPU default, and the reference the other backends must match.

Decoding is a plain loop over the model's forward with a KV cache (transformers' ``DynamicCache``), over
left-padded batches with per-sequence position ids. It is written out rather than delegated to
``model.generate`` because the seeding contract needs per-row random streams, which ``generate`` does not
offer:

- Every sample is its own row with its own ``torch.Generator``, seeded with
  ``sample_seed(params.request_seed(i), j)`` for sample j of prompt i. A row draws exactly one number per
  generated token, so its text depends only on its prompt, the weights, the params and its seed, never on
  which other rows share its batch or how many there are. That is exact in float32 (checked on CPU and on
  an H200). In bfloat16 on a GPU, a different batch shape runs different matmul kernels, whose rounding can
  flip a near-tie between two tokens, after which the texts diverge; the draws stay the same, so this is
  rare on trained weights (frequent on random ones). vLLM has the same property. Use ``dtype='float32'``
  where bit-for-bit batch independence matters more than speed.
- ``temperature == 0`` is greedy: one row per prompt, copied ``n`` times (greedy samples are identical).
- A row stops at an EOS token (``stop``), when its text contains a stop string (``stop``: the text is cut
  before the stop string, as vLLM and the OpenAI API do), or after ``max_new_tokens`` or the model's
  context length (``length``). Finished rows leave the batch (the cache drops them), so a long straggler
  does not make the finished ones cost compute.
- Rows are sorted by prompt length before batching (less padding); results come back in prompt order.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tulu_pipeline.generation.base import (
    Completion,
    Messages,
    SamplingParams,
    sample_seed,
)
from tulu_pipeline.generation.chat import ChatEncoder


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; anything else is passed to torch as is."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """``auto`` → bf16 on a GPU that supports it, else fp32 (CPU generation in bf16 is slower, not faster)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


# a shorter shared context is cheaper to recompute than to copy into every prompt's cache
SHARED_PREFIX_MIN_TOKENS = 64


def _roomy_layer(room: int) -> Any:
    """A transformers ``DynamicLayer`` that stores keys and values in buffers with ``room`` spare positions.
    transformers' own layer concatenates on every update, copying the whole cache once per generated token:
    with 32 rows of 1,000 cached positions that copy is most of a CPU decode step."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._length, self._key_buffer, self._value_buffer = 0, None, None
            end = self._length + key_states.shape[-2]
            if self._key_buffer is None or end > self._key_buffer.shape[-2]:
                self._key_buffer = self._grow(self._key_buffer, key_states, end + room)
                self._value_buffer = self._grow(self._value_buffer, value_states, end + room)
            self._key_buffer[:, :, self._length:end] = key_states
            self._value_buffer[:, :, self._length:end] = value_states
            self._length = end
            self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
            return self.keys, self.values

        def _grow(self, old: Any, like: Any, capacity: int) -> Any:
            import torch

            shape = (*like.shape[:2], capacity, like.shape[-1])
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
            if old is not None:
                buffer[:, :, :self._length] = old[:, :, :self._length]
            return buffer

        def batch_select_indices(self, indices: Any) -> None:
            if self.get_seq_length() > 0:
                self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
                self.keys = self._key_buffer[:, :, :self._length]
                self.values = self._value_buffer[:, :, :self._length]

    return RoomyLayer()


@dataclass
class _Row:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    seed: int
    budget: int  # new tokens allowed: max_new_tokens capped by the context length
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class TransformersBackend:
    """`GenerationBackend` over a local transformers model directory (see the module docstring)."""

    def __init__(self, model_path: str | Path, model_id: str, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 8, trust_remote_code: bool = False, chat_template: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
        self.model_id = model_id
        self.model_path = path
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.encoder = ChatEncoder.from_pretrained(path, chat_template, trust_remote_code)
        self.tokenizer = self.encoder.tokenizer
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype,
                                                          trust_remote_code=trust_remote_code)
        self.model.to(self.device)
        self.model.eval()
        self._torch = torch
        generation_config = getattr(self.model, "generation_config", None)
        self.stop_token_ids = self.encoder.stop_token_ids(getattr(generation_config, "eos_token_id", None))
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        # transformers 5.x renamed the forward's ``past_key_values`` to ``cache`` (the old name is deprecated).
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in parameters

    # -- generation -------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Messages], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order."""
        return self.generate_many([(prompts, params)])[0]

    def generate_many(self, requests: Sequence[tuple[Sequence[Messages], SamplingParams]],
                      ) -> list[list[list[Completion]]]:
        """Several `generate` calls decoded in shared batches (one evaluation's benchmarks at once: on a CPU a
        batch of 32 rows costs a few times a batch of 8, not four times); each result is exactly what
        ``generate(prompts, params)`` returns. Rows whose params differ only in ``max_new_tokens`` and the
        seed share batches."""
        self._split: dict[tuple[int, ...], int] = {}
        rows_of: list[list[_Row]] = []
        groups: dict[tuple[Any, ...], tuple[SamplingParams, list[_Row]]] = {}
        for prompts, params in requests:
            rows = self._rows(prompts, params)
            rows_of.append(rows)
            groups.setdefault((params.greedy, params.temperature, params.top_p, params.stop), (params, []))[1].extend(rows)
        shared: dict[tuple[int, ...], list] = {}  # prefix ids -> its cache's layers, for this call
        for params, rows in groups.values():
            # longest budgets together (a batch runs as long as its longest row), then longest prompts (less padding)
            order = sorted(range(len(rows)), key=lambda k: (-rows[k].budget, -len(rows[k].prompt_ids), k))
            for start in range(0, len(order), self.batch_size):
                self._decode([rows[k] for k in order[start:start + self.batch_size]], params, shared)
        return [self._completions(len(prompts), params, rows) for (prompts, params), rows in zip(requests, rows_of)]

    def _rows(self, prompts: Sequence[Messages], params: SamplingParams) -> list[_Row]:
        rows: list[_Row] = []
        for i, messages in enumerate(prompts):
            ids = self.encoder.prompt_ids(messages)
            self._split.setdefault(tuple(ids), self.shared_prefix_length(messages, ids))
            budget = params.max_new_tokens
            if self.max_positions:
                budget = min(budget, self.max_positions - len(ids))
                if budget < 1:
                    raise ValueError(f"prompt {i} has {len(ids)} tokens, no room left in the model's "
                                     f"{self.max_positions}-token context")
            request_seed = params.request_seed(i)
            for j in range(1 if params.greedy else params.n):
                rows.append(_Row(i, j, ids, sample_seed(request_seed, j), budget))
        return rows

    def _completions(self, count: int, params: SamplingParams, rows: list[_Row]) -> list[list[Completion]]:
        results: list[list[Completion]] = [[] for _ in range(count)]
        meta = params.to_json()
        for row in rows:
            text, reason, used = self._finish(row, params.stop)
            copies = params.n if params.greedy else 1
            for copy in range(copies):
                results[row.prompt_index].append(Completion(
                    text=text, model_id=self.model_id, finish_reason=reason, prompt_tokens=len(row.prompt_ids),
                    completion_tokens=used, seed=params.request_seed(row.prompt_index), params=meta,
                    index=row.sample_index + copy))
        return results

    def shared_prefix_length(self, messages: Messages, ids: list[int]) -> int:
        """How many leading tokens of a prompt to run (and cache) apart from the rest: the turns before its
        last message when they are at least `SHARED_PREFIX_MIN_TOKENS` long (few-shot exemplars, which every
        item of a benchmark shares), else 0. A function of the prompt alone, so batching never changes it."""
        if len(messages) < 2:
            return 0
        context = self.encoder.prompt_ids(messages[:-1])
        common = next((k for k, (a, b) in enumerate(zip(ids, context)) if a != b), min(len(ids), len(context)))
        common = min(common, len(ids) - 1)  # the last token's logits come from the rest
        return common if common >= SHARED_PREFIX_MIN_TOKENS else 0

    def _finish(self, row: _Row, stop: tuple[str, ...]) -> tuple[str, str, int]:
        tokens = row.tokens
        if tokens and tokens[-1] in self.stop_token_ids and row.finish_reason == "stop":
            tokens = tokens[:-1]
        text = self.encoder.decode(tokens)
        reason = row.finish_reason or "length"
        cut = min((pos for pos in (text.find(s) for s in stop) if pos >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return text, reason, len(row.tokens)

    def _new_cache(self, room: int = 0) -> Any:
        """A KV cache; with ``room``, one whose layers keep space for that many more positions per row, so that
        a decode step writes one column instead of copying the whole cache (`_RoomyLayer`)."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # older transformers: no config argument
            return DynamicCache()
        layers = getattr(cache, "layers", None)
        if room and layers and all(type(layer).__name__ == "DynamicLayer" for layer in layers):
            cache.layers = [_roomy_layer(room) for _ in layers]
        return cache

    def _forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any) -> Any:
        kwargs = {self._cache_kwarg: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1  # the prefill needs only the last position's logits
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return out.logits[:, -1, :].float()

    def _choose(self, logits: Any, params: SamplingParams, generators: list[Any]) -> Any:
        """The next token of every row, as a tensor on the model's device."""
        torch = self._torch
        if params.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
        return torch.cat([torch.multinomial(probs[r], 1, generator=generators[r]) for r in range(len(generators))])

    def _stopped_by_string(self, row: _Row, stop: tuple[str, ...], window: int) -> bool:
        return any(s in self.encoder.decode(row.tokens[-window:]) for s in stop) if stop else False

    def _layers(self, cache: Any) -> list[tuple[Any, Any]]:
        """(keys, values) of every layer: ``[batch, kv_heads, positions, head_dim]`` each."""
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56

    def _extend(self, prefix: list[tuple[Any, Any]] | None, ids: list[int], start: int) -> tuple[Any, list]:
        """Run ``ids`` (at positions ``start``...) on top of a batch-1 ``prefix`` cache; the last position's
        logits and the whole cache's layers."""
        torch = self._torch
        cache = self._new_cache()
        for layer, (keys, values) in enumerate(prefix or []):
            cache.update(keys, values, layer)  # the next update concatenates: the prefix stays untouched
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        attention = torch.ones((1, start + len(ids)), dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        logits = self._forward(input_ids, attention, positions, cache)
        return logits, self._layers(cache)

    def _prefill(self, batch: list[_Row], shared: dict[tuple[int, ...], list]) -> tuple[Any, Any, Any, Any]:
        """Every row's prompt run once, unpadded, then left-padded into one batch cache: the last logits,
        the cache, the attention mask and each row's last position.

        Each distinct prompt is run once (the ``n`` samples of a prompt share it), and a long multi-turn
        context (`shared_prefix_length`, e.g. few-shot exemplars) once per ``generate`` call for all the
        prompts that start with it. How a row is computed depends on its prompt alone, never on its batch."""
        torch = self._torch
        distinct: dict[tuple[int, ...], int] = {}
        for row in batch:
            distinct.setdefault(tuple(row.prompt_ids), len(distinct))
        runs = []
        for ids in distinct:
            split = self._split.get(ids, 0)
            prefix = None
            if split:
                if ids[:split] not in shared:
                    shared[ids[:split]] = self._extend(None, list(ids[:split]), 0)[1]
                prefix = shared[ids[:split]]
            runs.append(self._extend(prefix, list(ids[split:]), split))
        width = max(len(ids) for ids in distinct)
        which = [distinct[tuple(row.prompt_ids)] for row in batch]
        cache = self._new_cache(room=max(row.budget for row in batch))
        for layer in range(len(runs[0][1])):
            padded = [[torch.nn.functional.pad(tensor, (0, 0, width - tensor.shape[-2], 0))
                       for tensor in runs[w][1][layer]] for w in which]
            cache.update(torch.cat([p[0] for p in padded]), torch.cat([p[1] for p in padded]), layer)
        lengths = torch.tensor([len(row.prompt_ids) for row in batch], device=self.device)
        attention = (torch.arange(width, device=self.device).unsqueeze(0) >= (width - lengths).unsqueeze(1)).long()
        logits = torch.cat([runs[w][0] for w in which])
        return logits, cache, attention, (lengths - 1).unsqueeze(1)

    def _decode(self, batch: list[_Row], params: SamplingParams, shared: dict[tuple[int, ...], list]) -> None:
        """Generate every row of ``batch`` to its end, in place."""
        torch = self._torch
        device = self.device
        generators = []
        if not params.greedy:
            generators = [torch.Generator(device=device).manual_seed(row.seed) for row in batch]
        # Stop strings are checked on the last few tokens' text (a token holds at least part of a character).
        window = max((len(s) for s in params.stop), default=0) + 8
        active = list(range(len(batch)))  # batch rows still generating, in cache order
        with torch.inference_mode():
            logits, cache, attention, positions = self._prefill(batch, shared)
            while active:
                chosen_ids = self._choose(logits, params, [generators[r] for r in active] if generators else [])
                chosen = chosen_ids.tolist()
                keep = []
                for slot, r in enumerate(active):
                    row = batch[r]
                    row.tokens.append(chosen[slot])
                    if chosen[slot] in self.stop_token_ids or self._stopped_by_string(row, params.stop, window):
                        row.finish_reason = "stop"
                    elif len(row.tokens) >= row.budget:
                        row.finish_reason = "length"
                    else:
                        keep.append(slot)
                if not keep:
                    break
                next_ids = chosen_ids.unsqueeze(-1)
                if len(keep) < len(active):
                    index = torch.tensor(keep, dtype=torch.long, device=device)
                    next_ids = next_ids[index]
                    cache.batch_select_indices(index)
                    attention, positions = attention[index], positions[index]
                    active = [active[slot] for slot in keep]
                attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
                positions = positions[:, -1:] + 1
                logits = self._forward(next_ids, attention, positions, cache)

    # -- scoring ----------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[Messages, str]]) -> list[tuple[float, int]]:
        """For each (chat prompt, continuation): the summed log-probability of the continuation's tokens
        after the prompt (with its generation prompt) and their count. An empty continuation scores (0.0, 0)."""
        torch = self._torch
        encoded = [(self.encoder.prompt_ids(messages), self.encoder.continuation_ids(continuation))
                   for messages, continuation in requests]
        results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
        # One-token continuations (a judge's "A"/"B", "Yes"/"No") are read off one forward of their prompt.
        single: dict[tuple[int, ...], list[int]] = {}
        for k, (prompt, continuation) in enumerate(encoded):
            if len(continuation) == 1:
                single.setdefault(tuple(prompt), []).append(k)
        for prompt, logprobs in zip(single, self._next_token_logprobs(list(single))):
            for k in single[prompt]:
                results[k] = (float(logprobs[encoded[k][1][0]]), 1)
        order = sorted((k for k in range(len(encoded)) if len(encoded[k][1]) > 1),
                       key=lambda k: (-(len(encoded[k][0]) + len(encoded[k][1])), k))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            sequences = [encoded[k][0] + encoded[k][1] for k in chunk]
            width = max(len(s) for s in sequences)
            if self.max_positions and width > self.max_positions:
                raise ValueError(f"a prompt + continuation of {width} tokens exceeds the model's "
                                 f"{self.max_positions}-token context")
            keep = max(len(encoded[k][1]) for k in chunk) + 1
            with torch.inference_mode():
                input_ids, logits = self._last_logits(sequences, keep)
                # Position t predicts token t + 1: the last ``keep - 1`` logits predict the last tokens.
                logprobs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
                targets = input_ids[:, -(keep - 1):]
                picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            for r, k in enumerate(chunk):
                count = len(encoded[k][1])
                results[k] = (float(picked[r, -count:].sum()), count)
        return results

    def _last_logits(self, sequences: Sequence[Sequence[int]], keep: int) -> tuple[Any, Any]:
        """One uncached forward over ``sequences`` left-padded into a batch (every sequence ends in the last
        column): the padded ids and the logits of the last ``keep`` positions."""
        torch = self._torch
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for r, seq in enumerate(sequences):
            input_ids[r, width - len(seq):] = torch.tensor(list(seq))
            attention[r, width - len(seq):] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": keep} if self._logits_to_keep else {}
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                            use_cache=False, **kwargs).logits[:, -keep:, :]
        return input_ids, logits

    def _next_token_logprobs(self, prompts: list[tuple[int, ...]]) -> list[Any]:
        """The log-softmax over the vocabulary after each prompt (left-padded batches, last position only)."""
        torch = self._torch
        out: list[Any] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda k: (-len(prompts[k]), k))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(prompts[k]) for k in chunk)
            if self.max_positions and width + 1 > self.max_positions:
                raise ValueError(f"a prompt + continuation of {width + 1} tokens exceeds the model's "
                                 f"{self.max_positions}-token context")
            with torch.inference_mode():
                logits = self._last_logits([prompts[k] for k in chunk], 1)[1][:, -1, :]
                logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for r, k in enumerate(chunk):
                out[k] = logprobs[r]
        return out

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
