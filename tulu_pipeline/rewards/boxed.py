"""Find the content of \\boxed{...} / \\fbox{...} with balanced (nested) braces."""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed ([^\s${}]+)")


def _closing_braces(text: str) -> dict[int, int]:
    """Position of each "{" -> position of its matching "}", in one pass (unmatched ones are absent)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for pos, ch in enumerate(text):
        if ch == "{":
            stack.append(pos)
        elif ch == "}" and stack:
            pairs[stack.pop()] = pos
    return pairs


def boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every \\boxed{…}/\\fbox{…} (braces balanced) and '\\boxed x', in order.

    start/end delimit the content itself, so a caller can replace it in place. Linear in the text length
    (a response of thousands of unclosed "\\boxed{" must not stall a reward function).
    """
    found: list[tuple[int, int, str]] = []
    if "\\boxed" not in text and "\\fbox" not in text:
        return found
    pairs = None
    for match in _BOXED.finditer(text):
        if pairs is None:
            pairs = _closing_braces(text)
        close = pairs.get(match.end() - 1)
        if close is not None:
            found.append((match.end(), close, text[match.end():close].strip()))
    found.extend((m.start(1), m.end(1), m.group(1)) for m in _BOXED_BARE.finditer(text))
    return sorted(found)


def all_boxed(text: str) -> list[str]:
    """Contents of every boxed expression, in order of appearance."""
    return [content for _, _, content in boxed_spans(text)]


def last_boxed(text: str) -> str | None:
    """Content of the last boxed expression, or None."""
    spans = boxed_spans(text)
    return spans[-1][2] if spans else None
