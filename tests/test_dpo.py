"""DPO on a tiny random Llama: pair encoding, reference log-probs, training that improves held-out preference.

Pairs (tests/test_dpo_support.py): a GSM8K prompt, its reference answer as chosen and a sample of the tiny
model as rejected — the on-policy shape of Tülu 3's pairs. Before training, the model's length-normalized
preference between the two is near chance; `run_dpo` must raise it on held-out pairs it never trained on.
"""

from __future__ import annotations

import json

import pytest
from test_dpo_support import TINY_DPO, split_pairs, tiny_setup
from test_sft_support import smollm2_tokenizer

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.progress import NullReporter
from tulu_pipeline.training import dpo as dpo_module
from tulu_pipeline.templates.chat_template import IGNORE_INDEX, apply_tulu_chat_template
from tulu_pipeline.training.dpo import LOSS_CURVE_FILE, TRAINED_PAIRS_FILE, run_dpo
from tulu_pipeline.training.dpo_pairs import NO_RESPONSE_TOKENS, encode_pairs, encode_response
from tulu_pipeline.training.dpo_reference import compute_reference_logprobs
from tulu_pipeline.training.dpo_config import DPOTrainingConfig

CONFIG = DPOTrainingConfig(**TINY_DPO)


def test_labels_cover_the_final_response_only():
    tokenizer = apply_tulu_chat_template(smollm2_tokenizer())
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! Ask away."},
              {"role": "user", "content": "What is 2 + 3?"}]
    chosen = encode_response(prompt, "5", tokenizer, max_length=512)
    rejected = encode_response(prompt, "It is 6, I think.", tokenizer, max_length=512)
    trained = [t for t, label in zip(chosen["input_ids"], chosen["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "5" + tokenizer.eos_token  # not the earlier assistant turn
    assert chosen["tokens"] == len(trained)
    prefix = chosen["labels"].index(trained[0])
    assert chosen["input_ids"][:prefix] == rejected["input_ids"][:prefix]
    assert tokenizer.decode(chosen["input_ids"][:prefix]).endswith("<|user|>\nWhat is 2 + 3?\n<|assistant|>\n")
    # a max_length that leaves no response token drops the pair, with the reason
    cut = encode_pairs([{"pair_id": "p1", "prompt": prompt, "chosen": "5", "rejected": "6"}], tokenizer, max_length=prefix)
    assert cut.dropped == {"p1": NO_RESPONSE_TOKENS} and not cut.examples
    with pytest.raises(ValueError, match="preference pair p2"):
        encode_pairs([{"pair_id": "p2", "prompt": prompt, "chosen": None, "rejected": "6"}], tokenizer, 64)


def test_reference_logprobs_equal_the_model_loss():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, pairs = tiny_setup()
    rows = compute_reference_logprobs(list(pairs[:3]), model_dir, CONFIG)
    tokenizer = apply_tulu_chat_template(AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for pair, row in zip(pairs[:3], rows):
        assert row["pair_id"] == pair["pair_id"] and row["dropped_reason"] is None
        encoded = encode_response(pair["prompt"], pair["chosen"], tokenizer, CONFIG.max_length)
        with torch.no_grad():
            mean_nll = model(input_ids=torch.tensor([encoded["input_ids"]]), labels=torch.tensor([encoded["labels"]])).loss
        assert row["chosen_tokens"] == encoded["tokens"]
        assert row["chosen_logps"] == pytest.approx(-float(mean_nll) * encoded["tokens"], rel=1e-4)


@pytest.mark.integration  # the reference-logprobs job, then DPO training until held-out preference improves
def test_dpo_improves_heldout_preference_and_never_reruns_the_reference(tmp_path, monkeypatch):
    model_dir, pairs = tiny_setup()
    train, heldout = split_pairs(pairs)
    reference = compute_reference_logprobs([*train, *heldout], model_dir, CONFIG)

    def no_reference_model(*args, **kwargs):
        raise AssertionError("the trainer recomputed reference log-probs it was given")

    monkeypatch.setattr(dpo_module, "compute_reference_logprobs", no_reference_model)
    reporter = NullReporter()
    result = run_dpo(train, heldout, model_dir, tmp_path / "dpo", CONFIG, reference_logprobs=reference,
                     reporter=reporter, manifest_extra={"pairs_version": "pairs-test"})
    before, after = result.metrics["heldout_before"], result.metrics["heldout_after"]
    print(f"held-out preference accuracy {before['preference_accuracy']:.3f} -> {after['preference_accuracy']:.3f}; "
          f"reward accuracy {after['reward_accuracy']:.3f}, margin {after['mean_margin']:.4f}")
    assert before["pairs"] == after["pairs"] == len(heldout)
    assert before["reward_accuracy"] == 0.0 and before["mean_margin"] == 0.0  # the policy is the reference
    assert after["preference_accuracy"] > before["preference_accuracy"]
    assert after["reward_accuracy"] > 0.5 and after["mean_margin"] > 0
    assert after["loss"] < before["loss"]
    losses = [point["loss"] for point in result.metrics["train_loss"]]
    assert len(losses) == result.metrics["steps"] == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2

    out = result.checkpoint_dir
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["reference_logprobs_source"] == "precomputed"
    assert manifest["pairs_version"] == "pairs-test" and manifest["config"]["loss_type"] == "dpo_norm"
    assert manifest["heldout_pair_ids"] == [p["pair_id"] for p in heldout]
    assert set((out / TRAINED_PAIRS_FILE).read_text().split()) == {p["pair_id"] for p in train}
    assert (out / LOSS_CURVE_FILE).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "_checkpoints").exists()

    # same inputs: the published checkpoint is reused; other reference numbers are another run
    again = run_dpo(train, heldout, model_dir, out, CONFIG, reference_logprobs=reference,
                    manifest_extra={"pairs_version": "pairs-test"})
    assert again.reused
    shifted = [{**row, "chosen_tokens": row["chosen_tokens"] + 1} for row in reference]
    with pytest.raises(ValueError, match="another tokenizer or max_length"):
        run_dpo(train, heldout, model_dir, tmp_path / "other", CONFIG, reference_logprobs=shifted)
