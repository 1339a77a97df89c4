"""Runs inside the vLLM interpreter (``.venv-vllm``) for tests/test_vllm_engine.py; never imported by pytest.

``python tests/vllm_driver.py backend MODEL_DIR OUT.json`` builds one `VLLMBackend` on MODEL_DIR and records greedy
and seeded-sampling completions of `PROMPTS` and log-likelihoods of `CONTINUATIONS`.

``python tests/vllm_driver.py grpo WORK_DIR OUT.json`` runs two GRPO updates with vLLM rollouts on a tiny Llama and,
around every weight sync, compares the engine's log-probs of a fixed completion with the learner's.

vLLM starts worker processes, so everything runs under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Explain what a compiler does in one sentence."}],
    [{"role": "user", "content": "Give me a synonym for happy."}],
]
CONTINUATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "The capital of France is Paris."),
    ([{"role": "user", "content": "Name a fruit."}], "Banana"),
]
GREEDY_TOKENS = 32
SAMPLED = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95, "n": 2, "seed": 1234}


def run_backend(model_dir: str, out: str) -> None:
    from tulu_pipeline.generation.base import SamplingParams
    from tulu_pipeline.generation.vllm_backend import VLLMBackend

    backend = VLLMBackend(model_dir, "embedded", max_model_len=1024, seed=0)
    greedy = backend.generate(PROMPTS, SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0))
    sampled = backend.generate(PROMPTS, SamplingParams(**SAMPLED))
    loglikelihood = backend.loglikelihood(CONTINUATIONS)
    record = {"greedy": [[c.to_json() for c in cs] for cs in greedy],
              "sampled": [[c.to_json() for c in cs] for cs in sampled],
              "loglikelihood": loglikelihood}
    backend.close()
    Path(out).write_text(json.dumps(record), encoding="utf-8")


def run_grpo_sync_check(work_dir: str, out: str) -> None:
    """Two GRPO updates; after each, the engine's and the learner's log-probs of `FIXED` (prompt, completion)."""
    import torch
    from test_rlvr_support import addition_row, save_warm_addition_model

    from tulu_pipeline.training import rlvr as rlvr_training
    from tulu_pipeline.training.rlvr_config import RLVRTrainingConfig
    from tulu_pipeline.training.rlvr_step import completion_logprobs

    work = Path(work_dir)
    pairs = [(a, b) for a in range(4) for b in range(4)]
    # head_dim 64 (hidden 128, 2 heads): vLLM's CPU attention has no kernel for the toy's default 16.
    model_dir = save_warm_addition_model(work / "start", pairs, steps=40, hidden_size=128, heads=2)
    rows = [addition_row(a, b) for a, b in pairs]
    checks: list[dict] = []

    class CheckedRollouts(rlvr_training.VLLMRollouts):
        """`VLLMRollouts` whose sync compares log-probs before (stale engine) and after loading the weights."""

        fixed: tuple[list[int], list[int]] | None = None

        def engine_logprobs(self) -> list[float]:
            from vllm import SamplingParams

            prompt, completion = self.fixed
            params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=1)
            [output] = self.llm.generate([{"prompt_token_ids": prompt + completion}], params, use_tqdm=False)
            entries = output.prompt_logprobs[len(prompt):]
            return [float(entry[token].logprob) for token, entry in zip(completion, entries)]

        def learner_logprobs(self, model) -> list[float]:
            prompt, completion = self.fixed
            with torch.no_grad():
                logps, _ = completion_logprobs(model, [prompt], [completion], self.tokenizer.pad_token_id)
            return logps[0].tolist()

        def sync(self, model) -> None:
            if self.fixed is None:
                prompt = rlvr_training.prompt_ids(rows[0], self.tokenizer)
                answer = self.tokenizer.encode("7", add_special_tokens=False)
                self.fixed = (prompt, answer + [self.tokenizer.eos_token_id])
            learner = self.learner_logprobs(model)
            stale = self.engine_logprobs()
            super().sync(model)
            synced = self.engine_logprobs()
            checks.append({"learner": learner, "engine_before_sync": stale, "engine_after_sync": synced})

    rlvr_training.VLLMRollouts = CheckedRollouts
    # lr 1e-3 so that one update moves the log-probs far beyond the fp32 tolerance; a verifier whose score
    # depends on the text keeps group rewards unequal, so every update has a gradient.
    config = RLVRTrainingConfig(use_vllm=True, max_steps=2, prompts_per_step=2, num_generations=4,
                                max_completion_length=8, max_prompt_length=64, learning_rate=1e-3,
                                unfinished_penalty=None, beta=0.0, save_steps=10, seed=3)
    result = rlvr_training.run_rlvr(rows, [], model_dir, work / "out", config,
                           verifier=lambda row, text: (float(sum(map(ord, text)) % 5), False))
    Path(out).write_text(json.dumps({"checks": checks, "steps": result.metrics["steps"]}), encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    command, *args = sys.argv[1:]
    {"backend": run_backend, "grpo": run_grpo_sync_check}[command](*args)
