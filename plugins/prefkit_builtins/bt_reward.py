"""Bradley-Terry reward model: a scalar head on a causal LM backbone, trained on preference pairs.

Papers: Bradley & Terry (1952), "Rank analysis of incomplete block designs";
Ouyang et al. 2022, InstructGPT, https://arxiv.org/abs/2203.02155 (the pairwise reward loss);
Touvron et al. 2023, Llama 2, https://arxiv.org/abs/2307.09288 (the per-pair margin);
Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244 (reward centering).

Loss per pair: -log sigma(r(x, y_w) - r(x, y_l) - m) + c * (r(x, y_w) + r(x, y_l))^2,
with m the row's `margin` column (0 when absent or turned off) and c the centering coefficient.
The trained model is saved in `final/` as a `*ForSequenceClassification` model, usable anywhere
prefkit takes a reward source: `reward: {name: reward_model, params: {path: RUN/final}}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prefkit.api import LossInputs, LossOutput, Needs, Objective, ObjectiveParams, hookimpl


def bt_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss, fp32: -log sigma(r_w - r_l - m) + c (r_w + r_l)^2."""
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.float()
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return losses


class BTRewardParams(ObjectiveParams):
    use_margin: bool = Field(True, description="Subtract the data's per-row `margin` column when it has one.")
    center_coef: float = Field(
        0.0, ge=0.0, description="Reward centering: adds coef * (r_w + r_l)^2, pulling rewards towards 0."
    )


class BTReward(Objective):
    name = "bt_reward"
    description = "Bradley-Terry reward model: a scalar head trained so that r(chosen) > r(rejected)."
    Params = BTRewardParams

    def needs(self, params: BTRewardParams) -> Needs:
        return Needs(data="pairs", head="scalar")

    def loss(self, params: BTRewardParams, inputs: LossInputs) -> LossOutput:
        chosen, rejected = inputs.chosen_rewards, inputs.rejected_rewards
        margin = inputs.margin if params.use_margin else None
        losses = bt_loss(chosen, rejected, margin=margin, center_coef=params.center_coef)
        c, r = chosen.detach().float(), rejected.detach().float()
        both = torch.cat([c, r])
        metrics = {
            "accuracy": (c > r).float(),
            "margin": c - r,
            "rewards/chosen": c,
            "rewards/rejected": r,
            "rewards/margins": c - r,
            "rewards/accuracies": (c > r).float(),
            "reward/mean": both.mean(),
            "reward/std": both.std(unbiased=False),
        }
        return LossOutput(losses=losses, metrics=metrics)


@hookimpl
def register_objectives(register):
    register(BTReward())
