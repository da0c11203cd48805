"""Direct Preference Optimization and its close variants, as a prefkit plugin.

Papers:

- DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
  Reward Model", https://arxiv.org/abs/2305.18290
- Conservative DPO (label smoothing): Mitchell 2023, a note on DPO with noisy preferences,
  https://ericmitchell.ai/cdpo.pdf
- IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", https://arxiv.org/abs/2310.12036

The math lives in :func:`dpo_loss`, a pure function of log-prob tensors; :class:`DPO` adapts it
to the engine's :class:`~prefkit.api.objective.LossInputs`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from prefkit.api import LossInputs, LossOutput, Needs, Objective, ObjectiveParams, hookimpl

LossType = Literal["sigmoid", "ipo"]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO-family losses and implicit rewards, all ``[B]`` and fp32.

    Log-probs are sums over completion tokens. ``sigmoid`` is the paper's loss (with
    ``label_smoothing`` > 0: conservative DPO); ``ipo`` uses length-averaged log-probs and needs
    ``chosen_lengths``/``rejected_lengths`` (completion token counts). Reference values never
    receive gradients. Returns ``(losses, chosen_rewards, rejected_rewards)``; the rewards
    ``beta * (policy - reference)`` use the summed log-probs for every loss type and are detached.
    """
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.float().detach(), ref_rejected_logps.float().detach()

    if loss_type == "sigmoid":
        logits = (pc - pr) - (rc - rr)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(
            -beta * logits
        )
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (completion token counts)")
        if label_smoothing:
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
        # An empty completion (length 0) has log-prob 0; clamp so it averages to 0, not NaN.
        lc = chosen_lengths.float().clamp(min=1.0)
        lr = rejected_lengths.float().clamp(min=1.0)
        h = (pc / lc - rc / lc) - (pr / lr - rr / lr)
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")

    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    return losses, chosen_rewards, rejected_rewards


class DPOParams(ObjectiveParams):
    """Recipe ``objective.params`` for ``dpo``."""

    beta: float = Field(
        0.1, gt=0, description="Strength of the implicit KL penalty to the reference (smaller drifts further)."
    )
    loss_type: LossType = Field(
        "sigmoid", description="'sigmoid': the DPO paper's loss; 'ipo': squared loss on length-averaged log-ratios."
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed probability that a preference label is flipped (conservative DPO); sigmoid only.",
    )
    reference_free: bool = Field(
        False, description="Use no reference model: reference log-probs are taken to be 0."
    )

    @model_validator(mode="after")
    def _smoothing_only_for_sigmoid(self) -> DPOParams:
        if self.loss_type != "sigmoid" and self.label_smoothing:
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only")
        return self


class DPO(Objective):
    """DPO (sigmoid), conservative DPO (label smoothing), IPO and reference-free DPO."""

    name = "dpo"
    description = "Direct Preference Optimization on chosen/rejected pairs (also cDPO, IPO, reference-free)."
    Params = DPOParams

    def needs(self, params: DPOParams) -> Needs:
        return Needs(data="pairs", reference=not params.reference_free)

    def loss(self, params: DPOParams, inputs: LossInputs) -> LossOutput:
        chosen, rejected = inputs.chosen_logps, inputs.rejected_logps
        if params.reference_free:
            ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
        else:
            if inputs.ref_chosen_logps is None or inputs.ref_rejected_logps is None:
                raise ValueError("dpo needs reference log-probs (set reference_free: true to run without)")
            ref_chosen, ref_rejected = inputs.ref_chosen_logps, inputs.ref_rejected_logps

        lengths: dict[str, torch.Tensor] = {}
        if params.loss_type == "ipo":
            if inputs.chosen_mask is None or inputs.rejected_mask is None:
                raise ValueError("dpo with loss_type 'ipo' needs completion masks to count tokens")
            lengths = {"chosen_lengths": inputs.chosen_lengths, "rejected_lengths": inputs.rejected_lengths}

        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=params.beta,
            loss_type=params.loss_type,
            label_smoothing=params.label_smoothing,
            **lengths,
        )
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": chosen.detach().float(),
            "logps/rejected": rejected.detach().float(),
        }
        return LossOutput(losses=losses, metrics=metrics)


@hookimpl
def register_objectives(register):
    register(DPO())
