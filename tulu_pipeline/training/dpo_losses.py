"""Preference losses on per-sequence log-probabilities: ``dpo``, ``dpo_norm`` (Tülu 3) and ``simpo``.

Every loss takes, per pair, the *sum* of the response tokens' log-probs under the policy (and, except SimPO,
the reference) and the response's token count, so the same stored reference numbers serve every variant.

- ``dpo`` (Rafailov et al. 2023; TRL's default ``loss_type="sigmoid"``, open-instruct's ``dpo``)::

      z = β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]      loss = −log σ(z)

- ``dpo_norm`` (Tülu 3's loss; open-instruct ``DPOLossType.dpo_norm``, whose ``is_average_loss`` makes it feed
  per-token *averaged* log-probs to the DPO loss; TRL 1.16's ``loss_type="sigmoid_norm"`` divides each
  policy−reference log-ratio by its completion's token count, which is the same number since policy and
  reference score the same tokens)::

      z = β·[(log π(y_w) − log π_ref(y_w))/|y_w| − (log π(y_l) − log π_ref(y_l))/|y_l|]

- ``simpo`` (Meng et al. 2024; open-instruct's ``simpo_loss`` with ``gamma_beta_ratio = γ/β``), reference-free::

      z = β·(log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ

Implicit rewards (what TRL and open-instruct log as ``rewards/chosen`` etc.): β times the (normalized, for
``dpo_norm``) policy−reference log-ratio; for SimPO β times the average log-prob. ``margins`` are chosen minus
rejected rewards and ``accuracy`` is the share of pairs whose chosen reward is strictly higher (a tie, e.g.
policy == reference, counts as wrong, as in TRL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

LossType = Literal["dpo", "dpo_norm", "simpo"]
LOSS_TYPES: tuple[str, ...] = ("dpo", "dpo_norm", "simpo")
REFERENCE_FREE = frozenset({"simpo"})


@dataclass
class PreferenceLoss:
    """Per-pair tensors of one batch; ``loss`` is their mean (what is optimized)."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """Share of pairs whose chosen reward beats the rejected one (a scalar tensor)."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def _sigmoid_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    import torch.nn.functional as F

    return -F.logsigmoid(beta * logits)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> PreferenceLoss:
    """Standard DPO (sigmoid) on summed log-probs."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = _sigmoid_loss(chosen_ratio - rejected_ratio, beta)
    return PreferenceLoss(losses.mean(), losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def dpo_norm_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                  beta: float) -> PreferenceLoss:
    """Length-normalized DPO (Tülu 3): the log-ratios divided by each response's token count."""
    chosen_ratio = (policy_chosen - ref_chosen) / chosen_tokens.clamp(min=1)
    rejected_ratio = (policy_rejected - ref_rejected) / rejected_tokens.clamp(min=1)
    losses = _sigmoid_loss(chosen_ratio - rejected_ratio, beta)
    return PreferenceLoss(losses.mean(), losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, gamma: float) -> PreferenceLoss:
    """SimPO: reference-free, average log-probs, target margin ``gamma`` (in reward units, i.e. after β)."""
    chosen_avg = policy_chosen / chosen_tokens.clamp(min=1)
    rejected_avg = policy_rejected / rejected_tokens.clamp(min=1)
    losses = _sigmoid_loss(chosen_avg - rejected_avg - gamma / beta, beta)
    return PreferenceLoss(losses.mean(), losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())


def preference_loss(
    loss_type: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    beta: float = 0.1,
    gamma: float = 0.0,
) -> PreferenceLoss:
    """Dispatch on ``loss_type`` (one of `LOSS_TYPES`); ``gamma`` is used by ``simpo`` only."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if loss_type == "simpo":
        return simpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta, gamma)
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"loss_type {loss_type!r} needs the reference model's log-probs")
    if loss_type == "dpo":
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return dpo_norm_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
                         beta)
