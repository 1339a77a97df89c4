"""Rows each decontamination rule and short-item policy removes from the bundled training pools, and
issue #23's acceptance cases under each.

Every registry source with role ``train`` (raw rows, prompts only) against every eval benchmark, under
the old default (distinct-8-gram share >= 0.5, short items anywhere) and the new one (token coverage
> 0.5, short items by share), plus the other short-item policies, with the tokenizer of
`RULE_VERSION`. Then the acceptance cases of `tulu_pipeline.curation.acceptance` (seed 0), each scored
against its own item, under the old and the new default. Writes
``benchmarks/results/decontam_rules.json`` and prints the markdown tables of docs/decontamination.md.
``decontam_rules_rule_version_1.json`` is the same run at RULE_VERSION 1 (punctuation dropped, commit
3543b5e), before the acceptance part existed.

    .venv/bin/python benchmarks/decontam_rules.py
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tulu_pipeline.curation.acceptance import acceptance_cases, score_cases, unrelated_words
from tulu_pipeline.curation.decontaminate import (
    RULE_VERSION,
    DecontamConfig,
    Decontaminator,
    EvalIndex,
    registry_eval_items,
)
from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import registry
from tulu_pipeline.provenance.ledger import MemorySink
from tulu_pipeline.training.checkpointing import write_json_atomic

BEFORE, AFTER = "before: ngram_share, short anywhere", "after: token_coverage, short share"
RULES = {
    BEFORE: DecontamConfig(rule="ngram_share", short_items="anywhere"),
    AFTER: DecontamConfig(),
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
    cases = acceptance_cases(index.items, unrelated_words(), seed=0)
    result = {"rule_version": RULE_VERSION, "pools": {s: len(r) for s, r in pools.items()},
              "eval_items": len(index.items),
              "rules": {name: removed_by(config, index, pools) for name, config in RULES.items()},
              "acceptance": {name: score_cases(cases, RULES[name]) for name in (BEFORE, AFTER)}}
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
    print()
    accepted = result["acceptance"]
    print("| acceptance case | cases | " + " | ".join(accepted) + " |")
    print("|---|---:|" + "---:|" * len(accepted))
    for kind in accepted[AFTER]:
        shares = " | ".join(f"{100 * accepted[n][kind]['share']:.2f}%" for n in accepted)
        print(f"| {kind} | {accepted[AFTER][kind]['cases']} | {shares} |")
    low = {k: {b: v["share"] for b, v in accepted[AFTER][k]["by_benchmark"].items() if v["share"] < 0.95}
           for k in accepted[AFTER]}
    print(f"\nbenchmarks under 95% ({AFTER}): {low}")


if __name__ == "__main__":
    main()
