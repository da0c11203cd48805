"""Finding plugins and collecting what they register.

Plugins are found through the ``prefkit`` entry point group; the built-in objectives, model
sources and datasets are registered by the same mechanism. Each plugin's hook
implementations are called one plugin at a time, so every registered name is attributed
to the plugin that registered it, and a plugin that fails is reported by name without
taking the others down.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import pluggy
from pydantic import BaseModel

from prefkit import hookspecs

ENTRY_POINT_GROUP = "prefkit"

# hook name -> (registry attribute, what one registration must be)
KINDS = {
    "register_objectives": "objectives",
    "register_models": "model_sources",
    "register_datasets": "datasets",
    "register_reward_functions": "reward_functions",
}


@dataclass
class PluginInfo:
    name: str  # entry point name
    distribution: str
    version: str
    registered: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Registry:
    objectives: dict[str, Any] = field(default_factory=dict)
    model_sources: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)
    reward_functions: dict[str, Any] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def owner(self, kind: str, name: str) -> PluginInfo:
        return self.plugins[self.owners[(kind, name)]]


def _check_objective(item: Any) -> str | None:
    from prefkit.objectives import Objective

    if not isinstance(item, Objective):
        return f"register_objectives got {type(item).__name__}, not a prefkit.objectives.Objective instance"
    if not isinstance(getattr(item, "name", None), str) or not item.name:
        return f"{type(item).__name__} has no string `name`"
    params = getattr(item, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        return f"objective {item.name!r} has no pydantic `Params` model"
    if not isinstance(getattr(item, "description", None), str):
        return f"objective {item.name!r} has no string `description`"
    if getattr(item, "kind", None) not in ("offline", "online", "inference"):
        return f"objective {item.name!r} has kind {getattr(item, 'kind', None)!r}; expected offline, online or inference"
    if item.kind == "offline" and type(item).loss is Objective.loss:
        return f"objective {item.name!r} is offline but defines no `loss`"
    return None


def _check_named(item: Any, kind: str) -> str | None:
    if not isinstance(getattr(item, "name", None), str) or not item.name:
        return f"{kind}: {type(item).__name__} has no string `name`"
    return None


def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("prefkit")
    pm.add_hookspecs(hookspecs)
    return pm


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def build_registry(extra_plugins: dict[str, Any] | None = None) -> Registry:
    """Load every entry point plugin (plus ``extra_plugins``, name -> module, for tests)."""
    registry = Registry()
    pm = get_plugin_manager()

    for ep in _entry_points():
        dist = ep.dist
        info = PluginInfo(ep.name, dist.name if dist else "?", dist.version if dist else "?")
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            registry.problems.append(f"plugin {ep.name!r} ({info.distribution}) failed to load: {exc!r}")
            continue
        registry.plugins[ep.name] = info
    for name, module in (extra_plugins or {}).items():
        pm.register(module, name=name)
        registry.plugins[name] = PluginInfo(name, "<in-process>", "")

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        registry.problems.append(f"plugin {exc.plugin_name!r}: {exc}")

    for hook_name, kind in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            _collect(registry, kind, impl.plugin_name, impl.function)
    return registry


def _collect(registry: Registry, kind: str, plugin: str, function: Callable) -> None:
    table: dict[str, Any] = getattr(registry, kind)
    pending: list[Any] = []
    try:
        function(register=pending.append)
    except Exception as exc:
        registry.problems.append(f"plugin {plugin!r} raised in {kind} hook: {exc!r}")
        return
    for item in pending:
        problem = _check_objective(item) if kind == "objectives" else _check_named(item, kind)
        if problem:
            registry.problems.append(f"plugin {plugin!r}: {problem}")
            continue
        if item.name in table:
            other = registry.owners[(kind, item.name)]
            registry.problems.append(
                f"plugin {plugin!r} registers {kind[:-1].replace('_', ' ')} {item.name!r}, "
                f"already registered by plugin {other!r}; keeping {other!r}'s"
            )
            continue
        table[item.name] = item
        registry.owners[(kind, item.name)] = plugin
        if plugin in registry.plugins:
            registry.plugins[plugin].registered.setdefault(kind, []).append(item.name)


@lru_cache(maxsize=1)
def load_registry() -> Registry:
    """The registry for this process (entry points are read once)."""
    return build_registry()
