"""PPO with a KL penalty to the reference policy (RLHF), as a prefkit plugin.

The objective is to maximise ``E[r(x, y)] - beta * KL(pi || pi_ref)`` over completions ``y`` sampled
from the policy ``pi`` for prompts ``x``: the reward ``r`` comes from a reward function or a trained
reward model (the recipe's ``reward:``), and the KL penalty is paid per token, as in Ziegler et al.
It is optimised with PPO's clipped surrogate and a value head trained alongside (advantages by GAE).

Papers:

- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
  https://arxiv.org/abs/1909.08593 (the KL-penalised reward, the adaptive KL controller)
- Stiennon et al. 2020, "Learning to summarize from human feedback", https://arxiv.org/abs/2009.01325
- Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
  https://arxiv.org/abs/2203.02155
- PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347
- GAE: Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", https://arxiv.org/abs/1506.02438
- KL estimators k1 / k3: Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html

This module holds the pure math (functions of tensors, fp32, each tested with hand arithmetic in
``tests/test_ppo_math.py``), the params and the declared needs. The loop that samples, scores and
updates is the engine's: ``prefkit/loops/online.py``.

Shapes: ``B`` sequences, ``T`` completion positions. Every ``[B, T]`` tensor is aligned with the
completion tokens (position 0 is the first generated token) and ``mask`` is right-padded: the valid
tokens of a row are ``0 .. n-1``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from prefkit.api import LossOutput, Needs, OnlineInputs, OnlineObjective, OnlineParams, Rollout, hookimpl

KLEstimator = Literal["k1", "abs", "mse", "k3"]


# ----------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance (divide by n, not n - 1) of ``x`` where ``mask`` is true."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to mean 0 and variance 1 over the masked positions; 0 elsewhere.

    ``(x - mean) / sqrt(var + eps)`` with the masked mean and population variance; fp32.
    """
    x = x.float()
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


# ----------------------------------------------------------------------------- the KL penalty


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens, fp32.

    With ``d = logp - ref_logp`` (tokens drawn from the policy):

    - ``k1``: ``d``. Unbiased, but negative for single tokens; its sum over a completion is the
      sequence-level log-ratio, the KL the DPO paper reports.
    - ``abs``: ``|d|``.
    - ``mse``: ``d**2 / 2``.
    - ``k3``: ``(r - 1) - log r`` with ``r = exp(ref_logp - logp) = exp(-d)``; unbiased and never
      negative (Schulman 2020).

    Padding positions are not zeroed here; multiply by the mask.
    """
    d = logps.float() - ref_logps.float()
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(-d) + d  # (e^{-d} - 1) - (-d)
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, abs, mse or k3")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid position (right-padded mask); -1 for an empty row."""
    return mask.long().sum(-1) - 1


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The per-token reward PPO maximises: ``-kl_coef * kl`` on every completion token, plus the
    sequence's score on its last completion token (Ziegler et al. 2019, eq. 2). fp32 ``[B, T]``,
    zero on padding. A row with no completion token has nowhere to put its score and gets none.
    """
    rewards = -kl_coef * kl.float() * mask.float()
    last = last_token_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards[rows, last[rows]] += scores.float().to(rewards.device)[rows]
    return rewards


# ----------------------------------------------------------------------------- advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015) over the valid tokens of each row.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where the
    value and advantage after a row's last valid token are 0 (the episode ends there). Returns
    ``(advantages, returns)`` with ``returns = advantages + values``; both fp32, zero on padding,
    and no gradient (they are targets).
    """
    mask = mask.float()
    rewards, values = rewards.float().detach() * mask, values.float().detach() * mask
    width = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        # beyond the end (mask 0 at t + 1) next_value and next_advantage are 0: they were masked below
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage
    returns = (advantages + values) * mask
    return advantages, returns


# ----------------------------------------------------------------------------- the PPO losses


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``ratio = exp(logp - old_logp)``; per token ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``,
    averaged over all valid tokens of the batch. Returns ``(loss, stats)``: ``clipfrac`` is the share
    of tokens where the clipped term was chosen (strictly larger); ``approxkl`` is
    ``mean((logp - old_logp)**2) / 2``, the ``mse`` estimate of KL(pi_old || pi), as TRL logs it.
    Gradients reach ``logps`` only.
    """
    logps = logps.float()
    old_logps, advantages = old_logps.float().detach(), advantages.float().detach()
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approxkl": (0.5 * masked_mean(log_ratio.detach() ** 2, mask)),
    }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss: ``max((v - R)**2, (v_clip - R)**2) / 2`` averaged over valid tokens,
    with ``v_clip = clip(v, old_v - c, old_v + c)`` (as in OpenAI's baselines and TRL). Returns
    ``(loss, stats)``; ``clipfrac`` is the share of tokens where the clipped error was larger.

    ``v_clip`` is ``v`` itself, bit for bit, wherever ``v`` is within ``c`` of ``old_v``. The form
    ``old_v + clip(v - old_v, -c, c)`` rounds there (``0.3 + (0.1 - 0.3) != 0.1`` in fp32), and the
    last-bit difference made some unclipped tokens count as clipped: up to 7.5% of a rollout's
    tokens in ``recipes/ppo_kl_tiny.yaml``, which clips none.
    """
    values = values.float()
    old_values, returns = old_values.float().detach(), returns.float().detach()
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, {"clipfrac": masked_mean((err_clipped > err).float(), mask).detach()}


# ----------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, section 2.2: steer the KL coefficient towards a target KL.

    ``update(current_kl, n_steps)``: ``error = clip(current_kl / target - 1, -0.2, 0.2)`` and
    ``value *= 1 + error * n_steps / horizon``, where ``n_steps`` is the number of samples the
    KL was measured on. A KL above the target raises the coefficient, one below lowers it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# ----------------------------------------------------------------------------- reward normalisation


class RunningMoments:
    """Running mean and (population) standard deviation of scores: Welford's algorithm, merged a
    batch at a time (Chan et al.). Its state is three plain numbers, saved in checkpoints."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().reshape(-1)
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def normalise(self, values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``(values - mean) / max(std, eps)`` with the current statistics."""
        return ((values.double() - self.mean) / max(self.std, eps)).to(values.dtype)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def shape_scores(scores: torch.Tensor, finished: torch.Tensor, *, normaliser: RunningMoments | None,
                 missing_eos_penalty: float | None) -> torch.Tensor:
    """The score PPO adds at a completion's last token, from the reward function's raw scores.

    With a ``normaliser`` its statistics are first updated with this batch's raw scores, then the
    scores are normalised (mean 0, std 1 over every score seen so far). Then, with
    ``missing_eos_penalty``, that amount is subtracted from the score of every completion that did
    not finish (no end token within ``max_new_tokens``), so it is in normalised units when both are on.
    """
    scores = scores.float()
    if normaliser is not None:
        normaliser.update(scores)
        scores = normaliser.normalise(scores)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~finished.bool()).float()
    return scores


# ----------------------------------------------------------------------------- the objective


class PPOParams(OnlineParams):
    """Recipe ``objective.params`` for ``ppo_kl``. The sampling settings (``max_new_tokens``,
    ``temperature``, ``num_samples`` per prompt, ...) come from the recipe's ``sampling:``; the
    rollout settings ``rollout_batch_size`` and ``mini_batch_size`` from :class:`prefkit.api.OnlineParams`."""

    update_epochs: int = Field(4, gt=0, description="PPO epochs: passes over each rollout's samples.")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient beta (the start value when adaptive).")
    adaptive_kl: bool = Field(False, description="Steer kl_coef towards target_kl (Ziegler et al. 2019).")
    target_kl: float = Field(6.0, gt=0, description="Target sequence-level KL of the adaptive controller, in nats.")
    kl_horizon: int = Field(10000, gt=0, description="Horizon of the adaptive controller, in samples.")
    kl_estimator: KLEstimator = Field(
        "k1", description="Per-token KL estimate in the reward: k1 (log-ratio), abs, mse (half squared), k3."
    )
    clip_range: float = Field(0.2, gt=0, description="PPO's epsilon: the policy ratio is clipped to 1 +- epsilon.")
    clip_range_value: float = Field(0.2, gt=0, description="Values may move at most this far from the rollout's.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss in the total loss.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor over completion tokens.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="Normalise advantages over each rollout's tokens.")
    normalize_reward: bool = Field(False, description="Normalise scores by their running mean and std.")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the score of a completion that did not end within max_new_tokens."
    )


class PPOState:
    """What PPO keeps across rollouts: the KL controller and the reward normaliser."""

    def __init__(self, params: PPOParams):
        self.kl_controller = (AdaptiveKLController(params.kl_coef, params.target_kl, params.kl_horizon)
                              if params.adaptive_kl else FixedKLController(params.kl_coef))
        self.normaliser = RunningMoments() if params.normalize_reward else None

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl_controller.state_dict(),
                "reward_normaliser": self.normaliser.state_dict() if self.normaliser else None}

    def load_state_dict(self, state: dict) -> None:
        self.kl_controller.load_state_dict(state["kl_controller"])
        if self.normaliser is not None:
            self.normaliser.load_state_dict(state["reward_normaliser"])


def value_head(hidden_size: int) -> torch.nn.Linear:
    """One ``Linear(hidden, 1)`` on the policy's last hidden state, zero-initialised: every value
    starts at 0, so the first advantages are the plain discounted rewards."""
    head = torch.nn.Linear(hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


class PPOKL(OnlineObjective):
    """RLHF: PPO on a KL-penalised reward, with a value head on the policy's backbone."""

    name = "ppo_kl"
    description = "PPO with a per-token KL penalty to the reference (RLHF), on a reward function or model."
    Params = PPOParams

    def needs(self, params: PPOParams) -> Needs:
        return Needs(data="prompts", reference=True, reward=True, generation=True, hidden_states=True)

    def init_state(self, params: PPOParams) -> PPOState:
        return PPOState(params)

    def modules(self, params: PPOParams, hidden_size: int) -> dict[str, torch.nn.Module]:
        return {"value_head": value_head(hidden_size)}

    def token_outputs(self, params: PPOParams, modules: dict[str, torch.nn.Module],
                      hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        head = modules["value_head"]
        return {"values": head(hidden.to(head.weight.dtype)).squeeze(-1)}

    def prepare(self, params: PPOParams, rollout: Rollout, state: PPOState) -> dict[str, float]:
        """Shaped scores -> per-token KL-penalised rewards -> GAE advantages and returns."""
        kl_coef = state.kl_controller.value
        mask = rollout.mask
        scores = shape_scores(rollout.scores, rollout.finished, normaliser=state.normaliser,
                              missing_eos_penalty=params.missing_eos_penalty)
        kl = kl_penalty(rollout.logps, rollout.ref_logps, params.kl_estimator) * mask
        rewards = token_rewards(scores.to(mask.device), kl, mask, kl_coef)
        advantages, returns = gae(rewards, rollout.outputs["values"], mask, params.gamma, params.lam)
        if params.whiten_advantages:
            advantages = whiten(advantages, mask)
        rollout.extras.update(advantages=advantages, returns=returns)
        seq_kl = kl.sum(-1)
        state.kl_controller.update(float(seq_kl.mean()), rollout.num_sequences)
        return {"reward/total": float(rewards.sum(-1).mean()), "kl": float(seq_kl.mean()), "kl_coef": kl_coef}

    def loss(self, params: PPOParams, inputs: OnlineInputs) -> LossOutput:
        """The clipped policy loss + ``vf_coef`` x the clipped value loss, token means of the chunk."""
        pl, p_stats = policy_loss(inputs.logps, inputs.old_logps, inputs.extras["advantages"], inputs.mask,
                                  params.clip_range)
        vl, v_stats = value_loss(inputs.outputs["values"], inputs.old_outputs["values"], inputs.extras["returns"],
                                 inputs.mask, params.clip_range_value)
        return LossOutput(losses=pl + params.vf_coef * vl,
                          metrics={"loss/policy": pl, "loss/value": vl, "policy/clipfrac": p_stats["clipfrac"],
                                   "policy/approxkl": p_stats["approxkl"], "value/clipfrac": v_stats["clipfrac"]})


@hookimpl
def register_objectives(register):
    register(PPOKL())
