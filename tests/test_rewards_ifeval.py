"""IFEval verifier: every instruction type passes and fails on hand-written responses; strict vs loose;
kwargs validation; the constraint sampler."""

from __future__ import annotations

import json
import random
import re
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tulu_pipeline.rewards import ifeval as _ifeval
from tulu_pipeline.rewards import verify
from tulu_pipeline.rewards.constraints import INSTRUCTION_TYPES, NOT_SAMPLED, conflicts, sample_constraints
from tulu_pipeline.rewards.ifeval import ConstraintError, count_sentences, word_tokens

ENGLISH = ("The quick brown fox jumps over the lazy dog near the river bank every single morning. "
           "It is a very common sentence used to test typewriters and computer keyboards.")

# instruction id -> (kwargs, a response that follows it, a response that does not)
CASES = {
    "keywords:existence": ({"keywords": ["river", "C++"]}, "I code C++ by the River.", "I code Python by the lake."),
    "keywords:frequency": ({"keyword": "cat", "frequency": 3, "relation": "at least"},
                           "A cat, a Cat and a CAT.", "A cat and a dog."),
    "keywords:forbidden_words": ({"forbidden_words": ["war", "peace"]},
                                 "Warfare and peaceful times.", "Tolstoy wrote War and Peace."),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": "less than"},
                                  "A zebra.", "Zany zebras buzz."),
    "language:response_language": ({"language": "fr"},
                                   ("Le renard brun rapide saute par-dessus le chien paresseux tous les matins "
                                    "près de la rivière, et c'est une phrase très connue."), ENGLISH),
    "length_constraints:number_sentences": ({"num_sentences": 3, "relation": "less than"},
                                            "Dr. Smith paid $3.50 at 4 p.m. on Monday. He left.",
                                            "One. Two. Three. Four."),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "First part.\n***\nSecond part.",
                                             "First part.\n***\n***\nSecond part."),
    "length_constraints:number_words": ({"num_words": 5, "relation": "at least"},
                                        "one two three four five", "one two three four"),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        "Intro here.\n\n\"However, the second.\"", "Intro here.\n\nBut the second."),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "Dear [name], at [address].",
                                               "Dear [name], at home."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Hello.\n\nP.S. see you soon",
                                      "Hello.\n\nPS see you soon"),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "List:\n* one\n- two", "List:\n* one\n* two\n* three"),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Yes, definitely."),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, "*intro* and **details**",
                                                      "*intro* and ** **"),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            "Section 1\nfoo\nSection 2\nbar", "Section 1\nfoo and bar"),
    "detectable_format:json_format": ({}, '```json\n{"a": 1}\n```', '{"a": 1} and more'),
    "detectable_format:title": ({}, "<<A poem of joy>>\nRoses are red.", "<< >>\nRoses are red."),
    "combination:two_responses": ({}, "First answer.\n******\nSecond answer.", "Same.\n******\nSame."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Write a poem about cats."},
                                  "write a poem about cats. Cats are soft.", "Here is a poem about cats."),
    "startend:end_checker": ({"end_phrase": "Any other questions?"}, "Done here. Any other questions?\"",
                             "Any other questions? Done."),
    "change_case:capital_word_frequency": ({"capital_frequency": 3, "capital_relation": "at least"},
                                           "THIS is VERY important, DON'T forget.",
                                           "This is very Important."),
    "change_case:english_capital": ({}, ENGLISH.upper(), ENGLISH),
    "change_case:english_lowercase": ({}, ENGLISH.lower(), ENGLISH),
    "punctuation:no_comma": ({}, "No commas here at all.", "Well, there is one."),
    "startend:quotation": ({}, '  "Wrapped in quotes."  ', '"Not closed.'),
}


def test_cases_cover_all_25_types():
    assert len(INSTRUCTION_TYPES) == 25
    assert set(CASES) == set(INSTRUCTION_TYPES)


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_each_instruction_passes_and_fails(instruction_id):
    kwargs, good, bad = CASES[instruction_id]
    constraints = {"instruction_id_list": [instruction_id], "kwargs": [kwargs]}
    passed = verify("ifeval", good, constraints=constraints)
    failed = verify("ifeval", bad, constraints=constraints)
    assert passed.ok and passed.score == 1.0, passed.reason
    assert not failed.ok and failed.score == 0.0, failed.reason
    assert instruction_id in failed.reason
    assert failed.details["instructions"][0]["instruction_id"] == instruction_id


def test_score_is_fraction_and_reason_names_failures():
    constraints = {"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words",
                                           "detectable_format:title"],
                   "kwargs": [{}, {"num_words": 50, "relation": "at least"}, {}]}
    verdict = verify("ifeval", "<<Title>>\nShort text, with a comma.", constraints=constraints)
    assert verdict.score == pytest.approx(1 / 3)
    assert not verdict.ok
    assert verdict.details["follow_instruction_list"] == [False, False, True]
    assert "punctuation:no_comma (1 commas)" in verdict.reason
    assert "length_constraints:number_words (6 words, needs at least 50)" in verdict.reason


def test_loose_mode_tries_the_official_variants():
    # a chatty first line breaks "start with" style checks in strict mode only
    constraints = {"instruction_id_list": ["startend:quotation"], "kwargs": [{}]}
    response = 'Sure, here it is:\n"The whole answer, quoted."'
    assert not verify("ifeval", response, constraints=constraints, mode="strict").ok
    loose = verify("ifeval", response, constraints=constraints, mode="loose")
    assert loose.ok and "loose variant" in loose.details["instructions"][0]["observed"]
    # markdown bold makes the no-asterisk variant follow a highlight-free constraint
    title = {"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}
    assert not verify("ifeval", "**Note**\nthis is all lowercase text about the river and trees.",
                      constraints=title, mode="strict").ok
    assert verify("ifeval", "**Note**\nthis is all lowercase text about the river and trees.",
                  constraints=title, mode="loose").ok


def test_empty_response_follows_nothing():
    verdict = verify("ifeval", "   ", constraints={"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
    assert not verdict.ok and "empty response" in verdict.reason


def test_hf_style_null_kwargs_are_ignored():
    kwargs = {"num_words": 3, "relation": "at least", "keywords": None, "language": None}
    verdict = verify("ifeval", "one two three", constraints={
        "instruction_id_list": ["length_constraints:number_words"], "kwargs": [kwargs]})
    assert verdict.ok


@pytest.mark.parametrize("constraints, message", [
    ({"instruction_id_list": ["made:up"], "kwargs": [{}]}, "unknown IFEval instruction id"),
    ({"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_words": 3}]}, "missing kwargs"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"extra": 1}]}, "unexpected kwargs"),
    ({"instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 3, "relation": "at most"}]}, "relation must be one of"),
    ({"instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": "3", "relation": "at least"}]}, "non-negative integer"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}, "one object per instruction"),
    ({"instruction_id_list": []}, "non-empty list"),
    (None, "needs constraints"),
])
def test_invalid_constraints_raise(constraints, message):
    with pytest.raises(ConstraintError, match=message):
        verify("ifeval", "text", constraints=constraints)


def test_sentence_and_word_tokenization_edge_cases():
    assert count_sentences("Dr. Smith went to Washington. He arrived at 3 p.m. on Monday!") == 2
    assert count_sentences("The U.S. economy grew 3.5% in 2023. Prices rose, e.g. rent. I won't let him win. "
                           "I'm here.") == 4
    assert count_sentences("") == 0
    assert word_tokens("DON'T stop, WELL-KNOWN AT&T.") == ["DO", "N'T", "stop", ",", "WELL-KNOWN", "AT", "&", "T"]


def test_language_detection_is_deterministic():
    constraints = {"instruction_id_list": ["language:response_language"], "kwargs": [{"language": "en"}]}
    text = "Ok sure yes"  # short, ambiguous text: langdetect's answer depends on its seed
    results = {verify("ifeval", text, constraints=constraints).ok for _ in range(5)}
    assert len(results) == 1


def test_verify_works_from_a_worker_thread():
    kwargs, good, _ = CASES["length_constraints:number_sentences"]
    out = []
    thread = threading.Thread(target=lambda: out.append(verify("ifeval", good, constraints={
        "instruction_id_list": ["length_constraints:number_sentences"], "kwargs": [kwargs]})))
    thread.start()
    thread.join(timeout=60)
    assert out and out[0].ok


def test_sample_constraints_is_deterministic_compatible_and_verifiable():
    seen = set()
    for seed in range(240):
        k = 1 + seed % 3
        sample = sample_constraints(random.Random(seed), k=k)
        assert sample == sample_constraints(random.Random(seed), k=k)
        ids = sample["instruction_id_list"]
        assert len(ids) == k == len(sample["kwargs"]) == len(set(ids))
        assert not any(conflicts(a, b) for i, a in enumerate(ids) for b in ids[i + 1:])
        assert not set(ids) & NOT_SAMPLED
        assert isinstance(sample["instruction_text"], str) and sample["instruction_text"]
        json.dumps(sample)  # stored with prompts as JSON
        # the verifier accepts every sampled constraint set
        verdict = verify("ifeval", "Some response text.", constraints=sample)
        assert len(verdict.details["instructions"]) == k
        seen.update(ids)
    assert seen == set(INSTRUCTION_TYPES) - NOT_SAMPLED


def test_sample_constraints_text_matches_kwargs():
    sample = sample_constraints(random.Random(7), k=1)
    for kwargs in sample["kwargs"]:
        for value in kwargs.values():
            if isinstance(value, (str, int)):
                assert str(value) in sample["instruction_text"]
    with pytest.raises(ValueError, match="between 1 and 6"):
        sample_constraints(random.Random(0), k=0)


# ---- the linear-time rewrites match the official regexes exactly ----------------------------------------


_TEXT = st.text(alphabet="[]<>*-pPsS. \t\n\rax1", max_size=60)


def _official_bullets(text):
    return (len(re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE))
            + len(re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)))


@settings(max_examples=400, deadline=None)
@given(_TEXT)
def test_linear_checks_equal_official_regexes(text):
    _assert_linear_equals_official(text)


def _assert_linear_equals_official(text):
    assert _ifeval._count_placeholders(text) == len(re.findall(r"\[.*?\]", text))
    assert _ifeval._has_title(text) == any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))
    assert _ifeval._number_bullet_lists(text, num_bullets=_official_bullets(text))[0]
    for marker, official in (("P.S.", r"\s*p\.\s?s\..*$"), ("P.P.S", r"\s*p\.\s?p\.\s?s.*$")):
        expected = bool(re.findall(official, text.lower(), flags=re.MULTILINE))
        assert _ifeval._postscript(text, postscript_marker=marker)[0] == expected


# Bounded: each of these took tens of seconds with the official (quadratic) regexes at this size; the linear
# rewrites take well under a second each, so a quadratic regression trips the timeout instead of slowing CI.
@pytest.mark.timeout(60)
def test_pathological_responses_finish():
    for text in ("[" * 20000, "<" * 20000, "\n" * 20000 + "x*", " " * 20000 + "xp.s"):
        for instruction_id, (kwargs, _, _) in CASES.items():
            if instruction_id != "language:response_language":
                followed, note = _ifeval.check_instruction(
                    instruction_id, _ifeval.normalize_kwargs(instruction_id, kwargs), text, "loose")
                assert isinstance(followed, bool) and isinstance(note, str) and note, (instruction_id, note)
    # the four rewrites still agree with the official regexes on these shapes, at a size the regexes handle
    for text in ("[" * 300, "<" * 300, "\n" * 300 + "x*", " " * 300 + "xp.s"):
        _assert_linear_equals_official(text)
    deep = verify("ifeval", "[" * 5000, constraints={"instruction_id_list": ["detectable_format:json_format"],
                                                      "kwargs": [{}]})
    assert not deep.ok and "nested too deeply" in deep.reason
