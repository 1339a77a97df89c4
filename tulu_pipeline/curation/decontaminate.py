"""Exhaustive n-gram decontamination: training rows against every eval item, no hit cap.

**The rule** (`DecontamConfig.rule`). ``token_coverage`` (default, Tülu 3's, as open-instruct's
``decontamination/search.py`` scores): the share of the item's tokens that lie inside one of its
n-grams (default n = 8) also found in the row; contaminated when **above** ``threshold`` (default
0.5). ``ngram_share``: the share of the item's distinct n-grams found in the row; contaminated when
**at or above** the threshold. An item shorter than n tokens matches when the row contains its whole
token sequence and, under the default ``short_items="share"`` policy, that sequence makes up most of
the row or of one turn (`short_item_share`). Every item passing is reported (no cap on hits per
row, no cap on rows per item).

**The texts.** A row's text is its system and user turns (and assistant turns with
``include_response``) joined with ``"\\n"`` in message order, so n-grams span turn boundaries and an
item split across two turns is still found. An eval item's text is its system and user turns.

**Tokenization** (`tokenize`), spaCy-like as open-instruct's (its ``SPACY_MODEL(string)``): NFKC,
then `str.casefold`, then

- *word characters* are letters and digits of any script (``str.isalnum()``) and combining marks
  (categories M*, so that a Devanagari word with vowel signs stays one word); *separators* are
  whitespace and the categories C* and Z*; everything else (punctuation, symbols, emoji, the
  underscore) is *punctuation*;
- a word runs from a word character to the last word character before a separator (or a standalone
  character), punctuation inside it included ("3.5", "don't", "x^2", "has_close_elements" are one
  token each); punctuation before or after a word, or in a run with no word character, is one token
  per character ("(x)." is "(", "x", ")", ".");
- each Han ideograph and each Hiragana/Katakana character is a token by itself and ends a run (those
  scripts put no spaces between words, so a whole sentence would otherwise be one token). Other
  scripts written without spaces (Thai, Lao, Khmer, Myanmar) are not split.

So case, full-width forms and compatibility characters do not hide an overlap, but punctuation
counts, as in Tülu 3: a comma inserted into a copy is a one-token edit, and a short item matches
only with its punctuation. Compared with dropping punctuation, this adds tokens to an item that a
one-word edit does not touch, which is what lets an edited 16-word item pass the threshold (the
acceptance measurements are in docs/decontamination.md). Items with fewer than
``min_item_tokens`` tokens (default 1: only empty items) are not indexed (`EvalIndex.skipped`).
`RULE_VERSION` names this tokenizer and the rules; outputs made under another are never reused.

**Matches** name the item (benchmark, eval id, eval source and row id), its coverage and the span
of the training text from the first to the last matched token, in the original casing (at most
`SPAN_MAX_CHARS`, cut in the middle with "…").

**The fast path** (`EvalIndex.match_texts`) is a candidate filter followed by exact verification:

1. a batch of texts is normalized in Python (only non-ASCII texts need it: for ASCII, casefold is a
   byte table), encoded, and tokenized *in numpy on the bytes of the whole batch* (a code-point
   class table decides word / standalone / punctuation / separator, and running maxima and minima
   which punctuation has a word character on both sides); each token gets a 32-bit polynomial hash of
   its UTF-8 bytes from one prefix sum over the batch;
2. 64-bit hashes of every window of n tokens are rolled over the whole batch at once and probed in
   a bitmap of the eval n-gram hashes; items shorter than n are found by probing every 2-token
   window against their first two tokens, then rolling the few survivors out to the item lengths;
3. the few bitmap survivors are confirmed against the sorted eval hashes (`np.searchsorted`), which
   also gives their postings (item, position); (row, item) pairs whose hash-level score bound can
   pass the rule go to
4. exact verification: each distinct (window, n-gram) is compared token by token with the item's
   n-gram once (re-tokenizing the row with `tokenize`), so hash collisions never produce a match;
   exact scores are then computed in numpy per (row, item).

Steps 1-3 run in C where the extension `tulu_pipeline.curation._decon_kernel` is built (`pip install -e .`
compiles it; see its source): one pass over the Python strings of a batch does the normalization (by
segments: characters that NFKC leaves alone are case-folded by a per-code-point table, any other
segment goes to `normalize`), the tokens, their hashes, the windows and the probes, and hands the
hash-confirmed candidates to the same numpy scoring; verification and spans also use its character
loops. Results are identical to the numpy path (tested), which remains the fallback where the
extension is missing; with ``CI`` or ``TULU_REQUIRE_ALL`` set a missing kernel is an error instead.
Short-item candidates that cannot make up enough of their row (one turn) are dropped before
verification under the ``share`` policy, and all of them under ``ignore``.

**A split index** (`EvalIndex.partition`, `ShardedEvalIndex`): the n-grams divided by hash among
parts, each part runs steps 1-4 on the same texts without the hash-level bound (it sees only some of
a pair's n-grams) and returns its verified windows; the head scores their union as step 4 does, so
the matches are the whole index's. The Ray executor holds each part in an actor when the index is
too large to broadcast.

`reference_matches` is a deliberately plain implementation of the same rule (sets of n-gram tuples,
no hashing, no numpy), used to re-verify outputs and as the benchmark baseline; the blocking check
uses `overlap_check`, which does not share the tokenizer either. `curation.incremental` reuses an
earlier run's decisions so that only what changed is scanned.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import os
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import registry
from tulu_pipeline.provenance.ledger import DecisionSink, SharedDetails, record_many

KERNEL_ABI = 2  # the kernel's ABI constant this module expects (2: punctuation tokens)

try:
    from tulu_pipeline.curation import _decon_kernel
    if getattr(_decon_kernel, "ABI", None) != KERNEL_ABI:  # a stale build would tokenize by an older rule
        raise ImportError(f"_decon_kernel was built with ABI {getattr(_decon_kernel, 'ABI', None)}, "
                          f"expected {KERNEL_ABI}: rebuild it (`pip install -e .`)")
except ImportError as _kernel_error:  # not compiled: the numpy path (slower, same results)
    _decon_kernel = None
    _KERNEL_IMPORT_ERROR: ImportError | None = _kernel_error
else:
    _KERNEL_IMPORT_ERROR = None

log = logging.getLogger(__name__)

STAGE = "decontamination"
SPAN_MAX_CHARS = 300

# Letters of these blocks are tokens by themselves (Han ideographs, kana, iteration marks). NFKC has
# already mapped half-width kana, compatibility ideographs and Kangxi radicals into these blocks.
_STANDALONE_BLOCKS = (
    (0x3005, 0x3007), (0x3021, 0x3029), (0x3031, 0x3035), (0x3038, 0x303C), (0x3040, 0x30FF),
    (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3FFFF),
)
_SEPARATOR, _WORD, _STANDALONE, _PUNCT = 0, 1, 2, 3


# The version of the tokenizer and the rules: part of every decontamination output's version and run
# record, so that decisions made under an older one are never reused (2: punctuation tokens).
RULE_VERSION = "2"

Rule = Literal["token_coverage", "ngram_share"]
ShortItems = Literal["share", "anywhere", "ignore"]
RULES: tuple[str, ...] = ("token_coverage", "ngram_share")
SHORT_ITEM_POLICIES: tuple[str, ...] = ("share", "anywhere", "ignore")


class DecontamConfig(BaseModel):
    """How decontamination decides (defaults: Tülu 3's rule, 8-grams, coverage above 50%, prompts only)."""

    model_config = ConfigDict(extra="forbid")
    ngram: int = Field(8, ge=1, description="n of the word n-grams")
    threshold: float = Field(0.5, gt=0, le=1, description="token_coverage: contaminated when score > threshold; "
                             "ngram_share: when score >= threshold")
    rule: Rule = Field("token_coverage", description="token_coverage (open-instruct) or ngram_share")
    short_items: ShortItems = Field("share", description="items shorter than ngram tokens: share (must make up "
                                    "most of the row or a turn), anywhere (contained anywhere), ignore")
    include_response: bool = Field(False, description="also match the assistant turns of training rows")
    min_item_tokens: int = Field(1, ge=1, description="eval items with fewer tokens are not indexed")


def short_item_share(item_tokens: int, ngram: int) -> float:
    """Share of a row's (or a turn's) tokens that an item shorter than ``ngram`` must make up.

    1.0 for a one-token item (the turn is that word), easing linearly to 0.5 at ``ngram - 1``
    tokens: "who are you" counts as the whole question, not inside a 150-word row.
    """
    if ngram <= 2:
        return 1.0
    return 1.0 - 0.5 * (item_tokens - 1) / (ngram - 2)


def passes(score: float, threshold: float, rule: str) -> bool:
    """The rule's threshold comparison: open-instruct flags ``score > threshold``; ngram_share ``>=``."""
    return score > threshold if rule == "token_coverage" else score >= threshold


def short_item_counts(policy: str, item_tokens: int, ngram: int, row_tokens: int, turn_tokens: int) -> bool:
    """Whether a contained short item counts under ``policy`` (see `short_item_share`)."""
    if policy == "ignore":
        return False
    if policy == "anywhere":
        return True
    need = short_item_share(item_tokens, ngram)
    return item_tokens >= need * row_tokens or item_tokens >= need * turn_tokens


# ---------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """NFKC, then casefold: the text that tokens are cut from."""
    return unicodedata.normalize("NFKC", text).casefold()


@functools.cache
def _char_classes() -> np.ndarray:
    """Class of every code point: 0 separator, 1 word character, 2 standalone token, 3 punctuation."""
    def kind(c: str) -> int:
        if c.isalnum() or unicodedata.category(c)[0] == "M":
            return _WORD
        if c.isspace() or unicodedata.category(c)[0] in "CZ":
            return _SEPARATOR
        return _PUNCT
    table = np.frombuffer(bytes(map(kind, map(chr, range(0x110000)))), dtype=np.uint8).copy()
    for lo, hi in _STANDALONE_BLOCKS:
        block = table[lo:hi + 1]
        block[block == _WORD] = _STANDALONE
    table.setflags(write=False)
    return table


def _char_class_regex(table: np.ndarray, value: int) -> str:
    """A regex character class body for the BMP code points of class ``value``."""
    cps = np.flatnonzero(table[:0x10000] == value)
    if not len(cps):
        return ""
    breaks = np.flatnonzero(np.diff(cps) != 1)
    firsts, lasts = cps[np.r_[0, breaks + 1]], cps[np.r_[breaks, len(cps) - 1]]
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in zip(firsts, lasts))


# A word: word characters, with punctuation inside it kept ("3.5", "don't", "x^2"); any other
# punctuation character is a token by itself.
_ASCII_PUNCT = r"!-/:-@\[-`{-~"
_ASCII_TOKEN = re.compile(f"[a-z0-9]+(?:[{_ASCII_PUNCT}]+[a-z0-9]+)*|[{_ASCII_PUNCT}]")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


@functools.cache
def _bmp_token_regex() -> re.Pattern[str]:
    # Only BMP classes: the regex engine tests BMP sets in O(1), astral ranges one by one.
    table = _char_classes()
    word, punct = _char_class_regex(table, _WORD), _char_class_regex(table, _PUNCT)
    return re.compile(f"[{_char_class_regex(table, _STANDALONE)}]|[{word}]+(?:[{punct}]+[{word}]+)*|[{punct}]")


def _spans_by_char(normalized: str) -> list[tuple[int, int]]:
    """The tokenization rule spelled out character by character: (start, end) of each token.

    A word runs from a word character to the last word character before a separator or a
    standalone character; punctuation between its word characters belongs to it, punctuation
    before or after it (or with no word character) is one token per character.
    """
    table = _char_classes()
    spans: list[tuple[int, int]] = []
    begin = end = -1  # the word being built: its first character, and the end of its last word character

    def close(i: int) -> None:
        nonlocal begin
        if begin >= 0:
            spans.append((begin, end))
            spans.extend((j, j + 1) for j in range(end, i))  # trailing punctuation
            begin = -1

    for i, ch in enumerate(normalized):
        kind = table[ord(ch)]
        if kind == _WORD:
            if begin < 0:
                begin = i
            end = i + 1
        elif kind == _PUNCT:
            if begin < 0:
                spans.append((i, i + 1))  # leading punctuation, or punctuation alone
        else:
            close(i)
            if kind == _STANDALONE:
                spans.append((i, i + 1))
    close(len(normalized))
    return spans


def _tokens_of_normalized(normalized: str) -> list[str]:
    if normalized.isascii():
        return _ASCII_TOKEN.findall(normalized)
    if _ASTRAL.search(normalized) is None:
        return _bmp_token_regex().findall(normalized)
    return [normalized[a:b] for a, b in _spans_by_char(normalized)]


def tokenize(text: str) -> list[str]:
    """The tokens of ``text`` (see the module docstring): NFKC, casefold, words and punctuation."""
    return _tokens_of_normalized(normalize(text))


def _token_spans(normalized: str) -> list[tuple[int, int]]:
    """(start, end) of each token of an already normalized text."""
    if normalized.isascii():
        return [m.span() for m in _ASCII_TOKEN.finditer(normalized)]
    return _spans_by_char(normalized)


def _token_offsets(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Where the tokens of `tokenize(text)` sit: ``(source, [(start, end), ...])``.

    ``source`` is ``text`` itself whenever normalization can be aligned with it character by
    character (always for ASCII; per combining sequence otherwise); in the rare case where it
    cannot, ``source`` is the normalized text and the offsets point into that.
    """
    if text.isascii():
        return text, _token_spans(text.lower())
    normalized = normalize(text)
    if len(normalized) == len(text) and unicodedata.is_normalized("NFKC", text):
        return text, _token_spans(normalized)  # casefold mapped each character to one: offsets align
    pieces: list[str] = []
    begins: list[int] = []
    ends: list[int] = []
    seg = 0
    for i in range(1, len(text) + 1):
        if i < len(text) and (unicodedata.combining(text[i]) or 0x1160 <= ord(text[i]) <= 0x11FF):
            continue  # a combining character (or Hangul medial/final jamo) joins the previous one
        piece = normalize(text[seg:i])
        pieces.append(piece)
        begins.extend([seg] * len(piece))
        ends.extend([i] * len(piece))
        seg = i
    if "".join(pieces) != normalized:
        return normalized, _token_spans(normalized)
    return text, [(begins[start], ends[end - 1]) for start, end in _token_spans(normalized)]


def _token_offsets_fast(text: str, scanner: Any, normalized: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """`_token_offsets` with the kernel's character loops (same result; tested); ``normalized`` if known."""
    if scanner is None or text.isascii():
        return _token_offsets(text)
    if normalized is None:
        normalized = scanner.normalized(text)
    if len(normalized) == len(text) and unicodedata.is_normalized("NFKC", text):
        return text, scanner.token_spans(normalized)
    offsets = scanner.piece_offsets(text, normalized)
    if offsets is None:
        return normalized, scanner.token_spans(normalized)
    return text, offsets


def _span(source: str, offsets: list[tuple[int, int]], first: int, last: int) -> str:
    """The text from token ``first`` to token ``last`` (inclusive), truncated in the middle."""
    span = source[offsets[first][0]:offsets[last][1]]
    if len(span) > SPAN_MAX_CHARS:
        head = SPAN_MAX_CHARS * 2 // 3
        span = span[:head] + "…" + span[len(span) - (SPAN_MAX_CHARS - head - 1):]
    return span


# ---------------------------------------------------------------------------------------------
# rows and eval items
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalItem:
    """One eval prompt to protect; ``text`` is its system and user turns joined with newlines."""

    benchmark: str
    eval_id: str
    source: str
    row_id: str
    text: str


def _turns(row: dict[str, Any], roles: tuple[str, ...]) -> str:
    return "\n".join(m["content"] for m in row["messages"] if m["role"] in roles)


def eval_items_from_rows(rows: Iterable[dict[str, Any]], benchmark: str) -> Iterator[EvalItem]:
    """Eval items from rows of an eval source (its ``eval_id`` or, failing that, its ``row_id``)."""
    for row in rows:
        yield EvalItem(benchmark=benchmark, eval_id=str(row.get("eval_id") or row["row_id"]),
                       source=row["source"], row_id=row["row_id"], text=_turns(row, ("system", "user")))


def registry_eval_items(root: Path | None = None) -> list[EvalItem]:
    """Eval items of every registry source with role ``eval`` (the decontamination targets)."""
    items: list[EvalItem] = []
    for spec in registry():
        if spec.role == "eval":
            items.extend(eval_items_from_rows(iter_source_rows(spec, root), spec.benchmark or spec.id))
    return items


def training_turns(row: dict[str, Any], include_response: bool) -> list[str]:
    """System and user turns (and assistant turns with ``include_response``) in message order."""
    roles = ("system", "user", "assistant") if include_response else ("system", "user")
    return [m["content"] for m in row["messages"] if m["role"] in roles]


def training_text(row: dict[str, Any], include_response: bool) -> str:
    """`training_turns` joined with newlines: the text that is matched."""
    return "\n".join(training_turns(row, include_response))


def _joined_texts(rows: Sequence[dict[str, Any]], include_response: bool) -> list[str]:
    """`training_text` of each row (in C where the kernel is built)."""
    if _decon_kernel is not None:
        roles = ("system", "user", "assistant") if include_response else ("system", "user")
        return _decon_kernel.joined_texts(rows, roles, functools.partial(training_text,
                                                                          include_response=include_response))
    return [training_text(row, include_response) for row in rows]


class _LazyTurns(Sequence):
    """`training_turns` of each row, computed when asked for (only rows holding a short item need them)."""

    def __init__(self, rows: Sequence[dict[str, Any]], include_response: bool):
        self.rows, self.include_response = rows, include_response

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [training_turns(row, self.include_response) for row in self.rows[k]]
        return training_turns(self.rows[k], self.include_response)


@dataclass(frozen=True)
class Match:
    """One eval item a training text is contaminated by, under ``rule``."""

    benchmark: str
    eval_id: str
    source: str
    eval_row_id: str
    score: float  # under `rule` (1.0 for a contained short item)
    matched_ngrams: int  # distinct item n-grams found in the text
    item_ngrams: int  # distinct n-grams of the item (1 for a short item)
    span: str  # training text from the first to the last matched token, original casing
    rule: str = "token_coverage"
    covered_tokens: int = 0  # item tokens inside a matched n-gram (the whole item for a short item)
    item_tokens: int = 0
    spans: tuple[str, ...] = ()  # each maximal run of matched training tokens (at most MAX_SPANS)


MAX_SPANS = 20


def _merged_runs(windows: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Maximal runs (first, last token) covered by ``(start, length)`` windows."""
    runs: list[tuple[int, int]] = []
    for start, length in sorted(windows):
        end = start + length - 1
        if runs and start <= runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return runs


def _covered(positions: Iterable[int], ngram: int) -> int:
    """Number of item tokens inside the n-grams starting at ``positions`` (open-instruct's numerator)."""
    runs = _merged_runs((p, ngram) for p in positions)
    return sum(last - first + 1 for first, last in runs)


def _score(rule: str, covered: int, item_tokens: int, matched: int, item_ngrams: int) -> float:
    return covered / item_tokens if rule == "token_coverage" else matched / item_ngrams


def _sort_matches(matches: list[Match]) -> list[Match]:
    return sorted(matches, key=lambda m: (-m.score, m.benchmark, m.eval_id, m.eval_row_id))


# ---------------------------------------------------------------------------------------------
# hashing (numpy)
# ---------------------------------------------------------------------------------------------
_TOKEN_P = 0x01000193  # odd, so invertible modulo 2**32
_TOKEN_P_INV = pow(_TOKEN_P, -1, 1 << 32)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_WINDOW_Q = np.uint64(0xC2B2AE3D27D4EB4F)
_BATCH_BYTES = 1 << 21  # texts are hashed in slices of about this many bytes (bounds memory)

_ASCII_CLASS = np.zeros(256, np.uint8)
_BYTE_VALUE = np.zeros(256, np.uint32)
for _c in range(0x21, 0x7F):
    _ASCII_CLASS[_c] = _PUNCT
    _BYTE_VALUE[_c] = _c
for _c in b"0123456789abcdefghijklmnopqrstuvwxyz":
    _ASCII_CLASS[_c] = _WORD
for _c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ":
    _ASCII_CLASS[_c] = _WORD
    _BYTE_VALUE[_c] = _c + 32  # casefold of ASCII is lowercase
_BYTE_VALUE[0x80:] = np.arange(0x80, 0x100, dtype=np.uint32)


class _Powers:
    """P**j and P**-j modulo 2**32 for byte positions j; kept for sizes up to ``keep`` bytes."""

    def __init__(self, keep: int = 4 * _BATCH_BYTES) -> None:
        self.keep = keep
        self.fwd = np.ones(1, np.uint32)
        self.inv = np.ones(1, np.uint32)

    @staticmethod
    def _table(base: int, size: int) -> np.ndarray:
        return np.cumprod(np.r_[1, np.full(size - 1, base)].astype(np.uint32), dtype=np.uint32)

    def get(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if size > self.keep:  # one huge text: computed for it alone, not kept
            return self._table(_TOKEN_P, size), self._table(_TOKEN_P_INV, size)
        if size > len(self.fwd):
            grown = min(self.keep, max(size, 2 * len(self.fwd)))
            self.fwd, self.inv = self._table(_TOKEN_P, grown), self._table(_TOKEN_P_INV, grown)
        return self.fwd[:size], self.inv


_POWERS = _Powers()


def _token_hashes(encoded: Sequence[bytes], ascii_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the tokens of normalized UTF-8 texts, in order, and each text's token count.

    Must cut exactly the tokens `tokenize` cuts (tested), since the filter is only as exhaustive
    as this agreement.
    """
    buf = b"\n" + b"\n".join(encoded) + b"\n\0\0\0"  # leading separator: every token starts at >= 1
    b = np.frombuffer(buf, np.uint8)
    size = len(b)
    # Byte values to hash: lower-cased ASCII, every byte of a non-ASCII character for now; 0 for
    # separators. Then the class of each character (at its first byte).
    values = np.take(_BYTE_VALUE, b)
    # Characters by their first byte (for ASCII, every byte is one).
    firsts = None if ascii_only else np.flatnonzero((b < 0x80) | (b >= 0xC0))
    kind = np.take(_ASCII_CLASS, b if firsts is None else b[firsts])
    width = None
    if firsts is not None:
        width = np.ones(len(firsts), np.int64)
        lead = np.flatnonzero(b[firsts] >= 0xC0)
        if len(lead):  # decode the code point of every multi-byte character
            at = firsts[lead]
            b0 = b[at].astype(np.uint32)
            b1 = b[at + 1].astype(np.uint32) & 0x3F
            b2 = b[at + 2].astype(np.uint32) & 0x3F
            b3 = b[at + 3].astype(np.uint32) & 0x3F
            two, four = b0 < 0xE0, b0 >= 0xF0
            cp = np.where(two, ((b0 & 0x1F) << 6) | b1,
                          np.where(four, ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3,
                                   ((b0 & 0x0F) << 12) | (b1 << 6) | b2))
            kind[lead] = _char_classes()[np.minimum(cp, 0x10FFFF)]
            width[lead] = 2 + (b0 >= 0xE0) + four
            separator = kind[lead] == _SEPARATOR
            for k in range(4):  # a non-ASCII separator (no-break space, ...) hashes as nothing
                values[at[separator & (width[lead] > k)] + k] = 0
    # A run of punctuation between two word characters is part of the word; any other punctuation
    # character is a token by itself (as is a standalone character).
    punct = (kind == _PUNCT).view(np.int8)
    edges = np.flatnonzero(np.diff(punct, prepend=np.int8(0), append=np.int8(0)))
    run_start, run_end = edges[0::2], edges[1::2]  # [start, end) of each punctuation run
    last = len(kind) - 1
    inside = ((run_start > 0) & (kind[np.maximum(run_start - 1, 0)] == _WORD)
              & (run_end <= last) & (kind[np.minimum(run_end, last)] == _WORD))
    run_start, run_end = run_start[~inside], run_end[~inside]
    lengths = run_end - run_start
    alone = np.repeat(run_start - np.cumsum(np.r_[0, lengths[:-1]]), lengths) + np.arange(lengths.sum())
    if firsts is not None:
        alone = np.concatenate([alone, np.flatnonzero(kind == _STANDALONE)])
        standalone, standalone_end = firsts[alone], firsts[alone] + width[alone]
    else:
        standalone, standalone_end = alone, alone + 1
    word = values != 0
    start = np.zeros(size, bool)
    np.greater(word[1:], word[:-1], out=start[1:])
    if len(standalone):  # a standalone character is a token, and so is what follows it
        start[standalone_end] = word[standalone_end]
        start[standalone] = True
    starts = np.flatnonzero(start)
    powers, inverse_powers = _POWERS.get(size)
    values *= powers
    prefix = np.cumsum(values, dtype=np.uint32)
    edges = prefix[np.append(starts, size) - 1]
    hashes = (edges[1:] - edges[:-1]) * inverse_powers[starts]
    bounds = np.cumsum(np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded)))
    counts = np.diff(np.searchsorted(starts, np.r_[1, bounds + 1]))
    return hashes, counts


def _mix(token_hashes: np.ndarray, pad: int) -> np.ndarray:
    """64-bit token keys (padded with ``pad`` zeros) that windows are rolled over."""
    keys = np.zeros(len(token_hashes) + pad, np.uint64)
    keys[:len(token_hashes)] = token_hashes
    keys += np.uint64(1)
    keys *= _MIX
    keys ^= keys >> np.uint64(31)
    return keys


class _BitFilter:
    """A one-probe Bloom filter (a bitmap indexed by the top bits of a 64-bit hash)."""

    def __init__(self, hashes: np.ndarray, bits_per_key: int = 32):
        size = 1 << 12
        while size < bits_per_key * len(hashes) and size < 1 << 28:
            size <<= 1
        self.shift = np.uint64(64 - size.bit_length() + 1)
        self.bits = np.zeros(size >> 3, np.uint8)
        slots = hashes >> self.shift
        np.bitwise_or.at(self.bits, slots >> np.uint64(3), np.left_shift(1, (slots & np.uint64(7)).astype(np.uint8)))

    def probe(self, hashes: np.ndarray) -> np.ndarray:
        """Positions of ``hashes`` that may be in the set."""
        slots = hashes >> self.shift
        found = self.bits[slots >> np.uint64(3)]
        found >>= (slots & np.uint64(7)).astype(np.uint8)
        found &= 1
        return np.flatnonzero(found)


# ---------------------------------------------------------------------------------------------
# the C kernel (tulu_pipeline/curation/_decon_kernel.c)
# ---------------------------------------------------------------------------------------------
_K_NOT_B, _K_QC_NOT_YES, _K_MULTI_FOLD = 1 << 23, 1 << 24, 1 << 25
_K_CLS_SHIFT, _K_CCC_SHIFT = 21, 26


def kernel_required() -> bool:
    """Whether a missing C kernel is an error (``CI`` or ``TULU_REQUIRE_ALL`` set) instead of the numpy path."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or os.environ.get("TULU_REQUIRE_ALL", "").strip().lower() in ("1", "true", "yes")


def kernel_available() -> bool:
    """Whether the compiled kernel can be used (raises where it is required but missing)."""
    if _decon_kernel is None and kernel_required():
        raise RuntimeError("the decontamination C kernel (tulu_pipeline.curation._decon_kernel) is not built; "
                           "`pip install -e .` compiles it (CI / TULU_REQUIRE_ALL forbid the numpy fallback): "
                           f"{_KERNEL_IMPORT_ERROR}")
    return _decon_kernel is not None


@functools.cache
def _kernel_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per-code-point entries of the kernel as a two-stage table (stage1[cp >> 8], 256 entries a block).

    An entry is the offset from the code point to its case fold (bits 0-20, modulo 2**21, when the fold
    is one character), the token class
    of that fold (21-22), NOT_B (23: not a normalization boundary: combining class != 0 or
    NFKC_QC != Yes), QC_NOT_YES (24: NFKC_QC is No or Maybe), MULTI_FOLD (25) and the rank of its
    canonical combining class (26-31). NFKC_QC=Maybe is taken as every second character of a
    two-character canonical decomposition plus the Hangul medial and final jamo (a superset:
    marking too much only sends a segment to Python's `normalize`). A boundary character whose
    NFKD starts with a non-starter or a Maybe character is not treated as a boundary either.
    """
    classes = _char_classes()
    entries = classes.astype(np.uint32) << _K_CLS_SHIFT
    assigned: list[int] = []
    maybe = set(range(0x1160, 0x1200))  # Hangul jamo compose algorithmically (no decomposition data)
    category, decomposition = unicodedata.category, unicodedata.decomposition
    for cp in range(0x110000):
        c = chr(cp)
        if category(c) in ("Cn", "Co", "Cs"):
            continue  # unassigned, private use, surrogates: NFKC_QC=Yes, class 0, fold to themselves
        assigned.append(cp)
        d = decomposition(c)
        if d and not d.startswith("<"):
            parts = d.split()
            if len(parts) == 2:
                maybe.add(int(parts[1], 16))
    combining, nfkc = unicodedata.combining, functools.partial(unicodedata.normalize, "NFKC")
    ranks = {v: k for k, v in enumerate(sorted({combining(chr(cp)) for cp in assigned}))}
    if len(ranks) > 64:
        raise RuntimeError("more than 64 canonical combining classes")
    for cp in assigned:
        c = chr(cp)
        ccc = combining(c)
        fold = c.casefold()
        flags = ranks[ccc] << _K_CCC_SHIFT
        qc_yes = cp not in maybe and nfkc(c) == c
        if not qc_yes:
            flags |= _K_QC_NOT_YES
        if ccc or not qc_yes:
            flags |= _K_NOT_B
        else:
            first = unicodedata.normalize("NFKD", c)[0]
            if combining(first) or ord(first) in maybe:
                flags |= _K_NOT_B
        if len(fold) == 1:
            f = ord(fold)
            entries[cp] = ((f - cp) & 0x1FFFFF) | (int(classes[f]) << _K_CLS_SHIFT) | flags
        else:
            entries[cp] = (int(classes[cp]) << _K_CLS_SHIFT) | flags | _K_MULTI_FOLD
    blocks, stage1 = np.unique(entries.reshape(-1, 256), axis=0, return_inverse=True)
    return stage1.astype(np.uint16).reshape(-1), np.ascontiguousarray(blocks, dtype=np.uint32).reshape(-1)


def _make_scanner(index: "EvalIndex", kernel: Any = None) -> Any:
    """The kernel's scanner over ``index`` (None where the kernel is not built and not required).

    ``kernel``: another build of the kernel module (same ABI) to use instead, for benchmarks that compare builds.
    """
    if kernel is None and not kernel_available():
        return None
    stage1, stage2 = _kernel_tables()
    main, single, prefix = index._main_filter, index._single_filter, index._prefix_filter
    return (kernel or _decon_kernel).Scanner(index.ngram, stage1, stage2, _char_classes(), index._main_hash, main.bits,
                                 int(main.shift), single.bits, int(single.shift), prefix.bits, int(prefix.shift),
                                 index._short_hash, list(index._short_lengths), normalize)


# ---------------------------------------------------------------------------------------------
# the index
# ---------------------------------------------------------------------------------------------
class EvalIndex:
    """Every n-gram of every eval item (and the whole token sequence of items shorter than n).

    ``items`` are the indexed items (``skipped`` the ones under ``min_item_tokens``);
    ``benchmarks`` counts indexed items per benchmark.
    """

    def __init__(self) -> None:  # use EvalIndex.build
        self.items: list[EvalItem] = []
        self.skipped: list[EvalItem] = []
        self.benchmarks: dict[str, int] = {}
        self.ngram = 8
        self.min_item_tokens = 1
        self._scanner: Any = None  # the C kernel's scanner (None: the numpy path)

    @classmethod
    def build(cls, items: Iterable[EvalItem], ngram: int = 8, min_item_tokens: int = 1) -> "EvalIndex":
        if ngram < 1 or min_item_tokens < 1:
            raise ValueError(f"ngram and min_item_tokens must be >= 1, got {ngram}, {min_item_tokens}")
        index = cls()
        index.ngram, index.min_item_tokens = ngram, min_item_tokens
        interned: dict[str, str] = {}
        tokens: list[list[str]] = []
        for item in items:
            toks = [interned.setdefault(t, t) for t in tokenize(item.text)]
            if len(toks) < min_item_tokens:
                index.skipped.append(item)
                continue
            index.items.append(item)
            tokens.append(toks)
        index._item_tokens = tokens
        index.benchmarks = dict(Counter(item.benchmark for item in index.items))
        # Hash the items' own tokens (already normalized; one token per space-separated word), so the
        # index is defined by `tokenize` alone.
        hashes, lengths = [], []
        for lo in range(0, len(tokens), 4096):
            chunk = [" ".join(t).encode("utf-8", "surrogatepass") for t in tokens[lo:lo + 4096]]
            h, counts = _token_hashes(chunk, all(c.isascii() for c in chunk))
            hashes.append(h)
            lengths.append(counts)
        token_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint32)
        counts = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        if counts.tolist() != [len(t) for t in tokens]:
            raise RuntimeError("byte tokenizer disagrees with tokenize() on eval items")
        first_token = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
        item_keys = _mix(token_hashes, ngram)
        window_hashes = index._window_hashes(item_keys, ngram)

        # Every position of every n-gram is an entry (token coverage counts the tokens of each
        # occurrence). ``gram`` numbers distinct token sequences over all items: the distinct-n-gram
        # share counts (item, gram) pairs, and a candidate window is verified once per gram.
        main_hash, main_item, main_pos, main_gram = [], [], [], []
        short_hash, short_item, short_len, short_gram = [], [], [], []
        gram_ids: dict[tuple[str, ...], int] = {}
        item_ngrams = np.ones(len(tokens), np.int64)
        for i, toks in enumerate(tokens):
            start = int(first_token[i])
            if len(toks) < ngram:
                short_hash.append(window_hashes[len(toks)][start])
                short_item.append(i)
                short_len.append(len(toks))
                short_gram.append(gram_ids.setdefault(tuple(toks), len(gram_ids)))
                continue
            grams = [gram_ids.setdefault(tuple(toks[pos:pos + ngram]), len(gram_ids))
                     for pos in range(len(toks) - ngram + 1)]
            main_hash.extend(window_hashes[ngram][start:start + len(grams)].tolist())
            main_item.extend([i] * len(grams))
            main_pos.extend(range(len(grams)))
            main_gram.extend(grams)
            item_ngrams[i] = len(set(grams))
        del gram_ids
        index._item_ngrams = item_ngrams
        index._item_len = np.array([len(t) for t in tokens], np.int64)
        order = np.argsort(np.array(main_hash, np.uint64), kind="stable")
        index._main_hash = np.array(main_hash, np.uint64)[order]
        index._main_item = np.array(main_item, np.int64)[order]
        index._main_pos = np.array(main_pos, np.int64)[order]
        index._main_gram = np.array(main_gram, np.int64)[order]
        order = np.argsort(np.array(short_hash, np.uint64), kind="stable")
        index._short_hash = np.array(short_hash, np.uint64)[order]
        index._short_item = np.array(short_item, np.int64)[order]
        index._short_gram = np.array(short_gram, np.int64)[order]
        index._short_lengths = sorted(set(short_len))
        # Entry ids: main n-grams first (in hash order), then short items (in hash order).
        index._entry_item = np.concatenate([index._main_item, index._short_item])
        index._entry_pos = np.concatenate([index._main_pos, np.zeros(len(index._short_item), np.int64)])
        index._entry_gram = np.concatenate([index._main_gram, index._short_gram])
        n_grams = int(index._entry_gram.max()) + 1 if len(index._entry_gram) else 0
        index._gram_entry = np.zeros(n_grams, np.int64)  # one entry having each gram, to verify against
        index._gram_entry[index._entry_gram] = np.arange(len(index._entry_gram))
        index._main_filter = _BitFilter(np.unique(index._main_hash))  # repeated n-grams: one key each
        index._short_length_set = set(short_len)
        single = np.array([h for h, ln in zip(short_hash, short_len) if ln == 1], np.uint64)
        starts = np.array([first_token[i] for i, ln in zip(short_item, short_len) if ln >= 2], np.int64)
        index._single_filter = _BitFilter(single, bits_per_key=256)
        index._prefix_filter = _BitFilter(window_hashes[2][starts] if ngram >= 2 else np.zeros(0, np.uint64),
                                          bits_per_key=256)
        index._scanner = _make_scanner(index)
        if index._scanner is not None:  # the kernel must hash the items' tokens as the index did
            got = [np.frombuffer(index._scanner.keys(" ".join(t)), np.uint64) for t in tokens]
            if not np.array_equal(np.concatenate(got) if got else np.zeros(0, np.uint64),
                                  item_keys[:len(token_hashes)]):
                log.warning("the C kernel hashes eval items differently from this index; using the numpy path")
                index._scanner = None
        return index

    def __getstate__(self) -> dict[str, Any]:  # the kernel's scanner is rebuilt where the index is loaded
        return {**self.__dict__, "_scanner": self._scanner is not None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._scanner = _make_scanner(self) if state.get("_scanner") else None

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> dict[str, Any]:
        """Sizes for asset metadata and benchmark reports."""
        return {"items": len(self.items), "skipped_items": len(self.skipped), "benchmarks": dict(self.benchmarks),
                "ngram": self.ngram, "min_item_tokens": self.min_item_tokens,
                "indexed_ngrams": int(len(self._main_hash)), "short_items": int(len(self._short_hash)),
                "short_item_lengths": self._short_lengths}

    def table_bytes(self) -> int:
        """Bytes of the n-gram tables and the items' tokens (what sharding by n-gram hash splits)."""
        arrays = [v for v in self.__dict__.values() if isinstance(v, np.ndarray)]
        filters = [self._main_filter.bits, self._single_filter.bits, self._prefix_filter.bits]
        tokens = sum(len(t) for toks in self._item_tokens for t in toks) + 8 * sum(map(len, self._item_tokens))
        return sum(a.nbytes for a in arrays + filters) + tokens

    def partition(self, shards: int) -> tuple["EvalIndex", list["EvalIndex"]]:
        """This index split by n-gram hash: a head holding the items (to score and name matches) and
        ``shards`` parts, each the entries whose hash is its number modulo ``shards`` (so a gram lives in
        one part) and the tokens of the items having one there. See `ShardedEvalIndex`."""
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        main_owner = self._main_hash % np.uint64(shards)
        short_owner = self._short_hash % np.uint64(shards)
        head = self._subset(np.zeros(len(main_owner), bool), np.zeros(len(short_owner), bool))
        return head, [self._subset(main_owner == k, short_owner == k) for k in range(shards)]

    def _subset(self, main: np.ndarray, short: np.ndarray) -> "EvalIndex":
        """A copy with the ``main`` and ``short`` entries chosen (item-level arrays shared). The single and
        prefix filters stay whole: a filter is only a first test, every hit is looked up in the table."""
        part = EvalIndex.__new__(EvalIndex)
        part.__dict__.update(self.__dict__)
        part.skipped = []
        for name in ("_main_hash", "_main_item", "_main_pos", "_main_gram"):
            setattr(part, name, getattr(self, name)[main])
        for name in ("_short_hash", "_short_item", "_short_gram"):
            setattr(part, name, getattr(self, name)[short])
        part._entry_item = np.concatenate([part._main_item, part._short_item])
        part._entry_pos = np.concatenate([part._main_pos, np.zeros(len(part._short_item), np.int64)])
        part._entry_gram = np.concatenate([part._main_gram, part._short_gram])
        part._gram_entry = np.zeros(len(self._gram_entry), np.int64)  # gram ids stay global
        part._gram_entry[part._entry_gram] = np.arange(len(part._entry_gram))
        part._main_filter = _BitFilter(np.unique(part._main_hash))
        owned = set(np.unique(part._entry_item).tolist())
        part._item_tokens = [t if i in owned else [] for i, t in enumerate(self._item_tokens)]
        part._scanner = _make_scanner(part) if self._scanner is not None else None
        return part

    def _window_hashes(self, keys: np.ndarray, ngram: int) -> dict[int, np.ndarray]:
        """Hashes of the windows of every length 1..ngram starting at each token (build time)."""
        size = len(keys) - ngram
        out = {1: keys[:size].copy()}
        for length in range(2, ngram + 1):
            out[length] = out[length - 1] * _WINDOW_Q + keys[length - 1:length - 1 + size]
        return out

    # ---- matching -----------------------------------------------------------------------------
    def match_texts(self, texts: Sequence[str], threshold: float, rule: Rule = "token_coverage",
                    short_items: ShortItems = "share",
                    turns: Sequence[Sequence[str]] | None = None) -> list[list[Match]]:
        """For each text, every item it is contaminated by under ``rule`` (see `passes`), best first.

        ``turns[i]``, when given, are the turns that joined with newlines make ``texts[i]``: a short
        item making up most of one turn counts under the ``share`` policy (else only the whole text).
        """
        found = self.match_found(texts, threshold, rule, short_items, turns)
        return [found.get(k, []) for k in range(len(texts))]

    def match_found(self, texts: Sequence[str], threshold: float, rule: Rule = "token_coverage",
                    short_items: ShortItems = "share",
                    turns: Sequence[Sequence[str]] | None = None) -> dict[int, list[Match]]:
        """`match_texts` for the texts that match only: text index -> matches, best first.

        The streaming step's path: no object per clean text (a list per text of a large batch costs
        more in garbage collection than the scan of a short text).
        """
        found: dict[int, list[Match]] = {}
        self._scan(texts, _make_query(threshold, rule, short_items, turns), found)
        return found

    def verified_windows(self, texts: Sequence[str], query: "_Query") -> "_Windows":
        """The n-gram windows of ``texts`` that equal an n-gram of this index, unscored (one shard's
        part of `ShardedEvalIndex.match_texts`); no pair is dropped on a partial count."""
        collect = replace(query, windows=[])
        self._scan(texts, collect, {})
        return _Windows.concat(collect.windows)

    def _scan(self, texts: Sequence[str], query: "_Query", results: dict[int, list[Match]]) -> None:
        if not self.items:
            return
        scanner = self._scanner
        if scanner is not None:  # the C kernel: tokens, hashes and filter in one pass over the strings
            start = 0
            while start < len(texts):  # slices of about _BATCH_BYTES characters
                *scanned, stop = scanner.scan(texts, start, len(texts), _BATCH_BYTES)
                self._match_scanned(texts, start, scanned, query, results)
                start = stop
            return
        chunk: list[bytes] = []
        chunk_start, chunk_bytes, ascii_only = 0, 0, True
        for i, text in enumerate(texts):
            if text.isascii():
                chunk.append(text.encode("ascii"))
            else:
                ascii_only = False
                chunk.append(normalize(text).encode("utf-8", "surrogatepass"))
            chunk_bytes += len(chunk[-1]) + 1
            if chunk_bytes >= _BATCH_BYTES:
                self._match_chunk(texts, chunk_start, chunk, ascii_only, query, results)
                chunk, chunk_start, chunk_bytes, ascii_only = [], i + 1, 0, True
        if chunk:
            self._match_chunk(texts, chunk_start, chunk, ascii_only, query, results)

    def _match_scanned(self, texts: Sequence[str], offset: int, scanned: list[bytes], query: "_Query",
                       results: dict[int, list[Match]]) -> None:
        """The kernel's candidates (``Scanner.scan``), in the numpy path's order, to `_match_candidates`."""
        counts, pos, length, lo, hi = (np.frombuffer(b, np.int64) for b in scanned)
        if not len(pos):
            return
        order = np.argsort(length, kind="stable")  # by window length, then position, as the numpy path
        self._match_candidates(texts, offset, np.r_[0, np.cumsum(counts)], pos[order], length[order], lo[order],
                               hi[order], query, results)

    def _match_chunk(self, texts: Sequence[str], offset: int, encoded: list[bytes], ascii_only: bool,
                     query: "_Query", results: dict[int, list[Match]]) -> None:
        n = self.ngram
        token_hashes, counts = _token_hashes(encoded, ascii_only)
        total = len(token_hashes)
        if total == 0:
            return
        row_first = np.r_[0, np.cumsum(counts)].astype(np.int64)  # first token of each row, and the end
        keys = _mix(token_hashes, n)
        # Candidate windows: (global token position, window length, entry range) per filter hit.
        found_pos, found_len, found_lo, found_hi = [], [], [], []

        def confirm(pos: np.ndarray, h: np.ndarray, length: int, table: np.ndarray, base: int) -> None:
            """Keep the windows whose hash is in ``table`` and that lie inside one row."""
            lo = np.searchsorted(table, h, "left")
            ok = lo < len(table)
            ok[ok] = table[lo[ok]] == h[ok]
            pos, h, lo = pos[ok], h[ok], lo[ok]
            if not len(pos):
                return
            row = np.searchsorted(row_first, pos, "right") - 1
            ok = pos + length <= row_first[row + 1]
            found_pos.append(pos[ok])
            found_len.append(np.full(int(ok.sum()), length, np.int64))
            found_lo.append(lo[ok] + base)
            found_hi.append(np.searchsorted(table, h[ok], "right") + base)

        n_main = len(self._main_hash)
        with np.errstate(over="ignore"):
            window = keys[:total].copy()
            if self._short_lengths and self._short_lengths[0] == 1:  # one-token items: probe every token
                pos = self._single_filter.probe(window)
                confirm(pos, window[pos], 1, self._short_hash, n_main)
            for length in range(2, n + 1):
                window *= _WINDOW_Q
                window += keys[length - 1:length - 1 + total]
                if length == 2 and self._short_lengths and self._short_lengths[-1] >= 2:
                    # Items of 2..n-1 tokens: probe their first two tokens, then roll the few
                    # surviving positions out to each short length.
                    pos = self._prefix_filter.probe(window)
                    h = window[pos]
                    for short_length in range(2, self._short_lengths[-1] + 1):
                        if short_length > 2:
                            h = h * _WINDOW_Q + keys[pos + short_length - 1]
                        if short_length in self._short_length_set:
                            confirm(pos, h, short_length, self._short_hash, n_main)
            pos = self._main_filter.probe(window)
            confirm(pos, window[pos], n, self._main_hash, 0)
        if not found_pos:
            return
        pos = np.concatenate(found_pos)
        if not len(pos):
            return
        self._match_candidates(texts, offset, row_first, pos, np.concatenate(found_len), np.concatenate(found_lo),
                               np.concatenate(found_hi), query, results)

    def _match_candidates(self, texts: Sequence[str], offset: int, row_first: np.ndarray, pos: np.ndarray,
                          length: np.ndarray, lo: np.ndarray, hi: np.ndarray, query: "_Query",
                          results: dict[int, list[Match]]) -> None:
        """From candidate windows (token position in the chunk, length, entry range) to the matches."""
        n = self.ngram
        # Expand each candidate window to the entries (item n-grams) sharing its hash.
        reps = hi - lo
        cand = np.repeat(np.arange(len(pos)), reps)
        entry = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps) + lo[cand]
        item = self._entry_item[entry]
        row = np.searchsorted(row_first, pos[cand], "right") - 1
        if query.windows is not None:  # one shard sees part of a pair's n-grams: its counts bound nothing
            self._verify_chunk(texts, offset, row_first, pos[cand], length[cand], entry, query, results)
            return
        # Hash-level scores bound the exact scores from above: keep (row, item) pairs reaching them.
        threshold = query.threshold
        n_entries = len(self._main_hash) + len(self._short_hash)
        n_items = len(self.items)
        pair_entry = np.unique(row * n_entries + entry)
        pair_row, pair_ent = pair_entry // n_entries, pair_entry % n_entries
        pair_item = self._entry_item[pair_ent]
        if query.rule == "ngram_share":
            n_grams = len(self._gram_entry)
            gram_key = np.unique((pair_row * n_items + pair_item) * n_grams + self._entry_gram[pair_ent])
            pair_key, pair_count = np.unique(gram_key // n_grams, return_counts=True)
            keep = pair_key[pair_count / self._item_ngrams[pair_key % n_items] >= threshold]
        else:
            pair_key, pair_count = np.unique(pair_row * n_items + pair_item, return_counts=True)
            length_of = self._item_len[pair_key % n_items]
            bound = np.minimum(pair_count * n, length_of) / length_of
            keep = pair_key[(bound > threshold) | (length_of < n)]
        if not len(keep):
            return
        selected = np.isin(row * n_items + item, keep)
        short = selected & (entry >= len(self._main_hash))
        if short.any() and query.short_items != "anywhere":
            selected &= ~short
            if query.short_items == "share":  # keep the short items that can make up enough of the row or a turn
                size = self._item_len[item[short]]
                tokens = row_first[row[short] + 1] - row_first[row[short]]
                keys, back = np.unique(np.stack([size, tokens, row[short]]), axis=1, return_inverse=True)
                could = np.array([short_item_counts("share", a, n, b, b) or self._several_turns(query, offset + r)
                                  for a, b, r in keys.T.tolist()], bool)
                selected[np.flatnonzero(short)[could[back.reshape(-1)]]] = True
        self._verify_chunk(texts, offset, row_first, pos[cand][selected], length[cand][selected], entry[selected],
                           query, results)

    @staticmethod
    def _several_turns(query: "_Query", k: int) -> bool:
        """Whether text ``k`` is made of several turns (a short item may then make up most of one)."""
        return query.turns is not None and len(query.turns[k] or ()) > 1

    def _verify_chunk(self, texts: Sequence[str], offset: int, row_first: np.ndarray, pos: np.ndarray,
                      length: np.ndarray, entry: np.ndarray, query: "_Query", results: dict[int, list[Match]]) -> None:
        """Exact verification of candidate windows, exact scores, and the matches of each row.

        ``pos`` (token position in the chunk), ``length`` and ``entry`` describe one candidate
        window each. Every distinct (window, gram) is compared token by token with the item's
        n-gram once, so hash collisions never count; scores are then computed in numpy.
        """
        n, n_items = self.ngram, len(self.items)
        gram = self._entry_gram[entry]
        n_grams = len(self._gram_entry)
        window_key, window_of = np.unique(pos * n_grams + gram, return_inverse=True)
        w_pos, w_gram = window_key // n_grams, window_key % n_grams
        w_row = np.searchsorted(row_first, w_pos, "right") - 1
        ok = np.zeros(len(window_key), bool)
        fallback: set[int] = set()
        rep_entry = self._gram_entry[w_gram]
        w_item, w_at = self._entry_item[rep_entry].tolist(), self._entry_pos[rep_entry].tolist()
        w_size = np.where(rep_entry < len(self._main_hash), n, self._item_len[self._entry_item[rep_entry]])
        w_local = (w_pos - row_first[w_row]).tolist()
        w_size = w_size.tolist()
        scanner = self._scanner
        normalized_of: dict[int, str] = {}  # rows read by the kernel: their normalized text
        rows, firsts = np.unique(w_row, return_index=True)  # w_row is sorted (windows in position order)
        for r, a, b in zip(rows.tolist(), firsts.tolist(), np.r_[firsts[1:], len(w_row)].tolist()):
            text = texts[offset + r]
            wins = list(zip(w_local[a:b], w_size[a:b]))
            if scanner is None or text.isascii():
                tokens = tokenize(text)
                count, got = len(tokens), [tokens[p:p + size] for p, size in wins]
            else:  # only the tokens of the windows become strings
                normalized = normalized_of[r] = scanner.normalized(text)
                count, got = scanner.windows(normalized, wins)
            if count != int(row_first[r + 1] - row_first[r]):  # never expected (tested)
                log.warning("byte tokenizer disagrees with tokenize() on a text of %d chars; using the "
                            "reference", len(text))
                fallback.add(r)
            for k in range(a, b):
                at = w_at[k]
                ok[k] = got[k - a] == self._item_tokens[w_item[k]][at:at + w_size[k]]
        valid = ok[window_of]
        pos, length, entry = pos[valid], length[valid], entry[valid]
        row = np.searchsorted(row_first, pos, "right") - 1
        windows = _Windows(row=row + offset, local=pos - row_first[row], length=length,
                           main=entry < len(self._main_hash), item=self._entry_item[entry],
                           at=self._entry_pos[entry], gram=self._entry_gram[entry],
                           row_tokens=row_first[row + 1] - row_first[row],
                           fallback=np.array(sorted(r + offset for r in fallback), np.int64))
        if query.windows is not None:
            query.windows.append(windows)
            return
        self._score_windows(texts, windows, query, results, {r + offset: t for r, t in normalized_of.items()})

    def _score_windows(self, texts: Sequence[str], windows: "_Windows", query: "_Query", results: dict[int, list[Match]],
                       normalized_of: dict[int, str] | None = None) -> None:
        """The matches of each row of ``windows`` (verified, from one chunk or every shard) into ``results``."""
        n, n_items = self.ngram, len(self.items)
        normalized_of = normalized_of or {}
        fallback = set(windows.fallback.tolist())
        row, local, length, item, main = windows.row, windows.local, windows.length, windows.item, windows.main
        pair = row * n_items + item
        # (row, item) -> [score, matched, total, covered, [(first, last) token runs]]
        found: dict[tuple[int, int], list[Any]] = {}
        if main.any():
            self._score_pairs(pair[main], windows.at[main], windows.gram[main], local[main], query, found)
        turn_counts: dict[int, list[int]] = {}
        for r, i, p, ln, total in zip(row[~main].tolist(), item[~main].tolist(), local[~main].tolist(),
                                      length[~main].tolist(), windows.row_tokens[~main].tolist()):
            if query.short_items == "ignore":
                break
            if r not in turn_counts:
                turns = query.turns[r] if query.turns is not None else None
                turn_counts[r] = _turn_token_counts(turns, total) if query.short_items == "share" else [total]
            if short_item_counts(query.short_items, ln, n, total, _turn_at(turn_counts[r], p, ln)):
                found.setdefault((r, i), [1.0, 1, 1, ln, []])[4].append((p, p + ln - 1))
        by_row: dict[int, list[Match]] = defaultdict(list)
        located: dict[int, tuple[str, list[tuple[int, int]]]] = {}
        for (r, i), (score, matched, total, covered, runs) in found.items():
            if r in fallback:
                continue
            text = texts[r]
            if r not in located:
                located[r] = _token_offsets_fast(text, self._scanner, normalized_of.get(r))
            runs = _merged_runs((a, b - a + 1) for a, b in runs)
            it = self.items[i]
            by_row[r].append(Match(
                benchmark=it.benchmark, eval_id=it.eval_id, source=it.source, eval_row_id=it.row_id, score=score,
                matched_ngrams=matched, item_ngrams=total, span=_span(*located[r], runs[0][0], runs[-1][1]),
                rule=query.rule, covered_tokens=covered, item_tokens=int(self._item_len[i]),
                spans=tuple(_span(*located[r], a, b) for a, b in runs[:MAX_SPANS])))
        for r, matches in by_row.items():
            results[r] = _sort_matches(matches)
        for r in fallback:
            turns = query.turns[r] if query.turns is not None else None
            if matches := reference_matches(self.items, texts[r], n, query.threshold, query.rule,
                                            query.short_items, turns):
                results[r] = matches

    def _score_pairs(self, pair: np.ndarray, at: np.ndarray, gram: np.ndarray, local: np.ndarray, query: "_Query",
                     found: dict[tuple[int, int], list[Any]]) -> None:
        """Exact scores of (row, item) pairs from their verified n-gram windows (numpy, grouped by pair).

        ``at`` is the item position of each matched n-gram and ``local`` the row position of the
        window that matched it; the pairs passing the rule go into ``found`` with their token runs.
        """
        n, n_items = self.ngram, len(self.items)
        span = int(self._item_len.max()) + 1
        # Covered item tokens: over each pair's distinct item positions a_1 < ... < a_m, the union of
        # [a_j, a_j + n) has sum(min(n, a_{j+1} - a_j)) + n tokens.
        key = np.unique(pair * span + at)
        group, pos_in_item = key // span, key % span
        step = np.full(len(key), n, np.int64)
        same = group[1:] == group[:-1]
        step[:-1][same] = np.minimum(n, np.diff(pos_in_item)[same])
        pairs, first = np.unique(group, return_index=True)
        covered = np.add.reduceat(step, first)
        n_grams = len(self._gram_entry)
        distinct = np.unique(pair * n_grams + gram) // n_grams
        matched = np.unique(distinct, return_counts=True)[1]  # same pair order as ``pairs``
        items = pairs % n_items
        size, total = self._item_len[items], self._item_ngrams[items]
        if query.rule == "token_coverage":
            score = covered / size
            ok = score > query.threshold
        else:
            score = matched / total
            ok = score >= query.threshold
        if not ok.any():
            return
        # Token runs of the row covered by the matching windows, per passing pair.
        chosen = np.isin(pair, pairs[ok])
        run_key = np.unique(pair[chosen] * (int(local.max()) + 1) + local[chosen])
        run_pair, run_start = run_key // (int(local.max()) + 1), run_key % (int(local.max()) + 1)
        new_run = np.ones(len(run_key), bool)
        new_run[1:] = (run_pair[1:] != run_pair[:-1]) | (run_start[1:] > run_start[:-1] + n)
        starts = np.flatnonzero(new_run)
        ends = np.r_[starts[1:], len(run_key)] - 1
        runs: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for p, a, b in zip(run_pair[starts].tolist(), run_start[starts].tolist(), (run_start[ends] + n - 1).tolist()):
            runs[p].append((a, b))
        for p, sc, m, t, c in zip(pairs[ok].tolist(), score[ok].tolist(), matched[ok].tolist(), total[ok].tolist(),
                                  covered[ok].tolist()):
            found[(p // n_items, p % n_items)] = [sc, m, t, c, runs[p]]


@dataclass(frozen=True)
class _Query:
    threshold: float
    rule: str
    short_items: str
    turns: Sequence[Sequence[str]] | None
    windows: list["_Windows"] | None = None  # set: collect the verified windows (one shard), score nothing


def _make_query(threshold: float, rule: str, short_items: str, turns: Sequence[Sequence[str]] | None) -> _Query:
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if rule not in RULES or short_items not in SHORT_ITEM_POLICIES:
        raise ValueError(f"rule must be one of {RULES} and short_items one of {SHORT_ITEM_POLICIES}, "
                         f"got {rule!r}, {short_items!r}")
    return _Query(threshold, rule, short_items, turns)


@dataclass(frozen=True)
class _Windows:
    """Verified n-gram windows: text ``row``, its token position ``local`` and window ``length``, whether
    the entry is a main n-gram (else a short item), its ``item``, item position ``at`` and ``gram`` id;
    ``row_tokens`` is the row's token count, ``fallback`` the rows the byte tokenizer disagreed on."""

    row: np.ndarray
    local: np.ndarray
    length: np.ndarray
    main: np.ndarray
    item: np.ndarray
    at: np.ndarray
    gram: np.ndarray
    row_tokens: np.ndarray
    fallback: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence["_Windows"]) -> "_Windows":
        names = [f.name for f in cls.__dataclass_fields__.values()]
        if not parts:
            return cls(**{k: np.zeros(0, bool if k == "main" else np.int64) for k in names})
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in names})

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).nbytes for k in self.__dataclass_fields__)


# lookup(texts, query): the verified windows of ``texts`` from every part of a partitioned index.
ShardLookup = Callable[[Sequence[str], _Query], list[_Windows]]


class LocalShards:
    """`ShardLookup` over parts held in this process (tests; the Ray executor asks actors instead)."""

    def __init__(self, parts: Sequence[EvalIndex]):
        self.parts = list(parts)

    def __call__(self, texts: Sequence[str], query: _Query) -> list[_Windows]:
        return [part.verified_windows(texts, query) for part in self.parts]


class ShardedEvalIndex:
    """An `EvalIndex` split by n-gram hash (`EvalIndex.partition`), with `match_texts`'s answers.

    The texts go to every part, each part returns the windows that equal one of its n-grams (a join
    on the n-gram instead of the whole index in every worker), and the head scores the union: token
    coverage is the union of a (row, item)'s covered positions over all its n-grams, which lie in
    different parts, so no part decides alone and the scores are the whole index's.
    """

    def __init__(self, head: EvalIndex, lookup: ShardLookup):
        self.head, self.lookup = head, lookup
        self.items, self.benchmarks = head.items, head.benchmarks
        self.ngram, self.min_item_tokens = head.ngram, head.min_item_tokens
        self.last_windows_bytes = 0  # bytes of verified windows the last call got back from the parts

    def match_texts(self, texts: Sequence[str], threshold: float, rule: Rule = "token_coverage",
                    short_items: ShortItems = "share",
                    turns: Sequence[Sequence[str]] | None = None) -> list[list[Match]]:
        """`EvalIndex.match_texts` over the parts (the same matches, in the same order)."""
        found = self.match_found(texts, threshold, rule, short_items, turns)
        return [found.get(k, []) for k in range(len(texts))]

    def match_found(self, texts: Sequence[str], threshold: float, rule: Rule = "token_coverage",
                    short_items: ShortItems = "share",
                    turns: Sequence[Sequence[str]] | None = None) -> dict[int, list[Match]]:
        """`EvalIndex.match_found` over the parts."""
        query = _make_query(threshold, rule, short_items, turns)
        found: dict[int, list[Match]] = {}
        if not self.items or not texts:
            return found
        windows = _Windows.concat(self.lookup(list(texts), replace(query, turns=None)))
        self.last_windows_bytes = windows.nbytes
        if len(windows.row) or len(windows.fallback):
            self.head._score_windows(texts, windows, query, found)
        return found


def _turn_token_counts(turns: Sequence[str] | None, total: int) -> list[int]:
    """Token counts of the turns that make up a text (one turn, the whole text, without ``turns``)."""
    if not turns:
        return [total]
    counts = [len(tokenize(t)) for t in turns]
    return counts if sum(counts) == total else [total]


def _turn_at(turn_tokens: list[int], pos: int, length: int) -> int:
    """Token count of the turn holding tokens ``pos .. pos+length-1`` (the whole text if it spans turns)."""
    start = 0
    for count in turn_tokens:
        if pos < start + count:
            return count if pos + length <= start + count else sum(turn_tokens)
        start += count
    return sum(turn_tokens)


# ---------------------------------------------------------------------------------------------
# the reference implementation
# ---------------------------------------------------------------------------------------------
@dataclass
class _ReferenceIndex:
    items: Sequence[EvalItem]
    count: int
    ngram: int
    grams: dict[tuple[str, ...], list[tuple[int, int]]]  # n-gram -> (item, position) of every occurrence
    short: dict[tuple[str, ...], list[int]]  # whole token sequence of items shorter than n -> items
    short_first: dict[str, set[int]]  # first token of a short item -> the lengths of such items
    lengths: list[int]  # tokens per item
    totals: list[int]  # distinct n-grams per item (1 for a short item)


_REFERENCE_CACHE: list[_ReferenceIndex] = []


def _reference_index(items: Sequence[EvalItem], ngram: int) -> _ReferenceIndex:
    for cached in _REFERENCE_CACHE:  # items are treated as immutable between calls
        if cached.items is items and cached.count == len(items) and cached.ngram == ngram:
            return cached
    grams: dict[tuple[str, ...], list[tuple[int, int]]] = defaultdict(list)
    short: dict[tuple[str, ...], list[int]] = defaultdict(list)
    lengths: list[int] = []
    totals: list[int] = []
    for i, item in enumerate(items):
        tokens = tokenize(item.text)
        lengths.append(len(tokens))
        if len(tokens) < ngram:
            if tokens:  # an empty item is contained in everything: never indexed
                short[tuple(tokens)].append(i)
            totals.append(1)
            continue
        for p in range(len(tokens) - ngram + 1):
            grams[tuple(tokens[p:p + ngram])].append((i, p))
        totals.append(len({tuple(tokens[p:p + ngram]) for p in range(len(tokens) - ngram + 1)}))
    short_first: dict[str, set[int]] = defaultdict(set)
    for key in short:
        short_first[key[0]].add(len(key))
    _REFERENCE_CACHE[:] = [_ReferenceIndex(items, len(items), ngram, dict(grams), dict(short), dict(short_first),
                                           lengths, totals)]
    return _REFERENCE_CACHE[0]


def reference_matches(items: Sequence[EvalItem], text: str, ngram: int, threshold: float,
                      rule: Rule = "token_coverage", short_items: ShortItems = "share",
                      turns: Sequence[str] | None = None) -> list[Match]:
    """The matches of one text by plain sets of n-gram tuples (independent of the fast path).

    Builds (and keeps, for the same ``items`` object) an n-gram -> (item, position) dict; then
    takes the text's n-grams, collects per item the positions (and distinct n-grams) found, and
    checks the windows that start with a short item's first token against the short items' token
    sequences. Pass the same ``items`` object on every call (e.g. ``index.items``): the dict is
    kept for one object (a few seconds to build for all bundled evals) and rebuilt for another.
    """
    ref = _reference_index(items, ngram)
    tokens = tokenize(text)
    where: dict[tuple[str, ...], list[int]] = defaultdict(list)  # n-gram of the text -> its positions
    for p in range(len(tokens) - ngram + 1):
        where[tuple(tokens[p:p + ngram])].append(p)
    hits: dict[int, list[tuple[tuple[str, ...], int]]] = defaultdict(list)  # item -> (n-gram, item position)
    for gram in where:
        for i, at in ref.grams.get(gram, ()):
            hits[i].append((gram, at))
    found: dict[int, tuple[float, int, int, int, list[tuple[int, int]]]] = {}
    for i, pairs in hits.items():
        matched = len({gram for gram, _ in pairs})
        covered = _covered({at for _, at in pairs}, ngram)
        score = _score(rule, covered, ref.lengths[i], matched, ref.totals[i])
        if passes(score, threshold, rule):
            windows = [(p, ngram) for gram in {g for g, _ in pairs} for p in where[gram]]
            found[i] = (score, matched, ref.totals[i], covered, windows)
    turn_tokens = _turn_token_counts(turns, len(tokens))
    for p, token in enumerate(tokens):
        for length in ref.short_first.get(token, ()):
            if p + length > len(tokens):
                continue
            for i in ref.short.get(tuple(tokens[p:p + length]), ()):
                if short_item_counts(short_items, length, ngram, len(tokens), _turn_at(turn_tokens, p, length)):
                    found.setdefault(i, (1.0, 1, 1, length, []))[4].append((p, length))
    if not found:
        return []
    located = _token_offsets(text)
    out = []
    for i, (score, matched, total, covered, windows) in found.items():
        item = items[i]
        runs = _merged_runs(windows)
        out.append(Match(benchmark=item.benchmark, eval_id=item.eval_id, source=item.source, eval_row_id=item.row_id,
                         score=score, matched_ngrams=matched, item_ngrams=total,
                         span=_span(*located, runs[0][0], runs[-1][1]), rule=rule, covered_tokens=covered,
                         item_tokens=ref.lengths[i], spans=tuple(_span(*located, a, b) for a, b in runs[:MAX_SPANS])))
    return _sort_matches(out)


# ---------------------------------------------------------------------------------------------
# the streaming step
# ---------------------------------------------------------------------------------------------
@dataclass
class DecontamStats:
    """What a `Decontaminator` has seen so far."""

    rows: int = 0
    clean: int = 0
    quarantined: int = 0
    removed: Counter = field(default_factory=Counter)  # (training source, benchmark) -> rows removed
    eval_ids_hit: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # benchmark -> ids
    scanned: Counter = field(default_factory=Counter)  # "all" / "changed" -> rows scanned against all / changed

    def count_quarantined(self, row: dict[str, Any], matches: Sequence[Match]) -> None:
        self.quarantined += 1
        for benchmark in {m.benchmark for m in matches}:
            self.removed[(row.get("source", ""), benchmark)] += 1
        for m in matches:
            self.eval_ids_hit[m.benchmark].add(m.eval_id)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (asset metadata)."""
        return {"rows": self.rows, "clean": self.clean, "quarantined": self.quarantined,
                "removed": {f"{s}/{b}": n for (s, b), n in sorted(self.removed.items())},
                "eval_ids_hit": {b: len(ids) for b, ids in sorted(self.eval_ids_hit.items())},
                "scanned": dict(sorted(self.scanned.items()))}


def match_from_dict(d: dict[str, Any]) -> Match:
    """A `Match` back from its ``asdict`` form (quarantine ``matches`` JSON, ledger details)."""
    return Match(**{**d, "spans": tuple(d.get("spans", ()))})


def checked_details(benchmarks: Iterable[str]) -> SharedDetails:
    """Details of every kept event: the benchmarks the row was checked against (sorted)."""
    return SharedDetails(checked=sorted(benchmarks))


def quarantine_event(matches: Sequence[Match], config: DecontamConfig,
                     checked: Sequence[str]) -> tuple[str, list[str], dict[str, Any]]:
    """The reason, related ids and details of a ``quarantined`` event (``matches`` sorted, best first)."""
    best = matches[0]
    return (f"{best.benchmark}:{best.eval_id} {config.rule} {best.score:.2f}", [m.eval_row_id for m in matches],
            {"matches": [asdict(m) for m in matches], "benchmarks": sorted({m.benchmark for m in matches}),
             "checked": list(checked), "ngram": config.ngram, "threshold": config.threshold, "rule": config.rule,
             "short_items": config.short_items})


_ROW_ID = operator.itemgetter("row_id")


class Decontaminator:
    """Streaming step: yields clean rows in input order, quarantines contaminated ones.

    Every row gets exactly one ledger event: ``kept`` (decision ``clean``, details naming the
    benchmarks it was checked against) or ``quarantined`` (decision ``contaminated``, the best match as
    reason, every matched eval row as related ids, all matches and the checked benchmarks in details).
    Quarantined rows are kept in ``self.quarantine`` as ``{"row": row, "matches": [Match, ...]}``.
    """

    def __init__(self, index: "EvalIndex | ShardedEvalIndex", config: DecontamConfig, sink: DecisionSink,
                 batch_size: int = 4096):
        if index.ngram != config.ngram or index.min_item_tokens != config.min_item_tokens:
            raise ValueError(f"index built with ngram={index.ngram}, min_item_tokens={index.min_item_tokens}; "
                             f"config says ngram={config.ngram}, min_item_tokens={config.min_item_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.index, self.config, self.sink, self.batch_size = index, config, sink, batch_size
        self.checked = checked_details(index.benchmarks)
        self.quarantine: list[dict[str, Any]] = []
        self.stats = DecontamStats()

    def __call__(self, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rows = iter(rows)
        while batch := list(itertools.islice(rows, self.batch_size)):
            yield from self._process(batch)

    def _process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The clean rows of a batch scanned against every benchmark; the batch's events recorded in input
        order before its rows are handed on, the kept ones a run of rows at a time (`record_many`)."""
        config = self.config
        include = config.include_response
        found = self.index.match_found(_joined_texts(batch, include), config.threshold, config.rule,
                                       config.short_items, _LazyTurns(batch, include))
        stats = self.stats
        stats.rows += len(batch)
        stats.scanned["all"] += len(batch)
        stats.clean += len(batch) - len(found)
        if not found:  # the common batch: handed on as it is
            record_many(self.sink, list(map(_ROW_ID, batch)), "kept", "clean", self.checked)
            return batch
        clean: list[dict[str, Any]] = []
        done = 0
        for k in sorted(found):
            self._keep(batch[done:k], clean)
            self._quarantine_row(batch[k], found[k])
            done = k + 1
        self._keep(batch[done:], clean)
        return clean

    def _keep(self, run: list[dict[str, Any]], clean: list[dict[str, Any]]) -> None:
        """A run of clean rows: their ``kept`` events in one `record_many`, the rows onto ``clean``."""
        if run:
            record_many(self.sink, list(map(_ROW_ID, run)), "kept", "clean", self.checked)
            clean += run

    def _quarantine_row(self, row: dict[str, Any], matches: list[Match]) -> None:
        self.stats.count_quarantined(row, matches)
        self.quarantine.append({"row": row, "matches": matches})
        reason, related, details = quarantine_event(matches, self.config, self.checked["checked"])
        self.sink.record(row["row_id"], "quarantined", decision="contaminated", reason=reason,
                         related_ids=related, details=details)
