"""GSM8K: extract the final number of a response and compare it numerically with the reference.

The reference may be the bare answer ("1,000") or a whole GSM8K solution ending in "#### 1000".
The response's answer is taken from, in order of preference: the last "#### N" marker, the last
\\boxed{...}, the number right after the last "the (final) answer is" / "answer:", else the last
number in the text. Numbers may carry thousands commas, a currency sign, a percent sign, units or a
trailing period; they are compared with a small tolerance.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from tulu_pipeline.rewards.boxed import last_boxed
from tulu_pipeline.rewards.verdict import Verdict

# A number: optional sign, digits with well-formed thousands commas or plain digits, optional decimals.
# The sign only counts when it is not glued to a preceding word or digit ("5-3" is not "-3").
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-−–]\s?)?[$€£¥]?\s?"
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d+)?(?P<frac>\.\d+)?(?![\d])"
)
_ANSWER_PHRASES = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|=|:)\s*(?:[:=]\s*)?", re.IGNORECASE
)
_MARKER = "####"
REL_TOL = 1e-9
ABS_TOL = 1e-6


def _numbers(text: str) -> list[tuple[float, str]]:
    out = []
    for match in _NUMBER.finditer(text):
        if match.group("int") is None and match.group("frac") is None:
            continue
        raw = match.group(0).strip()
        digits = (match.group("int") or "0").replace(",", "") + (match.group("frac") or "")
        value = float(digits)
        if match.group("sign"):
            value = -value
        out.append((value, raw))
    return out


def _fraction(text: str) -> float | None:
    """A leading 'a/b' or '\\frac{a}{b}' (a GSM8K answer is sometimes written so), not part of a longer number."""
    text = text.strip().strip("$").strip()
    m = (re.match(r"(-?)\\d?frac\{(\d+)\}\{(\d+)\}", text)
         or re.match(r"(-?)(\d+)\s*/\s*(\d+)(?![\d.,/])", text))
    if not m or int(m.group(3)) == 0:
        return None
    value = float(Fraction(int(m.group(2)), int(m.group(3))))
    return -value if m.group(1) else value


def parse_number(text: str) -> float | None:
    """The first number in `text` (commas, currency, percent and units tolerated), or None."""
    frac = _fraction(text)
    if frac is not None:
        return frac
    found = _numbers(text)
    return found[0][0] if found else None


def reference_answer(ground_truth: str) -> float | None:
    """The reference's number: after the last '####' of a full solution, else the bare answer."""
    text = ground_truth.rsplit(_MARKER, 1)[1] if _MARKER in ground_truth else ground_truth
    return parse_number(text)


def extract_answer(response: str) -> tuple[float | None, str]:
    """The response's final answer and how it was found ('####', 'boxed', 'answer_phrase', 'last_number', 'none')."""
    if _MARKER in response:
        value = parse_number(response.rsplit(_MARKER, 1)[1])
        if value is not None:
            return value, "####"
    boxed = last_boxed(response)
    if boxed is not None:
        value = parse_number(boxed)
        if value is not None:
            return value, "boxed"
    phrases = list(_ANSWER_PHRASES.finditer(response))
    if phrases:
        value = parse_number(response[phrases[-1].end():])
        if value is not None:
            return value, "answer_phrase"
    found = _numbers(response)
    if found:
        return found[-1][0], "last_number"
    return None, "none"


def numbers_equal(a: float, b: float) -> bool:
    """Integers compare exactly (1000001 != 1000000); others within a small tolerance (0.1 + 0.2 == 0.3)."""
    if float(a).is_integer() and float(b).is_integer():
        return a == b
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def _format(value: float | None) -> str:
    if value is None:
        return "nothing"
    return str(int(value)) if float(value).is_integer() else repr(value)


def verify_gsm8k(response: str, ground_truth: str) -> Verdict:
    """Score a response against a GSM8K reference (bare answer or full '#### N' solution)."""
    expected = reference_answer(ground_truth)
    if expected is None:
        raise ValueError(f"gsm8k ground truth has no number: {ground_truth[-200:]!r}")
    extracted, method = extract_answer(response)
    ok = extracted is not None and numbers_equal(extracted, expected)
    verb = "matches" if ok else "does not match"
    reason = f"extracted {_format(extracted)} ({method}) {verb} expected {_format(expected)}"
    return Verdict(score=1.0 if ok else 0.0, ok=ok, reason=reason,
                   details={"extracted": extracted, "expected": expected, "method": method})
