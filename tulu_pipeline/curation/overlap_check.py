"""An independent re-check of decontamination, for the blocking ``no_eval_overlap`` check.

Same rule as `decontaminate` (token coverage above the threshold or distinct-n-gram share at or
above it; short items under the same policy), but a different code path, so that a bug in one
cannot hide in both: its own tokenizer (a character loop over `unicodedata`, no numpy tables and no
regexes, and a split per space-separated run rather than a character state machine), plain Python
sets of token tuples, no hashing. It only answers *which* items a text is
contaminated by and with what score; spans are the fast path's business.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

# Names of the letters that are tokens by themselves (scripts written without spaces between words).
_STANDALONE_NAMES = ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HIRAGANA", "KATAKANA",
                     "COMBINING KATAKANA-HIRAGANA", "IDEOGRAPHIC ITERATION MARK", "IDEOGRAPHIC CLOSING MARK",
                     "IDEOGRAPHIC NUMBER ZERO", "HANGZHOU NUMERAL", "VERTICAL KANA REPEAT",
                     "VERTICAL IDEOGRAPHIC ITERATION MARK", "MASU MARK")


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or unicodedata.category(ch).startswith("M")


def _is_space(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch)[0] in "CZ"


def _is_standalone(ch: str) -> bool:
    # Kana outside the BMP (archaic and small kana supplements) are ordinary word characters.
    if 0x10000 <= ord(ch) < 0x20000:
        return False
    return _is_word_char(ch) and unicodedata.name(ch, "").startswith(_STANDALONE_NAMES)


def _chunk_words(chunk: str) -> list[str]:
    """A run without spaces, spaCy-style: edge punctuation peeled off one character at a time, the
    middle (first to last letter or digit, "3.5", "don't") one word."""
    letters = [i for i, ch in enumerate(chunk) if _is_word_char(ch)]
    if not letters:
        return list(chunk)
    first, last = letters[0], letters[-1]
    return [*chunk[:first], chunk[first:last + 1], *chunk[last + 1:]]


def words(text: str) -> list[str]:
    """Tokens of ``text``: NFKC and casefold, then per run between spaces (and CJK/kana characters,
    one token each) the spaCy-like split of `_chunk_words`."""
    out: list[str] = []
    chunk = ""
    for ch in unicodedata.normalize("NFKC", text).casefold() + " ":
        if _is_space(ch) or _is_standalone(ch):
            if chunk:
                out.extend(_chunk_words(chunk))
                chunk = ""
            if not _is_space(ch):
                out.append(ch)
        else:
            chunk += ch
    return out


@dataclass(frozen=True)
class Overlap:
    """An eval item (by position in the item list) a text is contaminated by, and its score."""

    item: int
    score: float


class OverlapChecker:
    """Eval items as token tuples; `overlaps` re-decides one training text."""

    def __init__(self, item_texts: Sequence[str], ngram: int, threshold: float, rule: str, short_items: str):
        self.ngram, self.threshold, self.rule, self.short_items = ngram, threshold, rule, short_items
        self.tokens = [tuple(words(t)) for t in item_texts]
        self.by_gram: dict[tuple[str, ...], set[int]] = defaultdict(set)
        self.by_whole: dict[tuple[str, ...], set[int]] = defaultdict(set)
        for i, toks in enumerate(self.tokens):
            if len(toks) >= ngram:
                for p in range(len(toks) - ngram + 1):
                    self.by_gram[toks[p:p + ngram]].add(i)
            elif toks:
                self.by_whole[toks].add(i)
        self.short_lengths = sorted({len(k) for k in self.by_whole})

    def overlaps(self, turns: Sequence[str]) -> list[Overlap]:
        """Items the text made of ``turns`` (joined with newlines) is contaminated by."""
        n = self.ngram
        turn_tokens = [words(t) for t in turns]
        toks = tuple(w for t in turn_tokens for w in t)
        grams = {toks[p:p + n] for p in range(len(toks) - n + 1)}
        candidates = set().union(*(self.by_gram.get(g, set()) for g in grams)) if grams else set()
        out = []
        for i in sorted(candidates):
            item = self.tokens[i]
            item_grams = [item[p:p + n] for p in range(len(item) - n + 1)]
            if self.rule == "token_coverage":
                covered = {p + k for p, g in enumerate(item_grams) if g in grams for k in range(n)}
                score = len(covered) / len(item)
                hit = score > self.threshold
            else:
                distinct = set(item_grams)
                score = len(distinct & grams) / len(distinct)
                hit = score >= self.threshold
            if hit:
                out.append(Overlap(i, score))
        if self.short_items != "ignore":
            out.extend(Overlap(i, 1.0) for i in self._short_hits(toks, [len(t) for t in turn_tokens]))
        return out

    def _short_hits(self, toks: tuple[str, ...], turn_sizes: list[int]) -> set[int]:
        found: set[int] = set()
        bounds, start = [], 0
        for size in turn_sizes:
            bounds.append((start, start + size))
            start += size
        for k in self.short_lengths:
            # The share a k-token item must make up of the row or of its turn (1.0 at one token,
            # 0.5 at n-1 tokens): written out here rather than imported, to stay independent.
            need = 1.0 if self.ngram <= 2 else 1.0 - 0.5 * (k - 1) / (self.ngram - 2)
            for p in range(len(toks) - k + 1):
                items = self.by_whole.get(toks[p:p + k])
                if not items:
                    continue
                turn = next((hi - lo for lo, hi in bounds if lo <= p and p + k <= hi), len(toks))
                if self.short_items == "anywhere" or k >= need * len(toks) or k >= need * turn:
                    found |= items
        return found
