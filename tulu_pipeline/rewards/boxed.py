"""Find the content of \\boxed{...} / \\fbox{...} with balanced (nested) braces."""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed ([^\s${}]+)")


def boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every \\boxed{…}/\\fbox{…} (braces balanced) and '\\boxed x', in order.

    start/end delimit the content itself, so a caller can replace it in place.
    """
    found: list[tuple[int, int, str]] = []
    for match in _BOXED.finditer(text):
        depth = 1
        for pos in range(match.end(), len(text)):
            ch = text[pos]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    found.append((match.end(), pos, text[match.end():pos].strip()))
                    break
    found.extend((m.start(1), m.end(1), m.group(1)) for m in _BOXED_BARE.finditer(text))
    return sorted(found)


def all_boxed(text: str) -> list[str]:
    """Contents of every boxed expression, in order of appearance."""
    return [content for _, _, content in boxed_spans(text)]


def last_boxed(text: str) -> str | None:
    """Content of the last boxed expression, or None."""
    spans = boxed_spans(text)
    return spans[-1][2] if spans else None
