"""The hooks a prefkit plugin can implement.

Every hook receives a ``register`` callback; call it once per thing the plugin provides.
Built-in objectives, model sources and datasets use these very hooks.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("prefkit")
hookimpl = pluggy.HookimplMarker("prefkit")


@hookspec
def register_objectives(register):
    """Register training objectives: ``register(objective)`` with a :class:`prefkit.objectives.Objective`."""


@hookspec
def register_models(register):
    """Register named model sources: ``register(source)`` with a :class:`prefkit.models.ModelSource`."""


@hookspec
def register_datasets(register):
    """Register named datasets: ``register(dataset)`` with a :class:`prefkit.data.NamedDataset`."""


@hookspec
def register_reward_functions(register):
    """Register reward functions (texts in, scores out): ``register(reward_function)``."""
