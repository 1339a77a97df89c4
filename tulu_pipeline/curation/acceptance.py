"""The acceptance cases of issue #23, generated from the bundled benchmarks (seeded).

Three kinds of training text made from every eval item of the registry, by whitespace-separated
words of the item's text:

- ``edit``: an item of 16-40 words with its middle word replaced by an unrelated word (must be
  quarantined);
- ``prefix``: the first 62% of the words of an item of 22+ words (must be quarantined);
- ``prefix_unrelated``: the first 30% of the words of the same items, followed by 40-120 words of
  unrelated text (must stay clean: the row is not flagged at all).

The unrelated words come from a bundled training source with no eval twin (Anthropic HH harmless
prompts). `score_cases` scores them (each against its own item, or through a whole index).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tulu_pipeline.curation.decontaminate import DecontamConfig, EvalIndex, EvalItem, Match, reference_matches
from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import get_source

KINDS = ("edit", "prefix", "prefix_unrelated")
UNRELATED_SOURCE = "hh_rlhf_harmless"
EDIT_WORDS = (16, 40)  # an item's word count range for the one-word edit
PREFIX_MIN_WORDS = 22
PREFIX_SHARE, SHORT_PREFIX_SHARE = 0.62, 0.30


@dataclass(frozen=True)
class Case:
    """One generated training text and the item it was made from."""

    kind: str
    item: EvalItem
    text: str


def unrelated_words(limit: int = 100_000) -> list[str]:
    """Words of the unrelated source's turns, in order (the filler of ``prefix_unrelated``)."""
    out: list[str] = []
    for row in iter_source_rows(get_source(UNRELATED_SOURCE)):
        for message in row["messages"]:
            out.extend(message["content"].split())
            if len(out) >= limit:
                return out[:limit]
    return out


def acceptance_cases(items: Sequence[EvalItem], filler: Sequence[str], seed: int = 0) -> list[Case]:
    """Every case of every kind for ``items`` (deterministic for a seed)."""
    if len(filler) < 200:
        raise ValueError(f"need at least 200 unrelated words, got {len(filler)}")
    rng = random.Random(seed)
    cases: list[Case] = []
    for item in items:
        words = item.text.split()
        if EDIT_WORDS[0] <= len(words) <= EDIT_WORDS[1]:
            edited = list(words)
            middle = len(words) // 2
            replacement = rng.choice(filler)
            while replacement.casefold() in (w.casefold() for w in words):
                replacement = rng.choice(filler)
            edited[middle] = replacement
            cases.append(Case("edit", item, " ".join(edited)))
        if len(words) >= PREFIX_MIN_WORDS:
            cases.append(Case("prefix", item, " ".join(words[:round(PREFIX_SHARE * len(words))])))
            at = rng.randrange(len(filler) - 120)
            tail = filler[at:at + rng.randint(40, 120)]
            cases.append(Case("prefix_unrelated", item, " ".join([*words[:int(SHORT_PREFIX_SHARE * len(words))], *tail])))
    return cases


def case_passes(case: Case, matches: Sequence[Match], whole_row: bool) -> bool:
    """Quarantined by its own item (``edit``, ``prefix``); clean (``prefix_unrelated``): not matched by
    its own item, or with ``whole_row`` not matched at all."""
    own = any(m.eval_row_id == case.item.row_id for m in matches)
    if case.kind == "prefix_unrelated":
        return not (matches if whole_row else own)
    return own


def score_cases(cases: Sequence[Case], config: DecontamConfig | None = None,
                index: EvalIndex | None = None, batch: int = 2048) -> dict[str, Any]:
    """Per kind: the cases passing (`case_passes`), overall and per benchmark.

    Without ``index`` each case is scored against its own item alone (`reference_matches` over that
    one item: seconds for the whole bundle). With ``index`` (every item) the cases go through
    `EvalIndex.match_texts` as rows do in the decontaminator, and a clean row must match nothing;
    that takes minutes on the bundle, because BBH's templated items share long n-grams.
    """
    config = config or DecontamConfig()
    passed: dict[str, dict[str, list[int]]] = {k: defaultdict(lambda: [0, 0]) for k in KINDS}
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        if index is None:
            results = [reference_matches([c.item], c.text, config.ngram, config.threshold, config.rule,
                                         config.short_items) for c in chunk]
        else:
            results = index.match_texts([c.text for c in chunk], config.threshold, config.rule, config.short_items)
        for case, matches in zip(chunk, results):
            cell = passed[case.kind][case.item.benchmark]
            cell[0] += case_passes(case, matches, whole_row=index is not None)
            cell[1] += 1
    out: dict[str, Any] = {}
    for kind, by_benchmark in passed.items():
        hits, total = sum(v[0] for v in by_benchmark.values()), sum(v[1] for v in by_benchmark.values())
        out[kind] = {"passed": hits, "cases": total, "share": round(hits / total, 4) if total else None,
                     "by_benchmark": {b: {"passed": v[0], "cases": v[1], "share": round(v[0] / v[1], 4)}
                                      for b, v in sorted(by_benchmark.items())}}
    return out
