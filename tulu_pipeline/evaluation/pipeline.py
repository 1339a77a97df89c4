"""One benchmark on one checkpoint end to end: items, generation (here or in the generation job),
scoring, contamination verdict, publishing. The Dagster asset only supplies the backends' specs and,
for out-of-process generation, a function that runs the generation job through the compute launcher.

Execution modes (``execution``):

- ``in_process``: the model loads in this process (`spec.shared_backends`: it stays loaded for the next
  benchmark on the same checkpoint, and the judge for the next judged one). Meant for the small CPU configs
  (a handful of items on the embedded model), where starting a process costs more than generating.
- ``launcher``: the prompts are written to ``reports/eval/<benchmark>/<checkpoint>/_generation/<digest>/
  requests.jsonl``; ``run_job(requests_rel, output_rel, backend_spec, params)`` runs
  ``python -m tulu_pipeline.generation.job`` (a subprocess locally, a GPU pod on Kubernetes) and the
  answers are read back from ``output.jsonl``. Scoring (verifiers, the sandbox, the judge) stays here.
- ``auto``: ``launcher`` when the config evaluates more than `AUTO_IN_PROCESS_MAX_ITEMS` items (or every
  item), else ``in_process``.

TruthfulQA MC1 scores choices by log-likelihood, which the generation job does not return, so it always
loads the model in process.

The open-ended sets (``pairwise_vs_parent``) judge a checkpoint's answers against its parent's answers to the
same items (`lineage.parent_of`: base for SFT, SFT for DPO, DPO for RLVR). The parent's answers are read
from the parent's own evaluation of the benchmark (`results.saved_responses`: same items, same prompts and
sampling). Where it has none, ``missing_parent`` decides: ``generate`` (default) answers with the parent's
model here, in the same execution mode, and the records say ``parent_output_source: generated``; ``error``
raises `MissingParentOutputs`, naming the partition to materialize first. A checkpoint with no parent (the
base model) keeps its answers unscored: they are what its children are judged against.
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
from tulu_pipeline.evaluation.lineage import parent_of
from tulu_pipeline.evaluation.results import (
    REPORTS,
    checkpoint_identity,
    dataset_name,
    publish_result,
    read_summary,
    saved_responses,
    version_of,
)
from tulu_pipeline.evaluation.runner import (
    evaluate,
    generate_in_process,
    generation_digest,
    generation_requests,
    item_ids_sha256,
    needs_generation,
    responses_from_output,
    sampling_params,
)
from tulu_pipeline.generation.job import lineage_path
from tulu_pipeline.storage import Store

AUTO_IN_PROCESS_MAX_ITEMS = 32
JUDGED_KINDS = ("winrate", "refusal", "pairwise_vs_parent")
MISSING_PARENT = ("generate", "error")
RunJob = Callable[[str, str, Any, Any], None]


class MissingParentOutputs(FileNotFoundError):
    """A ``pairwise_vs_parent`` benchmark's parent has no saved answers to the items (and ``missing_parent``
    is ``error``)."""


def resolve_execution(execution: str, config: BenchmarkConfig) -> str:
    if execution not in ("auto", "in_process", "launcher"):
        raise ValueError(f"execution must be auto, in_process or launcher, got {execution!r}")
    if execution != "auto":
        return execution
    small = config.sample_size is not None and config.sample_size <= AUTO_IN_PROCESS_MAX_ITEMS
    return "in_process" if small else "launcher"


def is_current(store: Store, benchmark: str, checkpoint_id: str, config: BenchmarkConfig) -> bool:
    """Whether the latest published evaluation of ``benchmark`` on ``checkpoint_id`` is the one ``config`` would
    give now: the same version (eval code, weights identity, config, items), its item dataset present, and for
    a set judged against the parent, the parent's answers it was judged against still the parent's latest."""
    summary = read_summary(store, benchmark, checkpoint_id)
    if summary is None:
        return False
    samples = load_samples(benchmark, config)
    version = version_of(benchmark, checkpoint_id, checkpoint_identity(store, checkpoint_id), config.digest(),
                         item_ids_sha256(samples))
    dataset = posixpath.join(store.dataset_dir(dataset_name(benchmark, checkpoint_id), version), "_dataset.json")
    if summary.get("version") != version or not store.exists(dataset):
        return False
    parent = summary.get("parent") or {}
    if parent.get("source") == "saved":
        latest = read_summary(store, benchmark, parent["checkpoint_id"])
        return latest is not None and latest.get("version") == parent.get("version")
    return not parent  # answers generated here for a parent: evaluate the parent, then this again


def _model_dir_exists(store: Store, model: str) -> bool:
    return store.exists(model, "config.json")


def _parent_answers(store: Store, benchmark: str, checkpoint_id: str, samples: list, config: BenchmarkConfig,
                    missing_parent: str) -> tuple[str | None, list[str] | None, dict[str, Any] | None]:
    """(parent id, its saved answers or None when they must be generated, where they came from)."""
    parent = parent_of(store, checkpoint_id)
    if parent is None:
        return None, None, None
    digest = generation_digest(benchmark, config)
    saved = saved_responses(store, benchmark, parent, [s.item_id for s in samples], digest)
    if saved is not None:
        answers, summary = saved
        return parent, answers, {"checkpoint_id": parent, "source": "saved", "version": summary["version"],
                                 "run_id": summary.get("run_id")}
    if missing_parent == "error":
        raise MissingParentOutputs(
            f"{benchmark}: the parent checkpoint {parent} of {checkpoint_id} has no saved answers to these "
            f"{len(samples)} items under this generation config (max_new_tokens={config.max_new_tokens}, "
            f"temperature={config.temperature}, seed={config.seed}, few_shot={config.few_shot}); materialize "
            f"eval/{benchmark} for partition {parent} with the same config first (tulu-evaluate --checkpoint "
            f"{parent}), or let the parent's answers be generated here (missing_parent='generate')")
    if not _model_dir_exists(store, f"models/{parent}"):
        raise MissingParentOutputs(f"{benchmark}: the parent checkpoint {parent} of {checkpoint_id} has neither "
                                   f"saved answers nor a model under {store.uri('models', parent)}")
    return parent, None, {"checkpoint_id": parent, "source": "generated"}


def run_benchmark(store: Store, benchmark: str, checkpoint_id: str, config: BenchmarkConfig, *, run_id: str,
                  backend_spec: Any, judge_spec: Any = None, execution: str = "auto", run_job: RunJob | None = None,
                  build: Callable[[Any, Store], Any] | None = None, log: Callable[[str], None] = print,
                  backend_spec_for: Callable[[str], Any] | None = None, missing_parent: str = "generate",
                  companions: dict[str, BenchmarkConfig] | None = None) -> dict[str, Any]:
    """Evaluate and publish; returns the published summary (see `tulu_pipeline.evaluation.results`).
    ``backend_spec_for(checkpoint_id)`` gives the parent's generation spec when its answers must be generated.
    ``companions`` are the benchmarks (and configs) this process evaluates next on the same checkpoint: their
    answers are generated in the same batches as this one's and kept for them (`BatchedAnswers`)."""
    release = _closer(build)
    answers = _batched if build is None else None  # answers are only kept for models from the process's pool
    if build is None:
        from tulu_pipeline.generation.spec import shared_backends

        build = shared_backends.get
    if missing_parent not in MISSING_PARENT:
        raise ValueError(f"missing_parent must be one of {MISSING_PARENT}, got {missing_parent!r}")
    spec = get_benchmark(benchmark)
    samples = load_samples(benchmark, config)
    mode = resolve_execution(execution, config) if needs_generation(benchmark) else "in_process"
    if mode == "launcher" and run_job is None:
        raise ValueError("execution 'launcher' needs run_job (the compute launcher)")
    parent = parent_answers = parent_info = None
    if spec.kind == "pairwise_vs_parent":  # before generating: a missing parent fails fast
        parent, parent_answers, parent_info = _parent_answers(store, benchmark, checkpoint_id, samples, config,
                                                              missing_parent)
        if parent_answers is None and parent is not None and backend_spec_for is None:
            raise ValueError(f"{benchmark}: generating the parent's answers needs backend_spec_for")
    backend = judge_backend = None
    responses = None
    lineage = None  # the template lineage of the prompts the model saw, when a local tokenizer encoded them
    try:
        if spec.kind == "pairwise_vs_parent":
            responses, lineage = _answers(store, benchmark, checkpoint_id, samples, config, mode, backend_spec,
                                          run_job, build, release, log, batched=answers, companions=companions)
            if parent is not None and parent_answers is None:
                log(f"{benchmark}: parent {parent} has no saved answers to these items; generating them")
                parent_answers, _ = _answers(store, benchmark, checkpoint_id, samples, config, mode,
                                             backend_spec_for(parent), run_job, build, release, log, answering=parent)
        elif mode == "launcher":
            responses, lineage = _answers(store, benchmark, checkpoint_id, samples, config, mode, backend_spec,
                                          run_job, build, release, log)
        else:
            log(f"{benchmark}: loading {checkpoint_id} in process for {len(samples)} items")
            backend = build(backend_spec, store)
            encoder = getattr(backend, "encoder", None)
            lineage = encoder.lineage() if encoder is not None else None
            if needs_generation(benchmark) and answers is not None:
                responses = answers.get(backend, backend_spec, store, benchmark, samples, config, companions, log)
        judge = None
        needs_judge = spec.kind in JUDGED_KINDS and (spec.kind != "pairwise_vs_parent" or parent is not None)
        if needs_judge and judge_spec is not None:
            local = getattr(judge_spec, "kind", None) in ("transformers", "vllm")
            if local and not _model_dir_exists(store, judge_spec.model):
                if spec.kind != "refusal":
                    raise FileNotFoundError(f"judge model {judge_spec.model} not found under {store.url}")
                log(f"{benchmark}: judge model {judge_spec.model} not found; refusals judged by keywords")
            else:
                judge_backend = build(judge_spec, store)
                # a model directory under TULU_HOME/models is the base model or a checkpoint: the policy's family
                same_family = local and posixpath.normpath(judge_spec.model).startswith("models/")
                judge = Judge(judge_backend, same_family=same_family)
        if needs_judge and spec.kind != "refusal" and judge is None:
            raise ValueError(f"{benchmark} needs a judge: configure the judge resource")
        result = evaluate(benchmark, checkpoint_id, samples, config, backend=backend, responses=responses, judge=judge,
                          parent_responses=parent_answers, parent=parent_info)
    finally:
        for loaded in (backend, judge_backend):
            if loaded is not None:
                release(loaded)
    verdict = contamination(store, benchmark, checkpoint_id)
    extra = {"contamination": verdict, "execution": mode, "template_lineage": lineage,
             "judge": None if judge_spec is None or spec.kind not in JUDGED_KINDS else getattr(judge_spec, "model", None)}
    return publish_result(store, result, run_id, asset_key=f"eval/{benchmark}", extra=extra)


def _answers(store: Store, benchmark: str, checkpoint_id: str, samples: list, config: BenchmarkConfig, mode: str,
             backend_spec: Any, run_job: RunJob | None, build: Callable[[Any, Store], Any],
             release: Callable[[Any], None], log: Callable[[str], None], answering: str | None = None,
             batched: BatchedAnswers | None = None, companions: dict[str, BenchmarkConfig] | None = None,
             ) -> tuple[list[str], Any]:
    """One answer per sample from ``backend_spec``'s model (``answering``, default the evaluated checkpoint),
    in the generation job or in process (the model is released after); and the template lineage it prompted with.
    Generation files go under the evaluated checkpoint's reports (``parent-<id>/`` for a parent's answers)."""
    who = answering or checkpoint_id
    if mode == "launcher":
        base = posixpath.join(REPORTS, benchmark, checkpoint_id, "_generation", config.digest())
        if answering:
            base = posixpath.join(base, f"parent-{answering}")
        requests_rel, output_rel = f"{base}/requests.jsonl", f"{base}/output.jsonl"
        store.write_jsonl(requests_rel, generation_requests(samples))
        log(f"{benchmark}: generating {len(samples)} answers from {who} in the generation job")
        run_job(requests_rel, output_rel, backend_spec, sampling_params(config))
        records = [json.loads(line) for line in store.read_bytes(output_rel).decode().splitlines() if line.strip()]
        lineage = store.read_json(lineage_path(output_rel)) if store.exists(lineage_path(output_rel)) else None
        return responses_from_output(samples, records), lineage
    log(f"{benchmark}: loading {who} in process for {len(samples)} items")
    backend = build(backend_spec, store)
    try:
        encoder = getattr(backend, "encoder", None)
        lineage = encoder.lineage() if encoder is not None else None
        if batched is not None:
            return batched.get(backend, backend_spec, store, benchmark, samples, config, companions, log), lineage
        return generate_in_process(backend, samples, config), lineage
    finally:
        release(backend)


class BatchedAnswers:
    """Answers generated in this process, kept per model (its pool key: spec, TULU_HOME, files) and per
    (benchmark, generation digest, item).

    The first benchmark of a checkpoint to need answers generates those of its ``companions`` too, in shared
    batches (`generation.base.generate_many`), and the companions' steps then read theirs from here. What is
    kept is exactly what each benchmark would have generated alone (greedy rows do not depend on their batch);
    a companion whose config turns out different, or whose items are not all here, generates its own."""

    def __init__(self, models: int = 2):
        self.models = models
        self._kept: dict[tuple, dict[tuple[str, str], dict[str, str]]] = {}

    def get(self, backend: Any, spec: Any, store: Store, benchmark: str, samples: list, config: BenchmarkConfig,
            companions: dict[str, BenchmarkConfig] | None, log: Callable[[str], None] = print) -> list[str]:
        """This benchmark's answers to ``samples`` (generating them, and the companions', when not kept)."""
        from tulu_pipeline.generation.base import generate_many
        from tulu_pipeline.generation.spec import BackendPool

        model = BackendPool.key(spec, store)
        if model is None:  # not a pooled model: nothing to keep its answers under
            return generate_in_process(backend, samples, config)
        kept = self._kept.pop(model, {})
        self._kept[model] = kept  # most recently used last
        while len(self._kept) > self.models:
            self._kept.pop(next(iter(self._kept)))
        wanted = (benchmark, generation_digest(benchmark, config))
        have = kept.get(wanted, {})
        if all(s.item_id in have for s in samples):
            return [have[s.item_id] for s in samples]
        jobs = [(wanted, samples, config)]
        for name, other in (companions or {}).items():
            key = (name, generation_digest(name, other))
            if (name != benchmark and needs_generation(name) and key not in kept
                    and resolve_execution("auto", other) == "in_process"):
                jobs.append((key, load_samples(name, other), other))
        log(f"{benchmark}: generating in shared batches with {', '.join(name for (name, _), _, _ in jobs[1:]) or 'no other benchmark'}")
        results = generate_many(backend, [([s.prompt for s in items], sampling_params(cfg)) for _, items, cfg in jobs])
        for (key, items, _), completions in zip(jobs, results):
            kept.setdefault(key, {}).update({s.item_id: c[0].text for s, c in zip(items, completions)})
        return [kept[wanted][s.item_id] for s in samples]


# the process's kept answers (models from `spec.shared_backends` only)
_batched = BatchedAnswers()


def _closer(build: Callable[[Any, Store], Any] | None) -> Callable[[Any], None]:
    """How to let go of a backend: models from the process's pool (``build`` None) stay loaded for the next
    benchmark on the same checkpoint; a caller's ``build`` gets its backends closed."""
    if build is not None:
        return lambda backend: backend.close()
    from tulu_pipeline.generation.spec import shared_backends

    return lambda backend: None if shared_backends.owns(backend) else backend.close()
