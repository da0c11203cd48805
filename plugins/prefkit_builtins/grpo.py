"""GRPO, Group Relative Policy Optimization, as a prefkit plugin (an online objective).

Papers:

- GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models", https://arxiv.org/abs/2402.03300 (section 4.1: group-relative advantages
  instead of a value model, the clipped surrogate, a k3 KL penalty in the loss)
- Token-level aggregation and the asymmetric clip ("clip-higher", ``epsilon_high``): Yu et al. 2025,
  "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", https://arxiv.org/abs/2503.14476
- Advantages without the division by the group's standard deviation (``scale_rewards: false``):
  Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO),
  https://arxiv.org/abs/2503.20783
- The KL estimator k3: Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html

For each prompt the online loop samples a group of G completions and scores them. A completion's
advantage is its score relative to its group: ``(r - mean) / (std + eps)``, the same for all of its
tokens. There is no value model. The policy follows PPO's clipped surrogate on these advantages,
with a penalty ``beta * k3`` towards the reference policy added to the loss of every token.

The math is in pure functions of tensors (fp32, tested with hand arithmetic in ``tests/test_grpo.py``):
:func:`group_statistics`, :func:`group_advantages`, :func:`k3_kl`, :func:`grpo_token_loss` and
:func:`aggregate_loss`. :class:`GRPO` adapts them to the online loop's :class:`~prefkit.api.Rollout`
and :class:`~prefkit.api.OnlineInputs`.

Shapes: ``N`` sequences in a rollout, ``R`` in a chunk, ``T`` completion positions. Token tensors are
aligned with the completion tokens and right-padded; ``mask`` is true on completion tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from prefkit.api import LossOutput, LossUnit, Needs, OnlineInputs, OnlineObjective, OnlineParams, Rollout, hookimpl

LossAggregation = Literal["sequence", "token"]


# ----------------------------------------------------------------------------- group advantages


def group_statistics(scores: torch.Tensor, group_ids: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's mean and standard deviation of ``scores`` ``[N]``, fp32.

    Returns ``(inverse, mean, std)``: ``inverse`` ``[N]`` maps each sequence to its group's row in
    ``mean`` and ``std`` ``[P]`` (groups in ascending order of id). The standard deviation is the
    **sample** one, dividing by ``n - 1`` (Bessel's correction), as ``torch.std`` and TRL's
    GRPOTrainer compute it. A group of one has no sample standard deviation: ValueError.
    """
    scores = scores.detach().float()
    _, inverse, counts = torch.unique(group_ids.to(scores.device), return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        raise ValueError(
            f"GRPO needs at least 2 samples per prompt (group sizes: {counts.tolist()}); "
            "set sampling.num_samples >= 2"
        )
    counts = counts.to(scores.dtype)
    mean = torch.zeros_like(counts).index_add_(0, inverse, scores) / counts
    squares = (scores - mean[inverse]) ** 2
    std = (torch.zeros_like(counts).index_add_(0, inverse, squares) / (counts - 1)).sqrt()
    return inverse, mean, std


def group_advantages(scores: torch.Tensor, group_ids: torch.Tensor, *, scale: bool, eps: float = 1e-4
                     ) -> torch.Tensor:
    """GRPO's outcome advantages ``[N]``, fp32: each score relative to its group.

    ``A_i = (r_i - mean_g) / (std_g + eps)`` with ``g`` the group (prompt) of sequence ``i`` and
    ``std_g`` the sample standard deviation (``n - 1``, see :func:`group_statistics`); with
    ``scale=False`` only ``A_i = r_i - mean_g`` (Dr. GRPO). A group whose scores are all equal gets
    advantages 0. No gradient.
    """
    inverse, mean, std = group_statistics(scores, group_ids)
    centred = scores.detach().float() - mean[inverse]
    if not scale:
        return centred
    return centred / (std[inverse] + eps)


# ----------------------------------------------------------------------------- the loss


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from the sampled tokens' log-probs, fp32.

    With ``x = ref_logp - logp``: ``k3 = exp(x) - x - 1`` (Schulman 2020; the DeepSeekMath paper's
    ``pi_ref/pi - log(pi_ref/pi) - 1``). Never negative, 0 where the two agree. Gradients reach both
    arguments; detach ``ref_logps`` as the caller wishes. Padding is not zeroed here.
    """
    x = ref_logps.float() - logps.float()
    return torch.expm1(x) - x


def on_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 where ``mask`` is true, 0 elsewhere (no gradient reaches the padding)."""
    x = x.float()
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      *, clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token with one advantage per sequence (``advantages`` ``[R]``,
    broadcast over its tokens): ``-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)``
    with ``ratio = exp(logp - old_logp)``; ``[R, T]`` fp32, zero on padding. Also returns where the
    clipped term was the smaller (chosen), 1.0 / 0.0, zero on padding. Gradients reach ``logps`` only.
    """
    maskf = mask.float()
    # every log-prob 0 on padding, so that nothing there can overflow exp() or turn a gradient into NaN
    ratio = torch.exp(on_mask(logps, mask) - on_mask(old_logps.detach(), mask))
    adv = advantages.detach().float().to(logps.device).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    return -torch.minimum(unclipped, clipped) * maskf, (clipped < unclipped).float() * maskf


def grpo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's per-token loss ``[R, T]``, fp32 and zero on padding, to be aggregated by :func:`aggregate_loss`.

    With ``ratio = exp(logp - old_logp)`` and ``A`` the sequence's advantage (``advantages`` ``[R]``,
    broadcast over its tokens)::

        loss_t = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + beta * k3(logp, ref_logp)

    ``ref_logps`` may be None only when ``beta`` is 0. Gradients reach ``logps`` only.

    Returns ``(losses, stats)``; ``stats`` holds detached per-token tensors ``[R, T]``, zero on padding,
    for the caller to aggregate like the loss: ``policy`` (the clipped-surrogate term alone),
    ``clipped`` (1.0 where the clipped term was the smaller, i.e. chosen) and, when ``ref_logps`` is
    given, ``kl`` (k3 per token).
    """
    if beta > 0 and ref_logps is None:
        raise ValueError("GRPO with beta > 0 needs the reference's log-probs (ref_logps)")
    mask = mask.bool()
    maskf = mask.float()
    logps = on_mask(logps, mask)
    policy, clipped = clipped_surrogate(logps, old_logps, advantages, mask, clip_low=clip_low, clip_high=clip_high)
    losses = policy
    stats = {"policy": policy.detach(), "clipped": clipped}
    if ref_logps is not None:
        kl = k3_kl(logps, on_mask(ref_logps.detach(), mask)) * maskf
        if beta > 0:
            losses = losses + beta * kl
        stats["kl"] = kl.detach()
    return losses, stats


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: LossAggregation) -> torch.Tensor:
    """Reduce a per-token tensor ``[R, T]`` to a 0-dim mean over the valid tokens, fp32.

    - ``"sequence"`` (GRPO as published): the mean over each sequence's tokens, then the mean over
      sequences, ``1/R sum_i 1/|o_i| sum_t x_it``: every sequence weighs the same, so a token of a
      short completion weighs more than one of a long completion. A sequence without tokens counts
      as 0.
    - ``"token"`` (DAPO): the mean over all valid tokens, ``sum_it x_it / sum_i |o_i|``.
    """
    maskf = mask.float()
    per_token = per_token.float() * maskf
    if mode == "sequence":
        return (per_token.sum(-1) / maskf.sum(-1).clamp(min=1.0)).mean()
    if mode == "token":
        return per_token.sum() / maskf.sum().clamp(min=1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected 'sequence' or 'token'")


# ----------------------------------------------------------------------------- the objective


class GRPOParams(OnlineParams):
    """Recipe ``objective.params`` for ``grpo``. G, the completions per prompt, is the recipe's
    ``sampling.num_samples`` (at least 2); the rollout settings come from :class:`prefkit.api.OnlineParams`."""

    beta: float = Field(
        0.04, ge=0, description="KL coefficient: weight of the per-token k3 penalty to the reference; 0: no reference."
    )
    epsilon: float = Field(
        0.2, gt=0, lt=1, description="Clip range: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]."
    )
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip range (DAPO's clip-higher); default: epsilon."
    )
    scale_rewards: bool = Field(
        True, description="Divide advantages by the group's std (+1e-4); false: only subtract the mean (Dr. GRPO)."
    )
    loss_aggregation: LossAggregation = Field(
        "sequence",
        description="sequence: mean over each completion's tokens, then over completions (GRPO); "
        "token: mean over all tokens (DAPO).",
    )


class GRPO(OnlineObjective):
    """GRPO: group-relative advantages, the clipped surrogate and a k3 KL penalty in the loss."""

    name = "grpo"
    description = "GRPO: group-relative advantages (no value model), clipped surrogate, k3 KL penalty to the reference."
    Params = GRPOParams

    def needs(self, params: GRPOParams) -> Needs:
        return Needs(data="prompts", reward=True, generation=True, reference=params.beta > 0)

    def min_samples_per_prompt(self, params: GRPOParams) -> int:
        return 2

    def loss_unit(self, params: GRPOParams) -> LossUnit:
        return "sequence" if params.loss_aggregation == "sequence" else "token"

    def prepare(self, params: GRPOParams, rollout: Rollout, state: None) -> dict[str, float]:
        """Advantages ``[N]`` into ``rollout.extras["advantages"]``. Metrics: ``reward/group_std``, the
        mean over prompts of the group's sample std of scores; ``advantages/zero_frac``, the share of
        groups whose scores are all equal (their advantages are 0: they teach nothing)."""
        with torch.no_grad():
            _, _, std = group_statistics(rollout.scores, rollout.group_ids)
            rollout.extras["advantages"] = group_advantages(
                rollout.scores, rollout.group_ids, scale=params.scale_rewards
            )
            zero = torch.isclose(std, torch.zeros_like(std))
            return {"reward/group_std": float(std.mean()), "advantages/zero_frac": float(zero.float().mean())}

    def loss(self, params: GRPOParams, inputs: OnlineInputs) -> LossOutput:
        """The chunk's loss, aggregated per ``loss_aggregation``; the metrics are aggregated the same
        way, so ``loss = loss/policy + beta * kl``."""
        if "advantages" not in inputs.extras:
            raise ValueError("GRPO's loss needs extras['advantages']; prepare() writes them")
        clip_high = params.epsilon if params.epsilon_high is None else params.epsilon_high
        per_token, stats = grpo_token_loss(
            inputs.logps, inputs.old_logps, inputs.ref_logps, inputs.extras["advantages"], inputs.mask,
            clip_low=params.epsilon, clip_high=clip_high, beta=params.beta,
        )
        mode = params.loss_aggregation
        metrics: dict[str, torch.Tensor | float] = {
            "loss/policy": aggregate_loss(stats["policy"], inputs.mask, mode),
            "policy/clipfrac": aggregate_loss(stats["clipped"], inputs.mask, mode),
        }
        if params.beta > 0:
            metrics["kl"] = aggregate_loss(stats["kl"], inputs.mask, mode)
        return LossOutput(losses=aggregate_loss(per_token, inputs.mask, mode), metrics=metrics)


@hookimpl
def register_objectives(register):
    register(GRPO())
