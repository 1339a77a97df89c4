"""Tülu's chat format, and conversations encoded for SFT with assistant-only labels.

The format (open-instruct's ``tulu`` template)::

    <|system|>\\n{system}\\n          (optional, wherever a system message appears)
    <|user|>\\n{user}\\n
    <|assistant|>\\n{assistant}{eos}\\n   (no trailing newline after the last message)

`TULU_CHAT_TEMPLATE` is that template as Jinja, with ``{% generation %}`` markers around each assistant
``content + eos`` (what is trained), so TRL's / transformers' ``return_assistant_tokens_mask`` agree with
`encode_conversation`. `apply_tulu_chat_template` sets it on a tokenizer, which then saves it with the
checkpoint (``chat_template.jinja``).

Labels (`encode_conversation`): -100 everywhere except the content of every assistant turn and the EOS
right after it. The ``<|assistant|>\\n`` header, system and user turns, and the ``\\n`` separating an EOS
from the next turn are not trained (open-instruct also trains that separator; it carries no information
and a model that stops at EOS never produces it).

Tokenization is done segment by segment: each run of untrained text (everything up to and including
``<|assistant|>\\n``) and each assistant content is tokenized on its own and the pieces concatenated, with
the EOS appended by id. So a token never straddles a trained/untrained boundary (labels are exact, token by
token), the prompt part is tokenized exactly as a prompt rendered with ``add_generation_prompt=True`` is
at inference, and the ids decode back to the rendered text. Special-token strings that occur inside
message contents (e.g. a literal ``<|im_end|>``) are tokenized as plain text, never as control tokens.

Truncation keeps the first ``max_length`` tokens (open-instruct's rule): later turns, or the end of the
last assistant turn including its EOS, are cut. A conversation with no trained token left is flagged
(``num_trained_tokens == 0``); `encode_rows` reports such rows and leaves them out instead of training on
an all-masked sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100

TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}"
    "{{ raise_exception('Tulu chat template supports the roles system, user and assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

ROLES = ("system", "user", "assistant")


def apply_tulu_chat_template(tokenizer: Any) -> Any:
    """Set Tülu's chat template on ``tokenizer`` (and EOS as pad token if it has none); returns it."""
    if tokenizer.eos_token is None:
        raise ValueError("the Tülu format ends assistant turns with the tokenizer's EOS token, but it has none")
    tokenizer.chat_template = TULU_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render_segments(messages: Sequence[dict[str, str]], eos_token: str) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, trained)`` pieces; their concatenation is the template's output.

    Trained pieces are assistant contents followed by ``eos_token``; everything else is untrained.
    Consecutive untrained pieces are merged.
    """
    pieces: list[tuple[str, bool]] = []

    def add(text: str, trained: bool) -> None:
        if pieces and not trained and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + text, False)
        else:
            pieces.append((text, trained))

    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{index}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a string, got {type(content).__name__}")
        if role == "assistant":
            add("<|assistant|>\n", False)
            add(content + eos_token, True)
            if index < len(messages) - 1:
                add("\n", False)
        else:
            add(f"<|{role}|>\n{content}\n", False)
    return pieces


def prefix_ids(tokenizer: Any) -> list[int]:
    """Special tokens the tokenizer puts before any text (a BOS for Llama-style tokenizers; none for SmolLM2)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    cut = len(with_special) - len(plain)
    if cut > 0 and with_special[cut:] == plain:
        return list(with_special[:cut])
    return []


def text_ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def encode_conversation(
    messages: Sequence[dict[str, str]], tokenizer: Any, max_length: int | None = None
) -> dict[str, Any]:
    """Token ids and labels of one conversation in Tülu's format.

    Returns ``{"input_ids", "labels", "num_trained_tokens", "truncated"}``: ``labels`` equals ``input_ids``
    on assistant contents and the EOS after each of them, -100 elsewhere. With ``max_length`` the sequence
    keeps its first ``max_length`` tokens (``truncated`` says whether anything was cut);
    ``num_trained_tokens == 0`` means nothing is left to train on.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token")
    input_ids: list[int] = prefix_ids(tokenizer)
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    for text, trained in render_segments(messages, eos_token=""):
        ids = text_ids(tokenizer, text)
        if trained:
            ids = ids + [tokenizer.eos_token_id]
            labels.extend(ids)
        else:
            labels.extend([IGNORE_INDEX] * len(ids))
        input_ids.extend(ids)
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "num_trained_tokens": sum(1 for label in labels if label != IGNORE_INDEX),
        "truncated": truncated,
    }


@dataclass
class EncodedRows:
    """Rows encoded for training: the examples kept, and what happened to the others."""

    examples: list[dict[str, list[int]]] = field(default_factory=list)
    row_ids: list[str] = field(default_factory=list)
    truncated_row_ids: list[str] = field(default_factory=list)
    # Rows with no trained token left (no assistant turn, or all of it cut by truncation): not trained on.
    dropped_row_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(example["input_ids"]) for example in self.examples)

    @property
    def num_trained_tokens(self) -> int:
        return sum(sum(1 for label in example["labels"] if label != IGNORE_INDEX) for example in self.examples)

    def summary(self) -> dict[str, Any]:
        return {
            "rows": len(self.examples),
            "tokens": self.num_tokens,
            "trained_tokens": self.num_trained_tokens,
            "truncated_rows": len(self.truncated_row_ids),
            "dropped_rows": len(self.dropped_row_ids),
            "dropped_row_ids": list(self.dropped_row_ids[:20]),
        }


def encode_rows(rows: Iterable[dict[str, Any]], tokenizer: Any, max_length: int) -> EncodedRows:
    """`encode_conversation` over rows (``row_id``, ``messages``), keeping only rows with trained tokens."""
    encoded = EncodedRows()
    for row in rows:
        row_id = str(row.get("row_id"))
        try:
            example = encode_conversation(row["messages"], tokenizer, max_length)
        except ValueError as exc:
            raise ValueError(f"row {row_id}: {exc}") from exc
        if example["truncated"]:
            encoded.truncated_row_ids.append(row_id)
        if example["num_trained_tokens"] == 0:
            encoded.dropped_row_ids.append(row_id)
            continue
        encoded.examples.append({"input_ids": example["input_ids"], "labels": example["labels"]})
        encoded.row_ids.append(row_id)
    return encoded
