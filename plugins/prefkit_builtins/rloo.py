"""RLOO, REINFORCE with a leave-one-out baseline, as a prefkit plugin (an online objective).

Papers:

- RLOO for RLHF: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
  Learning from Human Feedback in LLMs", https://arxiv.org/abs/2402.14740 (a whole completion is one
  action; the KL penalty is part of its reward; the baseline of a sample is the mean reward of the
  other samples for the same prompt)
- The leave-one-out baseline: Kool, van Hoof and Welling 2019, "Buy 4 REINFORCE Samples, Get a
  Baseline for Free!", ICLR 2019 workshop Deep Reinforcement Learning meets Structured Prediction,
  https://wouterkool.github.io/publication/buy-4-samples-free-baseline/
- REINFORCE: Williams 1992, "Simple statistical gradient-following algorithms for connectionist
  reinforcement learning", Machine Learning 8
- The clipped surrogate (used when a rollout is reused): Schulman et al. 2017, "Proximal Policy
  Optimization Algorithms", https://arxiv.org/abs/1707.06347

For each prompt the online loop samples G >= 2 completions. Each completion's reward is its score
minus ``beta`` times its sequence-level KL to the reference (k1, summed over its tokens, measured at
sampling time); its advantage is that reward minus the mean reward of the other G - 1 completions of
its prompt, the same for all of its tokens. With ``update_epochs: 1`` and one minibatch per rollout
the ratio is 1 and the loss is plain REINFORCE with this baseline; more passes use PPO's clip.

The math is in pure functions of tensors (fp32, tested with hand arithmetic in ``tests/test_rloo.py``):
:func:`sequence_kl`, :func:`leave_one_out_advantages`, :func:`normalize` and :func:`rloo_token_loss`.
:class:`RLOO` adapts them to the online loop's :class:`~prefkit.api.Rollout` and
:class:`~prefkit.api.OnlineInputs`.

Shapes: ``N`` sequences in a rollout, ``R`` in a chunk, ``T`` completion positions. Token tensors are
aligned with the completion tokens and right-padded; ``mask`` is true on completion tokens.
"""

from __future__ import annotations

import torch
from pydantic import Field

from prefkit.api import LossOutput, LossUnit, Needs, OnlineInputs, OnlineObjective, OnlineParams, Rollout, hookimpl
from prefkit_builtins.grpo import clipped_surrogate, on_mask

# ----------------------------------------------------------------------------- rewards and advantages


def sequence_kl(old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's k1 estimate of KL(pi_old || pi_ref) ``[N]``, fp32: the sum over its completion
    tokens of ``old_logp - ref_logp`` (its log-likelihood ratio; can be negative). Padding is ignored."""
    return (on_mask(old_logps.detach(), mask) - on_mask(ref_logps.detach(), mask)).sum(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO's advantages ``[N]``, fp32: each reward minus the mean reward of the *other* members of
    its group (the completions of the same prompt).

    ``A_i = R_i - (S_g - R_i) / (n_g - 1)`` with ``S_g`` the sum and ``n_g`` the size of the group of
    ``i``; equivalently ``n_g / (n_g - 1) * (R_i - mean_g)``. The baseline does not depend on ``R_i``,
    so the policy gradient stays unbiased. A group of one has no baseline: ValueError. No gradient.
    """
    rewards = rewards.detach().float()
    _, inverse, counts = torch.unique(group_ids.to(rewards.device), return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        raise ValueError(
            f"RLOO needs at least 2 samples per prompt for a leave-one-out baseline (group sizes: "
            f"{counts.tolist()}); set sampling.num_samples >= 2"
        )
    sums = torch.zeros(len(counts), dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    others = (sums[inverse] - rewards) / (counts[inverse].to(rewards.dtype) - 1)
    return rewards - others


def normalize(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(A - mean) / (std + eps)`` over all of ``advantages`` ``[N]``, with the sample standard
    deviation (``n - 1``), as TRL's RLOOTrainer does with ``normalize_advantage``; fp32."""
    advantages = advantages.detach().float()
    return (advantages - advantages.mean()) / (advantages.std() + eps)


# ----------------------------------------------------------------------------- the loss


def rloo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate per token ``[R, T]``, fp32 and zero on padding, with each sequence's
    advantage (``advantages`` ``[R]``) broadcast over its tokens.

    With ``ratio = exp(logp - old_logp)`` per token and ``eps = clip_range``::

        loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)

    At ratio 1 (before the policy has moved from the sampling policy) its gradient is
    ``-A * grad logp_t``: REINFORCE.
    Gradients reach ``logps`` only. Returns ``(losses, stats)``; ``stats["clipped"]`` ``[R, T]`` is 1.0
    where the clipped term was the smaller (chosen), 0 elsewhere and on padding.
    """
    losses, clipped = clipped_surrogate(logps, old_logps, advantages, mask.bool(), clip_low=clip_range,
                                        clip_high=clip_range)
    return losses, {"clipped": clipped}


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the valid tokens (0 when there are none), 0-dim fp32."""
    maskf = mask.float()
    return (x.float() * maskf).sum() / maskf.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- the objective


class RLOOParams(OnlineParams):
    """Recipe ``objective.params`` for ``rloo``. G, the completions per prompt, is the recipe's
    ``sampling.num_samples`` (at least 2); the rollout settings come from :class:`prefkit.api.OnlineParams`."""

    beta: float = Field(
        0.05, ge=0, description="KL coefficient: reward = score - beta * sequence KL (k1); 0: no reference."
    )
    clip_range: float = Field(
        0.2, gt=0, lt=1, description="PPO's epsilon: the per-token ratio is clipped to 1 +- clip_range."
    )
    normalize_advantages: bool = Field(
        False, description="Normalise the advantages to mean 0, std 1 over each rollout (after the baseline)."
    )


class RLOO(OnlineObjective):
    """RLOO: REINFORCE on a KL-penalised sequence reward with a leave-one-out baseline."""

    name = "rloo"
    description = "RLOO: REINFORCE with a leave-one-out baseline over G samples per prompt, KL penalty in the reward."
    Params = RLOOParams

    def needs(self, params: RLOOParams) -> Needs:
        return Needs(data="prompts", reward=True, generation=True, reference=params.beta > 0)

    def min_samples_per_prompt(self, params: RLOOParams) -> int:
        return 2

    def loss_unit(self, params: RLOOParams) -> LossUnit:
        return "token"

    def prepare(self, params: RLOOParams, rollout: Rollout, state: None) -> dict[str, float]:
        """Rewards ``R = score - beta * sequence_kl`` and their leave-one-out advantages ``[N]`` into
        ``rollout.extras["advantages"]``. Metrics: ``kl`` (mean sequence KL, when the reference's
        log-probs are there) and ``reward/total`` (mean ``R``)."""
        with torch.no_grad():
            scores = rollout.scores.detach().float()
            rewards = scores
            metrics: dict[str, float] = {}
            if rollout.ref_logps is not None:
                kl = sequence_kl(rollout.logps, rollout.ref_logps, rollout.mask).to(scores.device)
                rewards = scores - params.beta * kl
                metrics["kl"] = float(kl.mean())
            elif params.beta > 0:
                raise ValueError("RLOO with beta > 0 needs the reference's log-probs (rollout.ref_logps)")
            advantages = leave_one_out_advantages(rewards, rollout.group_ids)
            if params.normalize_advantages:
                advantages = normalize(advantages)
            rollout.extras["advantages"] = advantages
            metrics["reward/total"] = float(rewards.mean())
            return metrics

    def loss(self, params: RLOOParams, inputs: OnlineInputs) -> LossOutput:
        """The clipped surrogate averaged over the chunk's valid tokens."""
        if "advantages" not in inputs.extras:
            raise ValueError("RLOO's loss needs extras['advantages']; prepare() writes them")
        per_token, stats = rloo_token_loss(
            inputs.logps, inputs.old_logps, inputs.extras["advantages"], inputs.mask, clip_range=params.clip_range
        )
        loss = token_mean(per_token, inputs.mask)
        return LossOutput(
            losses=loss,
            metrics={"loss/policy": loss.detach(), "policy/clipfrac": token_mean(stats["clipped"], inputs.mask)},
        )


@hookimpl
def register_objectives(register):
    register(RLOO())
