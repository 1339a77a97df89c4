"""Plots and tables for materialization metadata and reports (rendered headless, as PNG bytes)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (assets render in servers and pods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """Render and close a matplotlib figure, returning PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    return buffer.getvalue()


def histogram_png(values: Sequence[float] | Mapping[float, int], title: str, xlabel: str, bins: int = 40) -> bytes:
    """A histogram as PNG bytes (log-spaced bins when values span more than two decades).

    ``values`` are the values, or a mapping of value → how many times it occurs (the same plot)."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    counted = values.items() if isinstance(values, Mapping) else ((v, 1) for v in values)
    pairs = [(v, n) for v, n in counted if v is not None]
    data = np.asarray([v for v, _ in pairs], dtype=float)
    weights = np.asarray([n for _, n in pairs], dtype=float)
    if data.size:
        low, high = max(data.min(), 1.0), max(data.max(), 1.0)
        edges = np.geomspace(low, high + 1, bins) if high / low > 100 else bins
        ax.hist(data, bins=edges, weights=weights, color="#4c72b0")
        if high / low > 100:
            ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    fig.tight_layout()
    return figure_png(fig)


def _cell(value: Any, max_chars: int) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text.replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], max_chars: int = 80) -> str:
    """A markdown table of ``columns`` from ``rows``, cells flattened and truncated for display."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), max_chars) for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------------------------
def dpo_curve_png(curve: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any]) -> bytes:
    """Training loss and reward accuracy per step, with the held-out preference accuracy before and after."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=100)
    steps = [point["step"] for point in curve]
    left.plot(steps, [point["loss"] for point in curve], color="#4c72b0", label="train loss")
    for name, values, color in (("before", before, "#c44e52"), ("after", after, "#55a868")):
        if values.get("loss") is not None:
            left.axhline(values["loss"], color=color, linestyle="--", label=f"held-out {name} {values['loss']:.3f}")
    left.set_xlabel("optimizer step")
    left.set_ylabel("preference loss (nats/pair)")
    left.legend(loc="upper right", fontsize=8)
    right.plot(steps, [point.get("reward_accuracy", float("nan")) for point in curve], color="#8172b2",
               label="train reward accuracy")
    for name, values, color in (("before", before, "#c44e52"), ("after", after, "#55a868")):
        if values.get("preference_accuracy") is not None:
            right.axhline(values["preference_accuracy"], color=color, linestyle="--",
                          label=f"held-out pref. acc. {name} {values['preference_accuracy']:.2f}")
    right.set_ylim(-0.05, 1.05)
    right.set_xlabel("optimizer step")
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle("DPO training")
    fig.tight_layout()
    return figure_png(fig)


def reward_curve_png(history: list[dict[str, Any]], before: float | None, after: float | None,
                     title: str = "RLVR: mean verifiable reward per step",
                     heldout_reward: tuple[float, float] | None = None) -> bytes:
    """Mean reward per optimizer step (and verifier accuracy), with the held-out greedy accuracy and (when
    measured) the held-out sampled reward before and after."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["reward_mean"] for h in history], color="#4c72b0", marker="o", label="mean reward")
    if heldout_reward is not None:
        ax.scatter([steps[0] - 0.3 if steps else 0], [heldout_reward[0]], color="#c44e52", marker="D", zorder=3,
                   label=f"held-out reward before {heldout_reward[0]:.2f}")
        ax.scatter([steps[-1] + 0.3 if steps else 1], [heldout_reward[1]], color="#55a868", marker="D", zorder=3,
                   label=f"held-out reward after {heldout_reward[1]:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["accuracy"] for h in history], color="#dd8452", linestyle=":", label="train accuracy")
    if before is not None:
        ax2.axhline(before, color="#c44e52", linestyle="--", label=f"held-out acc. before {before:.2f}")
    if after is not None:
        ax2.axhline(after, color="#55a868", linestyle="--", label=f"held-out acc. after {after:.2f}")
    ax2.set_ylabel("verifier accuracy")
    ax2.set_ylim(-0.02, 1.02)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper left", fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return figure_png(fig)


# (panel title, [(metric key, label)]) of `training_metrics_png`
METRIC_PANELS = (
    ("reward", [("reward_mean", "mean"), ("reward_std", "std")]),
    ("share of rollouts / groups", [("unfinished_rate", "truncated"),
                                    ("zero_std_groups_dropped_share", "zero-std groups dropped")]),
    ("clipped tokens", [("clip_low_fraction", "low (r < 1 - eps_low, A < 0)"),
                        ("clip_high_fraction", "high (r > 1 + eps_high, A > 0)")]),
    ("policy", [("entropy", "entropy (nats)"), ("kl", "KL to start (k3)")]),
    ("response length (tokens)", [("completion_tokens_mean", "mean")]),
    ("sampler vs learner", [("logprob_mismatch", "mean |log p diff|"), ("is_weight_mean", "mean IS weight")]),
)


def training_metrics_png(history: list[dict[str, Any]], title: str = "RLVR: per-step training metrics") -> bytes:
    """One panel per group of `METRIC_PANELS` over the optimizer steps (a metric a run did not record is left out,
    e.g. KL with beta = 0)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6), dpi=100)
    steps = [h["step"] for h in history]
    for ax, (panel, series) in zip(axes.flat, METRIC_PANELS):
        for key, label in series:
            values = [h.get(key) for h in history]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], marker=".", label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return figure_png(fig)
