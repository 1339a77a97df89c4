"""Exact and near-duplicate removal over the normalized training pool.

Rows are compared on `dedup_text` (the prompt by default). They must arrive in `dedup_order`
(source priority, then source name, then row id) so the first row of every duplicate group is the
one kept, whatever order the sources were loaded in. Exact duplicates are found by the sha256 of the
compared text; near duplicates by MinHash LSH over word shingles (datasketch), confirmed by the
estimated Jaccard similarity, so every dropped row names the kept row it duplicates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tulu_pipeline.provenance.ledger import DecisionSink

if TYPE_CHECKING:  # datasketch loads scipy: imported where hashing starts, not with the config
    from datasketch import MinHash, MinHashLSH

PROMPT_ROLES = ("system", "user")
# LSH band/row choice weighted (false positives, false negatives) towards recall: every candidate is
# confirmed with its estimated Jaccard anyway, so a false positive costs one comparison, while a miss
# keeps a duplicate. On the bundled pool the even default (0.5, 0.5) missed 7 of 46 near duplicates.
LSH_WEIGHTS = (0.2, 0.8)


class DedupConfig(BaseModel):
    """What is compared and how similar counts as a duplicate."""

    model_config = ConfigDict(extra="forbid")
    key: Literal["prompt", "all"] = "prompt"  # system + user turns, or every message
    near_duplicates: bool = True
    shingle_size: int = Field(default=5, ge=1)  # words per shingle
    num_perm: int = Field(default=128, ge=2)
    threshold: float = Field(default=0.8, gt=0.0, le=1.0)  # estimated Jaccard at and above which rows are near duplicates
    seed: int = 1
    # Two near-identical prompts with different reference answers are different tasks (MATH's
    # templated "arrange the letters of MADAM" vs "… of COMBINATION"): keep both.
    distinct_answers_are_distinct: bool = True
    source_priority: list[str] = Field(default_factory=list)  # earlier sources win; unlisted ones follow, by name

    @model_validator(mode="after")
    def _lsh_feasible(self) -> "DedupConfig":
        if self.near_duplicates:
            try:
                _lsh(self)
            except ValueError as exc:  # e.g. a threshold so high that fewer than 2 bands fit in num_perm
                raise ValueError(f"threshold {self.threshold} with num_perm {self.num_perm} is not usable for LSH "
                                 f"({exc}); lower the threshold or raise num_perm") from exc
        return self


def _lsh(config: DedupConfig) -> MinHashLSH:
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=config.threshold, num_perm=config.num_perm, weights=LSH_WEIGHTS)


def lsh_bands(config: DedupConfig) -> tuple[int, int]:
    """(bands, rows per band) of the LSH index the keep rule queries: two rows are candidates
    exactly when some band of their MinHash values is identical."""
    lsh = _lsh(config)
    return lsh.b, lsh.r


def dedup_text(row: dict[str, Any], key: str) -> str:
    """The text rows are compared on: the prompt (system and user turns) or all messages,
    lowercased, with every whitespace run collapsed to one space."""
    if key not in ("prompt", "all"):
        raise ValueError(f"unknown dedup key {key!r}; expected 'prompt' or 'all'")
    parts = [m["content"] for m in row["messages"] if key == "all" or m["role"] in PROMPT_ROLES]
    return " ".join(" ".join(parts).lower().split())


def dedup_order_key(row: dict[str, Any], ranks: dict[str, int]) -> tuple[int, str, str]:
    return (ranks.get(row["source"], len(ranks)), row["source"], row["row_id"])


def source_ranks(source_priority: Sequence[str]) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for source in source_priority:
        ranks.setdefault(source, len(ranks))
    return ranks


def dedup_order(rows: Iterable[dict[str, Any]], source_priority: Sequence[str]) -> list[dict[str, Any]]:
    """``rows`` sorted into keep-first order: by rank in ``source_priority`` (unlisted sources last),
    then source name, then row id."""
    ranks = source_ranks(source_priority)
    return sorted(rows, key=lambda row: dedup_order_key(row, ranks))


def shingles(text: str, size: int) -> set[bytes]:
    """Word ``size``-grams of ``text`` (the whole text as one shingle when it has fewer words)."""
    words = text.split()
    if len(words) < size:
        return {" ".join(words).encode("utf-8", "surrogatepass")}
    return {" ".join(words[i : i + size]).encode("utf-8", "surrogatepass") for i in range(len(words) - size + 1)}


class Deduplicator:
    """Streaming dedup step: ``for row in Deduplicator(config, sink)(dedup_order(rows, priority))``.

    Yields the kept rows. Records one event per row: ``kept`` (decision ``unique``) or
    ``dropped_duplicate`` (decision ``exact`` or ``near``, ``related_ids`` = the kept row it
    duplicates, ``details`` = {"jaccard": estimate} for near duplicates). Raises ValueError when the
    rows are not in `dedup_order` for the configured ``source_priority`` (or repeat a row).
    """

    def __init__(self, config: DedupConfig, sink: DecisionSink):
        self.config = config
        self.sink = sink
        self.dropped: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {"rows_in": 0, "kept": 0, "exact_duplicates": 0, "near_duplicates": 0, "per_source": {}}
        self._ranks = source_ranks(config.source_priority)
        self._by_hash: dict[bytes, str] = {}  # text digest → id of the kept row with that text
        self._kept_index: dict[str, int] = {}  # kept row id → position among kept rows (tie-break)
        self._minhashes: dict[str, MinHash] = {}  # kept row id → its MinHash
        self._answers: dict[str, str] = {}  # kept row id → its ground truth, when it has one
        self._lsh = _lsh(config) if config.near_duplicates else None
        # Built once: copying it reuses the permutations instead of drawing them again for every row.
        from datasketch import MinHash

        self._template = MinHash(num_perm=config.num_perm, seed=config.seed) if config.near_duplicates else None
        self._last_key: tuple[int, str, str] | None = None

    def __call__(self, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in rows:
            if self.decide(row, *self.signature(row)):
                yield row

    def signature(self, row: dict[str, Any]) -> tuple[bytes, MinHash | None]:
        """What the keep rule compares: the sha256 of `dedup_text` and its MinHash (None without near dedup)."""
        text = dedup_text(row, self.config.key)
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        return digest, (self._minhash(text) if self._lsh is not None else None)

    def decide(self, row: dict[str, Any], digest: bytes, minhash: MinHash | None) -> bool:
        """Apply the keep rule to the next row in `dedup_order` (given its `signature`); True when kept.

        Only ``row_id``, ``source`` and ``ground_truth`` of ``row`` are read, so a resolver that
        already holds signatures (the Ray executor) can pass just those fields.
        """
        self._check_order(row)
        counts = self._count_in(row)
        original = self._by_hash.get(digest)
        if original is not None:
            self._drop(row, original, "exact", None, counts)
            return False
        if minhash is not None:
            match = self._nearest(minhash, row.get("ground_truth"))
            if match is not None:
                self._drop(row, match[0], "near", match[1], counts)
                return False
        row_id = row["row_id"]
        self._by_hash[digest] = row_id
        self._kept_index[row_id] = len(self._kept_index)
        if row.get("ground_truth") is not None:
            self._answers[row_id] = row["ground_truth"]
        if minhash is not None:
            self._minhashes[row_id] = minhash
            self._lsh.insert(row_id, minhash)
        self._keep(row, counts)
        return True

    def apply(self, row: dict[str, Any], duplicate_of: tuple[str, str, float | None] | None) -> bool:
        """Record a decision taken elsewhere for the next row in `dedup_order`: ``None`` keeps it,
        ``(kept row id, "exact" | "near", jaccard)`` drops it. Same events, stats and quarantine
        records as `decide`; nothing is remembered, so memory stays flat."""
        self._check_order(row)
        counts = self._count_in(row)
        if duplicate_of is None:
            self._keep(row, counts)
            return True
        original, kind, jaccard = duplicate_of
        self._drop(row, original, kind, jaccard, counts)
        return False

    def _count_in(self, row: dict[str, Any]) -> dict[str, int]:
        self.stats["rows_in"] += 1
        counts = self.stats["per_source"].setdefault(row["source"], {"in": 0, "kept": 0, "exact": 0, "near": 0})
        counts["in"] += 1
        return counts

    def _keep(self, row: dict[str, Any], counts: dict[str, int]) -> None:
        self.stats["kept"] += 1
        counts["kept"] += 1
        self.sink.record(row["row_id"], "kept", decision="unique")

    def _check_order(self, row: dict[str, Any]) -> None:
        key = dedup_order_key(row, self._ranks)
        if self._last_key is not None and key <= self._last_key:
            problem = "repeats row" if key == self._last_key else "comes after"
            raise ValueError(
                f"rows are not in dedup_order: {row['row_id']!r} (source {row['source']!r}) {problem} "
                f"{self._last_key[2]!r} (source {self._last_key[1]!r}); sort them with "
                f"dedup_order(rows, config.source_priority) first"
            )
        self._last_key = key

    def _minhash(self, text: str) -> MinHash:
        minhash = self._template.copy()
        minhash.update_batch(shingles(text, self.config.shingle_size))  # a min: order-free
        return minhash

    def _nearest(self, minhash: MinHash, answer: str | None) -> tuple[str, float] | None:
        """The kept row most similar to ``minhash`` at or above the threshold (earliest kept on ties)."""
        best: tuple[float, int, str] | None = None
        for candidate in self._lsh.query(minhash):
            other = self._answers.get(candidate)
            if self.config.distinct_answers_are_distinct and answer is not None and other is not None and other != answer:
                continue
            jaccard = float(minhash.jaccard(self._minhashes[candidate]))
            if jaccard < self.config.threshold:
                continue  # LSH candidates are approximate: confirm with the estimate
            rank = (-jaccard, self._kept_index[candidate], candidate)
            if best is None or rank < best:
                best = rank
        return None if best is None else (best[2], -best[0])

    def _drop(self, row: dict[str, Any], original: str, kind: str, jaccard: float | None, counts: dict[str, int]) -> None:
        row_id = row["row_id"]
        self.dropped.append({"row_id": row_id, "source": row["source"], "duplicate_of": original, "kind": kind, "jaccard": jaccard})
        if kind == "exact":
            self.stats["exact_duplicates"] += 1
            counts["exact"] += 1
            self.sink.record(row_id, "dropped_duplicate", decision="exact", reason=f"exact duplicate of {original}",
                             related_ids=[original])
        else:
            self.stats["near_duplicates"] += 1
            counts["near"] += 1
            self.sink.record(row_id, "dropped_duplicate", decision="near",
                             reason=f"near duplicate of {original} (estimated jaccard {jaccard:.3f})",
                             related_ids=[original], details={"jaccard": jaccard})
