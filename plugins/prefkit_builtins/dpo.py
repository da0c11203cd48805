"""Direct Preference Optimization and its close variants, as a prefkit plugin.

Papers, by ``loss_type``:

- ``sigmoid``, DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model", https://arxiv.org/abs/2305.18290
- ``sigmoid`` with ``label_smoothing``, conservative DPO: Mitchell 2023, a note on DPO with noisy
  preferences, https://ericmitchell.ai/cdpo.pdf
- ``ipo``, IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", https://arxiv.org/abs/2310.12036
- ``hinge``, SLiC-HF: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
  Feedback", https://arxiv.org/abs/2305.10425
- ``robust``, robust DPO: Chowdhury, Kini and Natarajan 2024, "Provably Robust DPO: Aligning Language
  Models with Noisy Feedback", https://arxiv.org/abs/2403.00409
- ``bco_pair``, BCO: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
  Alignment", https://arxiv.org/abs/2404.04656
- ``apo_zero`` and ``apo_down``, APO: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and
  Contrastive Revisions: Addressing Underspecification in Alignment", https://arxiv.org/abs/2408.06266
- ``sppo_hard``, SPPO: Wu et al. 2024, "Self-Play Preference Optimization for Language Model
  Alignment", https://arxiv.org/abs/2405.00675
- ``nca_pair``, NCA: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
  Rewards", https://arxiv.org/abs/2402.05369

The math lives in pure functions of log-prob tensors: :func:`dpo_loss_terms` (one loss per type),
:func:`dpo_loss` (their weighted sum, as TRL's ``loss_type`` list with ``loss_weights``) and
:func:`implicit_rewards`; :class:`DPO` adapts them to the engine's
:class:`~prefkit.api.objective.LossInputs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import Field, FiniteFloat, ValidationInfo, field_validator

from prefkit.api import LossInputs, LossOutput, Needs, Objective, ObjectiveParams, hookimpl

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "apo_zero", "apo_down", "sppo_hard", "nca_pair"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")  # the loss types that read label_smoothing
RewardShift = Literal["batch_mean", "none"]


def implicit_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards ``beta * (policy - reference)`` of chosen and rejected, ``[B]`` fp32, detached."""
    chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.float()).detach()
    rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.float()).detach()
    return chosen, rejected


def bco_reward_shift(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """BCO's reward shift δ for one batch: the mean of all 2B implicit rewards, 0-dim and detached.

    The BCO paper (and TRL before 1.0) keeps δ as a running mean over training; an offline prefkit
    objective holds no state between batches, so δ is the mean over the batch at hand.
    """
    return torch.cat([chosen_rewards.float(), rejected_rewards.float()]).mean().detach()


def _check_loss_types(loss_types: Sequence[str], label_smoothing: float) -> None:
    unknown = [name for name in loss_types if name not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown[0]!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not loss_types:
        raise ValueError("loss_type is empty; name at least one loss type")
    if len(set(loss_types)) != len(loss_types):
        raise ValueError(f"loss_type {list(loss_types)} names a loss type twice")
    if label_smoothing and not set(loss_types) & set(SMOOTHED_LOSS_TYPES):
        raise ValueError("label_smoothing applies to loss_type 'sigmoid' and 'robust' only")
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss_type 'robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")


def dpo_loss_terms(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_types: Sequence[LossType],
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    bco_shift: RewardShift = "batch_mean",
) -> dict[str, torch.Tensor]:
    """Per-example losses ``[B]`` fp32 of each named loss type, unweighted, by name.

    Log-probs are sums over completion tokens; reference values never receive gradients. Write
    ``c = policy_chosen - ref_chosen`` and ``r = policy_rejected - ref_rejected`` for the two
    log-ratios, ``h = c - r`` for the DPO margin, ``x = beta * h``, ``ε = label_smoothing``:

    - ``sigmoid``:   ``-(1-ε) log σ(x) - ε log σ(-x)`` (ε = 0: DPO; ε > 0: conservative DPO)
    - ``ipo``:       ``(h_avg - 1/(2β))²`` on length-averaged log-probs (needs the lengths)
    - ``hinge``:     ``max(0, 1 - x)``
    - ``robust``:    ``[-(1-ε) log σ(x) + ε log σ(-x)] / (1 - 2ε)``, ε the label-flip rate, < 0.5
    - ``bco_pair``:  ``-log σ(βc - δ) - log σ(-(βr - δ))``, δ from ``bco_shift``: ``"batch_mean"``
      (:func:`bco_reward_shift`) or ``"none"`` (δ = 0, as TRL 1.x computes it)
    - ``apo_zero``:  ``(1 - σ(βc)) + σ(βr)``
    - ``apo_down``:  ``σ(βc) + (1 - σ(x))``
    - ``sppo_hard``: ``(c - 1/(2β))² + (r + 1/(2β))²``
    - ``nca_pair``:  ``-log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr)``
    """
    loss_types = list(loss_types)
    _check_loss_types(loss_types, label_smoothing)
    eps = label_smoothing
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.float().detach(), ref_rejected_logps.float().detach()
    c, r = pc - rc, pr - rr  # log-ratios of chosen and rejected
    x = beta * ((pc - pr) - (rc - rr))  # β·h, h = c − r

    terms: dict[str, torch.Tensor] = {}
    for loss_type in loss_types:
        if loss_type == "sigmoid":
            losses = -(1.0 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
        elif loss_type == "ipo":
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (completion token counts)")
            # An empty completion (length 0) has log-prob 0; clamp so it averages to 0, not NaN.
            lc = chosen_lengths.float().clamp(min=1.0)
            lr = rejected_lengths.float().clamp(min=1.0)
            h_avg = (pc / lc - rc / lc) - (pr / lr - rr / lr)
            losses = (h_avg - 1.0 / (2.0 * beta)) ** 2
        elif loss_type == "hinge":
            losses = torch.relu(1.0 - x)
        elif loss_type == "robust":
            # An unbiased estimate of the clean-label loss when each label is flipped with probability ε;
            # it goes below 0 (and keeps pushing) where the margin is large.
            losses = (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)
        elif loss_type == "bco_pair":
            chosen_rewards, rejected_rewards = beta * c, beta * r
            delta = bco_reward_shift(chosen_rewards, rejected_rewards) if bco_shift == "batch_mean" else 0.0
            losses = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
        elif loss_type == "apo_zero":
            # Anchored at the reference: raise the chosen log-ratio, lower the rejected one.
            losses = (1.0 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
        elif loss_type == "apo_down":
            # Lower the chosen log-ratio, and the rejected one further (chosen worse than the model's own answers).
            losses = torch.sigmoid(beta * c) + (1.0 - torch.sigmoid(x))
        elif loss_type == "sppo_hard":
            # Hard win probabilities (1 for chosen, 0 for rejected): regress c to +1/(2β) and r to −1/(2β).
            target = 0.5 / beta
            losses = (c - target) ** 2 + (r + target) ** 2
        elif loss_type == "nca_pair":
            losses = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
        else:  # unreachable: _check_loss_types refused it
            raise ValueError(f"unknown loss_type {loss_type!r}")
        terms[loss_type] = losses
    return terms


def weighted_sum(terms: dict[str, torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """``Σ_k weights[k] · terms[k]`` in the order of ``terms``; ``weights`` None: 1.0 each (TRL's default)."""
    weights = [1.0] * len(terms) if weights is None else list(weights)
    if len(weights) != len(terms):
        raise ValueError(f"{len(weights)} loss weights for {len(terms)} loss types {list(terms)}")
    total = None
    for weight, losses in zip(weights, terms.values()):
        total = weight * losses if total is None else total + weight * losses
    return total


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: LossType | Sequence[LossType] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    bco_shift: RewardShift = "batch_mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO-family losses and implicit rewards, all ``[B]`` and fp32.

    ``loss_type`` is one name or a list of names whose losses are summed with ``loss_weights``
    (default 1.0 each); each loss is described in :func:`dpo_loss_terms`. Returns
    ``(losses, chosen_rewards, rejected_rewards)``; the rewards ``beta * (policy - reference)``
    use the summed log-probs for every loss type and are detached.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    terms = dpo_loss_terms(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_types=loss_types,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        bco_shift=bco_shift,
    )
    chosen_rewards, rejected_rewards = implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    return weighted_sum(terms, loss_weights), chosen_rewards, rejected_rewards


class DPOParams(ObjectiveParams):
    """Recipe ``objective.params`` for ``dpo``."""

    beta: float = Field(
        0.1, gt=0, description="Strength of the implicit KL penalty to the reference (smaller drifts further)."
    )
    loss_type: LossType | list[LossType] = Field(
        "sigmoid",
        description="One loss type, or a list of them summed with loss_weights: sigmoid (the DPO paper), ipo, "
        "hinge, robust, bco_pair, apo_zero, apo_down, sppo_hard, nca_pair.",
    )
    loss_weights: list[FiniteFloat] | None = Field(
        None, description="One weight (finite, >= 0) per loss_type entry; default: 1.0 each, as in TRL."
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed probability that a preference label is flipped: conservative DPO for 'sigmoid', "
        "robust DPO's ε for 'robust'; only with one of those.",
    )
    bco_reward_shift: RewardShift = Field(
        "batch_mean",
        description="bco_pair's reward shift δ: 'batch_mean' (the mean implicit reward of the batch) or 'none' "
        "(δ = 0, as TRL 1.x).",
    )
    reference_free: bool = Field(
        False, description="Use no reference model: reference log-probs are taken to be 0."
    )

    @field_validator("loss_type", mode="before")
    @classmethod
    def _known_loss_types(cls, value):
        names = [value] if isinstance(value, str) else value
        if isinstance(names, (list, tuple)):  # anything else: pydantic's own type error says what it expected
            _check_loss_types(list(names), 0.0)
        return value

    # The checks below read loss_type, validated before them (fields validate in order); when loss_type
    # itself was refused they have nothing to compare with, and its own error is the one shown.

    @field_validator("loss_weights")
    @classmethod
    def _one_weight_per_loss(cls, weights: list[float] | None, info: ValidationInfo) -> list[float] | None:
        types = _as_tuple(info.data.get("loss_type"))
        if weights is None:
            return weights
        if types and len(weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(weights)} entries but loss_type names {len(types)} ({', '.join(types)}); "
                "give one weight per loss type"
            )
        negative = [w for w in weights if w < 0]
        if negative:
            raise ValueError(f"loss_weights must be >= 0; got {negative[0]}")
        if not any(weights):
            raise ValueError("loss_weights are all 0, so nothing would be trained")
        return weights

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing_where_read(cls, label_smoothing: float, info: ValidationInfo) -> float:
        types = _as_tuple(info.data.get("loss_type"))
        if label_smoothing and types and not set(types) & set(SMOOTHED_LOSS_TYPES):
            raise ValueError(
                f"label_smoothing applies to loss_type 'sigmoid' (conservative DPO) and 'robust' only; "
                f"loss_type is {', '.join(types)}"
            )
        return label_smoothing

    @field_validator("bco_reward_shift")
    @classmethod
    def _shift_only_for_bco(cls, shift: str, info: ValidationInfo) -> str:
        types = _as_tuple(info.data.get("loss_type"))
        if shift != "batch_mean" and types and "bco_pair" not in types:
            raise ValueError(f"bco_reward_shift applies to loss_type 'bco_pair' only; loss_type is {', '.join(types)}")
        return shift

    @property
    def loss_types(self) -> tuple[LossType, ...]:
        """``loss_type`` as a tuple of names."""
        return _as_tuple(self.loss_type)

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per entry of :attr:`loss_types` (``loss_weights``, or 1.0 each)."""
        return tuple(self.loss_weights) if self.loss_weights is not None else (1.0,) * len(self.loss_types)


def _as_tuple(loss_type: str | list[str] | None) -> tuple[str, ...]:
    """A validated ``loss_type`` as a tuple of names; None (not validated) as ()."""
    if loss_type is None:
        return ()
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


class DPO(Objective):
    """DPO and its variants: conservative DPO, IPO, SLiC hinge, robust DPO, BCO, APO, SPPO, NCA; mixtures."""

    name = "dpo"
    description = (
        "Direct Preference Optimization on chosen/rejected pairs (also cDPO, IPO, hinge, robust, BCO, APO, SPPO, "
        "NCA, weighted mixtures, reference-free)."
    )
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
        if "ipo" in params.loss_types:
            if inputs.chosen_mask is None or inputs.rejected_mask is None:
                raise ValueError("dpo with loss_type 'ipo' needs completion masks to count tokens")
            lengths = {"chosen_lengths": inputs.chosen_lengths, "rejected_lengths": inputs.rejected_lengths}

        terms = dpo_loss_terms(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=params.beta,
            loss_types=params.loss_types,
            label_smoothing=params.label_smoothing,
            bco_shift=params.bco_reward_shift,
            **lengths,
        )
        chosen_rewards, rejected_rewards = implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, beta=params.beta)
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": chosen.detach().float(),
            "logps/rejected": rejected.detach().float(),
        }
        if len(terms) > 1:  # a mixture: each loss, unweighted
            metrics.update({f"loss/{name}": losses.detach() for name, losses in terms.items()})
        if "bco_pair" in terms and params.bco_reward_shift == "batch_mean":
            metrics["bco/reward_shift"] = bco_reward_shift(chosen_rewards, rejected_rewards)
        return LossOutput(losses=weighted_sum(terms, params.weights), metrics=metrics)


@hookimpl
def register_objectives(register):
    register(DPO())
