"""Chat prompts to token ids, the same way for every local backend (transformers and vLLM).

The template is the model directory's own when it has one (a Tülu SFT checkpoint saves Tülu's; the base
model keeps SmolLM2's ChatML), else Tülu's (`apply_tulu_chat_template`). Either way the prompt ends with the
generation prompt (``add_generation_prompt=True``: ``<|assistant|>\\n`` for Tülu).

Tülu prompts are tokenized exactly as `encode_conversation` tokenizes a training conversation: the
tokenizer's prefix (BOS for Llama-style tokenizers), then each untrained run of text and each earlier
assistant content on its own, special-token strings inside messages as plain text. So a model is prompted
with the very token sequence it was trained to continue. Other templates go through the tokenizer's
``apply_chat_template`` and are tokenized as transformers does it (no extra special tokens: the template
writes its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tulu_pipeline.generation.base import Messages
from tulu_pipeline.templates.lineage import template_lineage
from tulu_pipeline.templates.chat_template import (
    ROLES,
    TULU_CHAT_TEMPLATE,
    prefix_ids,
    text_ids,
    apply_tulu_chat_template,
    render_segments,
)

TEMPLATE_CHOICES = ("auto", "tulu", "model")


def validate_messages(messages: Any, where: str = "prompt") -> Messages:
    """``messages`` as a list of {role, content} strings, or ValueError saying what is wrong and where."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}}, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: messages[{index}] must be an object, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise ValueError(f"{where}: messages[{index}].role must be one of {ROLES}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: messages[{index}].content must be a string")
    return messages


class ChatEncoder:
    """Holds a tokenizer and turns chat prompts into the token ids a model continues.

    ``template``: ``auto`` (the tokenizer's own template if any, else Tülu's), ``tulu`` (always Tülu's) or
    ``model`` (the tokenizer's; an error if it has none). ``format`` says which one is in use.
    """

    def __init__(self, tokenizer: Any, template: str = "auto"):
        if template not in TEMPLATE_CHOICES:
            raise ValueError(f"chat template must be one of {TEMPLATE_CHOICES}, got {template!r}")
        own = getattr(tokenizer, "chat_template", None)
        if template == "model" and not own:
            raise ValueError("template='model' but the tokenizer has no chat template")
        if template == "tulu" or not own or own == TULU_CHAT_TEMPLATE:
            apply_tulu_chat_template(tokenizer)
            self.format = "tulu"
            self._prefix = prefix_ids(tokenizer)
        else:
            self.format = "model"
            self._prefix = []
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, model_path: str | Path, template: str = "auto", trust_remote_code: bool = False) -> ChatEncoder:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code), template)

    def prompt_ids(self, messages: Messages) -> list[int]:
        """Token ids of ``messages`` followed by the generation prompt."""
        validate_messages(messages)
        if self.format == "tulu":
            return self._tulu_prompt_ids(messages)
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(ids, add_special_tokens=False)["input_ids"])

    def prompt_text(self, messages: Messages) -> str:
        """The rendered prompt (for logs and the HTTP backend's debugging; generation uses `prompt_ids`)."""
        return self.tokenizer.decode(self.prompt_ids(messages))

    def _tulu_prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        pieces = render_segments(messages, eos_token="")
        # The header joins the untrained run before it, as it does in a training conversation.
        if pieces and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + "<|assistant|>\n", False)
        else:
            pieces.append(("<|assistant|>\n", False))
        ids = list(self._prefix)
        for text, trained in pieces:
            ids.extend(text_ids(self.tokenizer, text))
            if trained:  # an earlier assistant turn ends with its EOS, as in training
                ids.append(self.tokenizer.eos_token_id)
        return ids

    def lineage(self) -> dict[str, Any]:
        """The chat template, tokenizer and masking rule these prompts are encoded with (`template_lineage`)."""
        return template_lineage(self.tokenizer)

    def continuation_ids(self, continuation: str) -> list[int]:
        """Token ids of a continuation scored after a prompt (tokenized on its own, like an assistant turn)."""
        if self.format == "tulu":
            return text_ids(self.tokenizer, continuation)
        return list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])

    def stop_token_ids(self, extra: Any = None) -> set[int]:
        """EOS ids: the tokenizer's, plus any from a model's generation config (an int or a list)."""
        ids = {int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set()
        if isinstance(extra, int):
            ids.add(extra)
        elif extra:
            ids.update(int(x) for x in extra)
        # A ChatML template ends a turn with <|im_end|>, which need not be the tokenizer's EOS.
        if self.format == "model" and "<|im_end|>" in str(self.tokenizer.chat_template):
            end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            if isinstance(end, int) and end != self.tokenizer.unk_token_id:
                ids.add(end)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
