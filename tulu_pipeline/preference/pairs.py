"""preference_pairs: chosen/rejected pairs from the judged completions (origin ``on_policy``) and from the
bundled human preference data (origin ``human``), with a seeded held-out split and blocking checks.

On-policy selection per prompt (Tülu 3): chosen = a completion with the best mean rating, rejected = a
completion with a strictly lower mean rating and a different text; among equals the one with the
smallest sha256 of ``[seed, prompt row id, "chosen"|"rejected", completion id]`` is taken, so the
choice does not depend on row order. A prompt with no strictly lower-rated completion is a tie: it is
dropped, with its reason, into ``preference_pairs_quarantine`` and the ledger (``not_paired``).
With ``rank_by: verified``, a prompt a verifier can check (GSM8K, MATH, IFEval constraints) is paired by it
instead: a verified completion against a failing sample of the SFT model (`tulu_pipeline.preference.verified`),
read from ``policy_completions``, so the judge need not rate it.
Every prompt row of a pair gets a ``paired`` ledger event naming the pair.

The held-out split is by prompt: sha256 of ``["heldout", seed, prompt row id]`` below the fraction.
Pairs whose prompt, chosen or rejected text overlaps an eval item (the decontamination rule) are
quarantined before publication; the `no_eval_overlap` check re-verifies with the plain reference
implementation.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tulu_pipeline.curation.decontaminate import DecontamConfig, EvalIndex, reference_matches
from tulu_pipeline.curation.pipeline import require_checks_passed
from tulu_pipeline.mixing.publish import SOURCE_DATASET
from tulu_pipeline.preference.human import HUMAN_PAIR_BUILDERS, HumanPairProblem, expected_human_texts, human_pair
from tulu_pipeline.preference.prompts import PREFERENCE_CODE_VERSION, rank_key
from tulu_pipeline.preference.schema import (
    COMPLETIONS_DATASET, JUDGED_DATASET, PAIR_QUARANTINE_SCHEMA, PAIR_SCHEMA, PAIRS_DATASET, PAIRS_QUARANTINE_DATASET,
    PROMPTS_DATASET, NoPair, content_hash, pair_id, prompt_messages
)
from tulu_pipeline.preference.verified import verification_of, verified_pair
from tulu_pipeline.provenance.ledger import LedgerWriter
from tulu_pipeline.storage import DatasetInfo, Store

PAIRED_EVENT = "paired"
NOT_PAIRED_EVENT = "not_paired"


class PairConfig(BaseModel):
    """How pairs are chosen and split, and how much human preference data joins them."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    rank_by: Literal["auto", "rating", "expected", "verified"] = Field(
        "auto", description="rating: the mean of the 1-5 ratings (Tülu 3); expected: the mean expected rating "
        "of a log-likelihood judge, which separates completions a small judge rates alike (SmolLM2-135M gives "
        "rating 1 to nearly everything); auto: expected where every completion of the prompt has one, else "
        "rating; verified: prompts with a verifier (GSM8K, MATH, IFEval constraints) pair a verified completion "
        "with a failing SFT sample (`tulu_pipeline.preference.verified`), the others as auto")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="share of prompts held out for DPO evaluation")
    human_sources: list[str] = Field(default_factory=lambda: sorted(HUMAN_PAIR_BUILDERS),
                                     description="human preference sources to ingest ([] for none)")
    human_rows_per_source: int | None = Field(32, ge=0, description="rows read per human source, seeded "
                                              "sample (None: all)")


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
RANK_FIELDS = {"rating": "mean_rating", "expected": "mean_expected"}


def select_pair(prompt_row_id: str, completions: list[dict[str, Any]], seed: int,
                score: str = "mean_rating") -> tuple[dict, dict]:
    """(chosen, rejected) among one prompt's judged completions (dicts with ``completion_id``, ``text`` and
    the ``score`` field, ``mean_rating`` by default); raises `NoPair` for fewer than two non-empty
    completions or a tie at the top."""
    candidates = [c for c in completions if c["text"].strip()]
    unscored = [c["completion_id"] for c in candidates if c.get(score) is None]
    if unscored:
        raise ValueError(f"{prompt_row_id}: completions {unscored[:3]} have no {score} (rank_by 'expected' needs a "
                         "log-likelihood judge)")
    if len(candidates) < 2:
        raise NoPair("too_few_completions", f"{len(candidates)} non-empty judged completion(s); need two")

    def key(tag):
        return lambda c: rank_key(seed, prompt_row_id, tag, c["completion_id"])

    best = max(c[score] for c in candidates)
    chosen = min((c for c in candidates if c[score] == best), key=key("chosen"))
    lower = [c for c in candidates if c[score] < best and c["text"].strip() != chosen["text"].strip()]
    if not lower:
        raise NoPair("tie", f"no completion is rated strictly below the best {score} {best:g} "
                     f"({len(candidates)} completions)")
    return chosen, min(lower, key=key("rejected"))


def split_of(prompt_row_id: str, fraction: float, seed: int) -> str:
    """``heldout`` for a seeded-hash share ``fraction`` of prompt rows, ``train`` otherwise."""
    value = int(rank_key(seed, "heldout", prompt_row_id)[:15], 16) / float(16 ** 15)
    return "heldout" if value < fraction else "train"


def resolve_rank_by(rank_by: str, completions: list[dict[str, Any]]) -> str:
    if rank_by not in ("auto", "verified"):  # verified: a prompt with no verifier is ranked as auto
        return rank_by
    return "expected" if all(c.get("mean_expected") is not None for c in completions) else "rating"


def on_policy_pair(prompt_row_id: str, completions: list[dict[str, Any]], seed: int, fraction: float,
                   rank_by: str = "rating") -> dict:
    """A `PAIR_SCHEMA` row from one prompt's judged completions (rows of ``judged_completions``);
    ``chosen_rating``/``rejected_rating`` are the ranking scores (``rank_by``, see `PairConfig`)."""
    rank_by = resolve_rank_by(rank_by, completions)
    score = RANK_FIELDS[rank_by]
    chosen, rejected = select_pair(prompt_row_id, completions, seed, score)
    ratings = {"chosen": json.loads(chosen["ratings"]), "rejected": json.loads(rejected["ratings"]),
               "rubric_version": chosen["rubric_version"], "rubric_hash": chosen["rubric_hash"], "rank_by": rank_by,
               "mean_rating": {"chosen": chosen["mean_rating"], "rejected": rejected["mean_rating"]},
               "mean_expected": {"chosen": chosen.get("mean_expected"), "rejected": rejected.get("mean_expected")}}
    extra = {"chosen_completion_id": chosen["completion_id"], "rejected_completion_id": rejected["completion_id"],
             "candidates": len(completions), "seed": seed}
    return {
        "pair_id": pair_id(prompt_row_id, chosen["text"], rejected["text"], chosen["judge_id"]),
        "prompt_row_id": prompt_row_id, "source": chosen["source"], "license": chosen["license"],
        "prompt": chosen["prompt"], "chosen": chosen["text"], "rejected": rejected["text"],
        "chosen_model": chosen["model_id"], "rejected_model": rejected["model_id"],
        "chosen_rating": float(chosen[score]), "rejected_rating": float(rejected[score]),
        "ratings": json.dumps(ratings, sort_keys=True), "judge_id": chosen["judge_id"], "origin": "on_policy",
        "split": split_of(prompt_row_id, fraction, seed), "extra": json.dumps(extra, sort_keys=True),
    }


def group_by_prompt(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["prompt_row_id"], []).append(row)
    return groups


def human_rows(store: Store, decontam_version: str, config: PairConfig) -> list[dict[str, Any]]:
    """The seeded sample of decontaminated rows of the configured human sources (rank by seeded hash)."""
    unknown = sorted(set(config.human_sources) - set(HUMAN_PAIR_BUILDERS))
    if unknown:
        raise ValueError(f"human_sources {unknown} have no pair builder; known: {sorted(HUMAN_PAIR_BUILDERS)}")
    wanted = set(config.human_sources)
    by_source: dict[str, list[tuple[str, dict]]] = {}
    for row in store.iter_rows(SOURCE_DATASET, decontam_version):
        if row["source"] in wanted:
            by_source.setdefault(row["source"], []).append((rank_key(config.seed, row["source"], row["row_id"]), row))
    out = []
    for source in sorted(by_source):
        ranked = [row for _, row in sorted(by_source[source], key=lambda kr: kr[0])]
        out.extend(ranked if config.human_rows_per_source is None else ranked[:config.human_rows_per_source])
    return out


def pair_texts(pair: dict[str, Any]) -> list[str]:
    """The texts checked against the evals: the prompt's system and user turns, chosen, rejected."""
    prompt = "\n".join(m["content"] for m in pair["prompt"] if m["role"] in ("system", "user"))
    return [prompt, pair["chosen"], pair["rejected"]]


# ---------------------------------------------------------------------------------------------
# publishing
# ---------------------------------------------------------------------------------------------
@dataclass
class PairsResult:
    version: str
    dataset: DatasetInfo
    quarantine: DatasetInfo
    inputs: dict[str, str]
    counts: dict[str, int]
    dropped_reasons: dict[str, int]
    rating_margins: list[float] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)


def pairs_version(config: PairConfig, inputs: dict[str, str], decontam: DecontamConfig | None) -> str:
    return content_hash(PREFERENCE_CODE_VERSION, PAIRS_DATASET, config.model_dump(mode="json"), inputs,
                        decontam.model_dump(mode="json") if decontam else None, length=16)


def build_preference_pairs(store: Store, config: PairConfig, run_id: str, judged_version: str | None = None,
                           index: EvalIndex | None = None, decontam: DecontamConfig | None = None,
                           eval_inputs: dict[str, str] | None = None) -> PairsResult:
    """Pair the judged completions and the human data, drop eval overlaps (when ``index`` is given),
    publish ``preference_pairs`` and ``preference_pairs_quarantine``, and write the ledger events."""
    judged_version = judged_version or store.latest_version(JUDGED_DATASET)
    if judged_version is None:
        raise FileNotFoundError(f"{JUDGED_DATASET} has not been materialized under {store.url}")
    decontam_version = store.latest_version(SOURCE_DATASET)
    if decontam_version is None:
        raise FileNotFoundError(f"{SOURCE_DATASET} has not been materialized under {store.url}")
    require_checks_passed(store, decontam_version)
    decontam = decontam or DecontamConfig()
    inputs = {JUDGED_DATASET: judged_version, SOURCE_DATASET: decontam_version, **(eval_inputs or {})}
    completions_version = store.dataset_inputs(JUDGED_DATASET, judged_version)[COMPLETIONS_DATASET]
    verifications: dict[str, dict[str, Any]] = {}
    if config.rank_by == "verified":
        prompts_version = store.dataset_inputs(COMPLETIONS_DATASET, completions_version)[PROMPTS_DATASET]
        inputs.update({COMPLETIONS_DATASET: completions_version, PROMPTS_DATASET: prompts_version})
        verifications = {r["row_id"]: v for r in store.iter_rows(PROMPTS_DATASET, prompts_version)
                         if (v := verification_of(r)) is not None}
    version = pairs_version(config, inputs, decontam if index is not None else None)

    pairs: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    judged = group_by_prompt(store.iter_rows(JUDGED_DATASET, judged_version))
    completions = group_by_prompt(store.iter_rows(COMPLETIONS_DATASET, completions_version))
    for prompt_row_id in sorted(set(judged) | set(completions)):
        group = judged.get(prompt_row_id) or completions[prompt_row_id]
        try:
            if prompt_row_id in verifications:
                pairs.append(verified_pair(prompt_row_id, completions[prompt_row_id], verifications[prompt_row_id],
                                           config.seed, split_of(prompt_row_id, config.heldout_fraction, config.seed)))
            elif prompt_row_id not in judged:
                raise NoPair("not_judged", f"judged_completions@{judged_version} has no rating for it (the judge "
                             "skipped verifiable prompts: pair them with rank_by verified, or judge them)")
            else:
                pairs.append(on_policy_pair(prompt_row_id, group, config.seed, config.heldout_fraction,
                                            config.rank_by))
        except NoPair as exc:
            details: dict[str, Any] = {"message": str(exc)}
            if prompt_row_id in verifications:
                details.update(rank_by="verified", task=verifications[prompt_row_id]["task"])
            elif prompt_row_id in judged:
                field_name = RANK_FIELDS[resolve_rank_by(config.rank_by, group)]
                details.update(rank_field=field_name, scores=[c[field_name] for c in group])
            dropped.append({"prompt_row_id": prompt_row_id, "source": group[0]["source"], "origin": "on_policy",
                            "reason": exc.code, "details": json.dumps(details)})
    for row in human_rows(store, decontam_version, config) if config.human_sources else []:
        try:
            pair = human_pair(row, config.seed)
        except HumanPairProblem as exc:
            dropped.append({"prompt_row_id": row["row_id"], "source": row["source"], "origin": "human",
                            "reason": exc.code, "details": json.dumps({"message": str(exc)})})
            continue
        pair["pair_id"] = pair_id(pair["prompt_row_id"], pair["chosen"], pair["rejected"], pair["judge_id"])
        pair["split"] = split_of(pair["prompt_row_id"], config.heldout_fraction, config.seed)
        pairs.append(pair)

    if index is not None:
        kept = []
        matches = index.match_texts([t for p in pairs for t in pair_texts(p)], decontam.threshold)
        for i, pair in enumerate(pairs):
            found = [m for part in matches[3 * i:3 * i + 3] for m in part]
            if found:
                best = max(found, key=lambda m: m.score)
                dropped.append({"prompt_row_id": pair["prompt_row_id"], "source": pair["source"],
                                "origin": pair["origin"], "reason": "eval_overlap",
                                "details": json.dumps({"pair_id": pair["pair_id"], "benchmark": best.benchmark,
                                                       "eval_id": best.eval_id, "score": best.score,
                                                       "span": best.span})})
            else:
                kept.append(pair)
        pairs = kept

    with LedgerWriter(store, "preference", PAIRS_DATASET, version, run_id) as ledger:
        info = store.write_rows(PAIRS_DATASET, version, pairs, PAIR_SCHEMA, inputs=inputs)
        quarantine = store.write_rows(PAIRS_QUARANTINE_DATASET, version, dropped, PAIR_QUARANTINE_SCHEMA)
        for pair in pairs:
            ledger.record(pair["prompt_row_id"], PAIRED_EVENT, decision=pair["split"], related_ids=[pair["pair_id"]],
                          details={"origin": pair["origin"], "judge_id": pair["judge_id"],
                                   "chosen_model": pair["chosen_model"], "rejected_model": pair["rejected_model"]})
        for record in dropped:
            ledger.record(record["prompt_row_id"], NOT_PAIRED_EVENT, decision="dropped", reason=record["reason"],
                          details=json.loads(record["details"]))
    counts = Counter(f"{p['origin']}_{p['split']}" for p in pairs)
    return PairsResult(version, info, quarantine, inputs,
                       {"pairs": len(pairs), "dropped": len(dropped), **dict(sorted(counts.items()))},
                       dict(Counter(d["reason"] for d in dropped)),
                       [p["chosen_rating"] - p["rejected_rating"] for p in pairs if p["origin"] == "on_policy"],
                       pairs[:3] + [p for p in pairs if p["origin"] == "human"][:3])


# ---------------------------------------------------------------------------------------------
# checks (blocking): verdicts persisted so the DPO stage can refuse a failed set
# ---------------------------------------------------------------------------------------------
def checks_path(version: str) -> str:
    return posixpath.join("reports", PAIRS_DATASET, version, "checks.json")


class PairChecksFailedError(RuntimeError):
    """A stage was asked to read a preference_pairs version whose blocking checks did not pass."""


def record_pair_checks(store: Store, version: str, results: dict[str, bool]) -> None:
    store.write_json(checks_path(version), {"version": version, "checks": results})


def require_pair_checks_passed(store: Store, version: str) -> None:
    """Raise unless every blocking check on ``preference_pairs@version`` passed (for the DPO stage)."""
    if not store.exists(checks_path(version)):
        raise PairChecksFailedError(f"{PAIRS_DATASET}@{version} has no recorded check results; re-materialize it")
    failed = sorted(k for k, ok in store.read_json(checks_path(version))["checks"].items() if not ok)
    if failed:
        raise PairChecksFailedError(f"{PAIRS_DATASET}@{version} failed blocking checks {failed}")


def identical_pairs(store: Store, version: str, limit: int = 20) -> list[str]:
    """Pair ids whose chosen and rejected texts are equal (after trimming whitespace)."""
    return [p["pair_id"] for p in store.iter_rows(PAIRS_DATASET, version)
            if p["chosen"].strip() == p["rejected"].strip()][:limit]


def prompt_mismatches(store: Store, version: str, judged_version: str, decontam_version: str,
                      limit: int = 20) -> list[dict[str, Any]]:
    """Pairs whose chosen and rejected do not answer the pair's prompt: on-policy pairs are re-joined to
    both completions (``policy_completions``, which the judged ones are a subset of: same prompt row and
    prompt); human pairs to their source row (same prompt, and both texts among that row's replies)."""
    pairs = list(store.iter_rows(PAIRS_DATASET, version))
    wanted = set()
    for p in pairs:
        if p["origin"] == "on_policy":
            extra = json.loads(p["extra"])
            wanted |= {extra["chosen_completion_id"], extra["rejected_completion_id"]}
    completions_version = store.dataset_inputs(JUDGED_DATASET, judged_version)[COMPLETIONS_DATASET]
    completions = {r["completion_id"]: r for r in store.iter_rows(COMPLETIONS_DATASET, completions_version)
                   if r["completion_id"] in wanted}
    human_ids = {p["prompt_row_id"] for p in pairs if p["origin"] == "human"}
    sources = {r["row_id"]: r for r in store.iter_rows(SOURCE_DATASET, decontam_version) if r["row_id"] in human_ids}
    problems = []
    for p in pairs:
        problem = None
        if p["origin"] == "on_policy":
            extra = json.loads(p["extra"])
            for side in ("chosen", "rejected"):
                c = completions.get(extra[f"{side}_completion_id"])
                if c is None:
                    problem = f"{side} completion {extra[f'{side}_completion_id']} not in {COMPLETIONS_DATASET}"
                elif c["prompt_row_id"] != p["prompt_row_id"] or c["prompt"] != p["prompt"]:
                    problem = f"{side} completion answers {c['prompt_row_id']}, not {p['prompt_row_id']}"
                elif c["text"] != p[side]:
                    problem = f"{side} text differs from completion {c['completion_id']}"
        else:
            row = sources.get(p["prompt_row_id"])
            if row is None:
                problem = f"source row not in {SOURCE_DATASET}@{decontam_version}"
            elif prompt_messages(row["messages"])[0] != p["prompt"]:
                problem = "prompt differs from the source row's conversation"
            elif not {p["chosen"], p["rejected"]} <= expected_human_texts(row):
                problem = "chosen or rejected is not one of the source row's replies"
        if problem:
            problems.append({"pair_id": p["pair_id"], "problem": problem})
            if len(problems) >= limit:
                break
    return problems


def pair_eval_overlaps(store: Store, version: str, index: EvalIndex, decontam: DecontamConfig,
                       limit: int = 20) -> list[dict[str, Any]]:
    """Pairs any of whose texts overlaps an eval item, by the plain reference implementation."""
    violations = []
    for p in store.iter_rows(PAIRS_DATASET, version):
        for part, text in zip(("prompt", "chosen", "rejected"), pair_texts(p)):
            matches = reference_matches(index.items, text, decontam.ngram, decontam.threshold)
            if matches:
                violations.append({"pair_id": p["pair_id"], "part": part, "benchmark": matches[0].benchmark,
                                   "eval_id": matches[0].eval_id, "score": matches[0].score})
                break
        if len(violations) >= limit:
            break
    return violations
