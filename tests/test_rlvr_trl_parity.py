"""Our GRPO loss against TRL 1.16's, on identical tensors, for every variant both have.

TRL's loss lives in ``GRPOTrainer._compute_loss`` (a method reading attributes of the trainer). We build a bare
``GRPOTrainer`` with ``__new__``, set exactly the attributes ``_compute_loss`` reads, and hand it the per-token
log-probs through ``_get_per_token_logps_and_entropies`` (the only model call it makes). Our `grpo_loss` gets the
same tensors; the loss and its gradient with respect to the log-probs (everything upstream of them is the same
autograd graph in both) must agree to 1e-5, and so must TRL's clip-fraction, KL and entropy metrics.

One micro-batch, one process, no gradient accumulation: the setting in which TRL's per-micro-batch
normalizations and our per-step ones coincide (``num_sequences`` = B, ``num_tokens`` = the mask's sum).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

from tulu_pipeline.training.rlvr_step import grpo_loss, importance_weights  # noqa: E402
from tulu_pipeline.training.rlvr_config import RLVRTrainingConfig  # noqa: E402

B, T, MAX_LEN = 6, 7, 9
TOL = 1e-5


class _OneProcess:
    """The slice of an accelerate ``Accelerator`` that ``_compute_loss`` touches, for a single process."""

    num_processes = 1

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _batch(seed: int = 0, truncated_row: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    if truncated_row is not None:  # what mask_truncated_completions does to a completion cut off without EOS
        mask[truncated_row] = 0.0
    logps = -torch.rand(B, T, generator=g) * 3 - 0.05
    # old / sampler / reference log-probs differ from the current ones enough that both clips and the cap bite
    old = logps + (torch.rand(B, T, generator=g) - 0.5) * 1.2
    sampler = old + (torch.rand(B, T, generator=g) - 0.5) * 2.0
    ref = logps + (torch.rand(B, T, generator=g) - 0.5) * 0.8
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.0, 0.9])
    entropies = torch.rand(B, T, generator=g) * 4
    return {"logps": logps * mask, "old": old * mask, "sampler": sampler * mask, "ref": ref * mask, "mask": mask,
            "advantages": advantages, "entropies": entropies}


def _trl_loss(batch: dict, config: RLVRTrainingConfig, is_weights: torch.Tensor | None):
    trainer = trl_grpo.GRPOTrainer.__new__(trl_grpo.GRPOTrainer)
    trainer.args = SimpleNamespace(use_bias_correction_kl=False, delta=config.delta, steps_per_generation=1)
    trainer.loss_type = config.loss_type
    trainer.beta = config.beta
    trainer.epsilon_low, trainer.epsilon_high = config.epsilon_low, config.clip_high
    trainer.importance_sampling_level = "token"
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.aux_loss_enabled = False
    trainer._entropy_bonus_enabled = False
    trainer.use_vllm = is_weights is not None
    trainer.vllm_importance_sampling_correction = is_weights is not None
    trainer.max_completion_length = config.max_completion_length
    trainer.current_gradient_accumulation_steps = 1
    trainer.accelerator = _OneProcess()
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    logps = batch["logps"].clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, batch["entropies"], None)
    mask = batch["mask"].long()
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": batch["advantages"], "old_per_token_logps": batch["old"],
        "ref_per_token_logps": batch["ref"], "num_items_in_batch": mask.sum(),
    }
    if is_weights is not None:
        inputs["importance_sampling_ratio"] = is_weights
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), logps.grad, metrics


def _our_loss(batch: dict, config: RLVRTrainingConfig, is_weights: torch.Tensor | None):
    logps = batch["logps"].clone().requires_grad_(True)
    terms = grpo_loss(logps, batch["old"], batch["advantages"], batch["mask"], config, num_sequences=B,
                      num_tokens=int(batch["mask"].sum()), ref_logps=batch["ref"], is_weights=is_weights)
    terms.loss.backward()
    return float(terms.loss.detach()), logps.grad, terms


VARIANTS = {
    "grpo": dict(loss_type="grpo"),
    "dapo": dict(loss_type="dapo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo_clip_higher": dict(loss_type="dapo", epsilon_high=0.28),
    "grpo_clip_higher_kl": dict(loss_type="grpo", epsilon_high=0.28, beta=0.04),
    "dapo_kl": dict(loss_type="dapo", beta=0.05),
    "dr_grpo_kl_delta": dict(loss_type="dr_grpo", beta=0.05, delta=1.5),
    "dapo_two_sided_delta": dict(loss_type="dapo", epsilon_high=0.28, delta=1.3),
    "dapo_importance_sampling": dict(loss_type="dapo", importance_sampling_correction=True),
    "grpo_importance_sampling_kl": dict(loss_type="grpo", beta=0.04, importance_sampling_correction=True,
                                        importance_sampling_cap=1.5),
    "dapo_masked_truncated": dict(loss_type="dapo", mask_truncated_completions=True, unfinished_penalty=None),
    "grpo_masked_truncated": dict(loss_type="grpo", mask_truncated_completions=True, unfinished_penalty=None),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_loss_and_gradient_equal_trl(name):
    config = RLVRTrainingConfig(max_completion_length=MAX_LEN, **{"beta": 0.0, **VARIANTS[name]})
    batch = _batch(seed=len(name), truncated_row=2 if config.mask_truncated_completions else None)
    is_weights = None
    if config.importance_sampling_correction:
        # what TRL's _generate_and_score_completions computes in its "token_truncate" mode (old vs sampler)
        is_weights = importance_weights(batch["old"], batch["sampler"], batch["mask"],
                                        config.importance_sampling_cap)
        assert float(is_weights.max()) == pytest.approx(config.importance_sampling_cap)  # the cap bites
    trl_value, trl_grad, trl_metrics = _trl_loss(batch, config, is_weights)
    ours, our_grad, terms = _our_loss(batch, config, is_weights)
    print(f"{name}: TRL {trl_value:.6f} ours {ours:.6f}; max |grad diff| {(trl_grad - our_grad).abs().max():.2e}")
    assert ours == pytest.approx(trl_value, abs=TOL, rel=TOL)
    assert torch.allclose(our_grad, trl_grad, atol=TOL, rtol=TOL)
    assert float(trl_grad.abs().sum()) > 0
    tokens = terms.tokens
    assert tokens == float(batch["mask"].sum())
    assert terms.clip_low / tokens == pytest.approx(trl_metrics["clip_ratio/low_mean"], abs=TOL)
    assert terms.clip_high / tokens == pytest.approx(trl_metrics["clip_ratio/high_mean"], abs=TOL)
    if config.beta > 0:
        assert terms.kl_sum / tokens == pytest.approx(trl_metrics["kl"], abs=TOL)


def test_the_variants_differ_from_each_other():
    """Each option changes the loss on this batch, so a test above cannot pass by ignoring it."""
    batch = _batch(seed=1)
    values = {}
    for name, overrides in VARIANTS.items():
        config = RLVRTrainingConfig(max_completion_length=MAX_LEN, **{"beta": 0.0, **overrides})
        if "masked" in name:
            continue  # the mask is an input, not an option of the loss function
        weights = (importance_weights(batch["old"], batch["sampler"], batch["mask"], config.importance_sampling_cap)
                   if config.importance_sampling_correction else None)
        values[name] = _our_loss(batch, config, weights)[0]
    assert len({round(v, 6) for v in values.values()}) == len(values), values


def test_importance_weights_are_open_instructs_truncated_is():
    """open-instruct grpo_utils.compute_tis_weights: ``clamp(exp(old_logprob - vllm_logprobs), max=cap)`` on
    response tokens, 1 elsewhere (TRL: ``vllm_importance_sampling_mode="token_truncate"``)."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    expected = torch.tensor([[min(2.0, 2.718281828 ** 0.5), 2.718281828 ** -1.0, 1.0],
                             [2.0, 2.718281828 ** 0.2, 1.0]])
    assert torch.allclose(importance_weights(old, sampler, mask, cap=2.0), expected, atol=1e-6)
