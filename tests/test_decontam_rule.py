"""Tülu 3's decontamination rule: parity with open-instruct's scoring, the independent re-check, and
the acceptance cases (edited items, prefixes) generated from the bundled benchmarks."""

from __future__ import annotations

import random
import unicodedata
from collections import Counter, defaultdict
from functools import lru_cache

import pytest

from tulu_pipeline.curation.acceptance import Case, acceptance_cases, case_passes, score_cases, unrelated_words
from tulu_pipeline.curation.decontaminate import (
    DecontamConfig,
    EvalIndex,
    EvalItem,
    reference_matches,
    registry_eval_items,
    tokenize,
)
from tulu_pipeline.curation.overlap_check import OverlapChecker, words


# ---------------------------------------------------------------------------------------------
# open-instruct's scoring, ported
# ---------------------------------------------------------------------------------------------
# From allenai/open-instruct, decontamination/search.py, `get_ngram_mapping` and the per-query-string
# loop of `ngram_match` (the score of each training document), with `match_threshold` applied as in
# `main` (``score > args.match_threshold``). Two substitutions, marked: spaCy's tokenizer becomes our
# `tokenize` (spaCy-like: punctuation at a word's edges is tokens, inside a word it stays), and Elasticsearch's ``match_phrase`` filter (the n-gram's analyzed tokens appear
# contiguously in the document) becomes membership in the document's n-gram set. The dict keyed by
# n-gram text is kept as written: a repeated n-gram maps to its *last* occurrence's token indices.
def get_ngram_mapping(string: str, n: int):
    doc = tokenize(string)  # was: SPACY_MODEL(string)
    ngram_docs = [(i, doc[i:i + n]) for i in range(len(doc) - n + 1)]
    # Mapping from the ngram to the indices of tokens in the original string.
    mapping = {" ".join(ngram_doc): list(range(i, i + n)) for i, ngram_doc in ngram_docs}
    return mapping


def phrase_index(train_docs: dict[str, str], ngram_size: int) -> dict[str, set[str]]:
    """Stands in for the Elasticsearch index: n-gram text -> ids of the documents containing it."""
    docs_with = defaultdict(set)
    for doc_id, text in train_docs.items():
        t = tokenize(text)
        for i in range(len(t) - ngram_size + 1):
            docs_with[" ".join(t[i:i + ngram_size])].add(doc_id)
    return docs_with


def open_instruct_scores(query_string: str, docs_with: dict[str, set[str]], ngram_size: int) -> dict[str, float]:
    query_string_tokens = tokenize(query_string)  # was: [d.text for d in SPACY_MODEL(query_string)]
    query_string_length = len(query_string_tokens)
    ngram_mapping = get_ngram_mapping(query_string, ngram_size)
    train_doc_matches = defaultdict(set)
    for ngram, tokens in ngram_mapping.items():
        for doc_id in docs_with.get(ngram, ()):  # was: es.search(... match_phrase ngram ...)["hits"]["hits"]
            train_doc_matches[doc_id].update(tokens)
    return {doc_id: len(matching_tokens) / query_string_length for doc_id, matching_tokens in train_doc_matches.items()}


def item(text: str, eval_id: str = "e1") -> EvalItem:
    return EvalItem(benchmark="bench", eval_id=eval_id, source="bench_src", row_id=f"bench-{eval_id}", text=text)


@lru_cache(maxsize=None)
def bundle_items() -> tuple[EvalItem, ...]:
    return tuple(registry_eval_items())


@lru_cache(maxsize=None)
def filler_words() -> tuple[str, ...]:
    return tuple(unrelated_words())


def generated_texts(items: list[EvalItem], rng: random.Random, count: int) -> list[str]:
    """Training texts around real items: edited copies, prefixes, fragments, and two items glued."""
    filler = filler_words()
    texts = []
    for _ in range(count):
        words_ = rng.choice(items).text.split()
        kind = rng.randrange(5)
        if kind == 0 and words_:
            words_[rng.randrange(len(words_))] = "zebra"
        elif kind == 1:
            words_ = words_[:max(1, int(len(words_) * rng.uniform(0.2, 0.9)))]
        elif kind == 2:
            lo = rng.randrange(len(words_) or 1)
            words_ = words_[lo:lo + rng.randint(8, 30)]
        elif kind == 3:
            words_ = words_ + rng.choice(items).text.split()[: rng.randint(0, 20)]
        at = rng.randrange(len(filler) - 60)
        cut = rng.randint(0, 40)
        texts.append(" ".join([*filler[at:at + cut], *words_, *filler[at + cut:at + cut + rng.randint(0, 20)]]))
    return texts


def test_token_coverage_equals_open_instruct_on_generated_cases(bundle):
    rng = random.Random(3)
    pool = [i for i in bundle_items() if i.benchmark in ("gsm8k", "mbpp", "ifeval", "truthfulqa", "bbh")]
    items = [i for i in rng.sample(pool, 400) if len(tokenize(i.text)) >= 8]
    index = EvalIndex.build(items)
    texts = generated_texts(items, rng, 1500)
    ours = index.match_texts(texts, 0.5, "token_coverage", "ignore")  # open-instruct never scores short items
    docs = phrase_index({str(k): t for k, t in enumerate(texts)}, 8)
    compared = repeated = 0
    for it in items:
        theirs = open_instruct_scores(it.text, docs, 8)
        toks = tokenize(it.text)
        has_repeat = len({tuple(toks[p:p + 8]) for p in range(len(toks) - 7)}) < len(toks) - 7
        repeated += has_repeat
        for k, matches in enumerate(ours):
            mine = next((m.score for m in matches if m.eval_row_id == it.row_id), None)
            their_score = theirs.get(str(k), 0.0)
            flagged_theirs = their_score > 0.5
            if has_repeat:
                # Their dict keeps one occurrence per repeated n-gram; we count every occurrence,
                # so our score is never lower.
                assert mine is not None or not flagged_theirs
                continue
            assert (mine is not None) == flagged_theirs, (it.text, texts[k], their_score)
            if mine is not None:
                assert mine == pytest.approx(their_score, abs=1e-12)
                compared += 1
    assert compared >= 300  # the cases do exercise the rule, not only clean texts
    assert repeated < len(items)


def test_repeated_ngrams_count_every_occurrence():
    phrase = "one two three four five six seven eight"
    it = item(f"{phrase} nine {phrase}")  # the same 8-gram twice: 17 tokens
    [[m]] = EvalIndex.build([it]).match_texts([phrase], 0.4)
    assert (m.covered_tokens, m.item_tokens) == (16, 17)  # both occurrences are covered
    assert open_instruct_scores(it.text, phrase_index({"d": phrase}, 8), 8)["d"] == 8 / 17  # theirs: the last one


# ---------------------------------------------------------------------------------------------
# the independent re-check
# ---------------------------------------------------------------------------------------------
def test_independent_tokenizer_agrees_with_tokenize():
    samples = ["Hello, WORLD!! it's 3.5 o'clock", "Ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ", "我喜欢在公园里散步", "カタカナとひらがな",
               "naïve café crème", "नमस्ते दुनिया", "snake_case and kebab-case", "x²+y² ≤ z²", "emoji 🎉 party",
               "ﬁne ﬂour", "Straße STRASSE", "ǅemal", "𠀀𠀁 astral han", "𐐷 deseret", "\u3005\u3007\u30fc",
               "(a+b)... don't stop", "好。a,b", "$x^2$, 3.5%!", "--", "“quoted”—dash", "a\u200bb\u00a0c"]
    for text in samples:
        assert words(text) == tokenize(text), text


def test_independent_tokenizer_agrees_on_every_code_point():
    """Each assigned code point between letters, alone, and at a word's end, as `tokenize` cuts it."""
    cps = [cp for cp in range(0x110000) if unicodedata.category(chr(cp)) not in ("Cn", "Co", "Cs")]
    for lo in range(0, len(cps), 2000):
        chars = [chr(cp) for cp in cps[lo:lo + 2000]]
        for text in (" ".join(f"a{c}b" for c in chars), " ".join(chars), " ".join(f"x{c}" for c in chars)):
            assert words(text) == tokenize(text)


@pytest.mark.parametrize("rule", ["token_coverage", "ngram_share"])
@pytest.mark.parametrize("policy", ["share", "anywhere", "ignore"])
def test_independent_checker_agrees_with_the_fast_path(bundle, rule, policy):
    rng = random.Random(11)
    items = rng.sample(bundle_items(), 1500)
    index = EvalIndex.build(items)
    checker = OverlapChecker([i.text for i in index.items], 8, 0.5, rule, policy)
    texts = generated_texts(index.items, rng, 600)
    turn_sets = [t.split(" zebra ") if k % 3 == 0 else [t] for k, t in enumerate(texts)]  # some multi-turn rows
    fast = index.match_texts(["\n".join(ts) for ts in turn_sets], 0.5, rule, policy, turn_sets)
    position = {it.row_id: k for k, it in enumerate(index.items)}
    for ts, matches in zip(turn_sets, fast):
        theirs = {(o.item, round(o.score, 12)) for o in checker.overlaps(ts)}
        assert {(position[m.eval_row_id], round(m.score, 12)) for m in matches} == theirs


# ---------------------------------------------------------------------------------------------
# acceptance: edited items and prefixes from every bundled benchmark
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def cases() -> tuple[Case, ...]:
    return tuple(acceptance_cases(bundle_items(), unrelated_words(), seed=0))


def test_acceptance_cases_pass_at_95_percent(bundle):
    """Issue #23: one-word mid-item edits (16-40 words) and 62% prefixes (22+ words) are quarantined,
    30% prefixes followed by unrelated text stay clean, each at >= 95%, over every bundled benchmark."""
    result = score_cases(cases())
    # Measured: 7868/7872 edits, 11341/11915 prefixes (HumanEval 69%: its signature and docstring
    # come first, and 62% of the words can be under half of the tokens of a code item; MATH 91%),
    # 11879/11915 short prefixes clean.
    assert result["edit"]["share"] >= 0.95, result["edit"]
    assert result["prefix"]["share"] >= 0.95, result["prefix"]
    assert result["prefix_unrelated"]["share"] >= 0.95, result["prefix_unrelated"]
    made_from = set(result["edit"]["by_benchmark"]) | set(result["prefix"]["by_benchmark"])
    assert made_from == {i.benchmark for i in bundle_items()}  # every bundled benchmark contributes
    assert result["edit"]["cases"] > 7000 and result["prefix"]["cases"] == result["prefix_unrelated"]["cases"] > 10_000
    # The former default (distinct-8-gram share, short items anywhere) misses them: why the default changed.
    before = score_cases(cases(), DecontamConfig(rule="ngram_share", short_items="anywhere"))
    assert before["edit"]["share"] < 0.9 and before["prefix"]["share"] < 0.9


def test_acceptance_scoring_per_item_equals_the_fast_path(bundle):
    """`score_cases` scores each case against its own item with the plain implementation; the fast
    path (an index over many items) decides the same for that item."""
    rng = random.Random(9)
    sample = rng.sample(cases(), 600)
    index = EvalIndex.build({c.item.row_id: c.item for c in sample}.values())
    config = DecontamConfig()
    fast = index.match_texts([c.text for c in sample], config.threshold)
    alone = [reference_matches([c.item], c.text, 8, config.threshold) for c in sample]
    for case, many, one in zip(sample, fast, alone):
        assert case_passes(case, many, whole_row=False) == case_passes(case, one, whole_row=False), case
    assert Counter(c.kind for c in sample).keys() == {"edit", "prefix", "prefix_unrelated"}


def test_acceptance_cases_are_deterministic_and_as_described():
    items = [item(" ".join(f"w{k}" for k in range(30)))]
    filler = [f"f{k}" for k in range(300)]
    made = acceptance_cases(items, filler, seed=1)
    assert made == acceptance_cases(items, filler, seed=1)
    by_kind = {c.kind: c.text.split() for c in made}
    assert by_kind["edit"][:15] == [f"w{k}" for k in range(15)] and by_kind["edit"][16:] == [f"w{k}" for k in range(16, 30)]
    assert by_kind["edit"][15].startswith("f")  # the middle word replaced
    assert by_kind["prefix"] == [f"w{k}" for k in range(19)]  # round(0.62 * 30)
    assert by_kind["prefix_unrelated"][:9] == [f"w{k}" for k in range(9)]  # int(0.3 * 30)
    assert 40 <= len(by_kind["prefix_unrelated"]) - 9 <= 120 and by_kind["prefix_unrelated"][9].startswith("f")
