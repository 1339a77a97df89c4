"""The generation job: ``python -m tulu_pipeline.generation.job``, run by the compute launcher in its own process.

Under Dagster (dagster-pipes) it reads its parameters from the pipes context's extras, logs progress as JSON
lines (``{"event": "generation_progress", "requests_done", "requests_total", "completions",
"completion_tokens", "tokens_per_s"}``) and ends with ``report_asset_materialization`` carrying the
summary. Without Dagster, ``--params params.json`` (the same fields) runs it directly and prints the summary.

Parameters (extras):

- ``tulu_home``: the fsspec root (local path or URL);
- ``requests``: TULU_HOME-relative JSONL, one ``{"request_id", "messages"}`` per line;
- ``output``: TULU_HOME-relative JSONL to write, one ``{"request_id", "completions": [Completion]}`` per
  request, in request order; written through a temporary file and renamed, so it is either complete or absent;
- ``backend``: a `BackendSpec` (object or JSON string); local model paths are relative to ``tulu_home``;
- ``params``: `SamplingParams` fields (object or JSON string).

Seeds: request k of the file (0-based) uses ``params.seed + k`` whatever the chunking, so the output for a
request id depends only on its position in the file, the model, and the params.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections import Counter
from typing import Any

from tulu_pipeline.generation.base import GenerationBackend, SamplingParams
from tulu_pipeline.generation.chat import validate_messages
from tulu_pipeline.generation.spec import BackendSpec, build_backend
from tulu_pipeline.jobs import Job, JobOutcome, floats, job_main, require, typed
from tulu_pipeline.templates.lineage import lineage_hashes
from tulu_pipeline.storage import Store
from tulu_pipeline.progress import NullReporter, Reporter

PROGRESS_EVENT = "generation_progress"
REQUIRED = ("tulu_home", "requests", "output", "backend")


def read_requests(store: Store, rel: str) -> list[dict[str, Any]]:
    """The requests file's ``{"request_id", "messages"}`` records; ValueError naming the line otherwise."""
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with store.fs.open(store.path(rel), "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.decode("utf-8").strip()
            if not line:
                continue
            where = f"{rel}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc}); expected {{\"request_id\", \"messages\"}}") from None
            if not isinstance(record, dict) or not isinstance(record.get("request_id"), str) or not record["request_id"]:
                raise ValueError(f"{where}: expected an object with a non-empty string request_id")
            validate_messages(record.get("messages"), where)
            if record["request_id"] in seen:
                raise ValueError(f"{where}: request_id {record['request_id']!r} repeats line {seen[record['request_id']]}")
            seen[record["request_id"]] = number
            records.append({"request_id": record["request_id"], "messages": record["messages"]})
    return records


def _as_dict(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"generation job parameter {name!r} must be an object, got {type(value).__name__}")
    return value


def run_generation(store: Store, requests_rel: str, output_rel: str, spec: BackendSpec, params: SamplingParams,
                   reporter: Reporter | None = None, backend: GenerationBackend | None = None,
                   chunk_size: int | None = None) -> dict[str, Any]:
    """Generate ``params.n`` completions for every request of ``requests_rel`` and write ``output_rel``.

    ``backend`` overrides building one from ``spec`` (tests, or a caller reusing a loaded model; it is then
    not closed here). Requests go to the backend in chunks of ``chunk_size`` (default: 4 batches for
    transformers, 256 for the engines that batch themselves) with progress logged after each. Returns the
    summary (also the job's materialization metadata).
    """
    reporter = reporter or NullReporter()
    requests = read_requests(store, requests_rel)
    own_backend = backend is None
    started = time.perf_counter()
    if backend is None:
        backend = build_backend(spec, store)
    model_id = backend.model_id
    encoder = getattr(backend, "encoder", None)  # local backends tokenize; an HTTP server's template is its own
    lineage = encoder.lineage() if encoder is not None else None
    if chunk_size is None:
        chunk_size = spec.batch_size * 4 if spec.kind == "transformers" else 256
    reporter.log(f"generating {params.n} completion(s) for {len(requests)} requests from {requests_rel} with "
                 f"{spec.kind} backend {model_id}")
    meta = params.to_json()
    digest = hashlib.sha256()
    counts: Counter[str] = Counter()
    totals = {"completions": 0, "prompt_tokens": 0, "completion_tokens": 0}
    generate_s = 0.0
    try:
        with store.atomic_open(output_rel, "wb") as handle:
            for offset in range(0, len(requests), chunk_size):
                chunk = requests[offset:offset + chunk_size]
                # Shift the seed so that request k of the file gets params.seed + k whatever the chunking.
                chunk_params = dataclasses.replace(params, seed=params.seed + offset)
                t0 = time.perf_counter()
                results = backend.generate([r["messages"] for r in chunk], chunk_params)
                generate_s += time.perf_counter() - t0
                if len(results) != len(chunk):
                    raise RuntimeError(f"{model_id} returned {len(results)} results for {len(chunk)} requests")
                for request, completions in zip(chunk, results):
                    if len(completions) != params.n:
                        raise RuntimeError(f"{model_id} returned {len(completions)} completions for request "
                                           f"{request['request_id']}, expected {params.n}")
                    dicts = [{**c.to_json(), "params": meta} for c in completions]
                    for c in completions:
                        counts[c.finish_reason] += 1
                        totals["completions"] += 1
                        totals["prompt_tokens"] += c.prompt_tokens
                        totals["completion_tokens"] += c.completion_tokens
                    line = (json.dumps({"request_id": request["request_id"], "completions": dicts},
                                       ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
                    digest.update(line)
                    handle.write(line)
                reporter.log(json.dumps({
                    "event": PROGRESS_EVENT, "requests_done": offset + len(chunk), "requests_total": len(requests),
                    "completions": totals["completions"], "completion_tokens": totals["completion_tokens"],
                    "tokens_per_s": round(totals["completion_tokens"] / generate_s, 2) if generate_s else None,
                }, sort_keys=True))
    finally:
        if own_backend:
            backend.close()
    wall_s = time.perf_counter() - started
    summary = {
        "requests": len(requests),
        **totals,
        "tokens": totals["completion_tokens"],
        "tokens_per_s": round(totals["completion_tokens"] / generate_s, 2) if generate_s else 0.0,
        "generate_s": round(generate_s, 3),
        "wall_s": round(wall_s, 3),
        "model_id": model_id,
        "backend": spec.kind,
        "finish_reasons": dict(sorted(counts.items())),
        "params": meta,
        "output": store.uri(output_rel),
        "output_sha256": digest.hexdigest(),
        "template_lineage": lineage,
    }
    if lineage is not None:
        store.write_json(lineage_path(output_rel), lineage)
    reporter.log(f"wrote {totals['completions']} completions for {len(requests)} requests to {summary['output']}")
    return summary


def lineage_path(output_rel: str) -> str:
    """Sidecar of a generation output: the template lineage its prompts were encoded with."""
    return f"{output_rel}.lineage.json"


def run_job(extras: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """`run_generation` from job parameters (see the module docstring)."""
    require(extras, REQUIRED, "generation job")
    spec = BackendSpec.model_validate(_as_dict(extras["backend"], "backend"))
    params = SamplingParams.from_json(_as_dict(extras.get("params") or {}, "params"))
    store = Store(str(extras["tulu_home"]))
    return run_generation(store, extras["requests"], extras["output"], spec, params, reporter)


def materialization_metadata(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as dagster-pipes metadata (typed where inference would guess wrong)."""
    return {
        **{k: summary[k] for k in ("requests", "completions", "prompt_tokens", "completion_tokens", "tokens",
                                   "model_id", "backend", "output_sha256")},
        **floats(summary, ("tokens_per_s", "generate_s", "wall_s")),
        "output": typed(summary["output"], "path"),
        "finish_reasons": typed(summary["finish_reasons"], "json"),
        "params": typed(summary["params"], "json"),
        "template_lineage": typed(lineage_hashes(summary.get("template_lineage")), "json"),
    }


def _run(extras: dict[str, Any], reporter: Reporter) -> JobOutcome:
    summary = run_job(extras, reporter)
    return JobOutcome(materialization_metadata(summary), data_version=summary["output_sha256"][:16], summary=summary)


JOB = Job("tulu_pipeline.generation.job", _run, result_event="generation_result")


def main(argv: list[str] | None = None) -> int:
    return job_main(JOB, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
