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
