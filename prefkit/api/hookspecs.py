"""The hooks a prefkit plugin can implement.

Every hook receives a ``register`` callback; call it once per thing the plugin provides.
Built-in objectives, data kinds, model sources, datasets and reward functions use these very hooks.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("prefkit")
hookimpl = pluggy.HookimplMarker("prefkit")


@hookspec
def register_objectives(register):
    """Register training objectives: ``register(objective)`` with an instance of
    :class:`prefkit.api.Objective`, :class:`prefkit.api.OnlineObjective` or :class:`prefkit.api.InferenceObjective`."""


@hookspec
def register_data_kinds(register):
    """Register data kinds (a row schema, its row checks, its columns): ``register(kind)`` with a
    :class:`prefkit.api.DataKind`."""


@hookspec
def register_models(register):
    """Register named model sources: ``register(source)`` with a :class:`prefkit.api.ModelSource`."""


@hookspec
def register_datasets(register):
    """Register named datasets: ``register(dataset)`` with a :class:`prefkit.api.NamedDataset`."""


@hookspec
def register_reward_functions(register):
    """Register reward functions (texts in, scores out): ``register(reward_function)`` with a
    :class:`prefkit.api.RewardFunction`."""
