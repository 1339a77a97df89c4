"""The end of a run on one page (what `tulu-evaluate` prints last and ``eval_comparison`` shows): each
training stage's paired effect on its own held-out target, each stage's paired effect on the benchmarks,
the checkpoint ids per stage, where the reports and plots are, and the commands to go further. Written to
``reports/eval/comparison/summary.md``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tulu_pipeline.evaluation.comparison import COMPARISON_REPORT, objectives_markdown, stage_effects_markdown
from tulu_pipeline.evaluation.lineage import BASE_MODEL_ID
from tulu_pipeline.evaluation.results import REPORTS
from tulu_pipeline.plots import markdown_table
from tulu_pipeline.provenance.ledger import Ledger
from tulu_pipeline.storage import Store

SUMMARY_FILE = f"{COMPARISON_REPORT}/summary.md"
MIX_DATASET = "sft_mix"
# where stages put a checkpoint's own reports beside reports/eval: reports/<dir>/<checkpoint_id>/
CHECKPOINT_REPORTS = {"audit": "data bill", "rlvr": "RLVR plots"}


def command_prefix() -> str:
    """What goes before ``tulu`` in a printed command: nothing when it is on PATH, else this interpreter's
    scripts directory (``.venv/bin/`` under ``make``), relative to the working directory when inside it."""
    scripts = Path(sys.executable).parent
    if shutil.which("tulu") or not (scripts / "tulu").exists():
        return ""
    try:
        return f"{scripts.relative_to(Path.cwd())}/"
    except ValueError:
        return f"{scripts}/"


def example_trained_row(store: Store, checkpoint_ids: list[str]) -> str | None:
    """A row the earliest trained checkpoint saw (its ``trained_on`` ledger events; the smallest id, so the
    same run names the same row), else the first row of the latest SFT mix; None when neither exists."""
    ledger = Ledger(store)
    for checkpoint_id in checkpoint_ids:
        if checkpoint_id == BASE_MODEL_ID:
            continue
        rows = ledger.query("SELECT min(row_id) AS row_id FROM events WHERE event = 'trained_on' "
                            "AND list_contains(related_ids, ?)", [checkpoint_id], related_to=checkpoint_id)
        if rows and rows[0]["row_id"]:
            return rows[0]["row_id"]
    if store.latest_version(MIX_DATASET):
        return next((r["row_id"] for r in store.iter_rows(MIX_DATASET)), None)
    return None


def _checkpoints(table: dict[str, Any]) -> str:
    parents = {pair["child"]: pair["parent"] for pair in table.get("pairs", [])}
    lines = [{"stage": table["stages"][c], "checkpoint": f"`{c}`", "parent": f"`{parents[c]}`" if c in parents else "",
              "benchmarks": sum(c in row["cells"] for row in table["rows"])} for c in table["columns"]]
    return markdown_table(lines, ["stage", "checkpoint", "parent", "benchmarks"], max_chars=80)


def _locations(store: Store, table: dict[str, Any]) -> list[str]:
    out = [f"- comparison: `{store.uri(COMPARISON_REPORT)}/` — `comparison.md` (the tables), `comparison.png` "
           "(the chart), `comparison.json` (the data), `summary.md` (this page)",
           f"- per benchmark and checkpoint: `{store.uri(REPORTS)}/<benchmark>/<checkpoint>/summary.json` and "
           "`<version>/items.jsonl` (each item's prompt, response, score and reason)"]
    for checkpoint_id in table["columns"]:
        where = [f"model `{store.uri('models', checkpoint_id)}`"]
        plots = [name for name in store.listdir("models", checkpoint_id) if name.endswith(".png")]
        if plots:
            where.append("training plots " + ", ".join(f"`{store.uri('models', checkpoint_id, name)}`"
                                                       for name in plots))
        where += [f"{label} `{store.uri('reports', kind, checkpoint_id)}/`"
                  for kind, label in CHECKPOINT_REPORTS.items() if store.exists("reports", kind, checkpoint_id)]
        out.append(f"- `{checkpoint_id}`: " + "; ".join(where))
    return out


def _commands(store: Store, table: dict[str, Any], prefix: str, ui_port: str) -> list[str]:
    columns = table["columns"]
    last = columns[-1] if columns else "<checkpoint>"
    row_id = example_trained_row(store, columns)
    pair = table["pairs"][-1] if table.get("pairs") else None
    benchmark = table["rows"][0]["benchmark"] if table["rows"] else "<benchmark>"
    tulu = f"{prefix}tulu"
    commands = [
        ("make ui", f"the Dagster UI at http://localhost:{ui_port}: assets, runs, checks, this page (eval_comparison)"),
        (f"{tulu} trace {row_id or '<row_id>'} --tree",
         "one training row's path: source, curation, mix and the checkpoints trained on it"
         + ("" if row_id else f" (row ids: {tulu} rows {MIX_DATASET})")),
        (f"{tulu} diff {pair['parent']} {pair['child']}" if pair else f"{tulu} diff <checkpoint_a> <checkpoint_b>",
         "what changed between two checkpoints: data, config, and the eval items that flipped"),
        (f"{tulu} audit checkpoint {last} --markdown", "the data bill: sources, licenses, decontamination, hashes"),
        (f"{tulu} rows eval/{benchmark}/{last} --full --limit 3", "per-item prompts, responses and scores"),
        (f"{prefix}tulu-evaluate --sample-size N", "more items per benchmark: a smaller MDD"),
    ]
    width = max(len(c) for c, _ in commands)
    return ["```", *(f"{c.ljust(width)}  # {why}" for c, why in commands), "```"]


def run_summary(store: Store, table: dict[str, Any], prefix: str = "", ui_port: str | None = None) -> str:
    """The summary markdown of a `comparison_table`; ``prefix`` goes before ``tulu`` in the commands
    (`command_prefix`), ``ui_port`` is the UI's port (default ``$PORT`` as ``make ui`` reads it, else 3000)."""
    ui_port = ui_port or os.environ.get("PORT") or "3000"
    effects = (stage_effects_markdown(table) if any(row.get("deltas") for row in table["rows"])
               else "### Stage effects\n\nNone yet: a checkpoint and its parent must both be evaluated on a benchmark.")
    objectives = [objectives_markdown(table)] if table.get("objectives") else []
    parts = ["## Run summary", *objectives, effects, "### Checkpoints", _checkpoints(table),
             "### Where the results are", "\n".join(_locations(store, table)),
             "### Next", "\n".join(_commands(store, table, prefix, ui_port))]
    return "\n\n".join(parts)


def write_run_summary(store: Store, table: dict[str, Any], prefix: str | None = None,
                      ui_port: str | None = None) -> str:
    """`run_summary` (``prefix`` default: `command_prefix`), written to ``summary.md``; returns the markdown."""
    markdown = run_summary(store, table, command_prefix() if prefix is None else prefix, ui_port)
    store.write_bytes(SUMMARY_FILE, (markdown + "\n").encode())
    return markdown

