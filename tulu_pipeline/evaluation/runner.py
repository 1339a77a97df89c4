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
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tulu_pipeline.evaluation import scoring
from tulu_pipeline.evaluation.benchmarks import (
    PAIRWISE_KINDS,
    VERIFIER_TASK,
    BenchmarkConfig,
    EvalSample,
    get_benchmark,
)
from tulu_pipeline.evaluation.judge_scoring import PAIRWISE_TEMPLATE_VERSION, REFUSAL_TEMPLATE_VERSION, Judge
from tulu_pipeline.evaluation.sandbox import SandboxLimits, run_python
from tulu_pipeline.hashing import json_hash

# 2: AlpacaEval's pairs judged in both orders; the open-ended sets judged against the parent checkpoint
EVAL_CODE_VERSION = "2"
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


def generation_digest(benchmark: str, config: BenchmarkConfig) -> str:
    """What fixes a checkpoint's answers to given items: the benchmark's prompts (its few-shot count) and the
    sampling parameters. Two evaluations with the same digest answered the same items the same way, whatever
    their sample sizes, so a child's judged comparison can reuse its parent's saved answers."""
    return json_hash({"benchmark": benchmark, "few_shot": config.few_shot, "max_new_tokens": config.max_new_tokens,
                      "temperature": config.temperature, "seed": config.seed})


def score_samples(benchmark: str, samples: Sequence[EvalSample], responses: Sequence[str] | None,
                  config: BenchmarkConfig, *, loglikelihood: Callable | None = None, judge: Judge | None = None,
                  verify: Callable | None = None, parent_responses: Sequence[str] | None = None,
                  ) -> list[scoring.ItemScore]:
    """Score every sample (``responses`` aligned with ``samples``; None only for MC1). ``parent_responses``
    (aligned too) are what a ``pairwise_vs_parent`` benchmark judges against; without them (a checkpoint with
    no parent) the answers are kept unscored (NaN) for the children to be judged against."""
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
    if kind == "pairwise_vs_parent" and parent_responses is None:
        return [scoring.ItemScore(math.nan, "no parent checkpoint: answers kept for its children's comparison",
                                  {"outputs_only": True}) for _ in samples]
    if kind in PAIRWISE_KINDS:
        if judge is None:
            raise ValueError(f"{benchmark} needs a judge (configure the judge resource)")
        if kind == "winrate":
            others, other = [s.reference["reference_output"] for s in samples], "reference"
        else:
            others, other = list(parent_responses or []), "parent"
            if len(others) != len(samples):
                raise ValueError(f"{benchmark}: {len(samples)} samples but {len(others)} parent responses")
        triples = [(s.prompt[-1]["content"], r, o) for (s, r), o in zip(pairs, others)]
        record = judge.record(PAIRWISE_TEMPLATE_VERSION)
        out = []
        for ((first, raw_first), (second, raw_second)), o in zip(judge.pairwise_swapped(triples), others):
            item = scoring.score_swapped_preference(first, second, other)
            details = {**item.details, "judge": record,
                       "raw": {"model_first": raw_first[:500], "model_second": raw_second[:500]}}
            if kind == "pairwise_vs_parent":
                details["parent_response"] = o
            out.append(scoring.ItemScore(item.score, item.reason, details))
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
            judged = {} if judge is None else {"judge": judge.record(REFUSAL_TEMPLATE_VERSION)}
            out.append(scoring.ItemScore(item.score, item.reason, {**item.details, **judged, "raw": raw[:500]}))
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
    outputs_only = bool(scores) and all(s.details.get("outputs_only") for s in scores)
    if spec.kind in PAIRWISE_KINDS and not outputs_only:
        metrics = {"wins": sum(v == 1.0 for v in values), "ties": sum(v == 0.5 for v in values),
                   "losses": sum(v == 0.0 for v in values),
                   # how often the two orders agreed: a judge with a position bias ties everything
                   "position_consistency": float(sum(bool(s.details.get("consistent")) for s in scores)
                                                 / len(scores)) if scores else math.nan}
    return {
        "benchmark": benchmark, "suite": spec.suite, "metric": spec.metric, "checkpoint_id": checkpoint_id,
        "n": len(values), "score": scoring.mean_score(values), "ci_low": low, "ci_high": high,
        "confidence": 0.95, "metrics": metrics, "scores": values,
        "config": config.model_dump(mode="json"), "config_digest": config.digest(),
        "item_ids_sha256": item_ids_sha256(samples),
        "decontamination_target": spec.decontamination_target, "code_version": EVAL_CODE_VERSION,
        "kind": spec.kind, "generation_digest": generation_digest(benchmark, config), "outputs_only": outputs_only,
    }


def item_ids_sha256(samples: Sequence[EvalSample]) -> str:
    """Which items an evaluation scored, in order (part of its version)."""
    return hashlib.sha256("\n".join(s.item_id for s in samples).encode()).hexdigest()


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
             verify: Callable | None = None, parent_responses: Sequence[str] | None = None,
             parent: dict[str, Any] | None = None) -> EvalResult:
    """Evaluate ``samples``: responses are given (from the generation job) or generated by ``backend``.
    ``parent_responses`` and ``parent`` (``{"checkpoint_id", "source", ...}``: where those answers came from)
    are for ``pairwise_vs_parent`` benchmarks; the summary records them and the judge (`Judge.info`)."""
    kind = get_benchmark(benchmark).kind
    if needs_generation(benchmark):
        if responses is None:
            if backend is None:
                raise ValueError(f"{benchmark}: pass responses or a backend to generate them")
            responses = generate_in_process(backend, samples, config)
        scores = score_samples(benchmark, samples, responses, config, judge=judge, verify=verify,
                               parent_responses=parent_responses)
    else:
        loglikelihood = getattr(backend, "loglikelihood", None)
        scores = score_samples(benchmark, samples, None, config, loglikelihood=loglikelihood)
        responses = None
    if parent is not None and kind == "pairwise_vs_parent":
        scores = [scoring.ItemScore(s.score, s.reason, {**s.details, "parent_checkpoint": parent["checkpoint_id"],
                                                        "parent_output_source": parent["source"]})
                  for s in scores]
    result = build_result(benchmark, checkpoint_id, samples, responses, scores, config)
    judged = judge is not None and (kind in PAIRWISE_KINDS and not result.summary["outputs_only"] or kind == "refusal")
    result.summary["judge_info"] = (judge.info(REFUSAL_TEMPLATE_VERSION if kind == "refusal" else PAIRWISE_TEMPLATE_VERSION)
                                    if judged else None)
    result.summary["low_confidence"] = bool(judged and result.summary["judge_info"]["low_confidence"])
    if kind == "pairwise_vs_parent":
        result.summary["parent"] = parent
        result.summary["parent_checkpoint"] = parent["checkpoint_id"] if parent else None
    return result
