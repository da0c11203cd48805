"""KTO, Kahneman-Tversky Optimization, as a prefkit plugin.

Paper: Ethayarajh, Xu, Muennighoff, Jurafsky and Kiela 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization", https://arxiv.org/abs/2402.01306

KTO learns from unpaired feedback: each example is one prompt x, one completion y and a binary
label (desirable or undesirable), with no second completion to compare against. Write
r(x, y) = log pi_theta(y|x) - log pi_ref(y|x) for the log-ratio (log-probs summed over the
completion's tokens) and z0 for the reference point, an estimate of KL(pi_theta || pi_ref) that
gets no gradient. The paper's loss is L_KTO = E[lambda_y - v(x, y)], with the value
v = lambda_D * sigmoid(beta * (r - z0)) for a desirable y and lambda_U * sigmoid(beta * (z0 - r))
for an undesirable one; per example:

    desirable:    lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - r)))

so a desirable completion is pushed above the reference point and an undesirable one below it.

The reference point. The paper estimates z0 per batch from mismatched pairs: each prompt with the
completion of another example, whose log-ratio under the policy and the reference averages to an
estimate of the KL; the estimate is clamped at 0 and gets no gradient. :func:`kl_reference_point`
does this on one batch, as TRL's ``KTOTrainer`` does per batch. The mismatched completions come
from the engine (``Needs(mismatched=True)``): example i's prompt with example (i + 1) mod N's
completion, fixed when the dataset is prepared, so their reference log-probs are cached like the
others. TRL additionally averages the estimate over processes; here it is the local batch's.

Weights. TRL's defaults are ``desirable_weight = undesirable_weight = 1.0``, as here. With
unbalanced data the paper advises (its Eq. 8, against which TRL's KTOTrainer checks the weights)
choosing them so that

    desirable_weight * n_D / (undesirable_weight * n_U)  is in  [1, 4/3]

(n_D, n_U: the numbers of desirable and undesirable examples), e.g. with one desirable example
for every ten undesirable ones, undesirable_weight = 1 and desirable_weight in [10, 13.33].

The math lives in :func:`kto_loss` and :func:`kl_reference_point`, pure functions of tensors;
:class:`KTO` adapts them to the engine's :class:`~prefkit.api.LossInputs`.
"""

from __future__ import annotations

import torch
from pydantic import Field

from prefkit.api import LossInputs, LossOutput, Needs, Objective, ObjectiveParams, hookimpl


def kl_reference_point(mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 for one batch: ``mean(policy - reference)`` over the mismatched
    prompt/completion pairs ``[B]``, clamped at a minimum of 0 and detached (a 0-dim fp32 tensor).

    This is the batch estimate TRL's ``KTOTrainer`` uses (there also averaged across processes).
    No gradient flows through it, into either argument.
    """
    logratios = mismatched_logps.detach().float() - ref_mismatched_logps.detach().float()
    return logratios.mean().clamp(min=0.0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses and implied rewards, both ``[B]`` fp32.

    ``policy_logps`` / ``ref_logps`` are summed completion log-probs ``[B]``; ``labels`` ``[B]`` is
    1 for a desirable completion and 0 for an undesirable one (a value above 0.5 counts as
    desirable); ``kl`` is the reference point z0 (a number or a 0-dim tensor; detached here). With
    r = policy - ref (the log-ratio):

    - desirable:   ``desirable_weight * (1 - sigmoid(beta * (r - kl)))``
    - undesirable: ``undesirable_weight * (1 - sigmoid(beta * (kl - r)))``

    ``1 - sigmoid(u)`` is computed as ``sigmoid(-u)``, which keeps its precision where
    ``sigmoid(u)`` is close to 1. Gradients flow into ``policy_logps`` only. Returns ``(losses, rewards)`` with the rewards
    ``beta * r``, detached.
    """
    policy = policy_logps.float()
    ref = ref_logps.float().detach()
    z0 = torch.as_tensor(kl, dtype=torch.float32, device=policy.device).detach()
    desirable = labels.to(policy.device) > 0.5

    logratios = policy - ref
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (logratios - z0))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z0 - logratios))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = beta * logratios.detach()
    return losses, rewards


class KTOParams(ObjectiveParams):
    """Recipe ``objective.params`` for ``kto``."""

    beta: float = Field(
        0.1, gt=0, description="Scale of the implied reward beta * log(pi/pi_ref); larger stays nearer the reference."
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="lambda_D: weight of the loss on desirable examples (TRL's default 1.0)."
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="lambda_U: weight of the loss on undesirable examples (TRL's default 1.0)."
    )


class KTO(Objective):
    """KTO on unpaired data (prompt, completion, desirable/undesirable label)."""

    name = "kto"
    description = "Kahneman-Tversky Optimization on unpaired desirable/undesirable completions."
    Params = KTOParams

    def needs(self, params: KTOParams) -> Needs:
        return Needs(data="unpaired", reference=True, mismatched=True)

    def loss(self, params: KTOParams, inputs: LossInputs) -> LossOutput:
        policy, ref = inputs.completion_logps, inputs.ref_completion_logps
        mismatched, ref_mismatched = inputs.mismatched_logps, inputs.ref_mismatched_logps
        labels = inputs.columns.get("label")
        missing = [name for name, value in (("completion_logps", policy), ("ref_completion_logps", ref),
                                            ("mismatched_logps", mismatched),
                                            ("ref_mismatched_logps", ref_mismatched),
                                            ("columns['label']", labels)) if value is None]
        if missing:
            raise ValueError(f"kto needs {', '.join(missing)}; it was given {', '.join(inputs.given()) or 'nothing'}")

        kl = kl_reference_point(mismatched, ref_mismatched)
        losses, rewards = kto_loss(policy, ref, labels, kl, beta=params.beta,
                                   desirable_weight=params.desirable_weight,
                                   undesirable_weight=params.undesirable_weight)

        desirable = labels.to(rewards.device) > 0.5
        logps = policy.detach().float()
        metrics: dict[str, torch.Tensor | float] = {"kl": kl}
        if bool(desirable.any()):
            metrics["rewards/chosen"] = rewards[desirable].mean()
            metrics["logps/chosen"] = logps[desirable].mean()
        if bool((~desirable).any()):
            metrics["rewards/rejected"] = rewards[~desirable].mean()
            metrics["logps/rejected"] = logps[~desirable].mean()
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return LossOutput(losses=losses, metrics=metrics)


@hookimpl
def register_objectives(register):
    register(KTO())
