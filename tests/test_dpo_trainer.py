"""The DPO trainer's arithmetic on a tiny random Llama: the step's loss and gradient under gradient accumulation,
sequence log-probs computed in bounded chunks, and reference log-probs keyed by the dtype they were scored in.

Each test fails when its fix is undone: accumulation scaled twice (transformers < 5.19 without TRL's setting),
full ``[2B, L, V]`` logits, a reference cache shared between fp32 and bf16.
"""

from __future__ import annotations

import functools

import pytest
from test_dpo_support import TINY_DPO, tiny_setup

from tulu_pipeline.training import dpo as dpo_module
from tulu_pipeline.training.dpo_pairs import DPOCollator, encode_pairs, tulu_tokenizer
from tulu_pipeline.training.dpo_reference import attach_reference, compute_reference_logprobs, sequence_logps
from tulu_pipeline.training.dpo_config import DPOTrainingConfig
from tulu_pipeline.training.dpo_losses import preference_loss


def _tiny_model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_setup()[0], dtype=torch.float32)


@functools.lru_cache(maxsize=4)
def _encoded(n: int, config: DPOTrainingConfig):
    """``n`` training pairs encoded, with the tiny model's reference log-probs attached (once per test session)."""
    model_dir, pairs = tiny_setup()
    pairs = [p for p in pairs if p["split"] == "train"][:n]
    encoded = encode_pairs(pairs, tulu_tokenizer(model_dir), config.max_length)
    rows = compute_reference_logprobs(pairs, model_dir, config)
    attach_reference(encoded, {row["pair_id"]: row for row in rows})
    return encoded


# ---------------------------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transformers_api", ["current", "before_5_19"])
def test_accumulated_step_equals_the_mean_over_its_pairs(tmp_path, transformers_api):
    """Two micro-batches of two pairs: the logged loss and the gradient before the optimizer step are those of the
    mean loss over the four pairs. ``before_5_19`` emulates a Trainer that does not know ``loss_is_scaled_for_ga``
    and decides from ``model_accepts_loss_kwargs`` alone, which scaled the loss (and gradient) by the accumulation
    steps."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback, TrainingArguments

    from tulu_pipeline.progress import NullReporter
    from tulu_pipeline.training.checkpointing import trainer_arguments

    config = DPOTrainingConfig(**{**TINY_DPO, "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
                                  "max_steps": 1, "max_grad_norm": None, "warmup_ratio": 0.0})
    encoded = _encoded(4, config)
    tokenizer = tulu_tokenizer(tiny_setup()[0])

    # by hand: each pair on its own, the mean of the four losses
    reference = _tiny_model()
    losses = []
    for example in encoded.examples:
        batch = DPOCollator(tokenizer.pad_token_id)([example])
        sums, counts = sequence_logps(reference, batch["input_ids"], batch["attention_mask"], batch["labels"])
        result = preference_loss(config.loss_type, sums[:1], sums[1:], counts[:1].float(), counts[1:].float(),
                                 batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float(),
                                 beta=config.beta, gamma=config.gamma)
        losses.append(result.loss)
    expected_loss = torch.stack(losses).mean()
    expected_loss.backward()
    expected_grads = {name: p.grad.clone() for name, p in reference.named_parameters() if p.grad is not None}

    grads: dict[str, torch.Tensor] = {}

    class GradientProbe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})

    from tulu_pipeline.training.hf_trainers import TuluDPOTrainer

    trainer_cls = TuluDPOTrainer
    if transformers_api == "before_5_19":
        trainer_cls = type("OldTransformersTrainer", (trainer_cls,), {"loss_is_scaled_for_ga": None})
    args = TrainingArguments(**trainer_arguments(config, tmp_path, False, torch.device("cpu")))
    trainer = trainer_cls(
        model=_tiny_model(), args=args, data_collator=DPOCollator(tokenizer.pad_token_id),
        train_dataset=Dataset.from_list([{**ex, "example_index": i} for i, ex in enumerate(encoded.examples)]),
        processing_class=tokenizer, callbacks=[GradientProbe()],
        dpo=config, times_seen=[0] * len(encoded.examples), reporter=NullReporter(),
    )
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [pytest.approx(float(expected_loss.detach()), rel=1e-4)]
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# sequence log-probs in chunks
# ---------------------------------------------------------------------------------------------
def _full_logits_logps(model, input_ids, attention_mask, labels):
    """The unchunked computation: every position's fp32 logits at once, ``[2B, L, V]``."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    picked = torch.gather(logits, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return ((picked - torch.logsumexp(logits, dim=-1)) * mask).sum(-1), mask.sum(-1)


def test_chunked_sequence_logps_equal_the_full_logits_and_bound_them():
    import torch

    config = DPOTrainingConfig(**TINY_DPO)
    encoded = _encoded(4, config)
    batch = DPOCollator(tulu_tokenizer(tiny_setup()[0]).pad_token_id)(encoded.examples)
    inputs = batch["input_ids"], batch["attention_mask"], batch["labels"]
    vocab = int(_tiny_model().config.vocab_size)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    chunk = 7
    assert labelled > 3 * chunk, "the pairs must span several chunks"

    full_model, chunked_model = _tiny_model(), _tiny_model()
    head_outputs: list[tuple[int, ...]] = []
    chunked_model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: head_outputs.append(tuple(output.shape)))
    full_sums, full_counts = _full_logits_logps(full_model, *inputs)
    sums, counts = sequence_logps(chunked_model, *inputs, chunk_tokens=chunk)
    assert torch.equal(counts, full_counts)
    torch.testing.assert_close(sums, full_sums, rtol=1e-5, atol=1e-5)

    # gradients through the chunks (recomputed in backward) equal the full computation's
    full_sums.sum().backward()
    sums.sum().backward()
    full_grads = dict(full_model.named_parameters())
    for name, param in chunked_model.named_parameters():
        # relative to the tensor's norm: the tied embedding sums many tokens' terms in another order
        expected = full_grads[name].grad
        assert float((param.grad - expected).norm() / expected.norm()) < 1e-5, name

    # the LM head never produced more than a chunk of positions' logits, forward or backward (recomputation)
    assert head_outputs and max(torch.Size(shape).numel() for shape in head_outputs) <= max(chunk, len(counts)) * vocab
    assert sum(shape[0] for shape in head_outputs if len(shape) == 2) == 2 * labelled  # forward + recompute

    with torch.no_grad():  # scoring (reference, held-out): the same numbers without autograd
        scored, _ = sequence_logps(chunked_model, *inputs, chunk_tokens=chunk)
    torch.testing.assert_close(scored, full_sums.detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# reference log-probs and the dtype they were scored in
# ---------------------------------------------------------------------------------------------
def test_the_reference_version_depends_on_the_scoring_precision():
    from tulu_pipeline.training.dpo_plan import SFTCheckpointRef, reference_logprobs_version

    ref = SFTCheckpointRef("sft-x", "models/sft-x", "f" * 64, None)
    versions = {precision: reference_logprobs_version("pairs-v1", ref, 512, precision)
                for precision in ("auto", True, False)}
    assert len(set(versions.values())) == 3
    assert versions[False] == reference_logprobs_version("pairs-v1", ref, 512, False)


class _Recomputed(Exception):
    pass


def test_reference_logprobs_scored_in_another_dtype_are_recomputed(tmp_path, monkeypatch):
    """fp32 numbers (a CPU run) are not reused to train in bf16 (a GPU run), nor the other way round: each row says
    the dtype it was scored in and `run_dpo` recomputes them in its own when they differ."""
    from tulu_pipeline.training.dpo import run_dpo
    from tulu_pipeline.training.dpo_reference import scoring_dtype

    model_dir, pairs = tiny_setup()
    train = [p for p in pairs if p["split"] == "train"][:4]
    heldout = [p for p in pairs if p["split"] == "heldout"][:2]
    fp32 = DPOTrainingConfig(**{**TINY_DPO, "max_steps": 1})
    rows = compute_reference_logprobs([*train, *heldout], model_dir, fp32)
    assert scoring_dtype(fp32) == "float32" and {row["dtype"] for row in rows} == {"float32"}

    recomputed: list[str] = []

    def record(pairs, model_dir, config, reporter=None):
        recomputed.append(scoring_dtype(config))
        raise _Recomputed

    monkeypatch.setattr(dpo_module, "compute_reference_logprobs", record)
    bf16 = fp32.model_copy(update={"bf16": True})
    with pytest.raises(_Recomputed):
        run_dpo(train, heldout, model_dir, tmp_path / "bf16", bf16, reference_logprobs=rows)
    with pytest.raises(_Recomputed):  # rows that do not say their dtype are not trusted either
        run_dpo(train, heldout, model_dir, tmp_path / "unknown", fp32,
                reference_logprobs=[{k: v for k, v in row.items() if k != "dtype"} for row in rows])
    assert recomputed == ["bfloat16", "float32"]

    result = run_dpo(train, heldout, model_dir, tmp_path / "fp32", fp32, reference_logprobs=rows)  # same dtype
    assert recomputed == ["bfloat16", "float32"]
    assert result.manifest["reference_logprobs_source"] == "precomputed"
    assert result.manifest["reference_logprobs_dtype"] == "float32"
    effect = result.metrics["heldout_effect"]  # paired over both held-out pairs, before vs after
    assert {d["n"] for d in effect.values()} == {len(heldout)} == {result.metrics["heldout_pairs"]}
    assert result.manifest["batch"] == {"world_size": 1, "global_batch_size": 4, "per_device_batch_size": 2,
                                        "gradient_accumulation_steps": 2, "unit": "pairs"}
