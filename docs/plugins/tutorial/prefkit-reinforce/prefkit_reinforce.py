"""REINFORCE with a leave-one-out baseline, as a prefkit plugin (an online objective).

Papers:

- Williams 1992, "Simple statistical gradient-following algorithms for connectionist
  reinforcement learning", Machine Learning 8 (REINFORCE);
- Kool, van Hoof and Welling 2019, "Buy 4 REINFORCE samples, get a baseline for free!",
  https://openreview.net/forum?id=r1lgTGL5DE (the leave-one-out baseline).

prefkit's online loop samples G completions for each prompt and scores them. Each completion's
advantage is its score minus the mean score of the *other* G - 1 completions of the same prompt:

    A_i = s_i - 1/(G-1) * sum_{j != i} s_j

The baseline does not depend on completion i itself, so the gradient estimate stays unbiased, and
no value model is needed. The loss is plain REINFORCE, averaged over the completion tokens:

    loss = - sum_i sum_t A_i * log pi(y_it | x_i, y_i<t)  /  number of completion tokens

With ``kl_coef > 0`` the score is first penalised by the sequence's KL estimate to the reference
policy, ``s_i - kl_coef * sum_t (log pi_old(y_it) - log pi_ref(y_it))``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from prefkit.api import LossOutput, LossUnit, Needs, OnlineInputs, OnlineObjective, OnlineParams, Rollout, hookimpl


def loo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages ``[N] -> [N]``, fp32: each score minus the mean score of the other
    samples with the same group id (the other completions of its prompt).

    For a group of G samples this equals ``G / (G - 1) * (s_i - mean(s))``, so the advantages of a
    group sum to zero. Raises ValueError for a group with a single sample (it has no "others").
    """
    scores = scores.float()
    _, group = torch.unique(group_ids.to(scores.device), return_inverse=True)
    groups = int(group.max()) + 1 if group.numel() else 0
    sums = torch.zeros(groups, device=scores.device).index_add_(0, group, scores)
    counts = torch.zeros(groups, device=scores.device).index_add_(0, group, torch.ones_like(scores))
    if bool((counts < 2).any()):
        raise ValueError("every prompt needs at least 2 samples for a leave-one-out baseline; "
                         "raise sampling.num_samples")
    others = (sums[group] - scores) / (counts[group] - 1)
    return scores - others


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The k1 estimate of KL(pi || pi_ref) of each sampled sequence: the sum over its completion
    tokens of ``logp - ref_logp``. ``[N, T]`` -> ``[N]``, fp32."""
    return ((logps.float() - ref_logps.float()) * mask.float()).sum(-1)


def reinforce_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``-(A * log pi)`` summed over the completion tokens of the R sequences, divided by their
    number of tokens (a token mean); a 0-dim fp32 tensor. ``logps`` ``[R, T]`` carries the
    gradient; ``advantages`` ``[R]`` is a constant."""
    mask = mask.float()
    per_token = -advantages.detach().float()[:, None] * logps.float() * mask
    return per_token.sum() / mask.sum().clamp(min=1.0)


class ReinforceParams(OnlineParams):
    """Recipe ``objective.params`` for ``reinforce_loo``; with the online loop's own
    ``rollout_batch_size``, ``update_epochs`` and ``mini_batch_size`` (from ``OnlineParams``)."""

    kl_coef: float = Field(
        0.0, ge=0, description="Subtract kl_coef x the sequence's KL to the reference from its score (0: no reference)."
    )
    normalize: bool = Field(False, description="Divide the advantages by their standard deviation over the rollout.")


class ReinforceLOO(OnlineObjective):
    name = "reinforce_loo"
    description = "REINFORCE with a leave-one-out baseline over the samples of each prompt (RLOO)."
    Params = ReinforceParams

    def needs(self, params: ReinforceParams) -> Needs:
        # prompts, a reward and sampling; the reference policy only when the score pays a KL penalty
        return Needs(data="prompts", reward=True, generation=True, reference=params.kl_coef > 0)

    def min_samples_per_prompt(self, params: ReinforceParams) -> int:
        return 2  # a leave-one-out baseline needs another sample of the same prompt

    def loss_unit(self, params: ReinforceParams) -> LossUnit:
        return "token"  # loss() is a mean over the chunk's completion tokens

    def prepare(self, params: ReinforceParams, rollout: Rollout, state: None) -> dict[str, float]:
        # state is what init_state() returned: None, REINFORCE keeps nothing across rollouts
        scores = rollout.scores.float()
        metrics: dict[str, float] = {}
        if params.kl_coef > 0:
            kl = sequence_kl(rollout.logps, rollout.ref_logps, rollout.mask)
            scores = scores - params.kl_coef * kl
            metrics["reward/total"] = float(scores.mean())  # the penalised score (the loop logs "kl")
        advantages = loo_advantages(scores, rollout.group_ids)
        metrics["advantages/std"] = float(advantages.std(unbiased=False))
        if params.normalize:
            advantages = advantages / (advantages.std(unbiased=False) + 1e-8)
        rollout.extras["advantages"] = advantages
        return metrics

    def loss(self, params: ReinforceParams, inputs: OnlineInputs) -> LossOutput:
        advantages, mask = inputs.extras["advantages"], inputs.mask
        loss = reinforce_loss(inputs.logps, advantages, mask)
        with torch.no_grad():
            tokens = mask.float().sum().clamp(min=1.0)
            log_ratio = (inputs.logps.float() - inputs.old_logps.float()) * mask
            metrics = {
                "logps/mean": (inputs.logps.float() * mask).sum() / tokens,
                # how far the policy has moved from the one that sampled (0 on the first update)
                "policy/approxkl": 0.5 * (log_ratio ** 2).sum() / tokens,
            }
        return LossOutput(losses=loss, metrics=metrics)


@hookimpl
def register_objectives(register):
    register(ReinforceLOO())
