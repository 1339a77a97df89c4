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


@pytest.mark.parametrize("loss_type", ["dpo", "dpo_norm", "simpo"])
def test_per_pair_values_average_to_the_heldout_metrics(loss_type):
    """`preference_scores`' per-pair values are what `preference_metrics` averages: the mean of ``preferred`` is
    ``preference_accuracy`` and the mean of ``reward_correct`` is ``reward_accuracy`` (exactly), the mean of
    ``margin`` is ``mean_margin``; `heldout_effect` pairs them by pair id."""
    import random

    from tulu_pipeline.training.dpo import heldout_effect, preference_metrics, preference_scores
    from tulu_pipeline.training.dpo_reference import PairScores

    rng = random.Random(3)
    ids = [f"p{i}" for i in range(15)]

    def scores() -> PairScores:
        return PairScores(list(ids), [-rng.uniform(5, 40) for _ in ids], [-rng.uniform(5, 40) for _ in ids],
                          [rng.randint(3, 20) for _ in ids], [rng.randint(3, 20) for _ in ids])

    reference, policy = scores(), scores()
    config = DPOTrainingConfig(**{**TINY_DPO, "loss_type": loss_type, "beta": 2.0})
    metrics, per_pair = preference_scores(policy, reference, config)
    assert metrics == preference_metrics(policy, reference, config)
    assert all(list(values) == ids for values in per_pair.values())
    assert 0 < metrics["preference_accuracy"] < 1 and 0 < metrics["reward_accuracy"] < 1  # both kinds of pair
    assert sum(per_pair["preferred"].values()) / len(ids) == metrics["preference_accuracy"]
    assert sum(per_pair["reward_correct"].values()) / len(ids) == metrics["reward_accuracy"]
    assert sum(per_pair["margin"].values()) / len(ids) == pytest.approx(metrics["mean_margin"], rel=1e-12)
    assert {v > 0 for v in per_pair["margin"].values()} == {True, False}
    assert all(per_pair["reward_correct"][i] == float(per_pair["margin"][i] > 0) for i in ids)

    start, start_pairs = preference_scores(reference, reference, config)
    if loss_type != "simpo":  # the policy is the reference: every margin 0, no pair counted correct
        assert set(start_pairs["margin"].values()) == {0.0} and start["reward_accuracy"] == 0.0
    effect = heldout_effect(per_pair, start_pairs, seed=config.seed)
    assert {d["n"] for d in effect.values()} == {len(ids)}
    assert effect["preference_accuracy"]["delta"] == pytest.approx(
        metrics["preference_accuracy"] - start["preference_accuracy"])
    assert effect["margin"]["delta"] == pytest.approx(metrics["mean_margin"] - start["mean_margin"])
    assert preference_scores(PairScores([], [], [], [], []), PairScores([], [], [], [], []), config) == (
        {"pairs": 0}, {"preferred": {}, "reward_correct": {}, "margin": {}})


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
    # the paired per-pair change: every held-out pair, the deltas those of the aggregates
    effect = result.metrics["heldout_effect"]
    assert set(effect) == {"preference_accuracy", "reward_accuracy", "margin"}
    assert all(d["n"] == len(heldout) and d["same_items"] for d in effect.values())
    assert effect["preference_accuracy"]["delta"] == pytest.approx(
        after["preference_accuracy"] - before["preference_accuracy"])
    assert effect["reward_accuracy"]["delta"] == pytest.approx(after["reward_accuracy"])  # from 0 (no margins)
    assert effect["reward_accuracy"]["down"] == 0 and effect["reward_accuracy"]["up"] > len(heldout) / 2
    assert effect["margin"]["delta"] == pytest.approx(after["mean_margin"])
    assert effect["margin"]["ci_low"] <= effect["margin"]["delta"] <= effect["margin"]["ci_high"]
    losses = [point["loss"] for point in result.metrics["train_loss"]]
    assert len(losses) == result.metrics["steps"] == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2

    out = result.checkpoint_dir
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["reference_logprobs_source"] == "precomputed"
    assert manifest["pairs_version"] == "pairs-test" and manifest["config"]["loss_type"] == "dpo_norm"
    assert manifest["heldout_pair_ids"] == [p["pair_id"] for p in heldout]
    assert manifest["metrics"]["heldout_effect"] == effect
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
