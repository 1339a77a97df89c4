"""The chat template, tokenizer and label-masking rule a stage tokenized with, as lineage.

Every stage that tokenizes (the SFT mix's token counts, SFT, reference log-probs, DPO, RLVR prompts and
rollouts in GRPO, generation, evaluation) records `template_lineage(...)` in its manifest or summary, and
`lineage_hashes(...)` in the ledger events it writes:

- ``chat_template_sha256``: sha256 of the Jinja template text;
- ``tokenizer_sha256``: sha256 of the tokenizer's definition as loaded (``tokenizer.json``: vocabulary,
  merges, added tokens, normalizer, pre-tokenizer, post-processor; plus the BOS/EOS tokens). Padding and
  truncation settings are left out: they never change a token id. Hashing the loaded definition rather than
  the files on disk means a tokenizer saved next to a checkpoint hashes like the one it was loaded from;
- ``mask_rule`` / ``mask_rule_sha256``: which tokens carry labels. For Tülu's format the hash is of
  `render_segments` on `GOLDEN_CONVERSATION` (which text is trained, which is not), so a change to the rule's
  code changes it; a model's own template (generation and evaluation of the base model) has no labels;
- ``rendered_golden``: `GOLDEN_CONVERSATION` rendered by the template, so a mismatch can be shown as its
  first differing line.

`lineage_mismatches(child, parent)` compares two records; the asset checks on checkpoints and evaluations
report what it returns.
"""

from __future__ import annotations

import json
from typing import Any

from tulu_pipeline.templates.chat_template import TULU_CHAT_TEMPLATE, render_segments
from tulu_pipeline.hashing import canonical_json, sha256_text

# A fixed multi-turn conversation: system prompt, two exchanges, and a special-token string inside a message
# (it must be tokenized as text by every code path).
GOLDEN_CONVERSATION: list[dict[str, str]] = [
    {"role": "system", "content": "You are a careful math tutor."},
    {"role": "user", "content": "What is 12 * 7?"},
    {"role": "assistant", "content": "12 * 7 = 84."},
    {"role": "user", "content": "And halved? Answer after the marker <|im_end|> please."},
    {"role": "assistant", "content": "Half of 84 is 42.\nSo the answer is 42."},
]

TULU_MASK_RULE = "tulu/assistant-content+eos"
MODEL_TEMPLATE_RULE = "model-template/no-labels"
HASH_KEYS = ("chat_template_sha256", "tokenizer_sha256", "mask_rule_sha256")


def mask_rule_sha256(rule: str = TULU_MASK_RULE) -> str:
    """sha256 of the rule's name and, for Tülu's rule, of which text of `GOLDEN_CONVERSATION` it trains."""
    if rule != TULU_MASK_RULE:
        return sha256_text(rule)
    return sha256_text(canonical_json([rule, render_segments(GOLDEN_CONVERSATION, eos_token="<eos>")]))


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of the tokenizer's definition (``tokenizer.json`` without padding/truncation, plus BOS/EOS)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
    else:  # a slow tokenizer: its vocabulary is what there is
        definition = {"vocab": tokenizer.get_vocab()}
    return sha256_text(canonical_json([definition, tokenizer.bos_token, tokenizer.eos_token]))


def render_golden(tokenizer: Any, template: str) -> str:
    """`GOLDEN_CONVERSATION` rendered by ``template`` (text, not tokens)."""
    return tokenizer.apply_chat_template(GOLDEN_CONVERSATION, chat_template=template, tokenize=False)


def template_lineage(tokenizer: Any, template: str | None = None, mask_rule: str | None = None) -> dict[str, Any]:
    """The lineage record of a stage tokenizing with ``tokenizer`` and ``template`` (default: the tokenizer's).

    ``mask_rule`` defaults to Tülu's when the template is Tülu's, else to a model template's (no labels).
    """
    template = template if template is not None else tokenizer.chat_template
    if not template:
        raise ValueError("the tokenizer has no chat template and none was given")
    rule = mask_rule or (TULU_MASK_RULE if template == TULU_CHAT_TEMPLATE else MODEL_TEMPLATE_RULE)
    return {
        "chat_template_sha256": sha256_text(template),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "mask_rule": rule,
        "mask_rule_sha256": mask_rule_sha256(rule),
        "rendered_golden": render_golden(tokenizer, template),
    }


def lineage_hashes(lineage: dict[str, Any] | None) -> dict[str, Any]:
    """The three hashes and the rule name (what ledger events and metadata carry); empty for no record."""
    if not lineage:
        return {}
    return {key: lineage.get(key) for key in (*HASH_KEYS, "mask_rule")}


def first_differing_line(a: str, b: str) -> tuple[int, str, str] | None:
    """``(line number from 1, line of a, line of b)`` of the first line where ``a`` and ``b`` differ."""
    lines_a, lines_b = a.split("\n"), b.split("\n")
    for index in range(max(len(lines_a), len(lines_b))):
        left = lines_a[index] if index < len(lines_a) else "<end of text>"
        right = lines_b[index] if index < len(lines_b) else "<end of text>"
        if left != right:
            return index + 1, left, right
    return None


def lineage_mismatches(child: dict[str, Any] | None, parent: dict[str, Any] | None,
                       child_name: str = "stage", parent_name: str = "parent") -> list[str]:
    """What differs between a stage's lineage and its parent's, one sentence each naming both hashes (and,
    for the template, the first differing line of the rendered golden conversation); [] when they agree.
    A missing record is itself a mismatch: lineage that was not recorded cannot be vouched for."""
    missing = [name for name, record in ((child_name, child), (parent_name, parent)) if not record]
    if missing:
        return [f"{' and '.join(missing)} recorded no template lineage"]
    problems = []
    labels = {"chat_template_sha256": "chat template", "tokenizer_sha256": "tokenizer",
              "mask_rule_sha256": "label-masking rule"}
    for key in HASH_KEYS:
        if child.get(key) == parent.get(key):
            continue
        text = (f"{labels[key]} differs: {child_name} {str(child.get(key))[:16]} vs {parent_name} "
                f"{str(parent.get(key))[:16]}")
        if key == "mask_rule_sha256":
            text += f" ({child.get('mask_rule')} vs {parent.get('mask_rule')})"
        if key == "chat_template_sha256":
            diff = first_differing_line(child.get("rendered_golden") or "", parent.get("rendered_golden") or "")
            if diff is not None:
                line, ours, theirs = diff
                text += f"; first differing line of the rendered template: line {line}: {child_name} {ours!r} vs {parent_name} {theirs!r}"
        problems.append(text)
    return problems
