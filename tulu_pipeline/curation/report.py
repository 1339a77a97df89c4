"""Rendering the decontamination report: a markdown table and a source × benchmark heatmap."""

from __future__ import annotations

from typing import Any

from tulu_pipeline.plots import figure_png, markdown_table, pyplot


def report_markdown(report: dict[str, Any]) -> str:
    """Benchmarks with their share of items hit, then every non-empty source × benchmark cell."""
    header = (f"Word {report['ngram']}-grams, contaminated at ≥ {report['threshold']:.0%} of an item's n-grams "
              f"(or the whole item when shorter); {report['rows_removed']} training rows removed. "
              f"Cells above {report['flag_share']:.0%} of a benchmark's items are flagged.")
    benchmarks = [
        {"benchmark": name, "suite": b["suite"], "items": b["items"], "items hit": b["items_hit"],
         "share hit": f"{b['share_items_hit']:.2%}",
         "flag": "⚠" if b["share_items_hit"] > report["flag_share"] else ""}
        for name, b in report["benchmarks"].items()
    ]
    cells = [
        {"source": c["source"], "benchmark": c["benchmark"], "rows removed": c["rows_removed"],
         "items hit": c["items_hit"], "share hit": f"{c['share_items_hit']:.2%}", "flag": "⚠" if c["flagged"] else ""}
        for c in report["cells"] if c["rows_removed"]
    ]
    sources = [{"source": s, "rows in": v["rows_in"], "rows removed": v["rows_removed"]}
               for s, v in report["sources"].items()]
    run = report.get("run")
    if run and run.get("route"):
        header += (f" Made by a {run['route']} run ({run['reason']}"
                   + (f"; decisions reused from version {run['previous_version']}" if run["route"] == "incremental"
                      else "") + ").")
    parts = [
        header,
        "### Benchmarks",
        markdown_table(benchmarks, ["benchmark", "suite", "items", "items hit", "share hit", "flag"]),
        "### Training sources",
        markdown_table(sources, ["source", "rows in", "rows removed"]),
        "### Source × benchmark (non-empty cells)",
        markdown_table(cells, ["source", "benchmark", "rows removed", "items hit", "share hit", "flag"])
        if cells else "No overlap found.",
    ]
    return "\n\n".join(parts)


def heatmap_png(report: dict[str, Any]) -> bytes:
    """Share of each benchmark's items hit by each training source, annotated with rows removed."""
    import numpy as np

    plt = pyplot()
    sources = list(report["sources"])
    benchmarks = list(report["benchmarks"])
    share = np.zeros((len(sources), len(benchmarks)))
    removed = np.zeros_like(share, dtype=int)
    for cell in report["cells"]:
        i, j = sources.index(cell["source"]), benchmarks.index(cell["benchmark"])
        share[i, j], removed[i, j] = cell["share_items_hit"], cell["rows_removed"]
    fig, ax = plt.subplots(figsize=(max(6, 0.42 * len(benchmarks) + 2), max(2.5, 0.5 * len(sources) + 1.5)), dpi=100)
    image = ax.imshow(share * 100, cmap="Reds", vmin=0, vmax=max(report["flag_share"] * 200, float(share.max() * 100)),
                      aspect="auto")
    ax.set_xticks(range(len(benchmarks)), benchmarks, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(sources)), sources, fontsize=8)
    for i in range(len(sources)):
        for j in range(len(benchmarks)):
            if removed[i, j]:
                dark = share[i, j] * 100 > 0.6 * image.norm.vmax
                ax.text(j, i, str(removed[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label="% of benchmark items hit")
    ax.set_title("Decontamination: rows removed (numbers) and share of items hit (colour)", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)
