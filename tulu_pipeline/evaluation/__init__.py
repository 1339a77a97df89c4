"""Evaluation: the dev and unseen suites from the source registry, scored per item, per checkpoint.

- `benchmarks` — which benchmarks exist (from ``sources.yaml``), their suites, configs and seeded items;
- `scoring` — pure per-metric scoring functions and the seeded bootstrap;
- `sandbox` — confined execution of model-written code (HumanEval, MBPP);
- `judge` — pairwise preference and refusal classification by a judge model;
- `runner` — generate (or score choices) and score one benchmark on one checkpoint;
- `results` — per-item datasets, readable JSONL, summaries and ``evaluated`` ledger events;
- `lineage` / `comparison` — checkpoints side by side, regression and contamination verdicts.
"""

from tulu_pipeline.evaluation.benchmarks import (
    Benchmark,
    BenchmarkConfig,
    EvalSample,
    benchmark_config,
    benchmarks,
    get_benchmark,
    load_samples,
    suite,
)
from tulu_pipeline.evaluation.runner import EvalResult, evaluate

__all__ = ["Benchmark", "BenchmarkConfig", "EvalResult", "EvalSample", "benchmark_config", "benchmarks",
           "evaluate", "get_benchmark", "load_samples", "suite"]
