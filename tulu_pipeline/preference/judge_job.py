"""The judge job: ``python -m tulu_pipeline.preference.judge_job``, run by the compute launcher in its own
process (like the generation job), so a large judge model never loads into Dagster's process.

Parameters (dagster-pipes extras, or ``--params params.json`` without Dagster):

- ``tulu_home``: the fsspec root;
- ``requests``: store-relative JSONL of ``{"completion_id", "prompt", "response"}``;
- ``output``: store-relative JSONL written with one judgment per line (`tulu_pipeline.preference.judge`);
- ``backend``: the judge model's ``BackendSpec`` as JSON (built with the generation package's
  ``build_backend``);
- ``judge``: ``{"kind": "local"|"openai", "judge_id", "max_retries", "seed", "temperature",
  "retry_temperature", "max_new_tokens", "batch_size"}``.

It ends with ``report_asset_materialization`` carrying the judged and quarantined counts.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tulu_pipeline.generation.base import SamplingParams
from tulu_pipeline.jobs import Job, JobOutcome, job_main, require
from tulu_pipeline.preference.judge import ChatJudge, Judge, LoglikelihoodJudge, judge_identity, run_judging
from tulu_pipeline.progress import Reporter
from tulu_pipeline.storage import Store

REQUIRED = ("tulu_home", "requests", "output", "backend", "judge")


def build_judge_backend(spec: dict[str, Any], store: Store) -> Any:
    """The judge's generation backend from its BackendSpec JSON (imported lazily: vLLM and torch are heavy)."""
    from tulu_pipeline.generation.spec import BackendSpec, build_backend

    return build_backend(BackendSpec.model_validate(spec), store)


def make_judge(backend: Any, settings: dict[str, Any]) -> Judge:
    """A `LoglikelihoodJudge` (kind ``local``) or a `ChatJudge` (kind ``openai``) over ``backend``."""
    kind = settings.get("kind", "local")
    judge_id = settings.get("judge_id") or judge_identity(kind, getattr(backend, "model_id", "judge"))
    if kind == "local":
        if not hasattr(backend, "loglikelihood"):
            raise TypeError(f"the local judge needs a backend with loglikelihood(); {type(backend).__name__} has none")
        from tulu_pipeline.preference.scoring import judge_scorer

        return LoglikelihoodJudge(judge_scorer(backend), judge_id)
    if kind == "openai":
        params = SamplingParams(max_new_tokens=int(settings.get("max_new_tokens", 64)),
                                temperature=float(settings.get("temperature", 0.0)), n=1,
                                seed=int(settings.get("seed", 0)))
        return ChatJudge(backend, judge_id, params, max_retries=int(settings.get("max_retries", 2)),
                         retry_temperature=float(settings.get("retry_temperature", 0.7)))
    raise ValueError(f"judge.kind must be 'local' or 'openai', got {kind!r}")


def run_job(params: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Build the judge, judge every request, write the output; returns the counts and the wall time."""
    started = time.perf_counter()
    require(params, REQUIRED, "judge_job")
    store = Store(str(params["tulu_home"]))
    backend = build_judge_backend(params["backend"], store)
    try:
        judge = make_judge(backend, params["judge"])
        reporter.log(f"judging {params['requests']} with {judge.judge_id}")
        counts = run_judging(store, params["requests"], params["output"], judge, reporter,
                             batch_size=int(params["judge"].get("batch_size", 8)))
        return {**counts, "judge_id": judge.judge_id, "wall_s": round(time.perf_counter() - started, 3)}
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()


JOB = Job("tulu_pipeline.preference.judge_job",
          lambda params, reporter: JobOutcome(run_job(params, reporter)), result_event="judge_result")


def main(argv: list[str] | None = None) -> int:
    return job_main(JOB, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
