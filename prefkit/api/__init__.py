"""prefkit's public contracts: everything a plugin implements or receives.

This package imports nothing else from prefkit; every other module imports it. A plugin needs
only ``from prefkit.api import ...``:

- hooks: :data:`hookimpl` and the ``register_*`` hook specifications (:mod:`prefkit.api.hookspecs`);
- objectives: :class:`Objective` (offline), :class:`OnlineObjective`, :class:`InferenceObjective`,
  their params bases, :class:`Needs`, and what the loops hand them (:class:`LossInputs`,
  :class:`Rollout`, :class:`OnlineInputs`) and take back (:class:`LossOutput`);
- data: :class:`DataKind`, :class:`Example`, :class:`NamedDataset`, :data:`TRL_TYPES`;
- sources: :class:`ModelSource`, :class:`RewardFunction` and their params, :class:`Scorer`;
- errors: :class:`PrefkitError`, :class:`RecipeError`, :class:`DataError`.
"""

from prefkit.api.data import TRL_TYPES, DataKind, Example, Format, Messages, NamedDataset, Text
from prefkit.api.errors import DataError, PrefkitError, RecipeError
from prefkit.api.hookspecs import hookimpl, hookspec
from prefkit.api.objective import (
    InferenceObjective,
    LossInputs,
    LossOutput,
    LossUnit,
    ModelHead,
    Needs,
    Objective,
    ObjectiveKind,
    ObjectiveParams,
    OnlineInputs,
    OnlineObjective,
    OnlineParams,
    Rollout,
)
from prefkit.api.sources import ModelSource, ModelSourceParams, RewardFunction, RewardParams, Scorer

__all__ = [
    "DataError", "DataKind", "Example", "Format", "InferenceObjective", "LossInputs", "LossOutput", "LossUnit",
    "Messages", "ModelHead", "ModelSource", "ModelSourceParams", "NamedDataset", "Needs", "Objective",
    "ObjectiveKind", "ObjectiveParams", "OnlineInputs", "OnlineObjective", "OnlineParams", "PrefkitError",
    "RecipeError", "RewardFunction", "RewardParams", "Rollout", "Scorer", "TRL_TYPES", "Text", "hookimpl", "hookspec",
]
