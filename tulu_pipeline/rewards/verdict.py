"""The result every verifier returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """One verification.

    score: 1.0/0.0 for gsm8k and math; the fraction of constraints met for ifeval.
    ok: the answer is correct / every constraint is met.
    reason: human readable (extracted vs expected answer, or which instructions failed).
    details: machine readable (extracted, expected, per-instruction results...).
    """

    score: float
    ok: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
