"""SimPO: Simple Preference Optimization with a reference-free reward, as a prefkit plugin.

Paper: Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
Reward", https://arxiv.org/abs/2405.14734

The implicit reward of an answer is its *average* log-probability per token, scaled by beta, and
the chosen answer must beat the rejected one by a margin gamma:

    loss = -log sigmoid( beta/|y_w| * log pi(y_w|x)  -  beta/|y_l| * log pi(y_l|x)  -  gamma )

No reference model is needed, and the length normalisation keeps the policy from winning by
simply writing longer answers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prefkit.api import LossInputs, LossOutput, Needs, Objective, ObjectiveParams, hookimpl


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example SimPO losses and rewards, all ``[B]`` in fp32.

    ``*_logps`` are log-probs summed over the answer tokens, ``*_lengths`` the numbers of answer
    tokens. Returns ``(losses, chosen_rewards, rejected_rewards)``, the rewards detached.
    """
    chosen_rewards = beta * chosen_logps.float() / chosen_lengths.float().clamp(min=1.0)
    rejected_rewards = beta * rejected_logps.float() / rejected_lengths.float().clamp(min=1.0)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


class SimPOParams(ObjectiveParams):
    """Recipe ``objective.params`` for ``simpo``; unknown keys are refused."""

    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised reward (the paper uses 2 to 2.5).")
    gamma: float = Field(1.0, ge=0, description="Target reward margin between chosen and rejected answers.")


class SimPO(Objective):
    name = "simpo"
    description = "SimPO: reference-free, length-normalised margin loss on chosen/rejected pairs."
    Params = SimPOParams

    def needs(self, params: SimPOParams) -> Needs:
        # pairs data and an LM head; no reference model, no reward, no sampling
        return Needs(data="pairs", reference=False)

    def loss(self, params: SimPOParams, inputs: LossInputs) -> LossOutput:
        losses, chosen, rejected = simpo_loss(
            inputs.chosen_logps,
            inputs.rejected_logps,
            inputs.chosen_lengths,
            inputs.rejected_lengths,
            beta=params.beta,
            gamma=params.gamma,
        )
        metrics = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": (chosen > rejected).float(),
            "logps/chosen": inputs.chosen_logps.detach().float(),
            "logps/rejected": inputs.rejected_logps.detach().float(),
        }
        return LossOutput(losses=losses, metrics=metrics)


@hookimpl
def register_objectives(register):
    register(SimPO())
