"""What an objective is: a name, a params model, declared needs and its math.

An objective owns only its math. The engine reads :meth:`Objective.needs` and builds exactly
what is declared (a reference pass, a reward source, sampling, hidden states, ...), runs the
forward passes, and hands the objective tensors. There are three kinds, one class each:

- :class:`Objective` (``kind = "offline"``): a loss over batches of fixed data. The offline loop
  hands :meth:`Objective.loss` a :class:`LossInputs`.
- :class:`OnlineObjective` (``kind = "online"``): sample -> score -> update. The online loop
  samples G completions per prompt, scores them, computes policy and reference token log-probs
  and hands the objective a :class:`Rollout`; :meth:`OnlineObjective.prepare` computes the
  objective's advantages, and :meth:`OnlineObjective.loss` its loss on minibatches of it
  (an :class:`OnlineInputs`). Value heads, KL controllers, normalisers are the objective's own.
- :class:`InferenceObjective` (``kind = "inference"``): trains nothing; changes how a policy
  samples (:meth:`InferenceObjective.sample`) and says what KL that implies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import ConfigDict, Field

from prefkit.api.params import NumbersAreNumbers

ObjectiveKind = Literal["offline", "online", "inference"]
ModelHead = Literal["lm", "scalar"]
LossUnit = Literal["token", "sequence"]


class ObjectiveParams(NumbersAreNumbers):
    """Base for every objective's ``Params``: unknown keys are refused, and a number field takes no
    ``true``/``false``."""

    model_config = ConfigDict(extra="forbid")


class OnlineParams(ObjectiveParams):
    """Base for an online objective's ``Params``: the rollout settings the online loop reads.

    The number of completions per prompt (G) is the recipe's ``sampling.num_samples``.
    """

    rollout_batch_size: int = Field(8, gt=0, description="Prompts per rollout (each sampled sampling.num_samples times).")
    update_epochs: int = Field(1, gt=0, description="Passes over each rollout's samples.")
    mini_batch_size: int | None = Field(
        None, gt=0, description="Sequences per update (optimizer step); default: the whole rollout."
    )


@dataclass(frozen=True)
class Needs:
    """What an objective needs from the engine. The engine builds nothing else."""

    data: str = "pairs"  # a registered data kind: pairs, sft, prompts, unpaired, ... (`prefkit data-kinds`)
    reference: bool = False  # reference-model log-probs (offline: cached on disk; online: per rollout)
    reference_tokens: bool = False  # offline: per-token reference log-probs too (cached on disk)
    mismatched: bool = False  # offline: also each prompt with another example's completion (KTO's KL point)
    head: ModelHead = "lm"  # "lm": token log-probs; "scalar": a reward head on the backbone
    reward: bool = False  # a reward function or reward model (online and inference objectives)
    generation: bool = False  # sampling from the policy
    hidden_states: bool = False  # online: the policy's last hidden states, for the objective's own heads


# --------------------------------------------------------------------------------------------- offline


_PATTERNS = (  # attribute suffix/prefix -> which table of LossInputs holds it
    ("ref_", "_token_logps", "ref_token_logps"),
    ("ref_", "_logps", "ref_logps"),
    ("", "_token_logps", "token_logps"),
    ("", "_logps", "logps"),
    ("", "_mask", "masks"),
    ("", "_rewards", "rewards"),
)


class LossInputs:
    """Tensors the offline loop computes for one batch of B examples, by completion name.

    The data kind names each example's completions (pairs: ``chosen`` and ``rejected``; sft:
    ``chosen``; unpaired: ``completion``; with ``Needs.mismatched`` also ``mismatched``). For each
    name: ``logps[name]`` the summed completion log-probs ``[B]`` (prompt and padding excluded, fp32),
    ``token_logps[name]`` the per-token values ``[B, T]`` (zero off the mask), ``masks[name]``
    ``[B, T]`` bool. ``ref_logps`` / ``ref_token_logps`` hold the reference's, when declared.
    With ``Needs.head == "scalar"`` ``rewards[name]`` ``[B]`` is filled instead of log-probs.
    ``columns`` holds the data kind's extra columns as ``[B]`` tensors (``margin``, ``label``, ...).

    Read them by table (``inputs.logps["chosen"]``) or by attribute: ``inputs.chosen_logps``,
    ``inputs.ref_rejected_logps``, ``inputs.completion_token_logps``, ``inputs.chosen_mask``,
    ``inputs.chosen_rewards``, ``inputs.chosen_lengths``; an attribute of a name that is absent is
    None. The same names are accepted as keywords by the constructor.
    """

    def __init__(self, *, logps=None, token_logps=None, masks=None, ref_logps=None, ref_token_logps=None,
                 rewards=None, columns=None, **named: torch.Tensor | None):
        self.logps: dict[str, torch.Tensor] = dict(logps or {})
        self.token_logps: dict[str, torch.Tensor] = dict(token_logps or {})
        self.masks: dict[str, torch.Tensor] = dict(masks or {})
        self.ref_logps: dict[str, torch.Tensor] = dict(ref_logps or {})
        self.ref_token_logps: dict[str, torch.Tensor] = dict(ref_token_logps or {})
        self.rewards: dict[str, torch.Tensor] = dict(rewards or {})
        self.columns: dict[str, torch.Tensor] = dict(columns or {})
        for key, value in named.items():
            setattr(self, key, value)

    @staticmethod
    def _table_for(key: str) -> tuple[str, str] | None:
        for prefix, suffix, table in _PATTERNS:
            if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
                return table, key[len(prefix): -len(suffix)]
        return None

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        if key.endswith("_lengths"):
            mask = self.__dict__.get("masks", {}).get(key[: -len("_lengths")])
            return None if mask is None else mask.sum(-1).to(torch.float32)
        found = self._table_for(key)
        if found is None:
            raise AttributeError(f"LossInputs has no {key!r}; columns are in inputs.columns")
        table, name = found
        return self.__dict__.get(table, {}).get(name)

    def __setattr__(self, key: str, value: Any) -> None:
        if key in ("logps", "token_logps", "masks", "ref_logps", "ref_token_logps", "rewards", "columns"):
            object.__setattr__(self, key, value)
            return
        if key == "margin":
            self._set(self.columns, "margin", value)
            return
        found = self._table_for(key)
        if found is None:
            raise AttributeError(f"LossInputs has no {key!r}; put extra columns in inputs.columns")
        table, name = found
        self._set(getattr(self, table), name, value)

    @staticmethod
    def _set(table: dict, name: str, value: Any) -> None:
        if value is None:
            table.pop(name, None)
        else:
            table[name] = value

    @property
    def margin(self) -> torch.Tensor | None:
        """The optional ``margin`` column (Bradley-Terry), ``[B]``, or None."""
        return self.columns.get("margin")

    def given(self) -> list[str]:
        """What is filled, as attribute names (for messages)."""
        out = []
        for prefix, suffix, table in _PATTERNS:
            out += [f"{prefix}{name}{suffix}" for name in getattr(self, table)]
        return sorted(out + [f"columns[{name!r}]" for name in self.columns])


@dataclass
class LossOutput:
    """Losses and metrics (per-example ``[B]`` tensors or scalars).

    Offline: ``losses`` is one value per example ``[B]``; the loop averages it over the batch and
    the accumulation steps. Online: ``losses`` is one 0-dim tensor, the mean over the chunk's
    loss units (:meth:`OnlineObjective.loss_unit`); the loop weights chunks by their unit counts.
    Metric names follow the shared vocabulary (``rewards/chosen``, ``rewards/margins``, ``kl``, ...).
    """

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Objective:
    """An offline objective; subclass it and register an instance through ``register_objectives``.

    Also the base of :class:`OnlineObjective` and :class:`InferenceObjective`, whose ``kind``
    says which loop runs them.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    kind: ClassVar[ObjectiveKind] = "offline"
    Params: ClassVar[type[ObjectiveParams]] = ObjectiveParams

    def needs(self, params: ObjectiveParams) -> Needs:
        return Needs()

    def loss(self, params: ObjectiveParams, inputs: Any) -> LossOutput:
        """Offline: per-example losses from the engine's :class:`LossInputs`. Pure (no model calls)."""
        raise TypeError(f"objective {self.name!r} ({self.kind}) defines no loss")


# --------------------------------------------------------------------------------------------- online


@dataclass
class Rollout:
    """One rollout of the online loop: N = P x G sampled sequences.

    Token tensors are ``[N, T]``, aligned with the completion tokens (position 0 is the first
    generated token), right-padded, ``mask`` true on completion tokens, fp32. Sequence ``i``
    answers prompt ``group_ids[i]`` (0..P-1); the G samples of one prompt share a group id.
    :meth:`OnlineObjective.prepare` writes what its loss needs into ``extras`` (``[N]`` or
    ``[N, T]`` tensors: advantages, returns, ...); the loop hands each minibatch its rows.
    """

    step: int  # the rollout's number, from 0
    prompts: list[Any]  # the raw prompt of each sequence (a string or a list of messages), [N]
    completions: list[str]  # the sampled texts, [N]
    group_ids: torch.Tensor  # [N] long
    scores: torch.Tensor  # [N] the reward function's raw scores
    finished: torch.Tensor  # [N] bool: the completion ended with an end token
    mask: torch.Tensor  # [N, T] bool
    logps: torch.Tensor  # [N, T] the policy's log-probs at sampling time (the "old" policy)
    ref_logps: torch.Tensor | None  # [N, T] the reference's, when Needs.reference
    entropy: torch.Tensor  # [N, T] the policy's entropy at sampling time
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, T] token_outputs() at sampling time
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # written by prepare()

    @property
    def num_sequences(self) -> int:
        return int(self.mask.shape[0])


@dataclass
class OnlineInputs:
    """One chunk of a minibatch (R sequences of a rollout), with the current policy's values.

    ``logps`` and ``outputs`` carry gradients; everything else is the rollout's, sliced to the
    chunk's rows (``[R, T]`` token tensors cut to the chunk's longest completion).
    """

    logps: torch.Tensor  # [R, T] the current policy's log-probs of the sampled tokens
    mask: torch.Tensor  # [R, T] bool
    old_logps: torch.Tensor  # [R, T] at sampling time
    ref_logps: torch.Tensor | None  # [R, T]
    outputs: dict[str, torch.Tensor]  # [R, T] token_outputs() now
    old_outputs: dict[str, torch.Tensor]  # [R, T] token_outputs() at sampling time
    extras: dict[str, torch.Tensor]  # the rows of Rollout.extras
    scores: torch.Tensor  # [R]
    group_ids: torch.Tensor  # [R]


class OnlineObjective(Objective):
    """An online objective (sample -> score -> update); the online loop drives it.

    Per rollout the loop calls :meth:`prepare` once (advantages, controllers, metrics), then for
    ``update_epochs`` passes over shuffled minibatches of ``mini_batch_size`` sequences, :meth:`loss`
    on each chunk of ``train.batch_size`` sequences; one optimizer step per minibatch.
    """

    kind: ClassVar[ObjectiveKind] = "online"
    Params: ClassVar[type[ObjectiveParams]] = OnlineParams

    def needs(self, params: ObjectiveParams) -> Needs:
        return Needs(data="prompts", reward=True, generation=True)

    def init_state(self, params: ObjectiveParams) -> Any:
        """State kept across rollouts (a KL controller, a reward normaliser), or None. It must have
        ``state_dict()`` and ``load_state_dict()``: the loop saves it in every checkpoint."""
        return None

    def modules(self, params: ObjectiveParams, hidden_size: int) -> dict[str, torch.nn.Module]:
        """Extra trainable modules (a value head); trained, checkpointed and saved in ``final/``
        as ``NAME.safetensors`` by the loop. Declare ``Needs.hidden_states`` to feed them."""
        return {}

    def token_outputs(self, params: ObjectiveParams, modules: dict[str, torch.nn.Module],
                      hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token outputs of the objective's modules from the policy's last hidden states
        ``[K, H]`` at the K completion positions (row-major); return ``[K]`` tensors by name.
        The loop pads them to ``[R, T]`` (``Rollout.outputs``, ``OnlineInputs.outputs``)."""
        return {}

    def min_samples_per_prompt(self, params: ObjectiveParams) -> int:
        """The smallest ``sampling.num_samples`` (G) the objective works with (group baselines need 2)."""
        return 1

    def loss_unit(self, params: ObjectiveParams) -> LossUnit:
        """What :meth:`loss` averages over: "token" (valid tokens) or "sequence"."""
        return "token"

    def prepare(self, params: ObjectiveParams, rollout: Rollout, state: Any) -> dict[str, float]:
        """Compute what the loss needs into ``rollout.extras`` (advantages, ...); update ``state``;
        return metrics for this rollout (numbers). Runs without gradients."""
        raise TypeError(f"objective {self.name!r} defines no prepare()")

    def loss(self, params: ObjectiveParams, inputs: OnlineInputs) -> LossOutput:
        """The loss of one chunk: ``LossOutput.losses`` a 0-dim tensor, the mean over the chunk's
        loss units; metrics are numbers or 0-dim tensors (averaged by unit count)."""
        raise TypeError(f"objective {self.name!r} defines no loss()")


# --------------------------------------------------------------------------------------------- inference


class InferenceObjective(Objective):
    """An inference-time policy: trains nothing, changes how a policy samples."""

    kind: ClassVar[ObjectiveKind] = "inference"

    def needs(self, params: ObjectiveParams) -> Needs:
        return Needs(data="prompts", reward=True, generation=True)

    def sample(self, params: ObjectiveParams, model: Any, tokenizer: Any, prompt_ids: list[list[int]],
               prompts: list[Any], scorer: Any, cfg: Any, *, seed: int, num_samples: int = 1,
               progress: Any = None) -> list[list[Any]]:
        """``num_samples`` outputs per prompt (lists of ``prefkit.models.sampling.Sample``), drawn
        from ``model`` with the sampling settings ``cfg``, scored by ``scorer`` as needed."""
        raise TypeError(f"objective {self.name!r} defines no sample()")

    def kl(self, params: ObjectiveParams) -> float | None:
        """KL(induced policy || sampling policy) in nats when it is known analytically (a bound
        is fine; say so in ``kl_method``), or None: evaluators then measure it on samples."""
        return None

    def kl_method(self, params: ObjectiveParams) -> str:
        """How :meth:`kl` was obtained, as shown in results (e.g. ``"best_of_n_bound"``)."""
        return "analytic"

    def samples_per_output(self, params: ObjectiveParams) -> int:
        """Completions generated for each output (its sampling budget; best-of-N: N)."""
        return 1
