"""The RLVR prompt set: GSM8K, MATH and instruction-following prompts whose answers a verifier can check.

Everything comes from the decontaminated pool (``decontaminated_prompts``), and only from a version whose blocking
checks passed (`require_checks_passed`):

- ``gsm8k`` / ``math``: rows of ``gsm8k_train`` / ``math_train`` with their user turn only (the reference solution is
  dropped: the policy must produce it) and ``ground_truth`` = the final answer the loaders extracted (GSM8K's
  ``#### N``, MATH's last ``\\boxed{}``). The row keeps its ``row_id``: it is the same prompt.
- ``ifeval``: Tülu 3's persona-IF idea on our own curated prompts: a prompt of ``if_sources`` gets ``k`` sampled
  IFEval-taxonomy constraints (`tulu_pipeline.rewards.constraints.sample_constraints`, seeded per parent row)
  whose natural-language instruction is appended to the user turn; the row's ``constraints`` column holds
  ``{"instruction_id_list", "kwargs"}`` as JSON (the ground truth the IFEval verifier checks). This is a new
  prompt, so it gets a new content address, ``rlvr_if-<hash>`` of its parent row id and its constraints; its
  ``source_key`` is the parent's row id and its license the parent's.

Every row records its task and split in ``extra`` (JSON: ``{"task", "split", ...}``; `row_task`, `row_split`).
Selection is a seeded hash rank per task (same inputs + config -> same rows on any machine); the first
``heldout_per_task`` rows of each task's rank are the held-out split (greedy accuracy before/after RL, never
trained on), the next ``<task>_rows`` the training split.

Ledger (stage ``rlvr``, asset ``rlvr_prompts``): every included row gets ``included_in_mix`` with decision
``train`` or ``heldout`` and details ``{"stage": "rlvr", "task", "split", "dataset_version"}``; an ``ifeval`` row
names its parent in ``related_ids``, and the parent row gets ``included_in_mix`` with decision
``constraint_attached`` and the derived row in ``related_ids`` (so ``tulu trace`` walks both ways). Candidates that
cannot be verified (no ground truth) or are too long are ``quarantined`` with a reason and written to
``quarantine/rlvr_prompts/<version>.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tulu_pipeline.curation.pipeline import require_checks_passed
from tulu_pipeline.data.schema import ROW_SCHEMA, make_row_id
from tulu_pipeline.hashing import short_digest
from tulu_pipeline.provenance.ledger import LedgerWriter
from tulu_pipeline.storage import DatasetInfo, Store

# Bump when a change here changes which rows a config selects or what they contain.
RLVR_CODE_VERSION = "1"
RLVR_DATASET = "rlvr_prompts"
SOURCE_DATASET = "decontaminated_prompts"
IF_SOURCE = "rlvr_if"
TASKS = ("gsm8k", "math", "ifeval")
TASK_SOURCES = {"gsm8k": "gsm8k_train", "math": "math_train"}
TASK_OF_SOURCE = {source: task for task, source in TASK_SOURCES.items()}

ConstraintSampler = Callable[[random.Random, int], dict[str, Any]]


class RLVRPromptsConfig(BaseModel):
    """How many prompts per task (training and held-out), from which sources, with which seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gsm8k_rows: int | None = Field(16, ge=0, description="training prompts from gsm8k_train; None: all; 0: the task "
                                   "is left out (held-out rows too)")
    math_rows: int | None = Field(16, ge=0, description="training prompts from math_train; None: all; 0: left out")
    ifeval_rows: int | None = Field(16, ge=0, description="constraint prompts; None: one per eligible parent")
    heldout_per_task: int = Field(4, ge=0, description="held-out prompts per task (taken first from each rank)")
    if_sources: tuple[str, ...] = Field(
        ("self_instruct_seed", "fine_grained_rlhf_qa", "code_alpaca"),
        description="curated sources whose prompts get constraints attached")
    constraints_per_prompt: int = Field(1, ge=1, le=4)
    if_instruction_types: tuple[str, ...] | None = Field(
        None, description="constraint types to sample (IFEval ids); None: the whole taxonomy")
    if_word_limit: tuple[int, int] | None = Field(
        None, description="(lo, hi): number_words constraints become 'less than N words', N in [lo, hi]")
    max_prompt_chars: int = Field(2000, ge=16)
    seed: int = 1

    def quota(self, task: str) -> int | None:
        return {"gsm8k": self.gsm8k_rows, "math": self.math_rows, "ifeval": self.ifeval_rows}[task]


RLVR_PRESETS: dict[str, RLVRPromptsConfig] = {
    # Instruction-following prompts only, with a constraint whose training reward a 135M model raises in a few CPU
    # RL steps ("answer with less than N words", N in 5..10: short, finished answers); benchmarks/results/rlvr.json
    # measures it (held-out: no gain yet in 8 steps). GSM8K and MATH answers need 200+ tokens: too long to train on in CPU minutes.
    "cpu_demo": RLVRPromptsConfig(gsm8k_rows=0, math_rows=0, ifeval_rows=32, heldout_per_task=16,
                                  if_instruction_types=("length_constraints:number_words",), if_word_limit=(5, 10)),
    # Tülu 3's RLVR set uses all of GSM8K and MATH train and ~15k IF prompts; here: every eligible row.
    "tulu3": RLVRPromptsConfig(gsm8k_rows=None, math_rows=None, ifeval_rows=None, heldout_per_task=128),
}


def rlvr_info_path(version: str) -> str:
    """Sidecar with the config, inputs, counts and held-out ids of a published RLVR prompt set."""
    return posixpath.join("data", RLVR_DATASET, version, "rlvr.json")


def _extra(row: dict[str, Any]) -> dict[str, Any]:
    raw = row.get("extra")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"row {row.get('row_id')}: extra is not JSON ({exc})") from exc
    return value if isinstance(value, dict) else {}


def row_task(row: dict[str, Any]) -> str:
    """The verifier task of an RLVR row (``extra.task``)."""
    task = row.get("task") or _extra(row).get("task")
    if task not in TASKS:
        raise ValueError(f"row {row.get('row_id')}: extra.task must be one of {TASKS}, got {task!r}")
    return task


def row_split(row: dict[str, Any]) -> str:
    """``train`` or ``heldout`` (``extra.split``)."""
    return _extra(row).get("split", "train")


def _rank_key(seed: int, task: str, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{task}:{row_id}".encode()).hexdigest()


def _user_prompt(row: dict[str, Any]) -> str | None:
    users = [m["content"] for m in row["messages"] if m["role"] == "user"]
    return users[0] if users else None


def _default_sampler(config: RLVRPromptsConfig) -> ConstraintSampler:
    from tulu_pipeline.rewards.constraints import sample_constraints

    return lambda rng, k: sample_constraints(rng, k=k, types=config.if_instruction_types,
                                             word_limit=config.if_word_limit)


@dataclass
class RLVRPromptsResult:
    version: str
    dataset: DatasetInfo
    inputs: dict[str, str]
    counts: dict[str, dict[str, int]]  # task -> {"train", "heldout", "available", "quarantined"}
    heldout_row_ids: list[str]
    samples: list[dict[str, Any]] = field(default_factory=list)
    quarantined: int = 0


def _task_row(row: dict[str, Any], task: str, split: str, prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "row_id": row["row_id"], "source": row["source"], "source_key": row["source_key"], "license": row["license"],
        "messages": [{"role": "user", "content": prompt}], "ground_truth": row.get("ground_truth"),
        "constraints": None, "eval_id": row.get("eval_id"),
        "extra": json.dumps({"task": task, "split": split, **extra}, sort_keys=True, ensure_ascii=False),
    }


def if_row(parent: dict[str, Any], prompt: str, split: str, sampled: dict[str, Any]) -> dict[str, Any]:
    """The RLVR row of ``parent``'s prompt with the sampled constraints' instruction appended."""
    constraints = {"instruction_id_list": list(sampled["instruction_id_list"]), "kwargs": list(sampled["kwargs"])}
    text = str(sampled["instruction_text"]).strip()
    content = json.dumps(constraints, sort_keys=True, ensure_ascii=False)
    return {
        "row_id": make_row_id(IF_SOURCE, parent["row_id"], content.encode()),
        "source": IF_SOURCE, "source_key": parent["row_id"], "license": parent["license"],
        "messages": [{"role": "user", "content": f"{prompt.rstrip()}\n\n{text}"}],
        "ground_truth": None, "constraints": content, "eval_id": None,
        "extra": json.dumps({"task": "ifeval", "split": split, "parent_row_id": parent["row_id"],
                             "parent_source": parent["source"], "instruction_text": text},
                            sort_keys=True, ensure_ascii=False),
    }


def _select(candidates: list[tuple[str, dict[str, Any]]], quota: int | None, heldout: int) -> tuple[list, list]:
    if quota == 0:  # a task without training rows is left out, held-out rows included
        return [], []
    candidates.sort(key=lambda item: item[0])
    rows = [row for _key, row in candidates]
    held = rows[:heldout]
    rest = rows[heldout:]
    return (rest if quota is None else rest[:quota]), held


def build_rlvr_prompts(store: Store, config: RLVRPromptsConfig, run_id: str,
                       constraint_sampler: ConstraintSampler | None = None) -> RLVRPromptsResult:
    """Select and publish ``data/rlvr_prompts/<version>/`` from the latest decontaminated pool whose blocking
    checks passed, with its ledger events and quarantine (see the module docstring).

    The version is a content hash of the config, the input version and the rows written, so a change to the
    constraint sampler shows up as a new version.
    """
    source_version = store.latest_version(SOURCE_DATASET)
    if source_version is None:
        raise FileNotFoundError(f"{SOURCE_DATASET} has not been materialized under {store.url}")
    require_checks_passed(store, source_version)
    inputs = {SOURCE_DATASET: source_version}
    if_sources = set(config.if_sources)
    candidates: dict[str, list[tuple[str, dict[str, Any]]]] = {task: [] for task in TASKS}
    quarantine: list[dict[str, Any]] = []
    available = {task: 0 for task in TASKS}

    # Only row ids, rank keys and small rows are kept: prompts of the tasks we draw from.
    for row in store.iter_rows(SOURCE_DATASET, source_version):
        source = row["source"]
        task = TASK_OF_SOURCE.get(source) or ("ifeval" if source in if_sources else None)
        if task is None:
            continue
        available[task] += 1
        prompt = _user_prompt(row)
        reason = None
        if not prompt or not prompt.strip():
            reason = "no user prompt"
        elif len(prompt) > config.max_prompt_chars:
            reason = f"prompt has {len(prompt)} characters, over max_prompt_chars={config.max_prompt_chars}"
        elif task != "ifeval" and not (row.get("ground_truth") or "").strip():
            reason = f"no ground-truth final answer for {task}"
        if reason:
            quarantine.append({"row_id": row["row_id"], "source": source, "task": task, "reason": reason})
            continue
        candidates[task].append((_rank_key(config.seed, task, row["row_id"]), row))

    sampler = constraint_sampler
    rows_out: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    heldout_ids: list[str] = []
    parents: list[tuple[str, str]] = []  # (parent id, derived id)
    for task in TASKS:
        train, held = _select(candidates[task], config.quota(task), config.heldout_per_task)
        if (train or held) and task == "ifeval" and sampler is None:
            sampler = _default_sampler(config)
        for split, chosen in (("heldout", held), ("train", train)):
            for row in chosen:
                prompt = _user_prompt(row) or ""
                if task == "ifeval":
                    rng = random.Random(f"{config.seed}:{row['row_id']}")
                    out = if_row(row, prompt, split, sampler(rng, config.constraints_per_prompt))
                    parents.append((row["row_id"], out["row_id"]))
                else:
                    out = _task_row(row, task, split, prompt)
                rows_out.append(out)
                if split == "heldout":
                    heldout_ids.append(out["row_id"])
        counts[task] = {"available": available[task], "train": len(train), "heldout": len(held),
                        "quarantined": sum(1 for q in quarantine if q["task"] == task)}

    if not rows_out:
        raise ValueError(f"{SOURCE_DATASET}@{source_version} has no usable RLVR prompt (sources "
                         f"{sorted(TASK_SOURCES.values())} + if_sources {sorted(if_sources)}; {len(quarantine)} "
                         "quarantined)")
    duplicate = len({r["row_id"] for r in rows_out}) != len(rows_out)
    if duplicate:
        raise ValueError("two RLVR rows share a row id; the input has duplicate row ids")
    digest = hashlib.sha256(json.dumps({"code": RLVR_CODE_VERSION, "config": config.model_dump(mode="json"),
                                        "inputs": inputs}, sort_keys=True).encode())
    for out in rows_out:
        digest.update(json.dumps(out, sort_keys=True, ensure_ascii=False).encode())
    version = short_digest(digest)

    derived = dict(parents)
    with LedgerWriter(store, "rlvr", RLVR_DATASET, version, run_id) as ledger:
        info = store.write_rows(RLVR_DATASET, version, rows_out, ROW_SCHEMA, inputs=inputs)
        for out in rows_out:
            extra = _extra(out)
            details = {"stage": "rlvr", "task": extra["task"], "split": extra["split"], "dataset_version": version}
            parent = extra.get("parent_row_id")
            ledger.record(out["row_id"], "included_in_mix", decision=extra["split"],
                          related_ids=[parent] if parent else (), details=details)
        for parent_id, derived_id in derived.items():
            ledger.record(parent_id, "included_in_mix", decision="constraint_attached", related_ids=[derived_id],
                          details={"stage": "rlvr", "task": "ifeval", "derived_row_id": derived_id,
                                   "dataset_version": version})
        for entry in quarantine:
            ledger.record(entry["row_id"], "quarantined", decision="excluded", reason=entry["reason"],
                          details={"stage": "rlvr", "task": entry["task"]})
    if quarantine:
        store.write_jsonl(posixpath.join("quarantine", RLVR_DATASET, f"{version}.jsonl"), quarantine)
    train_ids = [r["row_id"] for r in rows_out if r["row_id"] not in set(heldout_ids)]
    store.write_json(rlvr_info_path(version), {
        "version": version, "config": config.model_dump(mode="json"), "inputs": inputs, "counts": counts,
        "heldout_row_ids": heldout_ids, "train_row_ids_hash": hashlib.sha256("\n".join(train_ids).encode()).hexdigest(),
        "code_version": RLVR_CODE_VERSION,
    })
    samples = []
    for task in TASKS:
        samples.extend([r for r in rows_out if _extra(r)["task"] == task][:2])
    return RLVRPromptsResult(version, info, inputs, counts, heldout_ids, samples, len(quarantine))


def iter_split(rows: Iterable[dict[str, Any]], split: str) -> Iterable[dict[str, Any]]:
    """The rows of one split (``train`` | ``heldout``)."""
    return (row for row in rows if row_split(row) == split)
