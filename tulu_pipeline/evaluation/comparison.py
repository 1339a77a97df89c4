"""Checkpoints side by side (Tülu 3's results table), the regression and contamination verdicts.

- `comparison_table(store)`: rows = benchmarks (dev suite, then unseen), columns = every evaluated
  checkpoint in lineage order; each cell is the score with its seeded 95% bootstrap interval, so the
  noise of an 8-item CPU sample is visible.
- `comparison_markdown` / `comparison_png`: the same table for the UI and as a chart with error bars.
- `regression(store, benchmark, checkpoint_id, max_drop)`: a checkpoint against its parent.
- `contamination(store, benchmark, checkpoint_id)`: whether every training run upstream of the
  checkpoint was decontaminated against the benchmark's eval sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tulu_pipeline.data.coverage import eval_coverage
from tulu_pipeline.data.registry import registry_version
from tulu_pipeline.evaluation.benchmarks import benchmarks, get_benchmark
from tulu_pipeline.evaluation.lineage import BASE_MODEL_ID, ancestors, lineage_order, parent_of, read_manifest, stage_of
from tulu_pipeline.evaluation.results import REPORTS, read_summary
from tulu_pipeline.plots import figure_png, markdown_table, pyplot
from tulu_pipeline.storage import Store


def evaluated(store: Store) -> dict[str, dict[str, dict[str, Any]]]:
    """``{benchmark: {checkpoint_id: summary}}`` of every latest summary under reports/eval."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for benchmark in store.listdir(REPORTS):
        for checkpoint_id in store.listdir(REPORTS, benchmark):
            summary = read_summary(store, benchmark, checkpoint_id)
            if summary is not None:
                found.setdefault(benchmark, {})[checkpoint_id] = summary
    return found


def _pct(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def comparison_table(store: Store) -> dict[str, Any]:
    """The table as data: ``columns`` (checkpoint ids in lineage order) and one row per benchmark."""
    found = evaluated(store)
    columns = lineage_order(store, sorted({c for per in found.values() for c in per}))
    known = list(benchmarks())
    rows = []
    for name in sorted(found, key=lambda b: (known.index(b) if b in known else len(known), b)):
        spec = get_benchmark(name) if name in known else None
        cells = {}
        for checkpoint_id in columns:
            s = found[name].get(checkpoint_id)
            if s is not None:
                cells[checkpoint_id] = {"score": s["score"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                                        "n": s["n"], "version": s.get("version"),
                                        "contamination": (s.get("contamination") or {}).get("status")}
        rows.append({"benchmark": name, "suite": spec.suite if spec else "?", "metric": spec.metric if spec else "",
                     "cells": cells})
    return {"columns": columns, "stages": {c: stage_of(c) for c in columns}, "rows": rows}


def comparison_markdown(table: dict[str, Any]) -> str:
    """Markdown: score (×100) and [low, high] per checkpoint; n items per benchmark."""
    headers = ["benchmark", "suite", "metric", "n"] + [f"{c} ({table['stages'][c]})" for c in table["columns"]]
    lines = []
    for row in table["rows"]:
        entry = {"benchmark": row["benchmark"], "suite": row["suite"], "metric": row["metric"],
                 "n": ", ".join(sorted({str(c["n"]) for c in row["cells"].values()}))}
        for c, header in zip(table["columns"], headers[4:]):
            cell = row["cells"].get(c)
            flag = " ⚠" if cell and cell.get("contamination") == "possibly_contaminated" else ""
            entry[header] = (f"{_pct(cell['score'])} [{_pct(cell['ci_low'])}, {_pct(cell['ci_high'])}]{flag}"
                             if cell else "")
        lines.append(entry)
    return markdown_table(lines, headers, max_chars=60) + (
        "\n\nScores ×100 with seeded 95% bootstrap intervals over items; overlapping intervals are not a "
        "difference. ⚠ = possibly contaminated: a training run upstream of the checkpoint was not "
        "decontaminated against the benchmark.")


def comparison_png(table: dict[str, Any]) -> bytes:
    """Grouped bars per benchmark, one colour per checkpoint, bootstrap intervals as error bars."""
    import numpy as np

    plt = pyplot()
    rows, columns = table["rows"], table["columns"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 3.6), dpi=100)
    width = 0.8 / max(1, len(columns))
    x = np.arange(len(rows))
    for k, checkpoint_id in enumerate(columns):
        scores, low, high = [], [], []
        for row in rows:
            cell = row["cells"].get(checkpoint_id)
            score = cell["score"] if cell else float("nan")
            scores.append(100 * score)
            low.append(100 * (score - cell["ci_low"]) if cell else 0.0)
            high.append(100 * (cell["ci_high"] - score) if cell else 0.0)
        ax.bar(x + (k - (len(columns) - 1) / 2) * width, scores, width, yerr=[low, high], capsize=2,
               label=f"{checkpoint_id} ({table['stages'][checkpoint_id]})")
    ax.set_xticks(x, [r["benchmark"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("score ×100 (95% CI)")
    ax.set_ylim(0, 105)
    ax.set_title("Evaluation by checkpoint")
    if columns:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return figure_png(fig)


# ---------------------------------------------------------------------------------------------
# regression against the parent checkpoint
# ---------------------------------------------------------------------------------------------
@dataclass
class Regression:
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def regression(store: Store, benchmark: str, checkpoint_id: str, max_drop: float = 0.10,
               require_significant: bool = True) -> Regression:
    """Fails when the checkpoint scores more than ``max_drop`` (absolute) below its parent and, with
    ``require_significant``, the two bootstrap intervals do not overlap (small samples are noisy)."""
    current = read_summary(store, benchmark, checkpoint_id)
    if current is None:
        return Regression(False, f"{benchmark} has no result for {checkpoint_id}")
    parent = parent_of(store, checkpoint_id)
    if parent is None:
        return Regression(True, f"{checkpoint_id} has no parent checkpoint to compare with",
                          {"score": current["score"]})
    before = read_summary(store, benchmark, parent)
    if before is None:
        return Regression(True, f"parent {parent} has not been evaluated on {benchmark}; nothing to compare",
                          {"score": current["score"], "parent": parent})
    drop = before["score"] - current["score"]
    disjoint = current["ci_high"] < before["ci_low"]
    failed = drop > max_drop and (disjoint or not require_significant)
    meta = {"score": current["score"], "parent": parent, "parent_score": before["score"], "drop": drop,
            "max_drop": max_drop, "intervals_disjoint": disjoint,
            "ci": [current["ci_low"], current["ci_high"]], "parent_ci": [before["ci_low"], before["ci_high"]]}
    verdict = "regressed" if failed else "no regression"
    return Regression(not failed, f"{benchmark}: {checkpoint_id} {_pct(current['score'])} vs parent {parent} "
                      f"{_pct(before['score'])} (drop {100 * drop:.1f} points, limit {100 * max_drop:.1f}): {verdict}",
                      meta)


# ---------------------------------------------------------------------------------------------
# contamination: was every training run upstream decontaminated against this benchmark?
# ---------------------------------------------------------------------------------------------
def contamination(store: Store, benchmark: str, checkpoint_id: str) -> dict[str, Any]:
    """``status``: ``clean`` (every training checkpoint up the lineage was decontaminated against all of the
    benchmark's current eval sources), ``possibly_contaminated`` (with the reasons), or ``not_applicable``
    for the base model (its pretraining data is outside this pipeline)."""
    spec = get_benchmark(benchmark)
    trained = [c for c in [checkpoint_id, *ancestors(store, checkpoint_id)] if c != BASE_MODEL_ID]
    if not trained:
        return {"status": "not_applicable", "benchmark": benchmark, "checkpoint_id": checkpoint_id,
                "reasons": ["the base model is not trained by this pipeline"], "checked": []}
    reasons: list[str] = []
    if not spec.decontamination_target:
        reasons.append(f"{benchmark} is not a decontamination target in the registry "
                       f"(its items come from the training source {', '.join(spec.sources)})")
    checked = []
    for cid in trained:
        entry = _coverage_of(store, cid, spec.sources)
        checked.append(entry)
        if spec.decontamination_target and entry["missing"]:
            reasons.append(f"{cid} was not decontaminated against {', '.join(entry['missing'])} ({entry['why']})")
    return {"status": "possibly_contaminated" if reasons else "clean", "benchmark": benchmark,
            "checkpoint_id": checkpoint_id, "reasons": reasons, "checked": checked}


def _coverage_of(store: Store, checkpoint_id: str, sources: tuple[str, ...]) -> dict[str, Any]:
    """Which of ``sources`` the checkpoint's own training data was checked against."""
    manifest = read_manifest(store, checkpoint_id)
    if manifest is None:
        return {"checkpoint_id": checkpoint_id, "missing": list(sources), "why": "no training manifest"}
    coverage = eval_coverage(store, checkpoint_id)
    if coverage.decontaminated_versions:
        missing = [s for s in sources if s not in coverage.covered]
        why = "checked against an older version or never" if missing else ""
        return {"checkpoint_id": checkpoint_id, "missing": missing, "why": why,
                "decontaminated_versions": coverage.decontaminated_versions}
    # No dataset lineage recorded: fall back on the registry version the run recorded.
    recorded = manifest.get("registry_version")
    if recorded and recorded == registry_version():
        return {"checkpoint_id": checkpoint_id, "missing": [], "why": "",
                "registry_version": recorded, "basis": "registry_version"}
    return {"checkpoint_id": checkpoint_id, "missing": list(sources),
            "why": f"registry version {recorded or 'not recorded'} differs from the current {registry_version()}"
            if recorded else "no decontaminated dataset or registry version recorded"}
