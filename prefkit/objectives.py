"""What an objective is: a name, a params model, declared needs and a loss over tensors.

An objective owns only its math. The engine reads :meth:`Objective.needs` and builds
exactly what is declared (a reference pass, a reward source, a value head, ...), runs the
forward passes, and hands the objective a :class:`LossInputs`.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

DataKind = Literal["pairs", "sft", "prompts"]
ModelHead = Literal["lm", "scalar"]


class ObjectiveParams(BaseModel):
    """Base for every objective's ``Params``: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Needs:
    """What an objective needs from the engine. The engine builds nothing else."""

    data: DataKind = "pairs"  # pairs: prompt/chosen/rejected; sft: prompt/completion; prompts: prompt only
    reference: bool = False  # reference-model log-probs of every example (cached on disk)
    head: ModelHead = "lm"  # "lm": token log-probs; "scalar": a reward head on the backbone
    reward: bool = False  # a reward function or reward model (online objectives)
    generation: bool = False  # sampling from the policy during training
    value_head: bool = False  # a value head (PPO)


@dataclass
class LossInputs:
    """Tensors the engine computes for one batch of B examples.

    Log-probs are sums over completion tokens (prompt and padding excluded), in fp32.
    ``*_token_logps`` hold the per-token values, zero where ``*_mask`` is False. The masks
    are always filled (chosen for every kind of data, rejected for pairs), so lengths are
    always available. With ``Needs.head == "scalar"`` the ``*_rewards`` fields are filled
    instead of the log-probs. Reference log-probs are filled when ``Needs.reference`` is true.
    """

    chosen_logps: torch.Tensor | None = None  # [B]
    chosen_token_logps: torch.Tensor | None = None  # [B, T]
    chosen_mask: torch.Tensor | None = None  # [B, T] bool
    rejected_logps: torch.Tensor | None = None
    rejected_token_logps: torch.Tensor | None = None
    rejected_mask: torch.Tensor | None = None
    ref_chosen_logps: torch.Tensor | None = None  # [B], from the reference cache
    ref_rejected_logps: torch.Tensor | None = None
    chosen_rewards: torch.Tensor | None = None  # [B], scalar head
    rejected_rewards: torch.Tensor | None = None
    margin: torch.Tensor | None = None  # [B], an optional per-row margin column

    @property
    def chosen_lengths(self) -> torch.Tensor:
        return self.chosen_mask.sum(-1).to(torch.float32)

    @property
    def rejected_lengths(self) -> torch.Tensor:
        return self.rejected_mask.sum(-1).to(torch.float32)


@dataclass
class LossOutput:
    """Per-example losses ``[B]`` and metrics (per-example ``[B]`` tensors or scalars).

    The engine averages both over the batch and the accumulation steps; metric names follow
    the shared vocabulary (``rewards/chosen``, ``rewards/margins``, ``logps/chosen``, ...).
    """

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


ObjectiveKind = Literal["offline", "online", "inference"]


class Objective(ABC):
    """Subclass this and register an instance through the ``register_objectives`` hook.

    ``kind`` says which engine loop runs it: "offline" objectives define :meth:`loss` over
    fixed data; "online" ones (PPO) plug into the rollout loop; "inference" ones (best-of-N)
    train nothing and change how a policy samples.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    kind: ClassVar[ObjectiveKind] = "offline"
    Params: ClassVar[type[ObjectiveParams]] = ObjectiveParams

    def needs(self, params: ObjectiveParams) -> Needs:
        return Needs()

    def loss(self, params: ObjectiveParams, inputs: LossInputs) -> LossOutput:
        """Offline objectives: per-example losses from the engine's tensors. Pure (no model calls)."""
        raise TypeError(f"objective {self.name!r} ({self.kind}) has no offline loss")
