"""N-gram decontamination: real overlaps in the bundled data, hand-made edge cases, and the fast
path against the plain reference implementation."""

from __future__ import annotations

import json
import random
from collections import Counter
import unicodedata
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tulu_pipeline.curation import decontaminate as dc
from tulu_pipeline.curation.decontaminate import (
    DecontamConfig,
    Decontaminator,
    EvalIndex,
    EvalItem,
    LocalShards,
    Match,
    ShardedEvalIndex,
    eval_items_from_rows,
    reference_matches,
    tokenize,
    training_text,
    training_turns,
)
from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import get_source
from tulu_pipeline.provenance.ledger import MemorySink


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def source_rows(source_id: str) -> tuple[dict, ...]:
    return tuple(iter_source_rows(get_source(source_id)))


def source_items(*source_ids: str) -> list[EvalItem]:
    return [item for sid in source_ids for item in eval_items_from_rows(source_rows(sid), get_source(sid).benchmark)]


def flagged(train_source: str, *eval_sources: str, include_response: bool = False, rule: str = "token_coverage"):
    """(row, matches) for every row of ``train_source`` contaminated by ``eval_sources``."""
    index = EvalIndex.build(source_items(*eval_sources))
    rows = source_rows(train_source)
    turns = [training_turns(r, include_response) for r in rows]
    results = index.match_texts(["\n".join(t) for t in turns], 0.5, rule, "share", turns)
    return [(row, matches) for row, matches in zip(rows, results) if matches]


def item(text: str, eval_id: str = "e1", benchmark: str = "bench") -> EvalItem:
    return EvalItem(benchmark=benchmark, eval_id=eval_id, source=f"{benchmark}_src", row_id=f"{benchmark}-{eval_id}",
                    text=text)


def row(*turns: tuple[str, str], row_id: str = "r1", source: str = "train") -> dict:
    return {"row_id": row_id, "source": source, "messages": [{"role": r, "content": c} for r, c in turns]}


def matches_for(items: list[EvalItem], text: str, threshold: float = 0.5, ngram: int = 8,
                rule: str = "token_coverage", short_items: str = "share") -> list[Match]:
    """Fast path, checked against the reference on the way."""
    fast = EvalIndex.build(items, ngram=ngram).match_texts([text], threshold, rule, short_items)[0]
    assert fast == reference_matches(items, text, ngram, threshold, rule, short_items)
    return fast


# ---------------------------------------------------------------------------------------------
# real overlaps in the bundled data (see /work/shared/data/README.md, "Known overlaps")
# ---------------------------------------------------------------------------------------------
def test_alpaca_eval_flags_exactly_its_vicuna_subset(bundle):
    hits = flagged("alpaca_eval", "vicuna_bench")
    vicuna = {r["row_id"] for r in source_rows("alpaca_eval") if json.loads(r["extra"])["dataset"] == "vicuna"}
    assert len(vicuna) == 80
    assert {r["row_id"] for r, _ in hits} == vicuna  # nothing from the other four subsets
    assert all(m[0].score == 1.0 and m[0].benchmark == "vicuna_bench" for _, m in hits)
    assert len({m[0].eval_id for _, m in hits}) == 80  # every Vicuna question is some row's best match
    # Extra matches: the ten Fermi questions (41-50) end with the same 17-token instruction "Try to
    # explain your answer. Your explanation should take the reader through your reasoning
    # step-by-step." (10 n-grams), which alone covers >= 50% of the shorter ones.
    extras = {(r["row_id"], m.eval_id, m.score) for r, ms in hits for m in ms[1:]}
    assert {eval_id for _, eval_id, _ in extras} <= {str(q) for q in range(41, 51)}
    # Token coverage: the shared 17 tokens are 53-68% of a Fermi question's tokens.
    assert all(0.5 < score < 0.7 for _, _, score in extras)
    assert sum(1 for _, ms in hits if len(ms) > 1) == 10


def test_tulu1_human_eval_prompts_are_all_eval_prompts(bundle):
    hits = flagged("tulu1_human_eval", "self_instruct_user_oriented", "vicuna_bench")
    assert len(hits) == len(source_rows("tulu1_human_eval")) == 996
    assert all(m[0].score == 1.0 for _, m in hits)
    by_benchmark = Counter(m[0].benchmark for _, m in hits)
    assert by_benchmark == {"self_instruct_user_oriented": 756, "vicuna_bench": 240}  # (252 + 80) prompts x 3 pairs


def test_math_train_against_math_test(bundle):
    # Token coverage (Tülu 3's rule) counts a shared stock phrase by its tokens, and punctuation is
    # tokens (as spaCy's in open-instruct), so LaTeX delimiters and operators count too: the templated
    # near-twins MATH train shares with test (same wording, other numbers: "Solve for $x$: $$\\sqrt...",
    # "A parabola with equation $y=x^2+bx+c$ passes through the points $(...)$. What is $c$?") have
    # their phrasing plus "$ ( , ) $ ." cover over half of the item. 1389 of 7500 rows, measured
    # (805 when punctuation only separated words; 42% of the 1389 at coverage <= 0.6).
    coverage = {r["eval_id"]: {m.eval_id: m.score for m in ms} for r, ms in flagged("math_train", "math_test")}
    assert 1300 <= len(coverage) <= 1450, len(coverage)
    hits = flagged("math_train", "math_test", rule="ngram_share")
    by_id = {r["eval_id"]: m for r, m in hits}
    duplicate = by_id["train/geometry/6032.json"]
    assert duplicate[0].eval_id == "test/precalculus/24307.json" and duplicate[0].score == 1.0
    assert duplicate[0].span.startswith("The points $(0,0)")
    # 451 of 7500 train problems (measured; 378 before punctuation tokens): shared [asy] preambles
    # and stock phrasings of near-twin problems ("Express your answer in simplest radical form ..."),
    # not only true duplicates.
    assert 400 <= len(hits) <= 500, len(hits)
    # Copies that differ only in LaTeX spacing ("$f(6)-f(2)=12$." / "$f(6) - f(2) = 12.$") now have
    # different tokens inside the formulas, as they would under spaCy: a score of 1.0 needs the same
    # spacing (2 rows), but the wording around the formulas still flags them by coverage ...
    assert sum(1 for _, m in hits if m[0].score == 1.0) >= 2
    assert coverage["train/algebra/517.json"]["test/algebra/636.json"] > 0.75
    assert coverage["train/intermediate_algebra/1894.json"]["test/intermediate_algebra/1607.json"] > 0.8
    # ... except where a formula is most of the item: "... equal to\\[\\frac{3^{100}+2^{100}}..." glues
    # "to" to the formula in one copy only. And "Compute $\\cos 150^\\circ$." is no longer taken for
    # the test's "Compute $\\cos (-150^\\circ)$." (once the minus and parentheses count, they differ).
    assert "test/intermediate_algebra/1007.json" not in coverage.get("train/number_theory/7105.json", {})
    assert "test/geometry/969.json" not in coverage.get("train/geometry/626.json", {})


def test_gsm8k_train_against_gsm8k_test_is_almost_clean(bundle):
    # Token coverage adds a third twin: 10 of 16 tokens of test question 632 ("Bella bought stamps ...").
    assert [m[0].eval_id for _, m in flagged("gsm8k_train", "gsm8k_test")] == [
        "gsm8k_test:632", "gsm8k_test:602", "gsm8k_test:602"]
    hits = flagged("gsm8k_train", "gsm8k_test", rule="ngram_share")
    # Two templated twins of test question 602 ("A train travels 270 (360) miles in 3 hours ...").
    assert len(hits) <= 3
    assert [(r["messages"][0]["content"][:30], m[0].eval_id) for r, m in hits] == [
        ("A train travels 270 miles in 3", "gsm8k_test:602"),
        ("A train travels 360 miles in 3", "gsm8k_test:602"),
    ]


def test_code_alpaca_generic_phrases_are_not_contamination(bundle):
    # Token coverage flags 16 rows whose stock phrasing ("write a python function to check whether
    # a ...") covers just over half of a short MBPP item; the distinct-8-gram share flags one.
    by_coverage = flagged("code_alpaca", "humaneval", "mbpp")
    assert len(by_coverage) == 16 and all(m[0].benchmark == "mbpp" and m[0].score > 0.5 for _, m in by_coverage)
    hits = flagged("code_alpaca", "humaneval", "mbpp", rule="ngram_share")
    # The one hit is the known near-duplicate (MBPP 374, permutations of a string); the 16 HumanEval
    # and ~60 MBPP single 8-gram overlaps ("write a python function to ...") stay below 50%.
    assert [(r["messages"][0]["content"], [(x.benchmark, x.eval_id) for x in m]) for r, m in hits] == [
        ("Write a function to print all permutations of a given string.", [("mbpp", "374")]),
    ]


def test_clean_controls_flag_nothing(bundle):
    assert flagged("hh_rlhf_harmless", "ifeval", "gsm8k_test") == []
    assert flagged("hh_rlhf_harmless", "ifeval", "gsm8k_test", include_response=True) == []


# ---------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------
def test_tokenize_documented_behaviour():
    assert tokenize("Hello, WORLD! Café naïve ＦＵＬＬ－ｗｉｄｔｈ 我喜欢猫 has_close_elements straße हिन्दी ﬁne x²") == [
        "hello", ",", "world", "!", "café", "naïve", "full-width", "我", "喜", "欢", "猫", "has_close_elements",
        "strasse", "हिन्दी", "fine", "x2"]
    # spaCy-like: punctuation inside a word stays in it, at its edges it is one token per character
    assert tokenize("It's 3.5, don't (x^2)!") == ["it's", "3.5", ",", "don't", "(", "x^2", ")", "!"]
    assert tokenize("cafe\u0301") == tokenize("café") == ["café"]  # NFKC composes
    assert tokenize("") == tokenize("  \n\t\u00a0\u200b") == []
    assert tokenize(" ,.!? …—“”") == [",", ".", "!", "?", ".", ".", ".", "—", "“", "”"]  # NFKC: … is three dots
    assert tokenize("emoji😀between 😀 x") == ["emoji😀between", "😀", "x"]
    assert tokenize("𠀀𠀁x") == ["𠀀", "𠀁", "x"]  # astral ideographs are standalone too
    assert tokenize("好。a,b") == ["好", "。", "a,b"]


UNICODE_PIECES = (list("aZ9_ -.,!?'\"\n\t\x00") + list("éÉñßÆæİıΣσςﬁ²½①") + ["e\u0301", "\u0301", "\u0915\u093f"]
                  + list("我喜欢猫ひらカター・、。ＡＢ１２！，한국어") + ["\u1100\u1161", "😀", "\ufeff", "ǰ", "ﾊﾞ", "㍿",
                                                               "\U00020000", "\U0001d400", "\u3005", "\U000110b9"])
unicode_texts = st.one_of(st.lists(st.sampled_from(UNICODE_PIECES), max_size=30).map("".join), st.text(max_size=40))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(unicode_texts)
def test_tokenize_regex_equals_the_rule_spelled_out(text):
    normalized = dc.normalize(text)
    assert tokenize(text) == [normalized[a:b] for a, b in dc._spans_by_char(normalized)]
    source, offsets = dc._token_offsets(text)
    assert len(offsets) == len(tokenize(text))
    if source is text:  # spans point into the original text and cover the token
        for (a, b), token in zip(offsets, tokenize(text)):
            assert token in tokenize(text[a:b])


def _byte_path(texts):
    encoded = [t.encode("ascii") if t.isascii() else dc.normalize(t).encode("utf-8", "surrogatepass") for t in texts]
    return dc._token_hashes(encoded, all(t.isascii() for t in texts))


def _token_path(texts):
    encoded = [" ".join(tokenize(t)).encode("utf-8", "surrogatepass") for t in texts]
    return dc._token_hashes(encoded, all(e.isascii() for e in encoded))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(unicode_texts, min_size=1, max_size=5))
def test_byte_tokenizer_cuts_the_same_tokens_as_tokenize(texts):
    """The numpy tokenizer of the fast path must agree with `tokenize`, or the filter could miss."""
    hashes, counts = _byte_path(texts)
    assert counts.tolist() == [len(tokenize(t)) for t in texts]
    expected_hashes, _ = _token_path(texts)
    assert np.array_equal(hashes, expected_hashes)


# ---------------------------------------------------------------------------------------------
# hand-made edge cases
# ---------------------------------------------------------------------------------------------
LONG = "The committee reviewed every proposal carefully before announcing which three projects would receive funding"


def test_short_item_contained_is_flagged_and_not_contained_is_not():
    items = [item("Who is Larry Page?")]  # 5 tokens < 8 ("?" is one)
    text = "Quick question: who is LARRY page? And what did he build?"
    assert matches_for(items, text) == []  # 5 of 14 tokens: not most of the row
    [m] = matches_for(items, text, short_items="anywhere")
    assert (m.score, m.matched_ngrams, m.item_ngrams, m.span) == (1.0, 1, 1, "who is LARRY page?")
    assert matches_for(items, "Who is Larry Page? Thanks")[0].score == 1.0  # 5 of 6 tokens
    assert matches_for(items, "Who is Larry Pages?", short_items="anywhere") == []
    # Its punctuation is part of the item: without the "?" it is another token sequence.
    assert matches_for(items, "who is larry page, please", short_items="anywhere") == []
    assert matches_for(items, "Larry Page: who is he?") == []
    assert matches_for(items, "who is larry") == []


def test_case_changes_do_not_hide_an_item_and_punctuation_counts_as_tokens():
    items = [item(LONG + ".")]  # 15 tokens
    [m] = matches_for(items, "THE COMMITTEE reviewed every PROPOSAL carefully before announcing which three "
                             "PROJECTS would receive funding. Thanks!")
    assert m.score == 1.0
    # An inserted comma is an inserted token, as in open-instruct: the 8-grams across it are lost
    # (tokens 5-14 stay covered), like a one-token edit.
    [m] = matches_for(items, LONG.replace("proposal", "proposal,") + ".")
    assert (m.covered_tokens, m.item_tokens) == (10, 15)


def test_item_embedded_in_a_longer_prompt_has_its_span():
    items = [item(LONG)]
    text = "Summarize this for me please. " + LONG.replace("committee", "Committee") + ". Keep it short, thanks."
    [m] = matches_for(items, text)
    assert m.span == LONG.replace("committee", "Committee")
    assert (m.benchmark, m.eval_id, m.source, m.eval_row_id) == ("bench", "e1", "bench_src", "bench-e1")


def test_item_split_across_user_turns_is_flagged():
    words = LONG.split()
    r = row(("user", " ".join(words[:7])), ("assistant", "Go on."),
            ("user", " ".join(words[7:]) + " What do you think?"))
    assert training_text(r, False) == " ".join(words[:7]) + "\n" + " ".join(words[7:]) + " What do you think?"
    [m] = matches_for([item(LONG)], training_text(r, False))
    assert m.score == 1.0


def test_unicode_accents_cjk_and_full_width():
    french = "Le café crème et la crêpe brûlée sont servis à la française chaque matin"
    nfd = unicodedata.normalize("NFD", french.upper())
    [m] = matches_for([item(french)], "Question : " + nfd + " ?")
    assert m.score == 1.0 and m.span == nfd  # the span is in the original (decomposed) text

    chinese = "我喜欢在公园里散步和看书"  # 12 standalone tokens, no spaces
    [m] = matches_for([item(chinese)], "今天天气很好。" + chinese + "，你呢？")
    assert m.score == 1.0 and m.span == chinese

    english = "What is the capital of France, and why is it famous"
    full_width = "ＷＨＡＴ　ＩＳ　ＴＨＥ　ＣＡＰＩＴＡＬ　ＯＦ　ＦＲＡＮＣＥ，　ＡＮＤ　ＷＨＹ　ＩＳ　ＩＴ　ＦＡＭＯＵＳ？"
    [m] = matches_for([item(english)], full_width)
    assert m.score == 1.0 and m.span == full_width[:-1]


def test_coverage_boundary_49_vs_50_percent():
    words = [f"w{i}" for i in range(107)]  # 100 distinct 8-grams
    items = [item(" ".join(words))]
    at_50 = " ".join(words[:57])  # windows 0..49: 50 n-grams
    at_49 = " ".join(words[:56])  # 49 n-grams
    [m] = matches_for(items, at_50, rule="ngram_share")
    assert (m.matched_ngrams, m.item_ngrams, m.score) == (50, 100, 0.5)
    assert matches_for(items, at_49, rule="ngram_share") == []
    assert matches_for(items, at_49, threshold=0.49, rule="ngram_share")[0].matched_ngrams == 49
    # Token coverage flags strictly above the threshold (open-instruct: ``score > match_threshold``).
    assert matches_for(items, " ".join(words[:53])) == []  # 53 of 107 tokens
    [m] = matches_for(items, " ".join(words[:54]))  # 54 of 107
    assert (m.covered_tokens, m.item_tokens, m.rule) == (54, 107, "token_coverage")
    assert matches_for(items, " ".join(words[:54]), threshold=54 / 107) == []


def test_coverage_counts_distinct_ngrams():
    phrase = "one two three four five six seven eight nine"
    items = [item(f"{phrase} {phrase} {phrase}")]  # 2 + 7 + ... repeated n-grams collapse
    distinct = {tuple(tokenize(items[0].text)[i:i + 8]) for i in range(len(tokenize(items[0].text)) - 7)}
    [m] = matches_for(items, f"{phrase} {phrase}")
    assert m.item_ngrams == len(distinct) == 9
    assert m.matched_ngrams == 9 and m.score == 1.0


def test_include_response_toggles_the_assistant_turn():
    items = [item(LONG)]
    index = EvalIndex.build(items)
    r = row(("user", "Tell me something."), ("assistant", LONG))
    for include, expected in ((False, 0), (True, 1)):
        step = Decontaminator(index, DecontamConfig(include_response=include), MemorySink())
        assert len(list(step([r]))) == 1 - expected
        assert len(step.quarantine) == expected


def test_empty_texts_and_empty_items():
    index = EvalIndex.build([item(""), item(" \n ", eval_id="e2"), item("Hi there", eval_id="e3")])
    assert [i.eval_id for i in index.skipped] == ["e1", "e2"]  # no tokens: never indexed
    results = index.match_texts(["", " ", "hi there", "Say: HI there, friend", "hi", "there hi"], 0.5,
                                short_items="anywhere")
    assert [[m.eval_id for m in r] for r in results] == [[], [], ["e3"], ["e3"], [], []]
    assert results[3][0].span == "HI there"
    assert reference_matches(index.items, "", 8, 0.5) == []
    assert EvalIndex.build([]).match_texts(["anything at all"], 0.5) == [[]]


def test_min_item_tokens_skips_tiny_items():
    items = [item("Hi there"), item(LONG, eval_id="e2")]
    index = EvalIndex.build(items, min_item_tokens=3)
    assert [i.eval_id for i in index.items] == ["e2"] and index.benchmarks == {"bench": 1}
    assert index.match_texts(["hi there " + LONG], 0.5)[0][0].eval_id == "e2"
    assert len(index.match_texts(["hi there " + LONG], 0.5)[0]) == 1


def test_every_item_at_threshold_is_reported_best_first():
    a = item(LONG, eval_id="a", benchmark="b1")
    b = item(LONG, eval_id="b", benchmark="b0")  # the same text in another benchmark
    c = item(LONG + " and nothing else", eval_id="c")  # 10 n-grams, 7 of them in LONG
    d = item(LONG + " and nothing else was decided by anyone there today", eval_id="d")  # 7 of 16: below
    result = matches_for([a, b, c, d], LONG, rule="ngram_share")
    assert [(m.benchmark, m.eval_id) for m in result] == [("b0", "b"), ("b1", "a"), ("bench", "c")]
    assert (result[2].matched_ngrams, result[2].item_ngrams, result[2].score) == (7, 10, 0.7)
    # By token coverage d is reported too: LONG is 14 of its 23 tokens.
    result = matches_for([a, b, c, d], LONG)
    assert [(m.eval_id, m.covered_tokens, m.item_tokens) for m in result[2:]] == [("c", 14, 17), ("d", 14, 23)]


def test_long_spans_are_truncated():
    long_item = " ".join(f"word{i}" for i in range(200))
    [m] = matches_for([item(long_item)], long_item)
    assert len(m.span) == dc.SPAN_MAX_CHARS and "…" in m.span
    assert m.span.startswith("word0 word1") and m.span.endswith("word199")


def test_hash_collisions_never_produce_matches(monkeypatch):
    """With every token hashing alike, every window is a candidate: only exact verification remains."""
    items = [item(LONG), item("Who is Larry Page?", eval_id="e2")]
    texts = [LONG, "who is larry page?", "completely different words " * 5, LONG.upper()[:60]]
    expected = EvalIndex.build(items).match_texts(texts, 0.5)
    monkeypatch.setattr(dc, "_mix", lambda hashes, pad: np.ones(len(hashes) + pad, np.uint64))
    degenerate = EvalIndex.build(items)
    assert degenerate.match_texts(texts, 0.5) == expected
    assert [bool(m) for m in expected] == [True, True, False, False]


# ---------------------------------------------------------------------------------------------
# the fast path equals the reference
# ---------------------------------------------------------------------------------------------
VOCAB = ["alpha", "beta", "Gamma", "delta", "épsilon", "ZETA", "eta", "θ", "猫", "x_1", "42", "the"]


@st.composite
def corpus(draw):
    words = st.lists(st.sampled_from(VOCAB), min_size=0, max_size=14)
    item_texts = draw(st.lists(words.map(" ".join), min_size=1, max_size=6))
    items = [item(t, eval_id=f"e{i}", benchmark=f"b{i % 2}") for i, t in enumerate(item_texts)]
    texts = []
    for _ in range(draw(st.integers(1, 6))):
        parts = draw(st.lists(st.one_of(words.map(" ".join), st.sampled_from(item_texts)), max_size=4))
        texts.append(draw(st.sampled_from([", ", "\n", " ", "!? "])).join(parts))
    return items, texts, draw(st.sampled_from([1, 2, 3, 4, 8])), draw(st.sampled_from([0.01, 0.3, 0.5, 1.0]))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(corpus())
def test_fast_path_equals_reference_property(case):
    items, texts, ngram, threshold = case
    index = EvalIndex.build(items, ngram=ngram)
    for rule in ("token_coverage", "ngram_share"):
        for policy in ("share", "anywhere"):
            assert index.match_texts(texts, threshold, rule, policy) == [
                reference_matches(index.items, t, ngram, threshold, rule, policy) for t in texts]


def test_fast_path_equals_reference_on_real_items(bundle):
    """A few thousand random rows of real vocabulary, a tenth of them with planted eval items."""
    items = source_items("vicuna_bench", "gsm8k_test", "mbpp", "truthfulqa", "alpaca_eval", "humaneval")
    rng = random.Random(7)
    vocabulary = [w for r in source_rows("gsm8k_train")[:400] for w in r["messages"][0]["content"].split()]
    texts, planted = [], {}
    for i in range(3000):
        words = rng.choices(vocabulary, k=rng.randint(0, 120))
        if i % 10 == 0:
            chosen = rng.choice(items)
            text = chosen.text if i % 20 else chosen.text.upper()
            words.insert(rng.randint(0, len(words)), text[: len(text) * rng.choice([1, 1, 2]) // 2])
            planted[i] = chosen
        texts.append(" ".join(words))
    index = EvalIndex.build(items)
    fast = index.match_texts(texts, 0.5, short_items="anywhere")
    assert fast == [reference_matches(index.items, t, 8, 0.5, short_items="anywhere") for t in texts]
    for rule in ("token_coverage", "ngram_share"):
        assert index.match_texts(texts, 0.5, rule) == [reference_matches(index.items, t, 8, 0.5, rule) for t in texts]
    whole = [i for i in planted if planted[i].text in texts[i] or planted[i].text.upper() in texts[i]]
    assert whole and all(any(m.eval_row_id == planted[i].row_id for m in fast[i]) for i in whole)


def test_sharded_index_equals_the_whole_index_on_random_rows(bundle):
    """Parts by n-gram hash, their verified windows scored together: the whole index's matches."""
    items = source_items("vicuna_bench", "gsm8k_test", "mbpp", "truthfulqa", "alpaca_eval", "humaneval")
    items.append(item("Who is Larry Page?", eval_id="short"))  # a short item: its own table entry
    rng = random.Random(11)
    vocabulary = [w for r in source_rows("gsm8k_train")[:400] for w in r["messages"][0]["content"].split()]
    turns = []
    for i in range(1500):
        words = rng.choices(vocabulary, k=rng.randint(0, 80))
        if i % 5 == 0:  # pieces of one or two items, so a pair's n-grams fall into different parts
            for chosen in rng.sample(items, rng.choice([1, 2])):
                cut = rng.randint(0, len(chosen.text) // 2)
                words.insert(rng.randint(0, len(words)), chosen.text[cut:cut + len(chosen.text) * 2 // 3])
        text = " ".join(words)
        turns.append([text, "Who is Larry Page?"] if i % 50 == 0 else [text])
    texts = ["\n".join(t) for t in turns]
    index = EvalIndex.build(items)
    head, parts = index.partition(3)
    assert sum(len(p._main_hash) for p in parts) == len(index._main_hash)
    assert all(len(p._main_hash) for p in parts) and not len(head._main_hash)
    sharded = ShardedEvalIndex(head, LocalShards(parts))
    for rule in ("token_coverage", "ngram_share"):
        for policy in ("share", "anywhere", "ignore"):
            whole = index.match_texts(texts, 0.5, rule, policy, turns)
            assert sum(map(bool, whole)) > 100
            assert sharded.match_texts(texts, 0.5, rule, policy, turns) == whole
    # pairs that pass only on the union of their parts' windows (no part alone reaches the threshold)
    alone = [ShardedEvalIndex(head, LocalShards([p])).match_texts(texts, 0.5, turns=turns) for p in parts]
    whole = index.match_texts(texts, 0.5, turns=turns)
    split = [(k, m.eval_row_id) for k, ms in enumerate(whole) for m in ms
             if all(m.eval_row_id not in {a.eval_row_id for a in part[k]} for part in alone)]
    assert len(split) > 10 and sharded.last_windows_bytes > 0


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(corpus(), st.sampled_from([1, 2, 3, 5]))
def test_sharded_index_equals_the_whole_index_property(case, shards):
    items, texts, ngram, threshold = case
    index = EvalIndex.build(items, ngram=ngram)
    sharded = ShardedEvalIndex(*(lambda h, p: (h, LocalShards(p)))(*index.partition(shards)))
    for rule in ("token_coverage", "ngram_share"):
        assert sharded.match_texts(texts, threshold, rule, "anywhere") == index.match_texts(texts, threshold, rule,
                                                                                           "anywhere")


# ---------------------------------------------------------------------------------------------
# the streaming step
# ---------------------------------------------------------------------------------------------
def test_decontaminator_events_order_quarantine_and_stats():
    items = [item(LONG, eval_id="q1", benchmark="b1"), item("Who is Larry Page?", eval_id="q2", benchmark="b2")]
    index = EvalIndex.build(items)
    rows = [row(("user", f"clean row number {i}"), row_id=f"r{i}", source="s1" if i % 2 else "s2") for i in range(10)]
    rows[3] = row(("system", "Be brief."), ("user", f"Please: {LONG}."), ("user", "Also, who is Larry Page?"),
                  row_id="r3", source="s1")  # the short item is most of its own turn
    rows[8] = row(("user", "who is larry page?"), row_id="r8", source="s2")
    sink = MemorySink()
    step = Decontaminator(index, DecontamConfig(), sink, batch_size=3)
    kept = list(step(iter(rows)))
    assert [r["row_id"] for r in kept] == [f"r{i}" for i in range(10) if i not in (3, 8)]
    assert [e["row_id"] for e in sink.events] == [f"r{i}" for i in range(10)]  # one event per row, in order
    events = {e["row_id"]: e for e in sink.events}
    assert all(events[f"r{i}"]["event"] == "kept" and events[f"r{i}"]["decision"] == "clean" for i in (0, 1, 9))
    e3 = events["r3"]
    assert (e3["event"], e3["decision"], e3["reason"]) == ("quarantined", "contaminated",
                                                           "b1:q1 token_coverage 1.00")
    assert e3["related_ids"] == ["b1-q1", "b2-q2"]
    assert e3["details"]["ngram"] == 8 and e3["details"]["threshold"] == 0.5
    assert e3["details"]["rule"] == "token_coverage" and e3["details"]["benchmarks"] == ["b1", "b2"]
    assert [m["eval_id"] for m in e3["details"]["matches"]] == ["q1", "q2"]
    assert set(e3["details"]["matches"][0]) == {"benchmark", "eval_id", "source", "eval_row_id", "score",
                                                "matched_ngrams", "item_ngrams", "span", "rule", "covered_tokens",
                                                "item_tokens", "spans"}
    assert [q["row"]["row_id"] for q in step.quarantine] == ["r3", "r8"]
    q = step.quarantine[0]["matches"][0]
    assert (q.benchmark, q.eval_id, q.score, q.span) == ("b1", "q1", 1.0, LONG)
    assert step.stats.rows == 10 and step.stats.clean == 8 and step.stats.quarantined == 2
    assert step.stats.removed == {("s1", "b1"): 1, ("s1", "b2"): 1, ("s2", "b2"): 1}
    assert step.stats.eval_ids_hit == {"b1": {"q1"}, "b2": {"q2"}}
    assert step.stats.as_dict()["removed"] == {"s1/b1": 1, "s1/b2": 1, "s2/b2": 1}


def test_config_validation_and_index_mismatch():
    assert DecontamConfig().model_dump() == {"ngram": 8, "threshold": 0.5, "rule": "token_coverage",
                                             "short_items": "share", "include_response": False,
                                             "min_item_tokens": 1}
    for bad in ({"threshold": 0}, {"threshold": 1.5}, {"ngram": 0}, {"min_item_tokens": 0}, {"n": 8}):
        with pytest.raises(ValidationError):
            DecontamConfig(**bad)
    index = EvalIndex.build([item(LONG)], ngram=13)
    with pytest.raises(ValueError, match="ngram=13"):
        Decontaminator(index, DecontamConfig(), MemorySink())
    with pytest.raises(ValueError, match="threshold"):
        index.match_texts(["x"], 0)


def test_eval_items_and_training_text_from_rows(bundle):
    [mt] = [i for i in source_items("mt_bench") if i.eval_id == "81"]
    assert mt.text.count("\n") >= 1  # both turns of a multi-turn prompt
    r = row(("system", "S"), ("user", "U1"), ("assistant", "A"), ("user", "U2"))
    assert training_text(r, False) == "S\nU1\nU2"
    assert training_text(r, True) == "S\nU1\nA\nU2"
