"""policy_completions: N samples per prompt from each model of the pool, plus the dataset's reference reply.

The pool (Tülu 3's on-policy recipe): the latest SFT checkpoint, the base model, any configured extra
backend (vLLM, an OpenAI-compatible server), and the prompt row's own assistant turn where it has one.
Generation itself runs in its own process (``python -m tulu_pipeline.generation.job``, one launch per
model); this module writes the requests it reads, reads the completions it writes and publishes them as
one dataset, each completion with its model id, sampling params and seed.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tulu_pipeline.generation.base import SamplingParams
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.preference.prompts import PREFERENCE_CODE_VERSION
from tulu_pipeline.preference.schema import (
    COMPLETION_SCHEMA, COMPLETIONS_DATASET, PROMPTS_DATASET, completion_id, content_hash
)
from tulu_pipeline.storage import DatasetInfo, Store

REFERENCE_MODEL_ID = "dataset_reference"
MODEL_ROLES = ("sft", "base", "extra", "reference")


@dataclass(frozen=True)
class PoolModel:
    """One generating model: its id (recorded on every completion), its role, and its backend spec (JSON)."""

    model_id: str
    role: str
    backend: dict[str, Any]

    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model_id)


def latest_sft_checkpoint(store: Store, checkpoint_id: str | None = None) -> str:
    """The id of the on-policy SFT checkpoint: ``checkpoint_id`` if given (it must exist), else the
    ``models/sft-*`` whose manifest was written last. A checkpoint without its manifest is unfinished."""
    if checkpoint_id:
        if not store.exists("models", checkpoint_id, MANIFEST_FILE):
            raise FileNotFoundError(f"models/{checkpoint_id}/{MANIFEST_FILE} not found under {store.url}; "
                                    "materialize sft_checkpoint first")
        return checkpoint_id
    finished = []
    for name in store.listdir("models"):
        if name.startswith("sft-") and store.exists("models", name, MANIFEST_FILE):
            info = store.fs.info(store.path("models", name, MANIFEST_FILE))
            finished.append((info.get("mtime") or info.get("created") or 0, name))
    if not finished:
        raise FileNotFoundError(f"no finished SFT checkpoint (models/sft-*/{MANIFEST_FILE}) under {store.url}; "
                                "materialize sft_checkpoint first or set include_sft: false")
    return max(finished)[1]


def model_pool(sft: tuple[str, dict[str, Any]] | None, base: tuple[str, dict[str, Any]] | None,
               extra: Sequence[tuple[str, dict[str, Any]]], include_reference: bool) -> list[PoolModel]:
    """The generating pool, in order: the on-policy SFT checkpoint, the base model, then the extra backends,
    each given as (model id, backend spec JSON); ids must be distinct and the pool (with the reference
    replies) not empty."""
    pool = [PoolModel(sft[0], "sft", sft[1])] if sft else []
    pool += [PoolModel(base[0], "base", base[1])] if base else []
    pool += [PoolModel(model_id, "extra", backend) for model_id, backend in extra]
    ids = [m.model_id for m in pool]
    if len(set(ids)) != len(ids):
        raise ValueError(f"model ids in the pool must be distinct, got {ids}")
    if not pool and not include_reference:
        raise ValueError("the model pool is empty: enable include_sft, include_base, include_reference or extra_models")
    return pool


def generate_pool(store: Store, version: str, pool: Sequence[PoolModel], prompt_ids: Sequence[str], n: int,
                  generate: Callable[[PoolModel, str], dict[str, Any]],
                  log: Callable[[str], None] = lambda message: None,
                  ) -> tuple[dict[str, tuple[PoolModel, str]], dict[str, dict[str, Any]]]:
    """Each model's completions under ``work/``: an earlier attempt's complete output is reused, else
    ``generate(model, output_path)`` runs the generation (one job per model) and returns what it reported.
    Returns the outputs for `publish_completions` and, per model, the run's report (or what was reused)."""
    outputs: dict[str, tuple[PoolModel, str]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for model in pool:
        rel = output_path(version, model)
        if output_complete(store, rel, prompt_ids, n):
            log(f"{model.model_id}: reusing the complete output of an earlier attempt ({rel})")
            runs[model.model_id] = {"reused": rel}
        else:
            log(f"{model.model_id}: generating {n} x {len(prompt_ids)} completions")
            runs[model.model_id] = generate(model, rel)
        outputs[model.model_id] = (model, rel)
    return outputs, runs


def requests_path(version: str) -> str:
    return posixpath.join("work", COMPLETIONS_DATASET, version, "requests.jsonl")


def output_path(version: str, model: PoolModel) -> str:
    return posixpath.join("work", COMPLETIONS_DATASET, version, f"{model.slug()}.jsonl")


def completions_version(prompts_version: str, pool: list[PoolModel], params: SamplingParams,
                        include_reference: bool) -> str:
    return content_hash(PREFERENCE_CODE_VERSION, COMPLETIONS_DATASET, prompts_version,
                        [[m.model_id, m.role, m.backend] for m in pool], params.to_json(), include_reference,
                        length=16)


def write_generation_requests(store: Store, prompts_version: str, rel: str) -> int:
    """``{"request_id": prompt row id, "messages": prompt}`` per prompt, the generation job's input."""
    rows = [{"request_id": r["row_id"], "messages": r["messages"]}
            for r in store.iter_rows(PROMPTS_DATASET, prompts_version)]
    store.write_jsonl(rel, rows)
    return len(rows)


def read_generation_output(store: Store, rel: str, expected_ids: Iterable[str] | None = None,
                           expected_n: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """The generation job's output: request id → completion dicts. Raises naming the file and line when a
    line is malformed, a request is missing, or a request got a different number of completions."""
    out: dict[str, list[dict[str, Any]]] = {}
    for number, line in enumerate(store.read_bytes(rel).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            request_id, completions = record["request_id"], record["completions"]
            if not isinstance(completions, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                                           for c in completions):
                raise ValueError("completions must be a list of objects with a text")
        except (ValueError, KeyError, TypeError) as exc:
            expected = '{"request_id", "completions": [Completion]}'
            raise ValueError(f"{rel}:{number}: {exc}; expected {expected}") from exc
        out[request_id] = completions
    if expected_ids is not None:
        missing = sorted(set(expected_ids) - set(out))
        if missing:
            raise ValueError(f"{rel}: no completions for {len(missing)} requests, e.g. {missing[:3]}")
    if expected_n is not None:
        wrong = sorted(k for k, v in out.items() if len(v) != expected_n)
        if wrong:
            raise ValueError(f"{rel}: expected {expected_n} completions per request; {wrong[:3]} differ")
    return out


def output_complete(store: Store, rel: str, expected_ids: Iterable[str], expected_n: int) -> bool:
    """Whether an earlier attempt of the same version already left a complete output (so a retried run
    does not generate again)."""
    if not store.exists(rel):
        return False
    try:
        read_generation_output(store, rel, expected_ids, expected_n)
    except ValueError:
        return False
    return True


@dataclass
class CompletionsResult:
    version: str
    dataset: DatasetInfo
    per_model: dict[str, int]
    lengths: list[int] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)


def completion_rows(store: Store, prompts_version: str, outputs: dict[str, tuple[PoolModel, str]],
                    include_reference: bool) -> Iterator[dict[str, Any]]:
    """Completion rows in prompt order: each model's samples (in pool order), then the reference reply."""
    loaded = {model_id: (model, read_generation_output(store, rel)) for model_id, (model, rel) in outputs.items()}
    for prompt in store.iter_rows(PROMPTS_DATASET, prompts_version):
        base = {"prompt_row_id": prompt["row_id"], "source": prompt["source"], "license": prompt["license"],
                "prompt": prompt["messages"]}
        for model_id, (model, by_request) in loaded.items():
            for position, c in enumerate(by_request.get(prompt["row_id"], [])):
                index, seed = int(c.get("index", position)), c.get("seed")
                yield {**base, "completion_id": completion_id(prompt["row_id"], model_id, index, seed, c["text"]),
                       "text": c["text"], "model_id": model_id, "model_role": model.role, "sample_index": index,
                       "finish_reason": c.get("finish_reason"), "prompt_tokens": c.get("prompt_tokens"),
                       "completion_tokens": c.get("completion_tokens"), "seed": seed,
                       "params": json.dumps(c.get("params") or {}, sort_keys=True)}
        reference = prompt.get("reference_response")
        if include_reference and reference and reference.strip():
            yield {**base, "completion_id": completion_id(prompt["row_id"], REFERENCE_MODEL_ID, 0, None, reference),
                   "text": reference, "model_id": REFERENCE_MODEL_ID, "model_role": "reference", "sample_index": 0,
                   "finish_reason": "reference", "prompt_tokens": None, "completion_tokens": None, "seed": None,
                   "params": json.dumps({"source_key": prompt["source_key"]})}


def publish_completions(store: Store, prompts_version: str, version: str,
                        outputs: dict[str, tuple[PoolModel, str]], include_reference: bool) -> CompletionsResult:
    """Publish ``data/policy_completions/<version>/`` from the generation outputs."""
    per_model: dict[str, int] = {}
    lengths: list[int] = []
    first: list[dict[str, Any]] = []

    def counted(rows):
        for row in rows:
            per_model[row["model_id"]] = per_model.get(row["model_id"], 0) + 1
            lengths.append(len(row["text"]))
            if len(first) < 6:
                first.append(row)
            yield row

    info = store.write_rows(COMPLETIONS_DATASET, version,
                            counted(completion_rows(store, prompts_version, outputs, include_reference)),
                            COMPLETION_SCHEMA, inputs={PROMPTS_DATASET: prompts_version})
    return CompletionsResult(version, info, per_model, lengths, first)
