"""Checkpoints side by side (Tülu 3's results table), the regression and contamination verdicts.

- `comparison_table(store)`: rows = benchmarks (dev suite, then unseen), columns = every evaluated
  checkpoint in lineage order; each cell is the score with its seeded 95% bootstrap interval, so the
  noise of an 8-item CPU sample is visible. Each row's ``deltas`` hold every stage's paired effect
  (child − parent on the shared items: `tulu_pipeline.evaluation.paired`).
- `comparison_markdown` / `comparison_png`: the same table for the UI (with the stage effects,
  `stage_effects_markdown`, and the trainers' own held-out targets, `objectives_markdown`) and as a chart
  with error bars.
- `regression(store, benchmark, checkpoint_id, max_drop)`: a checkpoint against its parent.
- `contamination(store, benchmark, checkpoint_id)`: whether every training run upstream of the
  checkpoint was decontaminated against the benchmark's eval sources.

Judged rows (AlpacaEval, the open-ended sets, safety's judged refusals) whose judge is low-confidence
(`judge_scoring.LOW_CONFIDENCE_RULE`: the default 135M local judge is) stay in the table with a ‡ and a
footnote. A "win rate vs parent" row is already a paired comparison: its cell is the checkpoint's win rate
against its parent, its stage effect is that win rate − 50 (sign test: wins against losses), and the base
model, which has no parent, has no cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tulu_pipeline.data.coverage import eval_coverage
from tulu_pipeline.data.registry import registry_version
from tulu_pipeline.evaluation.benchmarks import benchmarks, get_benchmark
from tulu_pipeline.evaluation.judge_scoring import LOW_CONFIDENCE_RULE
from tulu_pipeline.evaluation.lineage import (
    BASE_MODEL_ID, ancestors, lineage_order, parent_of, read_manifest, stage_of
)
from tulu_pipeline.evaluation.paired import format_p, paired_delta, significant
from tulu_pipeline.evaluation.results import REPORTS, item_scores, read_summary
from tulu_pipeline.plots import figure_png, markdown_table, pyplot
from tulu_pipeline.storage import Store

COMPARISON_REPORT = f"{REPORTS}/comparison"  # comparison.{json,md,png} and the run summary
# eval_comparison's code version, apart from the evaluations' (EVAL_CODE_VERSION): a new table or summary
# marks the comparison stale without re-versioning every evaluation. 2: stage effects and the run summary.
# 3: low-confidence judged cells (‡) and the win-rate-vs-parent rows. 4: the training objectives' paired effects.
COMPARISON_CODE_VERSION = "4"
LOW_CONFIDENCE_MARK = "‡"


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


def stage_pairs(store: Store, columns: list[str]) -> list[dict[str, str]]:
    """``{"child", "parent", "stage"}`` for every evaluated checkpoint whose parent was evaluated too; the
    label (``sft − base``) names the child when two children share it."""
    pairs = [{"child": c, "parent": p, "stage": f"{stage_of(c)} − {stage_of(p)}"}
             for c in columns if (p := parent_of(store, c)) in columns]
    labels = [pair["stage"] for pair in pairs]
    for pair in pairs:
        if labels.count(pair["stage"]) > 1:
            pair["stage"] += f" ({pair['child']})"
    return pairs


def comparison_table(store: Store, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The table as data: ``columns`` (checkpoint ids in lineage order), ``pairs`` (`stage_pairs`) and one
    row per benchmark; a row's ``deltas`` map each child checkpoint to its `paired_delta` against its
    parent (with ``parent`` and ``stage``), seeded by ``seed`` with ``resamples`` bootstrap draws."""
    found = evaluated(store)
    columns = lineage_order(store, sorted({c for per in found.values() for c in per}))
    pairs = stage_pairs(store, columns)
    known = list(benchmarks())
    rows = []
    for name in sorted(found, key=lambda b: (known.index(b) if b in known else len(known), b)):
        spec = get_benchmark(name) if name in known else None
        cells = {}
        for checkpoint_id in columns:
            s = found[name].get(checkpoint_id)
            if s is not None and not s.get("outputs_only"):
                judge = s.get("judge_info") or {}
                cells[checkpoint_id] = {"score": s["score"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                                        "n": s["n"], "version": s.get("version"),
                                        "contamination": (s.get("contamination") or {}).get("status"),
                                        "low_confidence": bool(s.get("low_confidence")),
                                        "judge": judge.get("model_id"), "parent": s.get("parent_checkpoint")}
        deltas = {}
        if spec is not None and spec.kind == "pairwise_vs_parent":
            labels = {pair["child"]: pair["stage"] for pair in pairs}
            for child, cell in cells.items():
                if cell["parent"] is None:
                    continue
                scores = item_scores(store, name, child, found[name][child])
                deltas[child] = {"parent": cell["parent"],
                                 "stage": labels.get(child, f"{stage_of(child)} − {stage_of(cell['parent'])}"),
                                 "low_confidence": cell["low_confidence"], "vs_parent": True,
                                 **paired_delta(scores, {i: 0.5 for i in scores}, resamples, seed)}
        else:
            for pair in pairs:
                child, parent = pair["child"], pair["parent"]
                if child in cells and parent in cells:
                    scores = {c: item_scores(store, name, c, found[name][c]) for c in (child, parent)}
                    deltas[child] = {"parent": parent, "stage": pair["stage"],
                                     "low_confidence": cells[child]["low_confidence"] or cells[parent]["low_confidence"],
                                     **paired_delta(scores[child], scores[parent], resamples, seed)}
        rows.append({"benchmark": name, "suite": spec.suite if spec else "?", "metric": spec.metric if spec else "",
                     "kind": spec.kind if spec else None, "cells": cells, "deltas": deltas,
                     "low_confidence": any(c["low_confidence"] for c in cells.values())})
    return {"columns": columns, "stages": {c: stage_of(c) for c in columns}, "pairs": pairs, "rows": rows,
            "objectives": objective_effects(store, columns)}


# Each training stage's own held-out target, measured by the trainer on items it never trained on, before (the
# starting weights: the parent) and after: (stage, key under the manifest's metrics.heldout_effect, label, scale,
# whether a decrease is the improvement).
OBJECTIVES = (
    ("sft", "loss", "held-out SFT loss (nats/token)", 1.0, True),
    ("dpo", "preference_accuracy", "held-out pair accuracy, length-normalised (×100)", 100.0, False),
    ("dpo", "reward_accuracy", "held-out reward accuracy (×100)", 100.0, False),
)


def objective_effects(store: Store, columns: list[str]) -> list[dict[str, Any]]:
    """The trainers' paired held-out effects (`tulu_pipeline.evaluation.paired.paired_delta` of after against
    before on the same held-out rows or pairs) of every checkpoint in ``columns`` that recorded them."""
    rows = []
    for checkpoint_id in columns:
        effects = ((read_manifest(store, checkpoint_id) or {}).get("metrics") or {}).get("heldout_effect") or {}
        parent = parent_of(store, checkpoint_id)
        for stage, key, label, scale, lower_is_better in OBJECTIVES:
            if stage_of(checkpoint_id) == stage and effects.get(key):
                rows.append({"objective": label, "key": key, "checkpoint": checkpoint_id, "parent": parent,
                             "stage": f"{stage} − {stage_of(parent) if parent else 'start'}", "scale": scale,
                             "lower_is_better": lower_is_better, **effects[key]})
    return rows


def _scaled(value: float | None, scale: float, signed: bool = True) -> str:
    """``value × scale``: 3 decimals for a loss (scale 1), 1 for a share ×100."""
    if value is None:
        return "–"
    digits = 3 if scale == 1.0 else 1
    return f"{scale * value:+.{digits}f}" if signed else f"{scale * value:.{digits}f}"


def objectives_markdown(table: dict[str, Any]) -> str:
    """The training objectives' paired effects: Δ [95% CI], sign test p, n (changed), MDD, and whether the
    stage improved its own target (an interval excluding zero on the better side and p < 0.05)."""
    headers = ["objective", "stage", "Δ [95% CI]", "p", "n (changed)", "MDD", "improved"]
    lines = []
    for row in table.get("objectives", []):
        scale = row["scale"]
        better = row["delta"] is not None and (row["delta"] < 0) == row["lower_is_better"] and row["delta"] != 0
        interval = f"[{_scaled(row['ci_low'], scale)}, {_scaled(row['ci_high'], scale)}]"
        lines.append({"objective": row["objective"], "stage": row["stage"],
                      "Δ [95% CI]": f"{_scaled(row['delta'], scale)} {interval}",
                      "p": format_p(row["p_value"]), "n (changed)": f"{row['n']} ({row['changed']})",
                      "MDD": _scaled(row["mdd"], scale, signed=False),
                      "improved": ("yes ▲" if better else "no, worse ▼") if significant(row) else "not shown"})
    return "### Training objectives (held-out, paired)\n\n" + markdown_table(lines, headers, max_chars=60) + (
        "\n\nEach stage's own target on held-out items it never trained on, the checkpoint against its starting "
        "weights: SFT's per-token loss on the mix's held-out rows (Δ < 0 is better), DPO's accuracy on held-out "
        "preference pairs (Δ > 0 is better). Δ, interval, p and MDD as in the stage effects; improved = the "
        "interval excludes zero on the better side and p < 0.05.")


def comparison_markdown(table: dict[str, Any]) -> str:
    """Markdown: score (×100) and [low, high] per checkpoint, n items per benchmark; then, where a checkpoint
    and its parent were both evaluated, the stage effects (`stage_effects_markdown`)."""
    headers = ["benchmark", "suite", "metric", "n"] + [f"{c} ({table['stages'][c]})" for c in table["columns"]]
    lines = []
    for row in table["rows"]:
        entry = {"benchmark": row["benchmark"], "suite": row["suite"], "metric": row["metric"],
                 "n": ", ".join(sorted({str(c["n"]) for c in row["cells"].values()}))}
        for c, header in zip(table["columns"], headers[4:]):
            cell = row["cells"].get(c)
            flag = " ⚠" if cell and cell.get("contamination") == "possibly_contaminated" else ""
            flag += f" {LOW_CONFIDENCE_MARK}" if cell and cell.get("low_confidence") else ""
            entry[header] = (f"{_pct(cell['score'])} [{_pct(cell['ci_low'])}, {_pct(cell['ci_high'])}]{flag}"
                             if cell else "")
        lines.append(entry)
    return markdown_table(lines, headers, max_chars=60) + (
        "\n\nScores ×100 with seeded 95% bootstrap intervals over items; overlapping intervals do not rule out "
        "a difference (the stage effects compare checkpoints item by item). ⚠ = possibly contaminated: a training run upstream of the checkpoint was not "
        "decontaminated against the benchmark.") + _judged_legend(table) + (
        "\n\n" + stage_effects_markdown(table) if any(row.get("deltas") for row in table["rows"]) else "") + (
        "\n\n" + objectives_markdown(table) if table.get("objectives") else "")


def _judged_legend(table: dict[str, Any]) -> str:
    """The footnotes of judged rows, only when the table has some."""
    notes = []
    if any(row.get("low_confidence") for row in table["rows"]):
        judges = sorted({c["judge"] for row in table["rows"] for c in row["cells"].values()
                         if c.get("low_confidence") and c.get("judge")})
        notes.append(f"{LOW_CONFIDENCE_MARK} = low confidence: scored by the judge {', '.join(judges)}, whose verdicts "
                     f"are reported but not to be trusted. The rule: {LOW_CONFIDENCE_RULE}.")
    if any(row.get("kind") == "pairwise_vs_parent" for row in table["rows"]):
        notes.append("Win rate vs parent: each checkpoint's answers judged against its parent's answers to the same "
                     "items, in both orders (a win or loss only when both orders agree, a tie otherwise); the base "
                     "model has no parent, so no cell. MT-Bench: first turn only.")
    return "".join("\n\n" + note for note in notes)


STAGE_EFFECTS_LEGEND = (
    "Δ = child − parent: the mean per-item difference ×100 on the items both checkpoints were scored on, with "
    "a seeded paired bootstrap 95% interval (items resampled, the same ones for both). p = exact two-sided "
    "sign test over the items whose score changed (ties dropped). n = paired items (changed items). MDD = the "
    "smallest true difference this n detects with 80% power at α = 0.05, (1.96 + 0.84) · sd(diff) / √n, with "
    "sd 0.5 (a 0/1 score at 50%) when the differences do not vary: a |Δ| below the MDD is not evidence of "
    "no effect, only of too few items. ▲/▼ = the interval excludes zero and p < 0.05 (with few changed items the "
    "bootstrap interval alone is too narrow). † = the two checkpoints were scored "
    "on different items; paired on the shared ones. Win rate vs parent rows: Δ = win rate − 50, the judge having "
    "compared child and parent directly (up = wins, down = losses, ties dropped). ‡ = judged by a low-confidence "
    "judge (see the table's footnote).")


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def stage_effects_markdown(table: dict[str, Any]) -> str:
    """The stage effects (benchmark × stage): Δ ×100 [low, high], sign test p, n (changed), MDD ×100."""
    headers = ["benchmark", "stage", "Δ ×100 [95% CI]", "p", "n (changed)", "MDD ×100", "effect"]
    lines = []
    for row in table["rows"]:
        for child, d in row.get("deltas", {}).items():
            marked = significant(d)
            lines.append({
                "benchmark": row["benchmark"], "stage": d["stage"],
                "Δ ×100 [95% CI]": f"{_signed(d['delta'])} [{_signed(d['ci_low'])}, {_signed(d['ci_high'])}]",
                "p": format_p(d["p_value"]), "n (changed)": f"{d['n']} ({d['changed']}){'' if d['same_items'] else ' †'}",
                "MDD ×100": "–" if d["mdd"] is None else f"{100 * d['mdd']:.1f}",
                "effect": (("▲" if d["delta"] > 0 else "▼") if marked else "")
                          + (LOW_CONFIDENCE_MARK if d.get("low_confidence") else "")})
    return "### Stage effects\n\n" + markdown_table(lines, headers, max_chars=60) + "\n\n" + STAGE_EFFECTS_LEGEND


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
    if current.get("kind") == "pairwise_vs_parent":
        return _regression_vs_parent(benchmark, checkpoint_id, current, max_drop, require_significant)
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


def _regression_vs_parent(benchmark: str, checkpoint_id: str, current: dict[str, Any], max_drop: float,
                          require_significant: bool) -> Regression:
    """A win rate against the parent is the comparison itself: a drop is 50 − win rate, significant when the
    whole interval lies below 50."""
    parent = current.get("parent_checkpoint")
    if parent is None or current.get("outputs_only"):
        return Regression(True, f"{checkpoint_id} has no parent checkpoint to compare with", {"parent": None})
    drop = 0.5 - current["score"]
    below = current["ci_high"] < 0.5
    failed = drop > max_drop and (below or not require_significant)
    meta = {"score": current["score"], "parent": parent, "drop": drop, "max_drop": max_drop,
            "interval_below_tie": below, "ci": [current["ci_low"], current["ci_high"]],
            "low_confidence": bool(current.get("low_confidence"))}
    verdict = "regressed" if failed else "no regression"
    low = " (low-confidence judge)" if current.get("low_confidence") else ""
    return Regression(not failed, f"{benchmark}: {checkpoint_id} wins {_pct(current['score'])} against parent "
                      f"{parent} (drop {100 * drop:.1f} points below a tie, limit {100 * max_drop:.1f}): {verdict}{low}",
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
