"""Template lineage: one golden conversation through every tokenizing code path, the lineage record, and the
checks that fail when a stage's template, tokenizer or label masking differs from its parent's."""

from __future__ import annotations

import pytest
from test_sft_support import bundled_rows, save_tiny_model, smollm2_tokenizer

from tulu_pipeline.generation.chat import ChatEncoder
from tulu_pipeline.mixing.publish import mix_info_path
from tulu_pipeline.templates.lineage import GOLDEN_CONVERSATION, MODEL_TEMPLATE_RULE, TULU_MASK_RULE, first_differing_line, lineage_mismatches, template_lineage
from tulu_pipeline.audit.template_checks import check_checkpoint_lineage, check_evaluation_lineage
from tulu_pipeline.templates.chat_template import IGNORE_INDEX, TULU_CHAT_TEMPLATE, apply_tulu_chat_template, encode_conversation

FINAL = GOLDEN_CONVERSATION[-1]["content"]


@pytest.fixture(scope="module")
def tokenizer():
    return apply_tulu_chat_template(smollm2_tokenizer())


@pytest.fixture(scope="module")
def tulu_model_dir(tmp_path_factory):
    """A tiny random Llama saved as an SFT checkpoint saves itself: with Tülu's template in its tokenizer."""
    target = save_tiny_model(tmp_path_factory.mktemp("golden") / "model")
    apply_tulu_chat_template(smollm2_tokenizer()).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def reference(tokenizer):
    """The mix/SFT path (`encode_conversation`): the ids and labels every other path must reproduce."""
    encoded = encode_conversation(GOLDEN_CONVERSATION, tokenizer)
    prompt_only = encode_conversation([*GOLDEN_CONVERSATION[:-1], {"role": "assistant", "content": ""}], tokenizer)
    final_start = len(prompt_only["input_ids"]) - 1  # everything before the final answer's first token
    return encoded["input_ids"], encoded["labels"], final_start


def test_golden_conversation_renders_as_the_template_and_trains_the_assistant_turns(tokenizer, reference):
    ids, labels, _ = reference
    rendered = tokenizer.apply_chat_template(GOLDEN_CONVERSATION, tokenize=False)
    assert tokenizer.decode(ids) == rendered  # SmolLM2 adds no BOS
    assert "<|im_end|> please." in rendered  # the special-token text in a message is text
    # what is trained, as text: each assistant content and its EOS (transformers' generation mask, by character)
    trained = "".join(tokenizer.decode([i]) for i, label in zip(ids, labels) if label != IGNORE_INDEX)
    assert trained == "".join(m["content"] + "<|im_end|>" for m in GOLDEN_CONVERSATION if m["role"] == "assistant")


def test_every_tokenizing_code_path_gives_the_same_ids_and_label_mask(tokenizer, reference, tulu_model_dir):
    """mix/SFT, reference log-probs/DPO, RLVR prompts and rollouts, generation and evaluation."""
    import torch

    from tulu_pipeline.generation.transformers_backend import TransformersBackend
    from tulu_pipeline.mixing.publish import build_sft_mix  # noqa: F401  (the mix counts with encode_conversation)
    from tulu_pipeline.training.dpo_pairs import encode_pairs, tulu_tokenizer
    from tulu_pipeline.training.rlvr_rollouts import prompt_ids
    from tulu_pipeline.training.rlvr_step import completion_logprobs
    from tulu_pipeline.templates.chat_template import encode_rows

    ids, labels, final_start = reference
    final_only = [IGNORE_INDEX] * final_start + labels[final_start:]

    # SFT: encode_rows over a row
    sft = encode_rows([{"row_id": "golden", "messages": GOLDEN_CONVERSATION}], tokenizer, max_length=4096)
    assert sft.examples[0] == {"input_ids": ids, "labels": labels}

    # reference log-probs and DPO: one encoder (encode_pairs) with the checkpoint's own tokenizer; the loss is on
    # the final response, whose label mask is exactly SFT's there
    pair = {"pair_id": "p", "prompt": GOLDEN_CONVERSATION[:-1], "chosen": FINAL, "rejected": "No."}
    dpo = encode_pairs([pair], tulu_tokenizer(tulu_model_dir), max_length=4096).examples[0]
    assert dpo["chosen_input_ids"] == ids
    assert dpo["chosen_labels"] == final_only

    # RLVR: the prompt GRPO samples from, and a rollout that writes the reference answer
    row = {"row_id": "golden", "messages": GOLDEN_CONVERSATION}
    rl_prompt = prompt_ids(row, tokenizer)
    assert rl_prompt == ids[:final_start]
    completion = ids[final_start:]  # what the policy would generate, EOS included
    model = TransformersBackend(tulu_model_dir, "golden", device="cpu", dtype="float32").model
    with torch.no_grad():
        _, rollout_mask = completion_logprobs(model, [rl_prompt], [completion], tokenizer.pad_token_id)
    assert rl_prompt + completion == ids
    assert [IGNORE_INDEX] * len(rl_prompt) + [c if m else IGNORE_INDEX for c, m in
                                                zip(completion, rollout_mask[0].tolist())] == final_only

    # generation and evaluation: both go through the backends' ChatEncoder, which reads the checkpoint's template
    backend = TransformersBackend(tulu_model_dir, "golden", device="cpu", dtype="float32")
    encoder = backend.encoder
    assert encoder.format == "tulu"
    assert encoder.prompt_ids(GOLDEN_CONVERSATION[:-1]) == ids[:final_start]
    assert encoder.continuation_ids(FINAL) + [tokenizer.eos_token_id] == ids[final_start:]

    # and every path records the same lineage
    records = [template_lineage(tokenizer), template_lineage(tulu_tokenizer(tulu_model_dir)), encoder.lineage()]
    assert all(lineage_mismatches(r, records[0]) == [] for r in records)
    assert records[0]["mask_rule"] == TULU_MASK_RULE


def test_lineage_is_stable_across_save_and_reload_and_distinguishes_templates(tokenizer, tulu_model_dir):
    base = smollm2_tokenizer()  # SmolLM2's own ChatML template
    tulu = template_lineage(tokenizer)
    assert template_lineage(tulu_tokenizer_of(tulu_model_dir)) == tulu
    chatml = template_lineage(base)
    assert chatml["tokenizer_sha256"] == tulu["tokenizer_sha256"]  # same vocabulary, another template
    assert chatml["mask_rule"] == MODEL_TEMPLATE_RULE
    problems = lineage_mismatches(chatml, tulu, "eval/gsm8k", "sft-x")
    assert len(problems) == 2  # template and masking rule
    assert chatml["chat_template_sha256"][:16] in problems[0] and tulu["chat_template_sha256"][:16] in problems[0]
    assert "line 1: eval/gsm8k '<|im_start|>system' vs sft-x '<|system|>'" in problems[0]
    assert lineage_mismatches(None, tulu) == ["stage recorded no template lineage"]


def tulu_tokenizer_of(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_first_differing_line():
    assert first_differing_line("a\nb\nc", "a\nb\nc") is None
    assert first_differing_line("a\nb\nc", "a\nB\nc") == (2, "b", "B")
    assert first_differing_line("a", "a\nmore") == (2, "<end of text>", "more")


# ---------------------------------------------------------------------------------------------
# the checkpoint check on a real (tiny) SFT run
# ---------------------------------------------------------------------------------------------
TINY = dict(max_length=256, per_device_batch_size=4, gradient_accumulation_steps=1, max_steps=2, save_steps=100,
            logging_steps=1, bf16=False, seed=3)


def _train_sft(store, base_dir, name, template=None, monkeypatch=None):
    from tulu_pipeline.training import sft as sft_module
    from tulu_pipeline.training.sft_config import SFTTrainingConfig
    from tulu_pipeline.progress import NullReporter

    rows = bundled_rows("gsm8k_train", 8)
    if template is not None:  # the SFT stage alone renders with another template
        def patched(tok):
            apply_tulu_chat_template(tok)
            tok.chat_template = template
            return tok
        monkeypatch.setattr(sft_module, "apply_tulu_chat_template", patched)
    out = store.path("models", name)
    return sft_module.run_sft(rows[:6], rows[6:], base_dir, out, SFTTrainingConfig(**TINY), reporter=NullReporter(),
                              manifest_extra={"mix_hash": "mixv1", "checkpoint_id": name})


@pytest.mark.slow  # two tiny SFT runs: about a minute on 2 shared cores
def test_changing_the_template_of_one_stage_fails_the_check_with_the_first_differing_line(store, tmp_path, monkeypatch):
    base = save_tiny_model(tmp_path / "base_model")
    store.write_json(mix_info_path("mixv1"), {"mix_hash": "mixv1", "template_lineage": template_lineage(
        apply_tulu_chat_template(smollm2_tokenizer()))})

    _train_sft(store, base, "sft-same")
    same = check_checkpoint_lineage(store, "sft-same")
    assert same["passed"], same["description"]
    assert same["lineage"] == same["parents"]["sft_mix@mixv1"]

    drifted = TULU_CHAT_TEMPLATE.replace("'<|assistant|>\\n'", "'<|assistant|>:\\n'")
    assert drifted != TULU_CHAT_TEMPLATE
    _train_sft(store, base, "sft-drift", template=drifted, monkeypatch=monkeypatch)
    result = check_checkpoint_lineage(store, "sft-drift")
    assert not result["passed"]
    assert len(result["problems"]) == 2  # the template, and the masking rule that goes with it
    problem = result["problems"][0]
    assert problem.startswith("chat template differs: sft-drift ")
    assert result["lineage"]["chat_template_sha256"][:16] in problem
    assert result["parents"]["sft_mix@mixv1"]["chat_template_sha256"][:16] in problem
    assert "line 5: sft-drift '<|assistant|>:' vs sft_mix@mixv1 '<|assistant|>'" in problem

    # the evaluation check: a summary prompted with the model's own template against a Tülu checkpoint
    summary = {"benchmark": "gsm8k", "template_lineage": template_lineage(smollm2_tokenizer())}
    evaluation = check_evaluation_lineage(summary, store, "sft-same")
    assert not evaluation["passed"] and "first differing line" in evaluation["description"]
    ok = check_evaluation_lineage({"benchmark": "gsm8k", "template_lineage": template_lineage(
        apply_tulu_chat_template(smollm2_tokenizer()))}, store, "sft-same")
    assert ok["passed"], ok["description"]
    assert check_evaluation_lineage(summary, store, "base_model")["passed"]
