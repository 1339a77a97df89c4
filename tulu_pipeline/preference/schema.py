"""Arrow schemas of the preference datasets and their content-addressed ids.

`PAIR_SCHEMA` is the contract with the DPO stage: one row per (prompt, chosen, rejected) pair, on-policy
(judged completions) or human (bundled preference data), with the provenance of the prompt row.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from tulu_pipeline.data.schema import MESSAGE_TYPE, ROW_SCHEMA

class NoPair(ValueError):
    """Why a prompt's completions give no pair: ``code`` is the quarantine's ``reason`` (judged: ``tie``,
    ``too_few_completions``, ``not_judged``; verified: ``all_correct``, ``none_correct``, ``no_policy_sample``)."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code}: {message}")


PROMPTS_DATASET = "preference_prompts"
COMPLETIONS_DATASET = "policy_completions"
JUDGED_DATASET = "judged_completions"
PAIRS_DATASET = "preference_pairs"
PAIRS_QUARANTINE_DATASET = "preference_pairs_quarantine"

ORIGINS = ("on_policy", "human")
SPLITS = ("train", "heldout")

# preference_prompts: the row schema (messages cut after the last user turn) plus the reference reply.
PROMPT_SCHEMA = pa.schema([*ROW_SCHEMA, pa.field("reference_response", pa.string())])

COMPLETION_SCHEMA = pa.schema([
    pa.field("completion_id", pa.string(), nullable=False),
    pa.field("prompt_row_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("license", pa.string(), nullable=False),
    pa.field("prompt", pa.list_(MESSAGE_TYPE), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("model_role", pa.string(), nullable=False),  # sft | base | extra | reference
    pa.field("sample_index", pa.int64(), nullable=False),
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("seed", pa.int64()),
    pa.field("params", pa.string()),  # JSON: the sampling params of this completion
])

JUDGED_SCHEMA = pa.schema([
    *COMPLETION_SCHEMA,
    pa.field("ratings", pa.string(), nullable=False),  # JSON: aspect -> {rating, expected?, probs?}
    pa.field("mean_rating", pa.float64(), nullable=False),  # mean over aspects of the 1-5 ratings
    pa.field("mean_expected", pa.float64()),  # mean of the expected ratings (log-likelihood judges)
    pa.field("judge_id", pa.string(), nullable=False),
    pa.field("rubric_version", pa.string(), nullable=False),
    pa.field("rubric_hash", pa.string(), nullable=False),
    pa.field("judge_attempts", pa.int64()),
    pa.field("judge_raw", pa.string()),  # the judge's raw text (API judges); null for log-likelihood scoring
])

PAIR_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("prompt_row_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("license", pa.string(), nullable=False),
    pa.field("prompt", pa.list_(MESSAGE_TYPE), nullable=False),
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("chosen_model", pa.string(), nullable=False),
    pa.field("rejected_model", pa.string(), nullable=False),
    pa.field("chosen_rating", pa.float64(), nullable=False),
    pa.field("rejected_rating", pa.float64(), nullable=False),
    pa.field("ratings", pa.string(), nullable=False),  # JSON: per-aspect ratings of both sides
    pa.field("judge_id", pa.string(), nullable=False),
    pa.field("origin", pa.string(), nullable=False),  # on_policy | human
    pa.field("split", pa.string(), nullable=False),  # train | heldout
    pa.field("extra", pa.string()),  # JSON
])

# Prompts or candidate pairs that did not become a pair, and why.
PAIR_QUARANTINE_SCHEMA = pa.schema([
    pa.field("prompt_row_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("origin", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("details", pa.string()),  # JSON
])


def content_hash(*parts: Any, length: int = 24) -> str:
    """sha256 of the JSON of ``parts`` (stable across processes and machines), truncated."""
    payload = json.dumps(list(parts), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def pair_id(prompt_row_id: str, chosen: str, rejected: str, judge_id: str) -> str:
    """``pair-<hash>`` of the prompt row, the two texts and the judge: the same pair always gets the same id."""
    return "pair-" + content_hash(prompt_row_id, chosen, rejected, judge_id)


def completion_id(prompt_row_id: str, model_id: str, sample_index: int, seed: int | None, text: str) -> str:
    """``cmp-<hash>`` of where a completion came from and what it says."""
    return "cmp-" + content_hash(prompt_row_id, model_id, sample_index, seed, text)


def prompt_messages(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str | None] | None:
    """Split a conversation into the prompt (up to and including its last user turn) and the first
    non-empty assistant reply after it (the dataset's reference response, or None). None when the
    conversation has no non-empty user turn."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user" and (m.get("content") or "").strip()),
                    default=None)
    if last_user is None:
        return None
    reference = next((m["content"] for m in messages[last_user + 1:]
                      if m.get("role") == "assistant" and (m.get("content") or "").strip()), None)
    return [{"role": m["role"], "content": m["content"]} for m in messages[:last_user + 1]], reference
