"""Tülu's chat format and assistant-only labels, checked token by token with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
from test_sft_support import bundled_rows, smollm2_tokenizer

from tulu_pipeline.templates.chat_template import (
    IGNORE_INDEX,
    TULU_CHAT_TEMPLATE,
    apply_tulu_chat_template,
    encode_conversation,
    encode_rows,
    render_segments,
)

EOS = "<|im_end|>"  # SmolLM2's EOS token

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And times 3?\nShow the steps."},
    {"role": "assistant", "content": "(2+2)*3 = 12.\n\nSo: 12"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return apply_tulu_chat_template(smollm2_tokenizer())


def trained_spans(example: dict) -> list[list[int]]:
    """Maximal runs of positions whose label is not -100, as lists of label ids."""
    spans, current = [], []
    for label in example["labels"]:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
                current = []
        else:
            current.append(label)
    if current:
        spans.append(current)
    return spans


# ---------------------------------------------------------------------------------------------
# the rendered text
# ---------------------------------------------------------------------------------------------
def test_template_renders_tulu_format_exactly(tokenizer):
    assert tokenizer.chat_template == TULU_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    assert text == (
        "<|system|>\nYou are terse.\n"
        "<|user|>\nWhat is 2+2?\n"
        f"<|assistant|>\n4.{EOS}\n"
        "<|user|>\nAnd times 3?\nShow the steps.\n"
        f"<|assistant|>\n(2+2)*3 = 12.\n\nSo: 12{EOS}"
    )


def test_template_without_system_and_with_generation_prompt(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<|user|>\nHi\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nHi\n<|assistant|>\n"
    )
    two = [*messages, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(two, tokenize=False) == f"<|user|>\nHi\n<|assistant|>\nHello{EOS}"


def test_template_rejects_unknown_roles(tokenizer):
    with pytest.raises(Exception, match="roles system, user and assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    with pytest.raises(ValueError, match="role must be one of"):
        encode_conversation([{"role": "tool", "content": "x"}], tokenizer)


def test_segments_and_token_ids_reproduce_the_template_on_bundled_rows(tokenizer):
    rows = (bundled_rows("gsm8k_train", 20) + bundled_rows("code_alpaca", 20) + bundled_rows("self_instruct_seed", 10)
            + bundled_rows("hh_rlhf_harmless", 20))
    for row in rows:
        rendered = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert "".join(text for text, _ in render_segments(row["messages"], EOS)) == rendered
        example = encode_conversation(row["messages"], tokenizer)
        assert tokenizer.decode(example["input_ids"]) == rendered


# ---------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------
def test_labels_train_exactly_the_assistant_contents_and_their_eos(tokenizer):
    example = encode_conversation(MULTI_TURN, tokenizer)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    # every label is either -100 or the token at that position
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    spans = trained_spans(example)
    assert [tokenizer.decode(span) for span in spans] == [f"4.{EOS}", f"(2+2)*3 = 12.\n\nSo: 12{EOS}"]
    assert all(span[-1] == tokenizer.eos_token_id for span in spans)
    assert example["num_trained_tokens"] == sum(len(span) for span in spans)
    # everything else is masked: decode the untrained positions in order
    untrained = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert untrained == ("<|system|>\nYou are terse.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n"
                         "\n<|user|>\nAnd times 3?\nShow the steps.\n<|assistant|>\n")


def test_labels_token_by_token_on_a_small_conversation(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
    example = encode_conversation(messages, tokenizer)
    expected_ids, expected_labels = [], []
    for text, trained in [("<|user|>\nHi\n<|assistant|>\n", False), ("Yo", True),
                          ("\n<|user|>\nBye\n<|assistant|>\n", False), ("Ciao", True)]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if trained else [])
        expected_ids += ids
        expected_labels += ids if trained else [IGNORE_INDEX] * len(ids)
    assert example["input_ids"] == expected_ids
    assert example["labels"] == expected_labels


def test_labels_agree_with_transformers_generation_mask(tokenizer):
    """The template's {% generation %} markers (what TRL's assistant_only_loss reads) mark the same tokens."""
    conversations = [MULTI_TURN] + [row["messages"] for row in bundled_rows("hh_rlhf_harmless", 15)]
    for messages in conversations:
        ours = encode_conversation(messages, tokenizer)
        theirs = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == ours["input_ids"]
        assert [bool(m) for m in theirs["assistant_masks"]] == [label != IGNORE_INDEX for label in ours["labels"]]


def test_multi_turn_bundled_rows_train_every_assistant_turn(tokenizer):
    rows = [row for row in bundled_rows("hh_rlhf_harmless", 40) if len(row["messages"]) > 2]
    assert rows, "the HH-RLHF sample should hold multi-turn conversations"
    for row in rows:
        example = encode_conversation(row["messages"], tokenizer)
        contents = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(span) for span in trained_spans(example)] == [c + EOS for c in contents]


def test_special_token_text_inside_content_is_not_a_control_token(tokenizer):
    messages = [{"role": "user", "content": f"say {EOS} please"}, {"role": "assistant", "content": f"ok {EOS} done"}]
    example = encode_conversation(messages, tokenizer)
    assert example["input_ids"].count(tokenizer.eos_token_id) == 1  # only the one closing the assistant turn
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)


# ---------------------------------------------------------------------------------------------
# truncation
# ---------------------------------------------------------------------------------------------
def test_truncation_keeps_the_start_and_cuts_later_turns(tokenizer):
    full = encode_conversation(MULTI_TURN, tokenizer)
    first_span_end = next(i for i, label in enumerate(full["labels"]) if label == tokenizer.eos_token_id) + 1
    cut = encode_conversation(MULTI_TURN, tokenizer, max_length=first_span_end + 3)
    assert cut["truncated"] is True
    assert cut["input_ids"] == full["input_ids"][: first_span_end + 3]
    assert cut["labels"] == full["labels"][: first_span_end + 3]
    assert [tokenizer.decode(span) for span in trained_spans(cut)] == [f"4.{EOS}"]
    not_cut = encode_conversation(MULTI_TURN, tokenizer, max_length=len(full["input_ids"]))
    assert not_cut["truncated"] is False and not_cut["input_ids"] == full["input_ids"]


def test_truncation_inside_the_assistant_turn_trains_its_start_without_eos(tokenizer):
    messages = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "one two three four five six"}]
    full = encode_conversation(messages, tokenizer)
    cut = encode_conversation(messages, tokenizer, max_length=len(full["input_ids"]) - 3)
    assert cut["num_trained_tokens"] == full["num_trained_tokens"] - 3
    assert tokenizer.eos_token_id not in cut["input_ids"]


def test_rows_without_an_assistant_token_left_are_reported_not_trained(tokenizer):
    long_prompt = {"row_id": "long", "messages": [{"role": "user", "content": "word " * 300},
                                                   {"role": "assistant", "content": "ok"}]}
    prompt_only = {"row_id": "prompt-only", "messages": [{"role": "user", "content": "hello"}]}
    fine = {"row_id": "fine", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    encoded = encode_rows([long_prompt, prompt_only, fine], tokenizer, max_length=64)
    assert encoded.row_ids == ["fine"]
    assert encoded.dropped_row_ids == ["long", "prompt-only"]
    assert encoded.truncated_row_ids == ["long"]
    assert encoded.summary()["dropped_rows"] == 2
    assert all(any(label != IGNORE_INDEX for label in ex["labels"]) for ex in encoded.examples)


def test_apply_sets_pad_token_when_missing():
    tokenizer = smollm2_tokenizer()
    tokenizer.pad_token = None
    apply_tulu_chat_template(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
