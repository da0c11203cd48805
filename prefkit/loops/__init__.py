"""The training loops, one per kind of objective, and the one place that picks between them.

- ``offline`` (:mod:`prefkit.loops.offline`): a loss over batches of fixed data;
- ``online`` (:mod:`prefkit.loops.online`): sample -> score -> update, driven by the objective;
- ``inference``: trains nothing; ``prefkit sample`` and ``prefkit compare`` sample with it.

:func:`train` runs :mod:`prefkit.loops.preflight` first: the checks of the files, data and budget a
recipe points to, before any model is loaded.
"""

from __future__ import annotations

from typing import Any

from prefkit.api import PrefkitError, RecipeError
from prefkit.recipe import LoadedRecipe


def require_objective(loaded: LoadedRecipe, command: str = "run") -> None:
    """Refuse a recipe without ``objective`` for a command that needs one (RecipeError)."""
    if loaded.objective is None:
        raise RecipeError(loaded.path, [("objective", f"the recipe has none: `prefkit {command}` needs objective.name "
                                                      "(`prefkit objectives` lists them); a recipe without an "
                                                      "objective can only be sampled (`prefkit sample`)")])


def check_recipe(loaded: LoadedRecipe) -> None:
    """Refuse, before any work, what the loop that would run this recipe cannot do (RecipeError)."""
    require_objective(loaded, "run")
    kind = loaded.objective.kind
    problems: list[tuple[str, str]] = []
    if kind == "online":
        from prefkit.loops.online import check_online_recipe

        problems = check_online_recipe(loaded)
    elif kind == "offline":
        needs = loaded.objective.needs(loaded.params)
        if needs.generation or needs.reward or needs.hidden_states:
            problems = [("objective.name", f"objective {loaded.objective.name!r} is offline but declares "
                                           "generation, reward or hidden states, which only the online loop provides")]
    if problems:
        raise RecipeError(loaded.path, problems)


def train(loaded: LoadedRecipe, *, resume: bool = False, reporter: Any = None, registry: Any) -> dict[str, Any]:
    """Run the recipe with the loop of its objective's kind; returns the run summary (``run.json``).
    Everything :func:`prefkit.loops.preflight.preflight` can refuse without a model is refused first."""
    from prefkit.loops.preflight import preflight

    check_recipe(loaded)
    preflight(loaded, registry, command="run")
    kind = loaded.objective.kind
    if kind == "offline":
        from prefkit.loops.offline import train as run
    elif kind == "online":
        from prefkit.loops.online import train as run
    else:
        raise PrefkitError(f"objective {loaded.objective.name!r} is {kind}; it trains nothing "
                           "(use `prefkit sample`, or an arm of `prefkit compare`)")
    return run(loaded, resume=resume, reporter=reporter, registry=registry)
