"""Normalization: text cleanup on hand-made edge cases, and the step over every real training source."""

from __future__ import annotations

import unicodedata

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tulu_pipeline.curation.normalize import NormalizeConfig, Normalizer, looks_like_code, normalize_text
from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import get_source
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.provenance.ledger import MemorySink

TRAIN_SOURCES = ("gsm8k_train", "math_train", "code_alpaca", "self_instruct_seed", "hh_rlhf_harmless", "fine_grained_rlhf_qa")


def make_row(*messages: tuple[str, object], row_id: str = "t-1", **fields) -> dict:
    return {"row_id": row_id, "source": "t", "source_key": "t.jsonl:1", "license": "MIT",
            "messages": [{"role": role, "content": content} for role, content in messages], **fields}


def run(rows, **config):
    sink = MemorySink()
    step = Normalizer(NormalizeConfig(**config), sink)
    out = list(step(rows))
    return out, step, sink


@pytest.fixture(scope="module")
def train_rows(bundle) -> dict[str, list[dict]]:
    return {source: list(iter_source_rows(get_source(source), root=bundle)) for source in TRAIN_SOURCES}


# ---------------------------------------------------------------------------------------------
# normalize_text
# ---------------------------------------------------------------------------------------------
def test_nfc_composes_decomposed_characters():
    text, changes = normalize_text("Cafe\u0301 cre\u0300me")
    assert text == "Caf\u00e9 cr\u00e8me"
    assert changes == ["nfc"]


def test_newlines_unified_and_blank_runs_capped():
    text, changes = normalize_text("a\r\nb\rc\u2028d\r\n\r\n\r\n\r\ne")
    assert text == "a\nb\nc\nd\n\ne"
    assert changes == ["newlines", "whitespace"]


def test_nbsp_zero_width_and_exotic_spaces():
    text, changes = normalize_text("ten\u00a0dollars, thin\u2009space,\u3000ideo, zero\u200bwidth, bom\ufeff")
    assert text == "ten dollars, thin space, ideo, zerowidth, bom"
    assert changes == ["zero_width", "exotic_whitespace"]


def test_zero_width_joiner_kept():
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"
    assert normalize_text(family) == (family, [])


def test_space_and_tab_runs_collapsed_in_prose():
    text, changes = normalize_text("  Hello   world,\t\tthis  is\t prose.   \nNext  line.  ")
    assert text == "Hello world, this is prose.\nNext line."
    assert changes == ["whitespace"]


def test_nul_and_control_characters_removed():
    text, changes = normalize_text("a\x00b\x07c\x1bd\x7fe\x9ff\tg")
    assert text == "abcdef g"
    assert changes == ["control_chars", "whitespace"]


def test_unchanged_text_reports_no_changes():
    text = "Natalia sold clips to 48 of her friends in April.\n\nHow many clips did she sell?"
    assert normalize_text(text) == (text, [])


def test_code_indentation_and_inner_spacing_preserved():
    code = "def f(x):\n    if x:\n\treturn 'a  b'\n    return None   \n\n\n\n\nclass C:\n        pass"
    text, changes = normalize_text(code)
    assert looks_like_code(code)
    assert text == "def f(x):\n    if x:\n\treturn 'a  b'\n    return None\n\n\nclass C:\n        pass"
    assert changes == ["whitespace"]


def test_fenced_code_keeps_indentation():
    text = "Here is the fix:\n\n```python\nfor i in range(3):\n  print(i,  i)\n```"
    assert normalize_text(text) == (text, [])


def test_real_code_alpaca_indentation_preserved(train_rows):
    by_key = {row["source_key"]: row for row in train_rows["code_alpaca"]}
    factorial = by_key["train/code_alpaca/code_alpaca_2k.json#46"]["messages"][1]["content"]
    assert "\n        product = product * x" in factorial
    assert normalize_text(factorial) == (factorial, [])
    # NBSP-indented code becomes space-indented code, still valid Python
    celsius = by_key["train/code_alpaca/code_alpaca_2k.json#1589"]["messages"][1]["content"]
    text, changes = normalize_text(celsius)
    assert text == "def fahrenheit_to_celsius(f):\n    return (f - 32) * 5/9"
    assert changes == ["exotic_whitespace"]
    compile(text, "celsius", "exec")


def test_every_humaneval_prompt_keeps_its_indentation(bundle):
    rows = list(iter_source_rows(get_source("humaneval"), root=bundle))
    assert len(rows) == 164
    for row in rows:
        prompt, solution = (m["content"] for m in row["messages"])
        text, _ = normalize_text(prompt)
        original = [line.rstrip() for line in prompt.strip("\n").split("\n") if line.strip()]
        assert [line for line in text.split("\n") if line.strip()] == original, row["eval_id"]
        compile(text + "\n" + solution, row["eval_id"], "exec")


@pytest.mark.parametrize(
    ("raw", "expected", "change"),
    [
        ("<|im_start|>user\nWhat is 2+2?<|im_end|>", "What is 2+2?", "template:<|im_start|>"),
        ("What is 2+2?<|im_end|>", "What is 2+2?", "template:<|im_end|>"),
        ("<|user|>\nWhat is 2+2?", "What is 2+2?", "template:<|user|>"),
        ("<|assistant|> Four.", "Four.", "template:<|assistant|>"),
        ("<|system|>\nBe brief.", "Be brief.", "template:<|system|>"),
        ("Four.<|endoftext|>", "Four.", "template:<|endoftext|>"),
        ("Four.</s>", "Four.", "template:</s>"),
        ("<s>Four.", "Four.", "template:<s>"),
        ("<s>[INST] What is 2+2? [/INST]", "What is 2+2?", "template:[INST]"),
        ("[INST] What is 2+2? [/INST]", "What is 2+2?", "template:[/INST]"),
        ("<<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2?", "Be brief.\n\nWhat is 2+2?", "template:<<SYS>>"),
        ("### Instruction:\nAdd 2 and 2.\n\n### Response:", "Add 2 and 2.", "template:### Instruction:"),
        ("### Instruction: Add 2 and 2.", "Add 2 and 2.", "template:### Instruction:"),
        ("Add 2 and 2.\n\n### Response:\n", "Add 2 and 2.", "template:### Response:"),
        ("Human: What is 2+2?", "What is 2+2?", "template:Human:"),
        ("Assistant: Four.", "Four.", "template:Assistant:"),
        ("User:  What is 2+2?", "What is 2+2?", "template:User:"),
        ("Line one\n<|im_end|>\n<|im_start|>assistant\nLine two", "Line one\nLine two", "template:<|im_end|>"),
    ],
)
def test_template_artifacts_removed(raw, expected, change):
    text, changes = normalize_text(raw)
    assert text == expected
    assert change in changes
    assert normalize_text(raw, strip_template_artifacts=False)[0] != expected or raw == expected


@pytest.mark.parametrize(
    "prose",
    [
        "Then the user said: hello. The assistant replied.",
        "### Notes\n\nKeep the instruction short.\n\n### Response time\nUnder a minute.",
        "The Human: A Biography is a book.",  # speaker word mid-sentence
        "User: Hi, what's the weather?\nBot: Sunny, 20 degrees.",  # a dialogue: the prefixes are content
        "Use <s>strikethrough</s> for deleted text.",
        "<s>old price</s> new price",  # HTML strikethrough at the boundary is not a template token
        "Tokens such as <|im_start|> and [INST] mark turns in chat templates.",
        "Given the list [INST, MOV, ADD], what is the instruction set?",
        "Answer in the format Instruction: ... Response: ...",
    ],
)
def test_prose_with_template_words_kept(prose):
    assert normalize_text(prose) == (prose, [])


# ---------------------------------------------------------------------------------------------
# property: NFC, no control characters, idempotent
# ---------------------------------------------------------------------------------------------
_TOKENS = ["<|im_start|>", "user", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>",
           "### Instruction:", "### Response:", "###", "Human:", "User:", "Bot:", "```", "    ", "\t", "\n", "\r\n"]
_ALPHABET = "ab \t\n\r\x00\x07\x0b\x1f\x85\xa0\u200b\u2028\u3000e\u0301\u0308A\u030a\u00c5#:<>|[]/"
_tricky_text = st.lists(st.one_of(st.text(alphabet=_ALPHABET, max_size=6), st.sampled_from(_TOKENS)), max_size=25).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_tricky_text, st.text()))
def test_normalize_text_properties(text):
    out, _ = normalize_text(text)
    assert unicodedata.is_normalized("NFC", out)
    assert not any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in out)
    assert out == out.strip(" \n") or looks_like_code(out)  # code keeps its first line's indentation
    assert "\n\n\n\n" not in out
    assert normalize_text(out) == (out, [])


# ---------------------------------------------------------------------------------------------
# Normalizer over rows
# ---------------------------------------------------------------------------------------------
def test_row_normalized_copy_keeps_other_fields():
    row = make_row(("Human", "What is  2+2?"), ("gpt", "Four."), ground_truth="4", constraints=None, eval_id=None,
                   extra='{"k": 1}')
    out, step, sink = run([row])
    assert out == [{**row, "messages": [{"role": "user", "content": "What is 2+2?"},
                                        {"role": "assistant", "content": "Four."}]}]
    assert row["messages"][0] == {"role": "Human", "content": "What is  2+2?"}  # input untouched
    assert sink.events == [{"row_id": "t-1", "event": "normalized", "decision": "changed", "reason": None,
                            "related_ids": [], "details": {"changes": ["role:Human", "role:gpt", "whitespace"]}}]
    assert step.stats == {"rows_in": 1, "rows_out": 1, "changed": 1, "dropped_by_reason": {},
                          "changes": {"role:Human": 1, "role:gpt": 1, "whitespace": 1}}


def test_messages_reduced_to_role_and_content():
    row = make_row(("user", "Hi."))
    row["messages"][0]["name"] = "alice"
    out, _, sink = run([row])
    assert out[0]["messages"] == [{"role": "user", "content": "Hi."}]
    assert sink.events[0]["details"] == {"changes": ["message_fields"]}


def test_lone_surrogates_replaced():
    assert normalize_text("bad \ud800 byte") == ("bad \ufffd byte", ["surrogates"])


def test_unchanged_row_event():
    out, _, sink = run([make_row(("user", "Hi."), ("assistant", "Hello."))])
    assert len(out) == 1
    assert sink.events == [{"row_id": "t-1", "event": "normalized", "decision": "unchanged", "reason": None,
                            "related_ids": [], "details": None}]


def test_empty_message_dropped_naming_its_index():
    rows = [make_row(("user", "Question?"), ("assistant", " \n\u200b\t "), row_id="t-1"),
            make_row(("system", "Be brief."), ("user", "<|im_start|>user\n<|im_end|>"), row_id="t-2"),
            make_row(("system", "Be brief."), ("assistant", "Sure."), row_id="t-3")]
    out, step, sink = run(rows)
    assert out == []
    assert [d["reason"] for d in step.dropped] == [
        "empty: messages[1] (assistant) is empty after normalization",
        "empty: messages[1] (user) is empty after normalization",
        "empty: no user message",
    ]
    assert step.dropped[0]["row"] is rows[0]
    assert [(e["row_id"], e["event"], e["decision"]) for e in sink.events] == [
        ("t-1", "quarantined", "dropped"), ("t-2", "quarantined", "dropped"), ("t-3", "quarantined", "dropped")]
    assert sink.events[0]["reason"] == step.dropped[0]["reason"]
    assert step.stats["dropped_by_reason"] == {"empty": 3}


def test_over_long_row_dropped_with_length():
    out, step, sink = run([make_row(("user", "x" * 60), ("assistant", "y" * 50))], max_chars=100)
    assert out == []
    assert step.dropped[0]["reason"] == "too_long: 110 chars > max_chars 100"
    assert step.stats["dropped_by_reason"] == {"too_long": 1}
    # the limit counts normalized text: padding that normalization removes does not count
    out, _, _ = run([make_row(("user", "x" * 60 + " " * 100), ("assistant", "y" * 40))], max_chars=100)
    assert len(out) == 1


@pytest.mark.parametrize(
    ("row", "reason_part"),
    [
        (make_row(("narrator", "Once upon a time.")), "messages[0].role 'narrator'"),
        (make_row(("user", 42)), "messages[0].content must be a string, got int"),
        (make_row(("user", "Hi"), ("assistant", None)), "messages[1].content must be a string, got NoneType"),
        (make_row(("user", ["a", "b"])), "messages[0].content must be a string, got list"),
        (make_row((None, "Hi")), "messages[0].role None"),
        ({**make_row(("user", "Hi")), "messages": None}, "messages must be a non-empty list"),
        ({**make_row(("user", "Hi")), "messages": []}, "messages must be a non-empty list"),
        ({**make_row(("user", "Hi")), "messages": ["Hi"]}, "messages[0] must be an object, got str"),
        ({**make_row(("user", "Hi")), "license": None}, "missing field 'license'"),
        ({**make_row(("user", "Hi")), "ground_truth": 4}, "ground_truth must be a string or null, got int"),
        ({**make_row(("user", "Hi")), "row_id": 7}, "row_id must be a string, got int"),
        ("not a row", "row must be an object, got str"),
        (None, "row must be an object, got NoneType"),
    ],
)
def test_invalid_rows_dropped_not_raised(row, reason_part):
    out, step, sink = run([row, make_row(("user", "Fine."), row_id="t-ok")])
    assert [r["row_id"] for r in out] == ["t-ok"]
    reason = step.dropped[0]["reason"]
    assert reason.startswith("invalid: ") and reason_part in reason, reason
    assert len(sink.events) == 2 and sink.events[0]["event"] == "quarantined"
    assert step.stats["dropped_by_reason"] == {"invalid": 1}


def test_row_without_id_gets_a_placeholder_event():
    out, _, sink = run([{"messages": [{"role": "user", "content": "Hi"}]}])
    assert out == []
    assert sink.events[0]["row_id"] == "<no row_id: input #0>"
    assert "missing field 'row_id'" in sink.events[0]["reason"]


def test_deterministic_and_one_event_per_row(train_rows):
    rows = train_rows["hh_rlhf_harmless"][:400] + train_rows["code_alpaca"][:400]
    first_out, first, first_sink = run(rows)
    second_out, second, second_sink = run(rows)
    assert first_out == second_out
    assert first_sink.events == second_sink.events
    assert first.stats == second.stats
    assert [e["row_id"] for e in first_sink.events] == [r["row_id"] for r in rows]


# ---------------------------------------------------------------------------------------------
# every real training source
# ---------------------------------------------------------------------------------------------
# Measured on the bundled data; a change here means normalization (or the data) changed.
EXPECTED = {
    "gsm8k_train": {"rows_in": 7473, "rows_out": 7473, "changed": 1823, "dropped_by_reason": {},
                    "changes": {"exotic_whitespace": 4, "newlines": 1, "whitespace": 1821, "zero_width": 1}},
    "math_train": {"rows_in": 7500, "rows_out": 7500, "changed": 4128, "dropped_by_reason": {},
                   "changes": {"whitespace": 4128}},
    "code_alpaca": {"rows_in": 2017, "rows_out": 2015, "changed": 592, "dropped_by_reason": {"empty": 2},
                    "changes": {"exotic_whitespace": 1, "whitespace": 591}},
    "self_instruct_seed": {"rows_in": 175, "rows_out": 175, "changed": 29, "dropped_by_reason": {},
                           "changes": {"whitespace": 29}},
    "hh_rlhf_harmless": {"rows_in": 2312, "rows_out": 2312, "changed": 1017, "dropped_by_reason": {},
                         "changes": {"template:Human:": 23, "whitespace": 1010}},
    "fine_grained_rlhf_qa": {"rows_in": 500, "rows_out": 500, "changed": 136, "dropped_by_reason": {},
                             "changes": {"exotic_whitespace": 2, "whitespace": 134}},
}


@pytest.mark.parametrize("source", TRAIN_SOURCES)
def test_real_training_source(source, train_rows):
    rows = train_rows[source]
    out, step, sink = run(rows)
    assert step.stats == EXPECTED[source]
    assert len(sink.events) == len(rows)
    assert {e["row_id"] for e in sink.events} == {r["row_id"] for r in rows}
    # the only drops: two Code Alpaca records whose output is empty
    assert [(d["row"]["source_key"], d["reason"]) for d in step.dropped] == (
        [("train/code_alpaca/code_alpaca_2k.json#237", "empty: messages[1] (assistant) is empty after normalization"),
         ("train/code_alpaca/code_alpaca_2k.json#1859", "empty: messages[1] (assistant) is empty after normalization")]
        if source == "code_alpaca" else [])
    kept_ids = {o["row_id"] for o in out}
    for before, after in zip((r for r in rows if r["row_id"] in kept_ids), out):
        assert after["row_id"] == before["row_id"]
        assert {k: v for k, v in after.items() if k != "messages"} == {k: v for k, v in before.items() if k != "messages"}
        assert [m["role"] for m in after["messages"]] == [m["role"] for m in before["messages"]]
        # normalized text differs from the raw text only in whitespace and removed artifacts
        for m_before, m_after in zip(before["messages"], after["messages"]):
            assert "".join(m_after["content"].split()) in "".join(m_before["content"].split()).replace("\u200b", "")
    assert list(Normalizer(NormalizeConfig(), MemorySink())(out)) == out  # idempotent on real rows
    assert pa.Table.from_pylist(out, schema=ROW_SCHEMA).num_rows == len(out)  # writable as the row schema
