"""The C kernel of the decontamination fast path gives exactly what the numpy path gives.

`tulu_pipeline/curation/_decon_kernel.c` tokenizes, hashes and filters the texts of a batch in one
pass; the numpy path (`_token_hashes`, `_mix`, the rolled windows, the bit filters) stays as the
reference. Checked here: the token keys, the normalization by segments, the tokens and spans used
for verification, and whole results (matches, scores, spans, ledger events) of both paths on
generated texts: ASCII, accented, combining sequences, CJK, Hangul jamo, emoji, astral characters,
empty rows, very long rows and batches cut into many slices.
"""

from __future__ import annotations

import random
import unicodedata
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tulu_pipeline.curation import decontaminate as dc
from tulu_pipeline.curation.decontaminate import (
    DecontamConfig,
    Decontaminator,
    EvalIndex,
    EvalItem,
    registry_eval_items,
    tokenize,
)
from tulu_pipeline.provenance.ledger import MemorySink

pytestmark = pytest.mark.skipif(dc._decon_kernel is None and not dc.kernel_required(),
                                reason="the C kernel is not built (pip install -e . builds it)")

PIECES = (list("aZ9_ -.,!?'\"\n\t\x00") + list("éÉñßÆæİıΣσςﬁ²½①ǅẞK") + ["e\u0301", "\u0301", "\u0323\u0301",
          "\u0301\u0323", "\u0915\u093f", "\u0915\u094d\u0937", "\u093c"]
          + list("我喜欢猫ひらカター・、。ＡＢ１２！，한국어") + ["\u1100\u1161", "\u1161", "\u11a8", "가\u11a8", "😀",
                                                         "\ufeff", "ǰ", "ﾊﾞ", "㍿", "\U00020000", "\U0001d400",
                                                         "\u3005", "\U000110b9", "\ud800", "\u0344", "Å", "\u212b"])
texts_st = st.one_of(st.lists(st.sampled_from(PIECES), max_size=40).map("".join), st.text(max_size=60))


def test_kernel_is_used_where_required():
    """Where CI / TULU_REQUIRE_ALL is set, the kernel must be built and used (no silent numpy path)."""
    if dc.kernel_required():
        assert dc._decon_kernel is not None, dc._KERNEL_IMPORT_ERROR
    index = EvalIndex.build([EvalItem("b", "e", "s", "r", "one two three four five six seven eight nine")])
    assert index._scanner is not None


@lru_cache(maxsize=None)
def scanner():
    index = EvalIndex.build([EvalItem("b", "e", "s", "r", "one two three four five six seven eight nine")])
    return index._scanner


def numpy_keys(text: str) -> np.ndarray:
    encoded = text.encode("ascii") if text.isascii() else dc.normalize(text).encode("utf-8", "surrogatepass")
    hashes, _ = dc._token_hashes([encoded], text.isascii())
    return dc._mix(hashes, 0)[:len(hashes)]


def check_text(text: str) -> None:
    sc = scanner()
    normalized = dc.normalize(text)
    assert sc.normalized(text) == normalized
    assert np.array_equal(np.frombuffer(sc.keys(text), np.uint64), numpy_keys(text))
    assert sc.tokens(normalized) == tokenize(text)
    count, [window] = sc.windows(normalized, [(1, 3)])
    assert count == len(tokenize(text)) and window == tokenize(text)[1:4]
    assert dc._token_offsets_fast(text, sc) == dc._token_offsets(text)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(texts_st)
def test_kernel_tokens_equal_the_numpy_path(text):
    check_text(text)


def test_every_code_point_in_context():
    """Each assigned code point alone, after a letter, before combining marks and before a Hangul vowel."""
    cps = [cp for cp in range(0x110000) if unicodedata.category(chr(cp)) not in ("Cn", "Co")]
    for lo in range(0, len(cps), 2000):
        chars = [chr(cp) for cp in cps[lo:lo + 2000]]
        for text in (" ".join(chars), "".join(f"e{c}" for c in chars), "".join(f"{c}\u0301\u0323x" for c in chars),
                     "".join(f"{c}\u1161 " for c in chars), "".join(f"A{c}ß" for c in chars)):
            check_text(text)


# ---------------------------------------------------------------------------------------------
# whole results: kernel against numpy
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def bundle_index() -> EvalIndex:
    return EvalIndex.build(registry_eval_items())


def generated_texts(index: EvalIndex, seed: int) -> list[str]:
    """Rows of every kind, some carrying eval items whole, cut, upper-cased or inside non-ASCII text."""
    rng = random.Random(seed)
    words = ["the", "Cat", "sat", "on", "mat", "über", "naïve", "Straße", "ﬁle", "café", "e\u0301t\u00e9", "猫が好き",
             "ひらがな", "カタカナ", "한국어", "\u1100\u1161\u11a8", "😀", "👩\u200d💻", "\U00020001", "𝐀𝐁", "①②", "ＡＢＣ",
             "x_1", "42", "-", "...", "\n", "नमस्ते", "क्षत्रिय", "Ελληνικά", "ΣΊΣΥΦΟΣ", "İstanbul", "\ufeff"]
    items = index.items
    out = ["", " ", "\n\n", "😀😀"]
    for k in range(400):
        n = rng.choice([0, 1, 3, 20, 80, 400] + ([5000] if k % 40 == 0 else []))
        text = " ".join(rng.choice(words) for _ in range(n))
        if k % 3 == 0:
            it = items[rng.randrange(len(items))].text
            cut = it if k % 2 else it[:max(1, int(len(it) * rng.choice([0.3, 0.62, 1.0])))]
            if k % 5 == 0:
                cut = cut.upper()
            at = rng.randrange(len(text) + 1)
            text = text[:at] + " " + cut + " " + text[at:]
        out.append(text)
    return out


@pytest.mark.parametrize("rule", ["token_coverage", "ngram_share"])
@pytest.mark.parametrize("short_items", ["share", "anywhere", "ignore"])
def test_kernel_matches_equal_the_numpy_path(rule, short_items, monkeypatch):
    index = bundle_index()
    texts = generated_texts(index, seed=hash((rule, short_items)) % 1000)
    turns = [t.split("\n") for t in texts]
    monkeypatch.setattr(dc, "_BATCH_BYTES", 3000)  # many slices: rows on both sides of every cut
    kernel = index.match_texts(texts, 0.5, rule, short_items, turns)
    scanner, index._scanner = index._scanner, None
    try:
        reference = index.match_texts(texts, 0.5, rule, short_items, turns)
    finally:
        index._scanner = scanner
    assert kernel == reference
    assert sum(map(bool, kernel)) > 20


def test_decontaminator_events_equal_the_numpy_path():
    index = bundle_index()
    rows = [{"row_id": f"r{k}", "source": "s", "messages": [{"role": "user", "content": t}]
             + ([{"role": "assistant", "content": "ok " + t[:50]}, {"role": "user", "content": t[-40:]}] if k % 4 == 0
                else [])}
            for k, t in enumerate(generated_texts(index, seed=7))]

    def run() -> tuple[list, list, dict]:
        sink = MemorySink()
        step = Decontaminator(index, DecontamConfig(), sink, batch_size=97)
        kept = [r["row_id"] for r in step(iter(rows))]
        return kept, sink.events, step.stats.as_dict()

    kernel = run()
    scanner, index._scanner = index._scanner, None
    try:
        reference = run()
    finally:
        index._scanner = scanner
    assert kernel == reference
    assert kernel[2]["quarantined"] > 20


def test_pickled_index_keeps_the_kernel():
    import pickle

    index = bundle_index()
    copy = pickle.loads(pickle.dumps(index))
    assert copy._scanner is not None
    texts = generated_texts(index, seed=3)[:60]
    assert copy.match_texts(texts, 0.5) == index.match_texts(texts, 0.5)


def test_window_probes_batched_across_rows_equal_the_numpy_path():
    """One `scan` call over thousands of short rows (their windows probed together, many batches of waiting
    windows, a 5,000-word row among them) finds what the numpy path finds; `match_found` holds exactly the
    texts with matches."""
    index = bundle_index()
    texts = [t for seed in range(8) for t in generated_texts(index, seed) if len(t) < 2000]
    texts.insert(len(texts) // 2, " ".join(generated_texts(index, 99)[5:40]) * 3)
    assert sum(len(t.split()) for t in texts) > 3 * 4096
    kernel = index.match_texts(texts, 0.5)
    found = index.match_found(texts, 0.5)
    scanner, index._scanner = index._scanner, None
    try:
        reference = index.match_texts(texts, 0.5)
    finally:
        index._scanner = scanner
    assert kernel == reference
    assert found == {k: m for k, m in enumerate(kernel) if m} and len(found) > 100


@pytest.mark.parametrize("include_response", [False, True])
def test_kernel_joined_texts_equal_training_text(include_response):
    """The kernel's `joined_texts` (the texts a batch is scanned as) equals `training_text` row by row: one
    turn, several, roles left out, roles built at run time (equal, not the same object), and every row the
    kernel hands to the fallback (no messages, a message that is not a dict, a role or content that is not a
    plain str)."""

    class Text(str):
        pass

    def role(name: str) -> str:
        return "".join(list(name))  # an equal string, not the interned literal

    def msg(r: str, content) -> dict:
        return {"role": r, "content": content}

    rows = [{"messages": [msg("user", "only one")]},
            {"messages": [msg(role("system"), "be brief"), msg(role("user"), "hi"), msg("assistant", "hello"),
                          msg("user", "again")]},
            {"messages": [msg("assistant", "no user turn")]},
            {"messages": []},
            {"messages": [msg("user", "a"), msg("tool", "skipped"), msg("user", "")]},
            {"messages": [msg(Text("user"), "a str subclass role")]},
            {"messages": [msg("user", Text("a str subclass content")), msg("user", "b")]},
            {"messages": ({"role": "user", "content": "a tuple of messages"},)},
            {"messages": [["user", "not a dict"]]},
            {"messages": [{"content": "no role"}]},
            {"messages": [{"role": "user"}]},
            {"other": "no messages"},
            {"messages": [msg("user", "x" * 5000), msg("assistant", "y"), msg("user", "z")]}]

    def fallback(row: dict) -> str:
        try:
            return dc.training_text(row, include_response)
        except (KeyError, TypeError, AttributeError):
            return "<fallback>"

    roles = ("system", "user", "assistant") if include_response else ("system", "user")
    for given in (roles, list(roles)):
        assert dc._decon_kernel.joined_texts(rows, given, fallback) == [fallback(row) for row in rows]
