"""Deterministic sampling of an SFT mix from the available row ids, and its provenance.

The ``sft_mix`` asset streams the decontaminated prompts, keeps the rows that can be trained on
(`sft_eligible`, via `eligible_ids_by_source`), and only then counts what is available per source:
a source whose rows have no assistant reply (``hh_rlhf_harmless``: the chosen reply sits in
``extra``) has nothing to contribute to SFT. `sample_mix` turns those ids and a `MixConfig` into a
`MixSample`; `mix_hash` and `record_mix_events` record what was chosen and from what.

How rows are chosen. Every available row gets a rank key, sha256 of ``[seed, source, row_id]``;
a source's sample is its N rows with the smallest keys, and the first of those (in key order) are
its held-out rows. This is a seeded shuffle without replacement whose outcome depends only on the
*set* of ids, never on their order, on other sources, on the process or on the Python version (no
``random`` module, no salted ``hash()``). Because a row's key does not depend on the other rows,
a mix moves as little as possible when its inputs move: asking for more rows keeps every row
already chosen, and a row that curation drops is replaced by one row, not by a new sample.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

from tulu_pipeline.hashing import json_hash, short_digest
from tulu_pipeline.mixing.config import MixConfig
from tulu_pipeline.provenance.ledger import DecisionSink

# Part of the mix hash: bump it when a change here would choose other rows from the same inputs.
MIX_CODE_VERSION = "1"


class MixError(ValueError):
    """A mix that cannot be drawn from the available rows; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------------------------------------
# what can be trained on
# ---------------------------------------------------------------------------------------------
def sft_eligible(row: Mapping[str, Any]) -> bool:
    """Whether a row can be an SFT example: a non-empty assistant message after its last user turn.

    Rows without a user turn are not eligible either (there is no prompt to condition on).
    """
    messages = row.get("messages") or []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        return False
    return any(
        m.get("role") == "assistant" and isinstance(m.get("content"), str) and m["content"].strip()
        for m in messages[last_user + 1:]
    )


def eligible_ids_by_source(rows: Iterable[Mapping[str, Any]],
                           on_skip: Callable[[Mapping[str, Any]], None] | None = None) -> dict[str, list[str]]:
    """Row ids of the `sft_eligible` rows, per source, streaming; ``on_skip`` sees every other row.

    A source whose rows are all ineligible is present with an empty list, so `resolve_counts`
    can say why it has nothing to offer.
    """
    ids: dict[str, list[str]] = {}
    for row in rows:
        source_ids = ids.setdefault(row["source"], [])
        if sft_eligible(row):
            source_ids.append(row["row_id"])
        elif on_skip is not None:
            on_skip(row)
    return ids


# ---------------------------------------------------------------------------------------------
# how many rows
# ---------------------------------------------------------------------------------------------
def fraction_count(fraction: float, available: int) -> int:
    """Rows for ``{fraction: F}``: F × available rounded half up, at least 1 when anything is available.

    F is taken as the decimal written in the config (0.015 is exactly 15/1000, not the nearest
    binary float), so 0.015 × 100 gives 2 on every machine. Never more than ``available``.
    """
    if available <= 0:
        return 0
    exact = Decimal(repr(fraction)) * available
    return min(available, max(1, int(exact.to_integral_value(rounding=ROUND_HALF_UP))))


def resolve_counts(config: MixConfig, available: Mapping[str, int]) -> dict[str, int]:
    """Exact rows to sample per configured source (held-out rows included), given the rows available.

    ``{rows: N}`` is N and an error when N exceeds what is available; ``{fraction: F}`` follows
    `fraction_count`. A configured source with no available rows (missing from ``available``
    counts as 0) is an error, and so is a ``heldout_rows`` that would leave some source with no
    training row. Every problem is reported at once, in one `MixError`.
    """
    problems: list[str] = []
    counts: dict[str, int] = {}
    for source, quota in sorted(config.sources.items()):
        have = int(available.get(source, 0))
        if have < 0:
            raise ValueError(f"available[{source!r}] is negative: {have}")
        if have == 0:
            problems.append(f"sources.{source}: {quota.describe()} but no decontaminated rows are available "
                            "(none survived curation, or none has an assistant reply to train on)")
            continue
        if quota.rows is not None:
            if quota.rows > have:
                problems.append(f"sources.{source}: {quota.describe()} but only {have} decontaminated rows "
                                "are available")
                continue
            counts[source] = quota.rows
        else:
            counts[source] = fraction_count(quota.fraction, have)
    if not problems:
        total, most = sum(counts.values()), sum(counts.values()) - len(counts)
        if config.heldout_rows > most:
            problems.append(
                f"heldout_rows: {config.heldout_rows} but the mix samples {total} rows from {len(counts)} "
                f"sources and every source keeps at least one training row: at most {most} can be held out")
    if problems:
        raise MixError([f"mix {config.name}: {problem}" for problem in problems])
    return counts


def split_heldout(counts: Mapping[str, int], heldout_rows: int) -> dict[str, int]:
    """Held-out rows per source: proportional to each source's count (largest remainder).

    Each source gets floor(heldout_rows × count / total); the rows left over go one at a time to
    the sources with the largest remainders (ties: source id order), skipping any source that would
    be left without a training row. Requires ``heldout_rows <= total - len(counts)``.
    """
    total = sum(counts.values())
    if heldout_rows == 0 or total == 0:
        return {source: 0 for source in counts}
    if heldout_rows > total - len(counts):
        raise ValueError(f"heldout_rows {heldout_rows} leaves some source without a training row "
                         f"({total} rows over {len(counts)} sources)")
    shares = {source: Fraction(heldout_rows * count, total) for source, count in counts.items()}
    split = {source: int(share) for source, share in shares.items()}  # floor; never above count - 1
    order = sorted(counts, key=lambda source: (-(shares[source] - split[source]), source))
    left = heldout_rows - sum(split.values())
    while left:
        for source in order:
            if left and split[source] < counts[source] - 1:
                split[source] += 1
                left -= 1
    return split


# ---------------------------------------------------------------------------------------------
# which rows
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixSample:
    """The chosen rows: per source the training rows and the held-out rows, in sample order.

    ``counts[source]`` is ``{"available", "sampled", "train", "heldout"}``. Sources are in id order.
    """

    train: dict[str, list[str]]
    heldout_by_source: dict[str, list[str]]
    counts: dict[str, dict[str, int]]

    @property
    def heldout(self) -> list[str]:
        """Every held-out row id (for held-out loss; never trained on), source by source."""
        return [row_id for ids in self.heldout_by_source.values() for row_id in ids]

    @property
    def train_ids(self) -> list[str]:
        """Every training row id, source by source."""
        return [row_id for ids in self.train.values() for row_id in ids]

    @property
    def n_train(self) -> int:
        return sum(len(ids) for ids in self.train.values())

    @property
    def n_heldout(self) -> int:
        return sum(len(ids) for ids in self.heldout_by_source.values())


def _rank_key(seed: int, source: str, row_id: str) -> bytes:
    return hashlib.sha256(json.dumps([seed, source, row_id], ensure_ascii=False).encode()).digest()


def sample_mix(rows_by_source: Mapping[str, Iterable[str]], config: MixConfig) -> MixSample:
    """Sample ``config`` from the row ids available per source (any order; extra sources ignored).

    Raises `MixError` when a quota cannot be met (see `resolve_counts`) or a source lists a row id
    twice.
    """
    ids: dict[str, list[str]] = {}
    duplicates: list[str] = []
    for source in sorted(config.sources):
        listed = list(rows_by_source.get(source, ()))
        unique = sorted(set(listed))
        if len(unique) != len(listed):
            duplicates.append(f"mix {config.name}: sources.{source}: {len(listed) - len(unique)} row ids are "
                              "listed more than once; row ids must be unique")
        ids[source] = unique
    if duplicates:
        raise MixError(duplicates)
    counts = resolve_counts(config, {source: len(unique) for source, unique in ids.items()})
    heldout = split_heldout(counts, config.heldout_rows)

    train: dict[str, list[str]] = {}
    heldout_by_source: dict[str, list[str]] = {}
    summary: dict[str, dict[str, int]] = {}
    for source in sorted(counts):
        ranked = sorted(ids[source], key=lambda row_id: (_rank_key(config.seed, source, row_id), row_id))
        chosen = ranked[:counts[source]]
        heldout_by_source[source] = chosen[:heldout[source]]
        train[source] = chosen[heldout[source]:]
        summary[source] = {"available": len(ids[source]), "sampled": len(chosen),
                           "train": len(train[source]), "heldout": heldout[source]}
    return MixSample(train=train, heldout_by_source=heldout_by_source, counts=summary)


# ---------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------
def mix_hash(config: MixConfig, input_versions: Mapping[str, str]) -> str:
    """16 hex chars of sha256 over the canonical config, the input asset versions and the sampler version.

    Key order and shorthand spelling in the YAML do not change it (`MixConfig.canonical`).
    """
    payload = {"code": MIX_CODE_VERSION, "config": config.canonical(),
               "inputs": {str(name): str(version) for name, version in input_versions.items()}}
    return json_hash(payload, compact=True)


def row_ids_hash(ids: Iterable[str]) -> str:
    """16 hex chars of sha256 over a set of row ids: order and repeats do not change it."""
    digest = hashlib.sha256()
    for row_id in sorted(set(ids)):
        piece = row_id.encode()
        digest.update(len(piece).to_bytes(8, "big"))
        digest.update(piece)
    return short_digest(digest)


def record_mix_events(sample: MixSample, sink: DecisionSink, mix_name: str, mix_hash: str,
                      lineage: dict[str, Any] | None = None) -> int:
    """One ``included_in_mix`` event per sampled row, decision ``train`` or ``heldout``; returns the count.
    ``lineage`` (template/tokenizer/mask hashes the mix was tokenized with) is copied into every event."""
    details = {"mix": mix_name, "mix_hash": mix_hash, **({"template_lineage": lineage} if lineage else {})}
    count = 0
    for decision, by_source in (("train", sample.train), ("heldout", sample.heldout_by_source)):
        for ids in by_source.values():
            for row_id in ids:
                sink.record(row_id, "included_in_mix", decision=decision, details=dict(details))
                count += 1
    return count
