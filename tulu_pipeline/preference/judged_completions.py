"""judged_completions: the stage around the judge job. Writes the job's requests from policy_completions,
then publishes its judgments: rated completions as a dataset (with judge id, rubric version and hash;
optionally without the prompts a verifier can check, which preference_pairs pairs by verifier),
quarantined ones (raw judge text and reason) to ``quarantine/judged_completions/<version>.jsonl`` with a
``quarantined`` ledger event on their prompt row."""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tulu_pipeline.preference.prompts import PREFERENCE_CODE_VERSION
from tulu_pipeline.preference.rubric import ASPECTS, RUBRIC_VERSION, rubric_hash
from tulu_pipeline.preference.schema import (
    COMPLETIONS_DATASET, JUDGED_DATASET, JUDGED_SCHEMA, PROMPTS_DATASET, content_hash
)
from tulu_pipeline.preference.verified import verification_of
from tulu_pipeline.provenance.ledger import LedgerWriter
from tulu_pipeline.storage import DatasetInfo, Store


def judged_version(completions_version: str, judge_id: str, judge_settings: dict[str, Any]) -> str:
    return content_hash(PREFERENCE_CODE_VERSION, JUDGED_DATASET, completions_version, judge_id, judge_settings,
                        length=16)


def judge_requests_path(version: str) -> str:
    return posixpath.join("work", JUDGED_DATASET, version, "requests.jsonl")


def judge_output_path(version: str) -> str:
    return posixpath.join("work", JUDGED_DATASET, version, "judgments.jsonl")


def quarantine_path(version: str) -> str:
    return posixpath.join("quarantine", JUDGED_DATASET, f"{version}.jsonl")


def verifiable_prompts(store: Store, completions_version: str) -> set[str]:
    """Row ids of the completions' prompts that a verifier can check (`verification_of`): preference_pairs
    with ``rank_by: verified`` pairs them without ratings."""
    prompts_version = store.dataset_inputs(COMPLETIONS_DATASET, completions_version)[PROMPTS_DATASET]
    return {r["row_id"] for r in store.iter_rows(PROMPTS_DATASET, prompts_version) if verification_of(r) is not None}


def write_judge_requests(store: Store, completions_version: str, rel: str, skip_prompts: frozenset[str] = frozenset()
                         ) -> int:
    """``{"completion_id", "prompt", "response"}`` per completion, the judge job's input; completions of
    ``skip_prompts`` are left out."""
    rows = [{"completion_id": r["completion_id"], "prompt": r["prompt"], "response": r["text"]}
            for r in store.iter_rows(COMPLETIONS_DATASET, completions_version)
            if r["prompt_row_id"] not in skip_prompts]
    store.write_jsonl(rel, rows)
    return len(rows)


def read_judgments(store: Store, rel: str) -> dict[str, dict[str, Any]]:
    out = {}
    for number, line in enumerate(store.read_bytes(rel).decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
                out[record["completion_id"]] = record
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{rel}:{number}: {exc}; expected one judgment object per line") from exc
    return out


@dataclass
class JudgedResult:
    version: str
    dataset: DatasetInfo
    quarantine_path: str
    quarantined: int
    mean_ratings: list[float] = field(default_factory=list)
    aspect_histograms: dict[str, dict[int, int]] = field(default_factory=dict)
    per_model_mean: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)


def publish_judgments(store: Store, completions_version: str, version: str, output_rel: str, judge_id: str,
                      run_id: str, skip_prompts: frozenset[str] = frozenset()) -> JudgedResult:
    """Join the judge's output with the completions; rated rows to ``judged_completions``, the rest to the
    quarantine; completions of ``skip_prompts`` were not judged and are left out. A completion the judge
    output lacks is an error (the job did not finish)."""
    judgments = read_judgments(store, output_rel)
    digest = rubric_hash()
    quarantine: list[dict[str, Any]] = []
    means: list[float] = []
    histograms: dict[str, Counter[int]] = {a: Counter() for a in ASPECTS}
    by_model: dict[str, list[float]] = {}
    first: list[dict[str, Any]] = []

    def rows(ledger: LedgerWriter):
        for row in store.iter_rows(COMPLETIONS_DATASET, completions_version):
            if row["prompt_row_id"] in skip_prompts:
                continue
            judgment = judgments.get(row["completion_id"])
            if judgment is None:
                raise ValueError(f"{output_rel}: no judgment for completion {row['completion_id']}; "
                                 "did the judge job finish?")
            if judgment.get("ratings") is None:
                quarantine.append({"completion_id": row["completion_id"], "prompt_row_id": row["prompt_row_id"],
                                   "model_id": row["model_id"], "text": row["text"], "judge_id": judge_id,
                                   "reason": judgment.get("reason") or "no ratings", "raw": judgment.get("raw"),
                                   "attempts": judgment.get("attempts")})
                ledger.record(row["prompt_row_id"], "quarantined", decision="judge_failed",
                              reason=judgment.get("reason"), related_ids=[row["completion_id"]],
                              details={"model_id": row["model_id"], "judge_id": judge_id})
                continue
            mean = float(judgment["mean_rating"])
            means.append(mean)
            by_model.setdefault(row["model_id"], []).append(mean)
            for aspect in ASPECTS:
                histograms[aspect][int(judgment["ratings"][aspect]["rating"])] += 1
            raw = judgment.get("raw") or []
            out = {**row, "ratings": json.dumps(judgment["ratings"], sort_keys=True), "mean_rating": mean,
                   "mean_expected": judgment.get("mean_expected"), "judge_id": judge_id,
                   "rubric_version": RUBRIC_VERSION, "rubric_hash": digest,
                   "judge_attempts": int(judgment.get("attempts") or 1), "judge_raw": raw[-1] if raw else None}
            if len(first) < 6:
                first.append(out)
            yield out

    with LedgerWriter(store, "preference", JUDGED_DATASET, version, run_id) as ledger:
        info = store.write_rows(JUDGED_DATASET, version, rows(ledger), JUDGED_SCHEMA,
                                inputs={COMPLETIONS_DATASET: completions_version})
        qpath = store.write_jsonl(quarantine_path(version), quarantine)
    return JudgedResult(version, info, qpath, len(quarantine), means,
                        {a: dict(sorted(c.items())) for a, c in histograms.items()},
                        {m: round(sum(v) / len(v), 4) for m, v in sorted(by_model.items())}, first)
