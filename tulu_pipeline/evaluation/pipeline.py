"""One benchmark on one checkpoint end to end: items, generation (here or in the generation job),
scoring, contamination verdict, publishing. The Dagster asset only supplies the backends' specs and,
for out-of-process generation, a function that runs the generation job through the compute launcher.

Execution modes (``execution``):

- ``in_process``: the model loads in this process (`build_backend`). Meant for the small CPU configs
  (a handful of items on the embedded model), where starting a process costs more than generating.
- ``launcher``: the prompts are written to ``reports/eval/<benchmark>/<checkpoint>/_generation/<digest>/
  requests.jsonl``; ``run_job(requests_rel, output_rel, backend_spec, params)`` runs
  ``python -m tulu_pipeline.generation.job`` (a subprocess locally, a GPU pod on Kubernetes) and the
  answers are read back from ``output.jsonl``. Scoring (verifiers, the sandbox, the judge) stays here.
- ``auto``: ``launcher`` when the config evaluates more than `AUTO_IN_PROCESS_MAX_ITEMS` items (or every
  item), else ``in_process``.

TruthfulQA MC1 scores choices by log-likelihood, which the generation job does not return, so it always
loads the model in process.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from typing import Any

from tulu_pipeline.evaluation.benchmarks import (
    BenchmarkConfig,
    get_benchmark,
    load_samples,
)
from tulu_pipeline.evaluation.comparison import contamination
from tulu_pipeline.evaluation.judge_scoring import Judge
from tulu_pipeline.evaluation.results import REPORTS, publish_result
from tulu_pipeline.evaluation.runner import (
    evaluate,
    generation_requests,
    needs_generation,
    responses_from_output,
    sampling_params,
)
from tulu_pipeline.generation.job import lineage_path
from tulu_pipeline.storage import Store

AUTO_IN_PROCESS_MAX_ITEMS = 32
JUDGED_KINDS = ("winrate", "refusal")
RunJob = Callable[[str, str, Any, Any], None]


def resolve_execution(execution: str, config: BenchmarkConfig) -> str:
    if execution not in ("auto", "in_process", "launcher"):
        raise ValueError(f"execution must be auto, in_process or launcher, got {execution!r}")
    if execution != "auto":
        return execution
    small = config.sample_size is not None and config.sample_size <= AUTO_IN_PROCESS_MAX_ITEMS
    return "in_process" if small else "launcher"


def _model_dir_exists(store: Store, model: str) -> bool:
    return store.exists(model, "config.json")


def run_benchmark(store: Store, benchmark: str, checkpoint_id: str, config: BenchmarkConfig, *, run_id: str,
                  backend_spec: Any, judge_spec: Any = None, execution: str = "auto", run_job: RunJob | None = None,
                  build: Callable[[Any, Store], Any] | None = None, log: Callable[[str], None] = print,
                  ) -> dict[str, Any]:
    """Evaluate and publish; returns the published summary (see `tulu_pipeline.evaluation.results`)."""
    if build is None:
        from tulu_pipeline.generation.spec import build_backend as build
    spec = get_benchmark(benchmark)
    samples = load_samples(benchmark, config)
    mode = resolve_execution(execution, config) if needs_generation(benchmark) else "in_process"
    if mode == "launcher" and run_job is None:
        raise ValueError("execution 'launcher' needs run_job (the compute launcher)")
    backend = judge_backend = None
    responses = None
    lineage = None  # the template lineage of the prompts the model saw, when a local tokenizer encoded them
    try:
        if mode == "launcher":
            base = posixpath.join(REPORTS, benchmark, checkpoint_id, "_generation", config.digest())
            requests_rel, output_rel = f"{base}/requests.jsonl", f"{base}/output.jsonl"
            store.write_jsonl(requests_rel, generation_requests(samples))
            log(f"{benchmark}: generating {len(samples)} answers from {checkpoint_id} in the generation job")
            run_job(requests_rel, output_rel, backend_spec, sampling_params(config))
            records = [json.loads(line) for line in store.read_bytes(output_rel).decode().splitlines() if line.strip()]
            responses = responses_from_output(samples, records)
            if store.exists(lineage_path(output_rel)):
                lineage = store.read_json(lineage_path(output_rel))
        else:
            log(f"{benchmark}: loading {checkpoint_id} in process for {len(samples)} items")
            backend = build(backend_spec, store)
            encoder = getattr(backend, "encoder", None)
            lineage = encoder.lineage() if encoder is not None else None
        judge = None
        if spec.kind in JUDGED_KINDS and judge_spec is not None:
            local = getattr(judge_spec, "kind", None) in ("transformers", "vllm")
            if local and not _model_dir_exists(store, judge_spec.model):
                if spec.kind == "winrate":
                    raise FileNotFoundError(f"judge model {judge_spec.model} not found under {store.url}")
                log(f"{benchmark}: judge model {judge_spec.model} not found; refusals judged by keywords")
            else:
                judge_backend = build(judge_spec, store)
                judge = Judge(judge_backend)
        if spec.kind == "winrate" and judge is None:
            raise ValueError(f"{benchmark} needs a judge: configure the judge resource")
        result = evaluate(benchmark, checkpoint_id, samples, config, backend=backend, responses=responses, judge=judge)
    finally:
        for loaded in (backend, judge_backend):
            if loaded is not None:
                loaded.close()
    verdict = contamination(store, benchmark, checkpoint_id)
    extra = {"contamination": verdict, "execution": mode, "template_lineage": lineage,
             "judge": None if judge_spec is None or spec.kind not in JUDGED_KINDS else getattr(judge_spec, "model", None)}
    return publish_result(store, result, run_id, asset_key=f"eval/{benchmark}", extra=extra)
