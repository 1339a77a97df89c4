"""Run one benchmark on one checkpoint: generate (or score choices), score every item, summarize.

Generation is separate from scoring so it can run where the model is: `generate_in_process` calls a
`GenerationBackend` here; `generation_requests` / `responses_from_output` are the two ends of the
generation job (``python -m tulu_pipeline.generation.job``) that the compute launcher runs in its own
process. TruthfulQA MC1 needs log-likelihoods, so it always runs in-process on a backend that has
``loglikelihood`` (the transformers backend).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tulu_pipeline.evaluation import scoring
from tulu_pipeline.evaluation.benchmarks import (
    VERIFIER_TASK,
    BenchmarkConfig,
    EvalSample,
    get_benchmark,
)
from tulu_pipeline.evaluation.judge_scoring import Judge
from tulu_pipeline.evaluation.sandbox import SandboxLimits, run_python

EVAL_CODE_VERSION = "1"
Messages = list[dict[str, str]]


@dataclass
class EvalResult:
    """Per-item records (prompt, response, score, reason) and the summary of one (benchmark, checkpoint)."""

    benchmark: str
    checkpoint_id: str
    config: BenchmarkConfig
    records: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


def needs_generation(benchmark: str) -> bool:
    return get_benchmark(benchmark).kind != "mc1"


def sampling_params(config: BenchmarkConfig) -> Any:
    from tulu_pipeline.generation.base import SamplingParams

    return SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, n=1, seed=config.seed)


def generate_in_process(backend: Any, samples: Sequence[EvalSample], config: BenchmarkConfig) -> list[str]:
    """One greedy (or seeded) completion per sample from a backend in this process."""
    if not samples:
        return []
    completions = backend.generate([s.prompt for s in samples], sampling_params(config))
    return [c[0].text for c in completions]


def generation_requests(samples: Sequence[EvalSample]) -> list[dict[str, Any]]:
    """The generation job's input records (``{"request_id", "messages"}``; the request id is the item id)."""
    return [{"request_id": s.item_id, "messages": s.prompt} for s in samples]


def responses_from_output(samples: Sequence[EvalSample], records: Sequence[dict[str, Any]]) -> list[str]:
    """The generation job's output lined up with the samples. A record carries ``request_id`` and either
    ``completions`` (a list of {"text", ...} or strings) or ``text``; a missing request is an error."""
    by_id: dict[str, str] = {}
    for record in records:
        if "completions" in record:
            first = record["completions"][0]
            by_id[record["request_id"]] = first["text"] if isinstance(first, dict) else str(first)
        else:
            by_id[record["request_id"]] = record["text"]
    missing = [s.item_id for s in samples if s.item_id not in by_id]
    if missing:
        raise ValueError(f"generation output lacks {len(missing)} requests, e.g. {missing[:3]}")
    return [by_id[s.item_id] for s in samples]


def sandbox_limits(config: BenchmarkConfig) -> SandboxLimits:
    return SandboxLimits(wall_s=config.sandbox_wall_s, cpu_s=config.sandbox_cpu_s, memory_mb=config.sandbox_memory_mb)


def score_samples(benchmark: str, samples: Sequence[EvalSample], responses: Sequence[str] | None,
                  config: BenchmarkConfig, *, loglikelihood: Callable | None = None, judge: Judge | None = None,
                  verify: Callable | None = None) -> list[scoring.ItemScore]:
    """Score every sample (``responses`` aligned with ``samples``; None only for MC1)."""
    kind = get_benchmark(benchmark).kind
    if kind == "mc1":
        if loglikelihood is None:
            raise ValueError(f"{benchmark} (MC1) needs a backend with loglikelihood(); the configured one has none")
        requests = [(s.prompt, choice) for s in samples for choice in s.reference["choices"]]
        scores = [ll for ll, _ in loglikelihood(requests)]
        out, at = [], 0
        for s in samples:
            k = len(s.reference["choices"])
            out.append(scoring.score_mc1(scores[at:at + k], s.reference["choices"], s.reference["correct"]))
            at += k
        return out
    if responses is None or len(responses) != len(samples):
        raise ValueError(f"{benchmark}: {len(samples)} samples but {0 if responses is None else len(responses)} responses")
    pairs = list(zip(samples, responses))
    if kind == "verified":
        return [scoring.score_verified(VERIFIER_TASK[benchmark], r, s.reference["ground_truth"], verify) for s, r in pairs]
    if kind == "ifeval":
        return [scoring.score_ifeval(r, s.reference["constraints"], verify) for s, r in pairs]
    if kind == "exact_match":
        return [scoring.score_exact_match(r, s.reference["ground_truth"]) for s, r in pairs]
    if kind in ("humaneval", "mbpp"):
        limits = sandbox_limits(config)
        out = []
        for s, r in pairs:
            ref = s.reference
            program = (scoring.humaneval_program(ref["prompt"], r, ref["test"], ref["entry_point"]) if kind == "humaneval"
                       else scoring.mbpp_program(r, ref["test_list"], ref["test_setup_code"]))
            run = run_python(program, limits)
            item = scoring.score_execution(run.status, run.reason)
            out.append(scoring.ItemScore(item.score, item.reason, {**item.details, "wall_s": run.wall_s}))
        return out
    if kind == "winrate":
        if judge is None:
            raise ValueError(f"{benchmark} needs a judge (configure the judge resource)")
        positions = [scoring.model_position(s.item_id, config.seed) for s in samples]
        triples = []
        for (s, r), pos in zip(pairs, positions):
            ref = s.reference["reference_output"]
            a, b = (r, ref) if pos == "A" else (ref, r)
            triples.append((s.prompt[-1]["content"], a, b))
        out = []
        for (winner, raw), pos in zip(judge.pairwise(triples), positions):
            item = scoring.score_preference(winner, pos)
            out.append(scoring.ItemScore(item.score, item.reason,
                                         {**item.details, "judge": judge.model_id, "method": judge.method, "raw": raw[:500]}))
        return out
    if kind == "refusal":
        verdicts = judge.refusal([(s.prompt, r) for s, r in pairs]) if judge is not None else [(None, "")] * len(pairs)
        out = []
        for (s, r), (refused, raw) in zip(pairs, verdicts):
            if refused is None:
                item = scoring.score_refusal(scoring.is_refusal_keyword(r),
                                             "keyword" if judge is None else "keyword (judge reply unparseable)")
            else:
                item = scoring.score_refusal(refused, f"judge {judge.method}")
            out.append(scoring.ItemScore(item.score, item.reason, {**item.details, "raw": raw[:500]}))
        return out
    raise ValueError(f"no scorer for benchmark kind {kind!r}")


def summarize(benchmark: str, checkpoint_id: str, samples: Sequence[EvalSample], scores: Sequence[scoring.ItemScore],
              config: BenchmarkConfig) -> dict[str, Any]:
    """Headline score with a seeded bootstrap CI, plus benchmark-specific metrics (IFEval's four)."""
    spec = get_benchmark(benchmark)
    values = [s.score for s in scores]
    low, high = scoring.bootstrap_ci(values, config.bootstrap_resamples, config.seed)
    metrics: dict[str, float] = {}
    if spec.kind == "ifeval":
        metrics = scoring.ifeval_aggregate([s.details for s in scores])
    if spec.kind == "winrate":
        metrics = {"wins": sum(v == 1.0 for v in values), "ties": sum(v == 0.5 for v in values),
                   "losses": sum(v == 0.0 for v in values)}
    return {
        "benchmark": benchmark, "suite": spec.suite, "metric": spec.metric, "checkpoint_id": checkpoint_id,
        "n": len(values), "score": scoring.mean_score(values), "ci_low": low, "ci_high": high,
        "confidence": 0.95, "metrics": metrics, "scores": values,
        "config": config.model_dump(mode="json"), "config_digest": config.digest(),
        "item_ids_sha256": hashlib.sha256("\n".join(s.item_id for s in samples).encode()).hexdigest(),
        "decontamination_target": spec.decontamination_target, "code_version": EVAL_CODE_VERSION,
    }


def build_result(benchmark: str, checkpoint_id: str, samples: Sequence[EvalSample], responses: Sequence[str] | None,
                 scores: Sequence[scoring.ItemScore], config: BenchmarkConfig) -> EvalResult:
    """Per-item records and the summary."""
    records = []
    for i, (sample, item) in enumerate(zip(samples, scores)):
        response = responses[i] if responses is not None else sample.reference["choices"][item.details["picked"]]
        records.append({
            "item_id": sample.item_id, "eval_id": sample.eval_id, "benchmark": benchmark, "source": sample.source,
            "checkpoint_id": checkpoint_id, "prompt": json.dumps(sample.prompt, ensure_ascii=False),
            "response": response, "score": float(item.score), "reason": item.reason,
            "details": json.dumps(item.details, ensure_ascii=False, sort_keys=True, default=str),
        })
    return EvalResult(benchmark, checkpoint_id, config, records, summarize(benchmark, checkpoint_id, samples, scores, config))


def evaluate(benchmark: str, checkpoint_id: str, samples: Sequence[EvalSample], config: BenchmarkConfig, *,
             backend: Any = None, responses: Sequence[str] | None = None, judge: Judge | None = None,
             verify: Callable | None = None) -> EvalResult:
    """Evaluate ``samples``: responses are given (from the generation job) or generated by ``backend``."""
    if needs_generation(benchmark):
        if responses is None:
            if backend is None:
                raise ValueError(f"{benchmark}: pass responses or a backend to generate them")
            responses = generate_in_process(backend, samples, config)
        scores = score_samples(benchmark, samples, responses, config, judge=judge, verify=verify)
    else:
        loglikelihood = getattr(backend, "loglikelihood", None)
        scores = score_samples(benchmark, samples, None, config, loglikelihood=loglikelihood)
        responses = None
    return build_result(benchmark, checkpoint_id, samples, responses, scores, config)
