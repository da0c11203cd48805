"""Model sources and reward functions: what a plugin registers to supply models and scores."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import ConfigDict

from prefkit.api.params import NumbersAreNumbers


class ModelSourceParams(NumbersAreNumbers):
    """Base for a named source's ``Params``: unknown keys are refused, and a number field takes no
    ``true``/``false``."""

    model_config = ConfigDict(extra="forbid")


class ModelSource(ABC):
    """A named model source, registered through the ``register_models`` hook."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[ModelSourceParams]] = ModelSourceParams
    # Where the same weights live on the Hugging Face hub, if anywhere: trained models and LoRA
    # adapters name it as their base model (a local cache path would resolve nowhere else).
    hub_id: ClassVar[str | None] = None

    @abstractmethod
    def materialize(self, params: ModelSourceParams, cache_dir: Path) -> Path:
        """Return a local directory holding config + safetensors weights + tokenizer files,
        loadable with ``from_pretrained``. Build it once (atomically, see
        ``prefkit.models.loading.materialize_once``) and reuse it."""


class RewardParams(NumbersAreNumbers):
    """Base for every reward function's ``Params``: unknown keys are refused, and a number field
    takes no ``true``/``false``."""

    model_config = ConfigDict(extra="forbid")


@runtime_checkable
class Scorer(Protocol):
    """Scores a batch: ``scorer(prompts, completions)`` -> one float per completion.

    ``prompts[i]`` is the prompt that ``completions[i]`` answers, as plain text. A scorer must be
    deterministic (the same inputs give the same scores, whatever the batch they come in) and
    should batch internally where that is faster. A scorer that understands conversations may set
    ``accepts_messages = True``; it is then handed raw prompts (a string or a list of role/content
    messages) instead of plain text.
    """

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]: ...


class RewardFunction(ABC):
    """Subclass this and register an instance through the ``register_reward_functions`` hook."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[RewardParams]] = RewardParams

    @abstractmethod
    def build(self, params: RewardParams, *, cache_dir: Path, device: Any) -> Scorer:
        """Load what the scorer needs (a lexicon, a model on ``device``, a ``torch.device``) and
        return it. Called once per run; the scorer is then called many times. ``cache_dir`` is the
        run's prefkit cache, for anything worth keeping between runs."""

    def problems(self, params: RewardParams) -> list[str]:
        """What :meth:`build` would refuse, found without building anything (a missing file or
        folder), so that ``prefkit validate`` and the checks before a run or compare report it
        before any model loads. Each is a sentence opening with the params key it concerns
        (``"params.path: no reward model folder at 'x'"``). The default finds none."""
        return []
