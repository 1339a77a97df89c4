"""Verified on-policy pairs: a completion the task's verifier accepts against the policy's own rejected sample.

A 135M judge cannot rank completions (it rates nearly everything alike), but GSM8K, MATH and IFEval-constraint
prompts have verifiers (`tulu_pipeline.rewards`). For such a prompt the pair is:

- chosen: the prompt's reference reply when it verifies, else a verified sample of any model of the pool;
- rejected: a sample of the on-policy SFT model that fails the verifier.

Among equals the smallest seeded hash wins (`tulu_pipeline.preference.prompts.rank_key`), as in the judged
selection. A prompt gives no pair, with its reason, when every SFT sample verifies (``all_correct``), no
completion verifies (``none_correct``) or the pool has no SFT sample (``no_policy_sample``): `NoPair`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tulu_pipeline.preference.prompts import rank_key
from tulu_pipeline.preference.schema import NoPair, pair_id
from tulu_pipeline.rlvr.prompts import TASK_OF_SOURCE  # the pool sources whose ground truth a verifier checks

VERIFIER_JUDGE_PREFIX = "verifier:"


def verification_of(prompt_row: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"task", "ground_truth" | "constraints"}`` for a prompt row a verifier can check, else None."""
    if prompt_row.get("constraints"):
        return {"task": "ifeval", "constraints": json.loads(prompt_row["constraints"])}
    task = TASK_OF_SOURCE.get(prompt_row.get("source", ""))
    if task and prompt_row.get("ground_truth"):
        return {"task": task, "ground_truth": prompt_row["ground_truth"]}
    return None


def verify_completion(verification: Mapping[str, Any], text: str) -> bool:
    """Whether ``text`` passes the prompt's verifier (strict mode)."""
    from tulu_pipeline.rewards import verify

    return verify(verification["task"], text, ground_truth=verification.get("ground_truth"),
                  constraints=verification.get("constraints")).ok


def select_verified(prompt_row_id: str, completions: list[dict[str, Any]], verdicts: Mapping[str, bool],
                    seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(chosen, rejected) among one prompt's completions (``model_role``, ``completion_id``, ``text``) given
    ``verdicts`` (completion id -> passes); raises `NoPair` (``all_correct``, ``none_correct`` or
    ``no_policy_sample``)."""
    def first(candidates: list[dict[str, Any]], tag: str) -> dict[str, Any]:
        return min(candidates, key=lambda c: rank_key(seed, prompt_row_id, tag, c["completion_id"]))

    policy = [c for c in completions if c["model_role"] == "sft" and c["text"].strip()]
    if not policy:
        raise NoPair("no_policy_sample", "the pool has no non-empty sample of the SFT model")
    wrong = [c for c in policy if not verdicts[c["completion_id"]]]
    if not wrong:
        raise NoPair("all_correct", f"all {len(policy)} SFT samples pass the verifier")
    right = [c for c in completions if verdicts[c["completion_id"]] and c["text"].strip()]
    if not right:
        raise NoPair("none_correct", f"none of {len(completions)} completions passes the verifier")
    references = [c for c in right if c["model_role"] == "reference"]
    return first(references or right, "chosen"), first(wrong, "rejected")


def verified_pair(prompt_row_id: str, completions: list[dict[str, Any]], verification: Mapping[str, Any],
                  seed: int, split: str) -> dict[str, Any]:
    """A `PAIR_SCHEMA` row (origin ``on_policy``, judge ``verifier:<task>``, ratings 1 / 0) from one prompt's
    completions (rows of ``policy_completions``)."""
    verdicts = {c["completion_id"]: verify_completion(verification, c["text"]) for c in completions}
    chosen, rejected = select_verified(prompt_row_id, completions, verdicts, seed)
    judge_id = VERIFIER_JUDGE_PREFIX + verification["task"]
    ratings = {"rank_by": "verified", "task": verification["task"],
               "passed": sorted(cid for cid, ok in verdicts.items() if ok),
               "failed": sorted(cid for cid, ok in verdicts.items() if not ok)}
    extra = {"chosen_completion_id": chosen["completion_id"], "rejected_completion_id": rejected["completion_id"],
             "candidates": len(completions), "seed": seed}
    return {
        "pair_id": pair_id(prompt_row_id, chosen["text"], rejected["text"], judge_id),
        "prompt_row_id": prompt_row_id, "source": chosen["source"], "license": chosen["license"],
        "prompt": chosen["prompt"], "chosen": chosen["text"], "rejected": rejected["text"],
        "chosen_model": chosen["model_id"], "rejected_model": rejected["model_id"],
        "chosen_rating": 1.0, "rejected_rating": 0.0,
        "ratings": json.dumps(ratings, sort_keys=True), "judge_id": judge_id, "origin": "on_policy",
        "split": split, "extra": json.dumps(extra, sort_keys=True),
    }
