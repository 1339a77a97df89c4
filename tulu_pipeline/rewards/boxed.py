"""Find the content of \\boxed{...} / \\fbox{...} with balanced (nested) braces."""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed ([^\s$]+)")


def all_boxed(text: str) -> list[str]:
    """Contents of every \\boxed{…}/\\fbox{…} (braces balanced) and '\\boxed x' in order of appearance."""
    found: list[tuple[int, str]] = []
    for match in _BOXED.finditer(text):
        depth = 1
        for pos in range(match.end(), len(text)):
            ch = text[pos]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    found.append((match.start(), text[match.end():pos].strip()))
                    break
    found.extend((m.start(), m.group(1)) for m in _BOXED_BARE.finditer(text))
    return [content for _, content in sorted(found)]


def last_boxed(text: str) -> str | None:
    """Content of the last boxed expression, or None."""
    boxes = all_boxed(text)
    return boxes[-1] if boxes else None
