"""Preference pairs for DPO: encoding through the Tülu template, content hashes, micro-batches.

Each pair becomes the conversation before the final assistant turn (``prompt``) plus ``chosen`` / ``rejected`` as
the last assistant turn (`encode_conversation`), labelled on the final response and its EOS only. Sequences keep
their first ``max_length`` tokens (open-instruct's ``preference_tulu_tokenize_and_truncate``); a pair whose chosen
or rejected response has no token left is left out with its reason (open-instruct's ``preference_tulu_filter``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tulu_pipeline.hashing import canonical_json
from tulu_pipeline.templates.chat_template import IGNORE_INDEX, apply_tulu_chat_template, encode_conversation
from tulu_pipeline.training.batching import SFTCollator

NO_RESPONSE_TOKENS = "no response token within max_length"


def encode_response(prompt: Sequence[dict[str, str]], response: str, tokenizer: Any,
                    max_length: int) -> dict[str, Any]:
    """``prompt`` + ``response`` as the final assistant turn; labels on that response (and its EOS) only."""
    full = encode_conversation([*prompt, {"role": "assistant", "content": response}], tokenizer, max_length)
    # Segments are tokenized one by one, so everything before the final response is tokenized the same
    # whatever the response: its length is the prefix of an empty response (whose only token is the EOS).
    empty = encode_conversation([*prompt, {"role": "assistant", "content": ""}], tokenizer)
    prefix = len(empty["input_ids"]) - 1
    if full["input_ids"][:prefix] != empty["input_ids"][: min(prefix, len(full["input_ids"]))]:
        raise ValueError("the prompt tokenizes differently before different responses")
    labels = [IGNORE_INDEX] * min(prefix, len(full["labels"])) + full["labels"][prefix:]
    return {"input_ids": full["input_ids"], "labels": labels,
            "tokens": sum(1 for label in labels if label != IGNORE_INDEX), "truncated": full["truncated"]}


@dataclass
class EncodedPairs:
    """Pairs encoded for scoring or training, and the ones left out (pair_id -> reason)."""

    examples: list[dict[str, Any]] = field(default_factory=list)
    pair_ids: list[str] = field(default_factory=list)
    truncated_pair_ids: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)


def encode_pairs(pairs: Iterable[Mapping[str, Any]], tokenizer: Any, max_length: int) -> EncodedPairs:
    """`encode_response` for chosen and rejected of every pair (``pair_id``, ``prompt``, ``chosen``, ``rejected``)."""
    encoded = EncodedPairs()
    for pair in pairs:
        pair_id = str(pair.get("pair_id"))
        try:
            prompt = list(pair["prompt"])
            if not isinstance(pair["chosen"], str) or not isinstance(pair["rejected"], str):
                raise TypeError("chosen and rejected must be strings")
            chosen = encode_response(prompt, pair["chosen"], tokenizer, max_length)
            rejected = encode_response(prompt, pair["rejected"], tokenizer, max_length)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"preference pair {pair_id}: {exc!r} (expected prompt: list of {{role, content}}, "
                             f"chosen/rejected: str)") from exc
        if chosen["truncated"] or rejected["truncated"]:
            encoded.truncated_pair_ids.append(pair_id)
        if chosen["tokens"] == 0 or rejected["tokens"] == 0:
            encoded.dropped[pair_id] = NO_RESPONSE_TOKENS
            continue
        encoded.examples.append({
            "chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
            "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
            "chosen_tokens": chosen["tokens"], "rejected_tokens": rejected["tokens"],
        })
        encoded.pair_ids.append(pair_id)
    return encoded


def pairs_content_sha256(pairs: Iterable[Mapping[str, Any]]) -> str:
    """sha256 over each pair's id, prompt, chosen and rejected, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(canonical_json([pair.get("pair_id"), pair.get("prompt"), pair.get("chosen"),
                                      pair.get("rejected")]).encode() + b"\n")
    return digest.hexdigest()


@dataclass
class DPOCollator:
    """A micro-batch of pairs: chosen sequences then rejected ones, right-padded, in one batch of 2B rows."""

    pad_token_id: int

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        sequences = [{"input_ids": ex[f"{side}_input_ids"], "labels": ex[f"{side}_labels"]}
                     for side in ("chosen", "rejected") for ex in examples]
        batch = SFTCollator(pad_token_id=self.pad_token_id, packing=False)(sequences)
        batch.pop("real_tokens")
        batch.pop("computed_tokens")
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen_logps"] = torch.tensor([float(ex["ref_chosen_logps"]) for ex in examples])
            batch["ref_rejected_logps"] = torch.tensor([float(ex["ref_rejected_logps"]) for ex in examples])
        if "example_index" in examples[0]:
            batch["example_index"] = torch.tensor([int(ex["example_index"]) for ex in examples])
        return batch


def tulu_tokenizer(model_dir: str | Path) -> Any:
    """The model directory's tokenizer with Tülu's chat template: what reference scoring and DPO encode with."""
    from transformers import AutoTokenizer

    return apply_tulu_chat_template(AutoTokenizer.from_pretrained(model_dir))
