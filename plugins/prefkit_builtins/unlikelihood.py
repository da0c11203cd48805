"""Unlikelihood training on preference pairs, as a prefkit plugin.

Papers:

- Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training",
  https://arxiv.org/abs/1908.04319 (the token-level unlikelihood loss −log(1 − p)).
- Used as a baseline on preference pairs in the DPO paper: Rafailov et al. 2023, "Direct
  Preference Optimization: Your Language Model is Secretly a Reward Model",
  https://arxiv.org/abs/2305.18290 (Section 6): maximise the likelihood of the chosen answer and
  minimise that of the rejected one.

For one pair, with p(y_t) the policy's probability of answer token t given everything before it:

    loss = mean_t∈chosen [−log p(y_w,t)]  +  α · mean_t∈rejected [−log(1 − p(y_l,t))]

Each term is averaged over its own answer tokens (``average="token"``, the default), so a long
rejected answer does not outweigh a short chosen one; ``average="sequence"`` sums both terms over
their tokens instead. α = 0 is Preferred-FT on the chosen answer. No reference model is needed.

Numerics. −log(1 − p) is computed from log p with :func:`log1mexp` (no ``1 - exp(logp)``
cancellation), and log p is capped at :data:`MAX_LOGP` = −1e−6 before it, so p → 1 (log p → 0⁻,
or exactly 0 in fp32) costs at most −log(1 − e^−1e−6) ≈ 13.8155 per token instead of inf/NaN.
The cap is applied with a straight-through gradient: above the cap the value is the capped one but
the gradient still flows (as if uncapped at the cap), so the most confidently predicted rejected
tokens, which are the ones the loss is for, keep being pushed down. A plain ``clamp`` would give
them no gradient at all.

The math lives in :func:`unlikelihood_loss`, a pure function of tensors; :class:`Unlikelihood`
adapts it to the engine's :class:`~prefkit.api.objective.LossInputs`.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from prefkit.api import LossInputs, LossOutput, Needs, Objective, ObjectiveParams, hookimpl
from prefkit_builtins.preferred_ft import Average, masked_sum_and_count, reduce_tokens, sft_loss

MAX_LOGP = -1e-6  # log p is capped here before log(1 − p): at most −log(1 − e^−1e−6) ≈ 13.8155 per token
LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate over the whole range (Mächler 2012, "Accurately computing
    log(1 − exp(−|a|))"): log(−expm1(x)) for x > −ln 2, log1p(−eˣ) otherwise.

    Both branches are finite for every x < 0, so ``torch.where`` passes no NaN gradient through
    the branch it does not select. At x = 0 the result is −inf: cap x first (:func:`capped_logp`).
    """
    return torch.where(x > -LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def capped_logp(logp: torch.Tensor, max_logp: float = MAX_LOGP) -> torch.Tensor:
    """``min(logp, max_logp)`` in value, with the gradient of the identity (straight-through)."""
    return logp - (logp - logp.clamp(max=max_logp)).detach()


def unlikelihood_loss(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    alpha: float = 1.0,
    average: Average = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example unlikelihood losses ``[B]`` (fp32) and the unlikelihood term ``[B]`` (detached).

    ``*_token_logps`` are per-token log-probs ``[B, T]`` of the chosen / rejected answers, ``*_mask``
    mark their answer tokens (values outside the mask are ignored, whatever they are).

        losses = NLL(chosen) + alpha · UL(rejected)
        NLL(chosen)   = reduce_t [−log p(y_w,t)]             (= :func:`sft_loss`)
        UL(rejected)  = reduce_t [−log(1 − p(y_l,t))]

    where ``reduce`` is the mean over that answer's own tokens (``average="token"``) or the sum
    (``"sequence"``). Returns ``(losses, UL(rejected))``; the second is for logging.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    nll = sft_loss(chosen_token_logps, chosen_mask, average=average)
    mask = rejected_mask.bool()
    # Replace whatever sits outside the mask before any exp/log, so garbage there cannot make NaN
    # gradients; −1 is an arbitrary safe value (those positions are dropped again by the reduce).
    safe = torch.where(mask, rejected_token_logps.float(), torch.full((), -1.0, device=mask.device))
    unlikely = reduce_tokens(-log1mexp(capped_logp(safe)), mask, average)
    return nll + alpha * unlikely, unlikely.detach()


class UnlikelihoodParams(ObjectiveParams):
    """Recipe ``objective.params`` for ``unlikelihood``."""

    alpha: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Weight of the unlikelihood term −log(1 − p) on rejected tokens; 0 is Preferred-FT.",
    )
    average: Average = Field(
        "token",
        description="'token': each term is the mean over its own answer's tokens; 'sequence': the sum.",
    )


class Unlikelihood(Objective):
    """Likelihood on chosen tokens plus α · unlikelihood on rejected tokens; no reference."""

    name = "unlikelihood"
    description = "Unlikelihood training: −log p on chosen tokens, −α·log(1 − p) on rejected tokens."
    Params = UnlikelihoodParams

    def needs(self, params: UnlikelihoodParams) -> Needs:
        return Needs(data="pairs")

    def loss(self, params: UnlikelihoodParams, inputs: LossInputs) -> LossOutput:
        fields = [inputs.chosen_token_logps, inputs.chosen_mask, inputs.rejected_token_logps, inputs.rejected_mask]
        if any(f is None for f in fields):
            raise ValueError("unlikelihood needs per-token log-probs and masks of chosen and rejected answers")
        losses, unlikely = unlikelihood_loss(*fields, alpha=params.alpha, average=params.average)
        with torch.no_grad():
            chosen, chosen_count = masked_sum_and_count(inputs.chosen_token_logps, inputs.chosen_mask)
            rejected, _ = masked_sum_and_count(inputs.rejected_token_logps, inputs.rejected_mask)
            metrics = {
                "logps/chosen": chosen,
                "logps/rejected": rejected,
                "logps/margins": chosen - rejected,
                "accuracy/logps": (chosen > rejected).float(),
                "nll/token": -chosen / chosen_count,
                "unlikelihood/term": unlikely,
            }
        return LossOutput(losses=losses, metrics=metrics)


@hookimpl
def register_objectives(register):
    register(Unlikelihood())
