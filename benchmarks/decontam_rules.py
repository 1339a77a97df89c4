"""Rows each decontamination rule and short-item policy removes from the bundled training pools.

Every registry source with role ``train`` (raw rows, prompts only) against every eval benchmark, under
the old default (distinct-8-gram share >= 0.5, short items anywhere) and the new one (token coverage
> 0.5, short items by share), plus the other short-item policies. Writes
``benchmarks/results/decontam_rules.json`` and prints the markdown tables of docs/decontamination.md.

    .venv/bin/python benchmarks/decontam_rules.py
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tulu_pipeline.curation.decontaminate import DecontamConfig, Decontaminator, EvalIndex, registry_eval_items
from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import registry
from tulu_pipeline.provenance.ledger import MemorySink
from tulu_pipeline.training.checkpointing import write_json_atomic

RULES = {
    "before: ngram_share, short anywhere": DecontamConfig(rule="ngram_share", short_items="anywhere"),
    "after: token_coverage, short share": DecontamConfig(),
    "token_coverage, short anywhere": DecontamConfig(short_items="anywhere"),
    "token_coverage, short ignore": DecontamConfig(short_items="ignore"),
}


def removed_by(config: DecontamConfig, index: EvalIndex, pools: dict[str, list[dict]]) -> dict:
    """Rows removed per (source, benchmark), and rows whose every match is a short item."""
    step = Decontaminator(index, config, MemorySink())
    for rows in pools.values():
        for _ in step(iter(rows)):
            pass
    short_only = Counter(q["row"]["source"] for q in step.quarantine
                         if all(m.item_tokens < config.ngram for m in q["matches"]))
    return {"removed": {f"{s}/{b}": n for (s, b), n in sorted(step.stats.removed.items())},
            "rows_removed": step.stats.quarantined, "rows_removed_by_short_items_only": dict(short_only)}


def main() -> None:
    index = EvalIndex.build(registry_eval_items())
    pools = {spec.id: list(iter_source_rows(spec)) for spec in registry() if spec.role == "train"}
    result = {"pools": {s: len(r) for s, r in pools.items()}, "eval_items": len(index.items),
              "rules": {name: removed_by(config, index, pools) for name, config in RULES.items()}}
    out = Path(__file__).parent / "results" / "decontam_rules.json"
    write_json_atomic(out, result)
    names = list(RULES)
    cells = sorted({c for r in result["rules"].values() for c in r["removed"]})
    print("| source / benchmark | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for cell in cells:
        print(f"| {cell} | " + " | ".join(str(result["rules"][n]["removed"].get(cell, 0)) for n in names) + " |")
    print("| **rows removed** | " + " | ".join(f"**{result['rules'][n]['rows_removed']}**" for n in names) + " |")
    print("| of which by short items only | " + " | ".join(
        str(sum(result["rules"][n]["rows_removed_by_short_items_only"].values())) for n in names) + " |")


if __name__ == "__main__":
    main()
