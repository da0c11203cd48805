"""Preferred-FT: supervised fine-tuning (maximum likelihood) on the preferred answer, as a prefkit plugin.

Papers:

- The baseline "Preferred-FT" of the DPO paper: Rafailov et al. 2023, "Direct Preference
  Optimization: Your Language Model is Secretly a Reward Model", https://arxiv.org/abs/2305.18290
  (Section 6: supervised fine-tuning on the chosen completions only).
- Supervised fine-tuning as the first stage of RLHF: Ouyang et al. 2022, "Training language models
  to follow instructions with human feedback", https://arxiv.org/abs/2203.02155

The loss is the negative log-likelihood of the answer tokens only: prompt and padding are excluded
by the engine's completion masks. It needs no reference and no rejected answers: the objective
asks for ``sft`` data, which the data layer reads from prompt/completion rows or from pair rows
(whose ``chosen`` becomes the completion).

The math lives in :func:`sft_loss`, a pure function of tensors; :class:`PreferredFT` adapts it to
the engine's :class:`~prefkit.api.objective.LossInputs`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from prefkit.api import LossInputs, LossOutput, Needs, Objective, ObjectiveParams, hookimpl

Average = Literal["token", "sequence"]
SFTAverage = Literal["token", "sequence", "batch_token"]


def masked_sum_and_count(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of ``values`` over ``mask`` and the number of masked-in tokens (at least 1), fp32.

    Positions outside the mask are replaced by 0 *before* summing (``torch.where``), so whatever
    they hold (padding, NaN, ±inf) changes neither the sums nor the gradients.
    """
    mask = mask.bool()
    kept = torch.where(mask, values.float(), torch.zeros((), dtype=torch.float32, device=values.device))
    # A row with no answer tokens sums to 0; dividing by 1 keeps it at 0 instead of NaN.
    count = mask.sum(-1).to(torch.float32).clamp(min=1.0)
    return kept.sum(-1), count


def reduce_tokens(values: torch.Tensor, mask: torch.Tensor, average: Average) -> torch.Tensor:
    """``[B, T] -> [B]``: the mean (``"token"``) or sum (``"sequence"``) of ``values`` over each row's mask."""
    total, count = masked_sum_and_count(values, mask)
    if average == "token":
        return total / count
    if average == "sequence":
        return total
    raise ValueError(f"unknown average {average!r}; expected 'token' or 'sequence'")


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, *, average: SFTAverage = "token") -> torch.Tensor:
    """Per-example negative log-likelihood of the answer tokens, ``[B]`` in fp32.

    ``token_logps[b, t]`` is log p(token t of row b); ``mask`` marks the answer tokens (prompt and
    padding False; values there are ignored, whatever they are).

    - ``"token"``: −Σ_t log p / (number of answer tokens of that row), the per-row mean NLL. The
      engine then averages over the batch, so every row weighs the same whatever its length
      (TRL's default instead divides the batch's summed NLL by the batch's total token count,
      which weighs long answers more).
    - ``"sequence"``: −Σ_t log p, the NLL of the whole answer (long answers weigh more).
    - ``"batch_token"``: row b's −Σ_t log p times B / (answer tokens of the whole batch), so that
      the engine's batch mean is the batch's summed NLL over its answer-token count: every token
      of the batch weighs the same (TRL SFTTrainer's loss, per micro-batch).
    """
    if average == "batch_token":
        total, _ = masked_sum_and_count(token_logps, mask)
        tokens = mask.bool().sum().to(torch.float32).clamp(min=1.0)
        return -total * (total.numel() / tokens)
    return -reduce_tokens(token_logps, mask, average)


class PreferredFTParams(ObjectiveParams):
    """Recipe ``objective.params`` for ``preferred_ft``."""

    average: SFTAverage = Field(
        "token",
        description="'token': per-answer mean NLL over its tokens (each row weighs the same); "
        "'sequence': summed NLL over the answer (long answers weigh more); "
        "'batch_token': the batch's summed NLL over its answer-token count (each token weighs the same, as TRL's SFT).",
    )


class PreferredFT(Objective):
    """Maximum likelihood on the preferred (or only) answer; no reference, no rejected answers."""

    name = "preferred_ft"
    description = "Preferred-FT / SFT: maximum likelihood on the chosen answer (or the completion) tokens."
    Params = PreferredFTParams

    def needs(self, params: PreferredFTParams) -> Needs:
        return Needs(data="sft")

    def loss(self, params: PreferredFTParams, inputs: LossInputs) -> LossOutput:
        if inputs.chosen_token_logps is None or inputs.chosen_mask is None:
            raise ValueError("preferred_ft needs per-token log-probs and completion masks of the answers")
        values, mask = inputs.chosen_token_logps, inputs.chosen_mask
        losses = sft_loss(values, mask, average=params.average)
        with torch.no_grad():
            total, count = masked_sum_and_count(values, mask)
            nll_per_token = -total / count
            metrics = {
                "logps/chosen": total,
                "nll/token": nll_per_token,
                # a scalar: exp of this batch's mean of the per-row NLL per token
                "ppl": nll_per_token.mean().exp(),
            }
        return LossOutput(losses=losses, metrics=metrics)


@hookimpl
def register_objectives(register):
    register(PreferredFT())
