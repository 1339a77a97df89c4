"""Paired statistics for one checkpoint against its parent on the same items: pure, seeded, no I/O.

Both checkpoints answer the same items, so the per-item difference (child − parent) removes the
between-item variance that makes per-column intervals of an 8-item sample overlap.

- `paired_delta(child, parent)`: mean difference on the shared items, its paired bootstrap interval, the
  exact sign test, the number of paired and changed items and the minimum detectable difference;
- `sign_test_p(ups, downs)`: exact two-sided binomial test of ``ups`` against ``downs`` at p = 0.5;
- `min_detectable_difference(diffs)`: the smallest true mean difference this design detects with 80% power.
- `format_p(p)`: a p-value as every table prints it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from tulu_pipeline.evaluation.scoring import bootstrap_ci

ALPHA = 0.05
POWER = 0.80
# sd of a 0/1 score at proportion 0.5: the largest a single binary score can have
WORST_CASE_SD = 0.5


def sign_test_p(ups: int, downs: int) -> float:
    """Exact two-sided sign test: the probability, under a fair coin over the ``ups + downs`` items whose
    score changed, of a split at least as lopsided as the one seen (ties are dropped before calling).
    1.0 when no item changed."""
    n = ups + downs
    if n == 0:
        return 1.0
    k = min(ups, downs)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    # both tails of a symmetric binomial; when ups == downs the two tails overlap at k and the sum exceeds 1
    return min(1.0, 2 * tail / 2 ** n)


def min_detectable_difference(diffs: Sequence[float], alpha: float = ALPHA, power: float = POWER) -> float | None:
    """MDD = (z_{1−α/2} + z_{power}) · sd(diff) / √n ≈ 2.80 · sd / √n at α = 0.05 two-sided and 80% power,
    with sd the sample standard deviation (ddof = 1) of the per-item differences (a normal approximation
    to the paired t-test).

    When that sd is 0 (every item moved by the same amount, usually none changed) or n = 1, the sd of a 0/1
    score at proportion 0.5 (0.5, the binomial worst case of one score) stands in, so a sample that simply
    showed no change does not claim it could have detected any difference. None for n = 0."""
    n = len(diffs)
    if n == 0:
        return None
    sd = float(np.std(np.asarray(diffs, dtype=float), ddof=1)) if n > 1 else 0.0
    if sd == 0.0:
        sd = WORST_CASE_SD
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return z * sd / math.sqrt(n)


def paired_delta(child: Mapping[str, float], parent: Mapping[str, float], resamples: int = 1000,
                 seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """The child − parent difference on the items both were scored on (``{item_id: score}`` each).

    Keys: ``n`` (paired items), ``changed`` (items whose score differs), ``up`` / ``down`` (of those, how
    many the child scored higher / lower), ``delta`` (mean difference), ``ci_low`` / ``ci_high`` (seeded
    percentile bootstrap of the mean difference: items are resampled, one index set for both checkpoints),
    ``p_value`` (sign test over the changed items), ``mdd`` (`min_detectable_difference`), ``child_only`` /
    ``parent_only`` (items outside the intersection) and ``same_items``. Undefined values are None."""
    shared = sorted(set(child) & set(parent))  # sorted: the bootstrap draws by position
    diffs = [float(child[i]) - float(parent[i]) for i in shared]
    up, down = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    # resampling the differences resamples both checkpoints' scores with the same item indices
    low, high = bootstrap_ci(diffs, resamples, seed, confidence) if diffs else (None, None)
    return {
        "n": len(shared), "changed": up + down, "up": up, "down": down,
        "delta": float(np.mean(diffs)) if diffs else None, "ci_low": low, "ci_high": high,
        "p_value": sign_test_p(up, down), "mdd": min_detectable_difference(diffs),
        "child_only": len(set(child) - set(parent)), "parent_only": len(set(parent) - set(child)),
        "same_items": set(child) == set(parent),
    }


def format_p(value: float) -> str:
    """A sign test's p as the tables print it: three decimals, ``<0.001`` below that."""
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def excludes_zero(delta: Mapping[str, Any]) -> bool:
    """Whether the interval of a `paired_delta` lies wholly above or below zero."""
    low, high = delta.get("ci_low"), delta.get("ci_high")
    return low is not None and high is not None and (low > 0 or high < 0)


def significant(delta: Mapping[str, Any], alpha: float = 0.05) -> bool:
    """Marked as an effect: the interval excludes zero *and* the sign test's p is below ``alpha`` (with few
    changed items the percentile bootstrap alone is too narrow)."""
    p = delta.get("p_value")
    return excludes_zero(delta) and p is not None and p < alpha
