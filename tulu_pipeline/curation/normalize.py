"""Text and row normalization: the first curation step over every training source.

`normalize_text` cleans one message content: Unicode NFC, one newline convention, no control
characters, no exotic or zero-width spaces, collapsed whitespace, and no leaked chat-template tokens.
`Normalizer` applies it to every message of every row, normalizes role names and drops rows that are
invalid, empty or too long, reporting one ledger event per row.

Whitespace rule for code: a text "looks like code" when it has a ``` / ~~~ fence or a line whose
indentation is 4+ spaces or contains a tab. Such a text keeps every line's indentation and inner
spacing (string literals and alignment matter) and up to two blank lines in a row (PEP 8); only
trailing spaces, exotic characters and leading blank lines go. Prose collapses runs of spaces/tabs
inside a line to one space and keeps at most one blank line. The rule is applied to the whole text,
so the result of normalizing is again normalized (normalization is idempotent).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tulu_pipeline.data.schema import REQUIRED_FIELDS, ROLES, row_problems
from tulu_pipeline.provenance.ledger import DecisionSink

# Role names seen in other chat formats (ShareGPT, OASST, Gemini) mapped onto the schema's roles.
ROLE_ALIASES = {"human": "user", "prompter": "user", "gpt": "assistant", "bot": "assistant",
                "chatgpt": "assistant", "model": "assistant"}


class NormalizeConfig(BaseModel):
    """Settings of the normalization step; the defaults keep every real training row but two."""

    model_config = ConfigDict(extra="forbid")
    max_chars: int = Field(default=32_000, gt=0)  # limit on a row's total message length, after normalization
    strip_template_artifacts: bool = True


# ---------------------------------------------------------------------------------------------
# character-level cleanup
# ---------------------------------------------------------------------------------------------
# Space separators (Unicode Zs) other than U+0020: NBSP, en/em/thin spaces, ideographic space …
_EXOTIC_SPACES = "\u00a0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B)) + "\u202f\u205f\u3000"
# Zero-width characters that only hide word boundaries. ZWJ/ZWNJ are kept: they shape emoji and scripts.
_ZERO_WIDTH = "\u200b\u2060\ufeff\u180e"
# Vertical separators that mean "new line".
_LINE_BREAKS = "\u000b\u000c\u0085\u2028\u2029"
_CONTROLS = [c for c in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t\r" and chr(c) not in _LINE_BREAKS]

_CHAR_STEPS: list[tuple[str, dict[int, Any]]] = [
    ("newlines", {ord(c): "\n" for c in _LINE_BREAKS}),
    ("control_chars", dict.fromkeys(_CONTROLS)),
    ("zero_width", dict.fromkeys(ord(c) for c in _ZERO_WIDTH)),
    ("exotic_whitespace", {ord(c): " " for c in _EXOTIC_SPACES}),
]
_SPECIAL_CHAR = re.compile("[%s]" % re.escape("".join(chr(c) for _name, table in _CHAR_STEPS for c in table)))
_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_nfc(text: str) -> bool:
    return unicodedata.is_normalized("NFC", text)


# ---------------------------------------------------------------------------------------------
# template artifacts
# ---------------------------------------------------------------------------------------------
_SPECIAL_NAMES = ("im_start", "im_end", "im_sep", "user", "assistant", "system", "endoftext", "end",
                  "eot_id", "begin_of_text", "end_of_text")
# (pattern, change name); every pattern tolerates the whitespace that prose normalization collapses.
_TOKENS: list[tuple[str, str]] = [
    (r"<\|im_start\|>(?:[ \t]*(?:system|user|assistant)\b)?", "<|im_start|>"),
    (r"<\|start_header_id\|>[ \t]*\w*[ \t]*<\|end_header_id\|>", "<|start_header_id|>"),
    *[(re.escape(f"<|{name}|>"), f"<|{name}|>") for name in _SPECIAL_NAMES if name != "im_start"],
    (r"<s>[ \t]*(?=\[INST\])", "<s>"),  # Llama-2's "<s>[INST]": never an HTML strikethrough
    (r"\[INST\]", "[INST]"),
    (r"\[/INST\]", "[/INST]"),
    (r"<<SYS>>", "<<SYS>>"),
    (r"<</SYS>>", "<</SYS>>"),
    (r"###[ \t]*Instruction[ \t]*:", "### Instruction:"),
    (r"###[ \t]*Input[ \t]*:", "### Input:"),
    (r"###[ \t]*Response[ \t]*:", "### Response:"),
]
# "<s>" / "</s>" are also HTML strikethrough; they count as artifacts only when the text does not use them as tags.
_HTML_S_TOKENS: list[tuple[str, str]] = [(r"<s>", "<s>"), (r"</s>", "</s>")]
_SPEAKERS = ("Human", "Assistant", "User")


def _alternation(tokens: list[tuple[str, str]]) -> str:
    return "|".join(f"(?P<t{i}>{pattern})" for i, (pattern, _name) in enumerate(tokens))


_ALL_TOKENS = _TOKENS + _HTML_S_TOKENS
# Each regex family is keyed by whether "<s>"/"</s>" count as artifacts in the text at hand.
_TOKEN_RE: dict[bool, re.Pattern[str]] = {}
_LEADING_RE: dict[bool, re.Pattern[str]] = {}
_TRAILING_RE: dict[bool, re.Pattern[str]] = {}
_STANDALONE_RE: dict[bool, re.Pattern[str]] = {}
for _with_s in (False, True):
    _tokens = _alternation(_TOKENS + (_HTML_S_TOKENS if _with_s else []))
    _TOKEN_RE[_with_s] = re.compile(_tokens)
    _LEADING_RE[_with_s] = re.compile(r"\A[ \t\n]*(?:%s)[ \t]*" % _tokens)
    _TRAILING_RE[_with_s] = re.compile(r"[ \t]*(?:%s)[ \t\n]*\Z" % _tokens)
    _STANDALONE_RE[_with_s] = re.compile(r"[ \t]*(?:(?:%s)[ \t]*)+" % _tokens)
_LEADING_SPEAKER = re.compile(r"\A[ \t\n]*(?P<speaker>%s)[ \t]*:[ \t]*" % "|".join(_SPEAKERS))
_SPEAKER_LINE = re.compile(r"^[ \t]*(?:Human|Assistant|User|System|AI|Bot)[ \t]*:", re.MULTILINE)
_HTML_S_USE = re.compile(r"<s>(?![ \t\n]*\[INST\])")


def _token_names(match: re.Match[str]) -> list[str]:
    return [_ALL_TOKENS[int(key[1:])][1] for key, value in match.groupdict().items() if value is not None]


def _strip_template_artifacts(text: str) -> tuple[str, list[str]]:
    """Remove chat-template tokens at the start/end of ``text`` and lines made only of them.

    Also a leading speaker prefix ("Human:", "Assistant:", "User:") unless the text is itself a
    dialogue (another line starts with a speaker), where the prefix is content.
    """
    names: list[str] = []
    if "<" not in text and "[" not in text and "#" not in text and ":" not in text:
        return text, names
    # With HTML strikethrough in use ("<s>old</s>"), "<s>" and "</s>" are content, not artifacts.
    with_s = not (_HTML_S_USE.search(text) and "</s>" in text)
    standalone, leading, trailing = _STANDALONE_RE[with_s], _LEADING_RE[with_s], _TRAILING_RE[with_s]

    lines = text.split("\n")
    kept = []
    for line in lines:
        if line.strip(" \t") and standalone.fullmatch(line):
            names.extend(name for m in _TOKEN_RE[with_s].finditer(line) for name in _token_names(m))
            continue
        kept.append(line)
    if len(kept) != len(lines):
        text = "\n".join(kept)

    while True:
        before = text
        if match := leading.match(text):
            names.extend(_token_names(match))
            text = text[match.end():]
        # Every token ends in ">", "]" or ":"; checking that first spares most texts a full regex scan.
        if text.rstrip(" \t\n").endswith((">", "]", ":")) and (match := trailing.search(text)):
            names.extend(_token_names(match))
            text = text[: match.start()]
        if (match := _LEADING_SPEAKER.match(text)) and len(_SPEAKER_LINE.findall(text)) == 1:
            names.append(f"{match.group('speaker')}:")
            text = text[match.end():]
        if text == before:
            break
    return text, names


# ---------------------------------------------------------------------------------------------
# whitespace
# ---------------------------------------------------------------------------------------------
_CODE_HINT = re.compile(r"^(?:[ \t]*\t| {4,})[ \t]*\S", re.MULTILINE)
_SPACE_RUN = re.compile(r"[ \t]{2,}|\t")
_PROSE_BLANKS = re.compile(r"\n{3,}")
_CODE_BLANKS = re.compile(r"\n{4,}")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def looks_like_code(text: str) -> bool:
    """A fence, or a line indented by 4+ spaces or a tab: the text's indentation is meaningful."""
    return "```" in text or "~~~" in text or bool(_CODE_HINT.search(text))


def _normalize_whitespace(text: str) -> str:
    if looks_like_code(text):
        lines = [line.rstrip(" \t") for line in text.split("\n")]
        text = _CODE_BLANKS.sub("\n\n\n", "\n".join(lines))
        return _LEADING_BLANK_LINES.sub("", text).rstrip(" \t\n")
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" ")
        indent = line[: len(line) - len(body)]  # at most 3 spaces here: more would make it code
        lines.append(indent + _SPACE_RUN.sub(" ", body).rstrip(" "))
    return _PROSE_BLANKS.sub("\n\n", "\n".join(lines)).strip(" \t\n")


def normalize_text(text: str, strip_template_artifacts: bool = True) -> tuple[str, list[str]]:
    """``text`` normalized, and the names of the changes made (in the order they were made).

    Change names: ``surrogates``, ``newlines``, ``control_chars``, ``zero_width``,
    ``exotic_whitespace``, ``nfc``, ``template:<token>`` (one per token kind removed) and ``whitespace``.
    """
    changes: list[str] = []
    if _SURROGATE.search(text):  # lone surrogates cannot be written as UTF-8
        text = _SURROGATE.sub("\ufffd", text)
        changes.append("surrogates")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        changes.append("newlines")
    if _SPECIAL_CHAR.search(text):
        for name, table in _CHAR_STEPS:
            cleaned = text.translate(table)
            if cleaned != text:
                text = cleaned
                if name not in changes:
                    changes.append(name)
    if not _is_nfc(text):
        text = unicodedata.normalize("NFC", text)
        changes.append("nfc")
    if strip_template_artifacts:
        text, removed = _strip_template_artifacts(text)
        changes.extend(f"template:{name}" for name in dict.fromkeys(removed))
    spaced = _normalize_whitespace(text)
    if spaced != text:
        text = spaced
        changes.append("whitespace")
    if not _is_nfc(text):  # removing characters can bring a combining mark next to its base
        text = unicodedata.normalize("NFC", text)
        if "nfc" not in changes:
            changes.append("nfc")
    return text, changes


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def normalize_role(role: Any) -> str | None:
    """The schema role for ``role`` ("Human" → "user", "gpt" → "assistant"), or None when unknown."""
    if not isinstance(role, str):
        return None
    name = role.strip().lower()
    name = ROLE_ALIASES.get(name, name)
    return name if name in ROLES else None


def _row_id(row: Any, index: int) -> str:
    if isinstance(row, dict) and isinstance(row.get("row_id"), str) and row["row_id"]:
        return row["row_id"]
    return f"<no row_id: input #{index}>"


class Normalizer:
    """Streaming normalization step: ``for row in Normalizer(config, sink)(rows)``.

    Yields normalized copies of the kept rows in input order (``row_id`` and every non-message field
    unchanged). Records exactly one event per input row: ``normalized`` (decision ``changed`` with the
    change names, or ``unchanged``) or ``quarantined`` (decision ``dropped`` with a reason that
    starts with its kind: ``invalid:``, ``empty:`` or ``too_long:``).
    """

    def __init__(self, config: NormalizeConfig, sink: DecisionSink):
        self.config = config
        self.sink = sink
        self.dropped: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {"rows_in": 0, "rows_out": 0, "changed": 0, "dropped_by_reason": {}, "changes": {}}
        self._dropped_by_reason: Counter[str] = Counter()
        self._changes: Counter[str] = Counter()

    def __call__(self, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for index, row in enumerate(rows):
            self.stats["rows_in"] += 1
            row_id = _row_id(row, index)
            try:
                result, changes, reason = self._normalize_row(row)
            except Exception as exc:  # a row must never stop the step: quarantine whatever breaks
                result, changes, reason = None, [], f"invalid: {type(exc).__name__}: {exc}"
            if result is None:
                self._drop(row, row_id, reason)
                continue
            if changes:
                self.stats["changed"] += 1
                self._changes.update(changes)
                self.stats["changes"] = dict(sorted(self._changes.items()))
                self.sink.record(row_id, "normalized", decision="changed", details={"changes": changes})
            else:
                self.sink.record(row_id, "normalized", decision="unchanged")
            self.stats["rows_out"] += 1
            yield result

    def _drop(self, row: Any, row_id: str, reason: str) -> None:
        self.dropped.append({"row": row, "reason": reason})
        self._dropped_by_reason[reason.split(":", 1)[0]] += 1
        self.stats["dropped_by_reason"] = dict(sorted(self._dropped_by_reason.items()))
        self.sink.record(row_id, "quarantined", decision="dropped", reason=reason)

    def _normalize_row(self, row: Any) -> tuple[dict[str, Any] | None, list[str], str]:
        """(normalized row, sorted change names, "") or (None, [], drop reason)."""
        if not isinstance(row, dict):
            return None, [], f"invalid: row must be an object, got {type(row).__name__}"
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            return None, [], "invalid: messages must be a non-empty list of {role, content}"
        changes: set[str] = set()
        new_messages = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                return None, [], f"invalid: messages[{i}] must be an object, got {type(message).__name__}"
            role = normalize_role(message.get("role"))
            if role is None:
                return None, [], f"invalid: messages[{i}].role {message.get('role')!r} is not one of {ROLES} or a known alias"
            if role != message["role"]:
                changes.add(f"role:{message['role']}")
            content = message.get("content")
            if not isinstance(content, str):
                return None, [], f"invalid: messages[{i}].content must be a string, got {type(content).__name__}"
            text, text_changes = normalize_text(content, self.config.strip_template_artifacts)
            changes.update(text_changes)
            if len(message) != 2:  # the schema's message struct is exactly {role, content}
                changes.add("message_fields")
            new_messages.append({"role": role, "content": text})
        result = {**row, "messages": new_messages}
        problems = row_problems(result) + [
            f"{name} must be a string, got {type(row[name]).__name__}"
            for name in REQUIRED_FIELDS if name != "messages" and row.get(name) is not None and not isinstance(row[name], str)
        ]
        if problems:
            return None, [], "invalid: " + "; ".join(problems)
        for i, message in enumerate(new_messages):
            if not message["content"]:
                return None, [], f"empty: messages[{i}] ({message['role']}) is empty after normalization"
        if not any(m["role"] == "user" for m in new_messages):
            return None, [], "empty: no user message"
        length = sum(len(m["content"]) for m in new_messages)
        if length > self.config.max_chars:
            return None, [], f"too_long: {length} chars > max_chars {self.config.max_chars}"
        return result, sorted(changes), ""
