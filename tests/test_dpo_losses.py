"""The preference losses against hand computations on fixed tensors (no model).

Two pairs, summed log-probs and response token counts:

    policy chosen  [-10, -20]   policy rejected [-12, -18]
    ref    chosen  [-11, -20]   ref    rejected [-11, -19]
    tokens chosen  [  5,  10]   tokens rejected [  4,   6]

dpo, β = 0.5: log-ratios chosen [1, 0], rejected [-1, 1]; z = β·(1 − (−1), 0 − 1) = (1, −0.5);
    loss_i = log(1 + e^(−z_i)) = (0.3132617, 0.9740770), mean 0.6436693; rewards chosen (0.5, 0),
    rejected (−0.5, 0.5); margins (1, −0.5); accuracy 1/2.
dpo_norm, β = 0.5: per-token log-ratios chosen (1/5, 0/10) = (0.2, 0), rejected (−1/4, 1/6);
    z = 0.5·(0.45, −1/6) = (0.225, −0.0833333); loss (0.5869620, 0.7356817), mean 0.6613218;
    rewards chosen (0.1, 0), rejected (−0.125, 0.0833333); accuracy 1/2.
simpo, β = 2, γ = 1: average log-probs chosen (−2, −2), rejected (−3, −3); z = 2·1 − 1 = 1;
    loss (0.3132617, 0.3132617); rewards chosen (−4, −4), rejected (−6, −6); margins (2, 2); accuracy 1.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tulu_pipeline.training.dpo_config import DPO_PRESETS, dpo_config
from tulu_pipeline.training.dpo_losses import preference_loss


@pytest.fixture(scope="module")
def torch():
    import torch  # here, not at module level: collecting the suite stays free of torch

    return torch


@pytest.fixture(scope="module")
def t(torch) -> SimpleNamespace:
    """The two pairs of the module docstring: policy (PC, PR), reference (RC, RR) and token counts (NC, NR)."""
    return SimpleNamespace(PC=torch.tensor([-10.0, -20.0]), PR=torch.tensor([-12.0, -18.0]),
                           RC=torch.tensor([-11.0, -20.0]), RR=torch.tensor([-11.0, -19.0]),
                           NC=torch.tensor([5.0, 10.0]), NR=torch.tensor([4.0, 6.0]))


def close(tensor, values):
    import torch

    return torch.allclose(tensor, torch.tensor(values, dtype=tensor.dtype), atol=1e-6)


def test_dpo_sigmoid_by_hand(t):
    out = preference_loss("dpo", t.PC, t.PR, t.NC, t.NR, t.RC, t.RR, beta=0.5)
    assert close(out.losses, [0.3132617, 0.9740770])
    assert out.loss.item() == pytest.approx(0.6436693, abs=1e-6)
    assert close(out.chosen_rewards, [0.5, 0.0]) and close(out.rejected_rewards, [-0.5, 0.5])
    assert close(out.margins, [1.0, -0.5])
    assert out.accuracy.item() == 0.5


def test_dpo_norm_by_hand(t):
    out = preference_loss("dpo_norm", t.PC, t.PR, t.NC, t.NR, t.RC, t.RR, beta=0.5)
    assert close(out.losses, [0.5869620, 0.7356817])
    assert out.loss.item() == pytest.approx(0.6613218, abs=1e-6)
    assert close(out.chosen_rewards, [0.1, 0.0]) and close(out.rejected_rewards, [-0.125, 0.0833333])
    assert out.accuracy.item() == 0.5


def test_simpo_by_hand_needs_no_reference(t, torch):
    out = preference_loss("simpo", t.PC, t.PR, t.NC, torch.tensor([4.0, 6.0]), beta=2.0, gamma=1.0)
    assert close(out.losses, [0.3132617, 0.3132617])
    assert close(out.chosen_rewards, [-4.0, -4.0]) and close(out.rejected_rewards, [-6.0, -6.0])
    assert close(out.margins, [2.0, 2.0])
    assert out.accuracy.item() == 1.0


def test_policy_equal_to_reference_gives_log_2_and_no_accuracy(t):
    out = preference_loss("dpo_norm", t.RC, t.RR, t.NC, t.NR, t.RC, t.RR, beta=5.0)
    assert out.loss.item() == pytest.approx(0.6931472, abs=1e-6)
    assert out.accuracy.item() == 0.0  # ties are not wins


def test_gradient_flows_to_the_policy_only(t, torch):
    policy = t.PC.clone().requires_grad_(True)
    preference_loss("dpo_norm", policy, t.PR, t.NC, t.NR, t.RC, t.RR, beta=0.5).loss.backward()
    # d/dpc of mean(-logsigmoid(β(pc-rc)/n_c - ...)) = -β/n_c · σ(-z) / 2
    expected = [-0.5 / 5 * torch.sigmoid(torch.tensor(-0.225)).item() / 2,
                -0.5 / 10 * torch.sigmoid(torch.tensor(1 / 12)).item() / 2]
    assert close(policy.grad, expected)


def test_errors_name_the_problem(t):
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss("ipo", t.PC, t.PR, t.NC, t.NR, t.RC, t.RR)
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss("dpo", t.PC, t.PR, t.NC, t.NR)


def test_presets():
    tulu = DPO_PRESETS["tulu3_8b"]
    assert (tulu.loss_type, tulu.beta, tulu.learning_rate, tulu.num_epochs) == ("dpo_norm", 5.0, 5e-7, 1)
    assert tulu.effective_batch_size == 128 and tulu.max_length == 2048
    assert dpo_config("cpu_demo", beta=0.1).beta == 0.1
    assert dpo_config(loss_type="simpo", beta=2.0, gamma_beta_ratio=0.5).gamma == 1.0
    with pytest.raises(KeyError, match="unknown DPO preset"):
        dpo_config("nope")
