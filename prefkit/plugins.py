"""Finding plugins and collecting what they register.

Plugins are found through the ``prefkit`` entry point group; the built-in objectives, model
sources and datasets are registered by the same mechanism. Each plugin's hook
implementations are called one plugin at a time (built-ins first, then the others by entry
point name), so every registered name is attributed to the plugin that registered it.

A broken plugin is harmless: a plugin that fails to import, raises inside a hook, registers a
name that is already taken, registers something invalid, or implements a hook that does not
exist (a misspelling) gets one clear message naming the plugin and the cause, in
``Registry.problems`` and in its own ``PluginInfo.problems``; every other plugin keeps working.

``PREFKIT_PLUGINS`` restricts which third-party plugins load: a comma-separated list of entry
point (or distribution) names. Unset loads all; empty loads none besides the built-ins.

A third-party plugin is imported in a daemon thread and waited for at most
``PREFKIT_PLUGIN_IMPORT_TIMEOUT`` seconds (default 60; 0 waits forever, in the calling thread): one
that hangs at import is skipped with a message, one that raises ``KeyboardInterrupt`` or
``SystemExit`` while importing is reported as broken. A plugin still importing holds the import
lock of the modules it is in the middle of importing; if one of them is not the plugin's own
package (say it hangs inside ``import torch``), going on could block prefkit itself, so loading
stops with a :class:`PluginError` that says so.

What plugins do later (build a model, score texts, ...) runs inside :func:`plugin_errors`, which
turns an exception into a :class:`PluginError` naming the item, the plugin and its distribution.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import inspect
import math
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pluggy
from pydantic import BaseModel

from prefkit.api import PrefkitError, hookspecs

ENTRY_POINT_GROUP = "prefkit"
ENV_VAR = "PREFKIT_PLUGINS"
TIMEOUT_VAR = "PREFKIT_PLUGIN_IMPORT_TIMEOUT"
DEFAULT_IMPORT_TIMEOUT = 60.0


class PluginError(PrefkitError):
    """A plugin failed: the message names what it was doing, the plugin and its distribution."""
BUILTIN_DISTRIBUTION = "prefkit"

# hook name -> registry attribute
KINDS = {
    "register_objectives": "objectives",
    "register_data_kinds": "data_kinds",
    "register_models": "model_sources",
    "register_datasets": "datasets",
    "register_reward_functions": "reward_functions",
}
# registry attribute -> what one item is called in messages
KIND_WORDS = {
    "objectives": "objective",
    "data_kinds": "data kind",
    "model_sources": "model source",
    "datasets": "dataset",
    "reward_functions": "reward function",
}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class PluginInfo:
    name: str  # entry point name
    distribution: str
    version: str
    module: str = ""  # what the entry point points at, e.g. "prefkit_builtins.dpo"
    builtin: bool = False  # shipped with prefkit itself
    registered: dict[str, list[str]] = field(default_factory=dict)  # kind -> names
    problems: list[str] = field(default_factory=list)  # the messages about this plugin
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, name, why) it could not register
    loaded: bool = True  # False: not imported (failed, or left out by PREFKIT_PLUGINS)
    disabled: bool = False  # left out by PREFKIT_PLUGINS

    @property
    def broken(self) -> bool:
        return bool(self.problems)

    @property
    def status(self) -> str:
        if self.disabled:
            return "disabled"
        return "broken" if self.problems else "ok"

    def cause(self, message: str) -> str:
        """A message of this plugin without its ``plugin 'NAME' (DIST VERSION):`` prefix."""
        return message.removeprefix(f"plugin {self.name!r} ({self.source}): ")

    def general_problems(self) -> list[str]:
        """Problems not about one registered item (import, hook errors, misspelled hooks, ...)."""
        specific = {why for _, _, why in self.rejected}
        return [p for p in self.problems if p not in specific]

    @property
    def source(self) -> str:
        """``distribution version``."""
        return f"{self.distribution} {self.version}" if self.version else self.distribution

    @property
    def label(self) -> str:
        """``distribution version (entry point)``, as shown in listings."""
        return f"{self.source} ({self.name})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "builtin": self.builtin,
            "status": self.status,
            "registered": {kind: list(self.registered.get(kind, [])) for kind in KIND_WORDS},
            "rejected": [{"kind": kind, "name": name, "problem": why} for kind, name, why in self.rejected],
            "problems": list(self.problems),
        }


@dataclass
class Registry:
    objectives: dict[str, Any] = field(default_factory=dict)
    data_kinds: dict[str, Any] = field(default_factory=dict)
    model_sources: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)
    reward_functions: dict[str, Any] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin
    plugins: dict[str, PluginInfo] = field(default_factory=dict)  # every plugin found, broken ones too
    problems: list[str] = field(default_factory=list)  # every message, in the order found
    selection: str | None = None  # the value of PREFKIT_PLUGINS when the registry was built

    def owner(self, kind: str, name: str) -> PluginInfo:
        return self.plugins[self.owners[(kind, name)]]

    def broken_plugins(self) -> list[PluginInfo]:
        return [info for info in self.plugins.values() if info.broken]

    def to_dict(self) -> dict[str, Any]:
        """What ``prefkit plugins --json`` prints."""
        return {
            "env": {ENV_VAR: self.selection},
            "plugins": [info.to_dict() for info in self.plugins.values()],
            "problems": list(self.problems),
        }

    def _problem(self, plugin: PluginInfo | None, message: str) -> str:
        text = f"plugin {plugin.name!r} ({plugin.source}): {message}" if plugin else message
        self.problems.append(text)
        if plugin is not None:
            plugin.problems.append(text)
        return text


# ----------------------------------------------------------------------------- checks


def _where(exc: BaseException) -> str:
    """`` (at file.py:12)`` for the innermost frame of an exception, or for a SyntaxError's line."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" (at {exc.filename}:{exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at {frame.filename}:{frame.lineno})"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _takes(function: Callable, *args: Any, **kwargs: Any) -> bool:
    """Whether ``function`` can be called with ``len(args)`` positional arguments (and ``kwargs``)."""
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): assume yes
        return True
    return True


def _check_params_model(params: Any, owner: str) -> str | None:
    if params is None:
        return f"{owner} has no `Params` model; set `Params` to a subclass of prefkit.api.objective.ObjectiveParams"
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        return (
            f"{owner} has `Params` = {params!r}, which is not a pydantic model; "
            "subclass prefkit.api.objective.ObjectiveParams"
        )
    if params.model_config.get("extra") != "forbid":
        return (
            f"{owner}'s `Params` ({params.__name__}) accepts unknown keys, so a misspelled recipe key would be "
            "ignored; subclass prefkit.api.objective.ObjectiveParams (or set model_config extra='forbid')"
        )
    return _default_problem(params, owner)


def _default_problem(params: type[BaseModel], owner: str) -> str | None:
    """A default of ``params`` that its own field checks refuse (pydantic never checks defaults):
    a recipe leaving the key out would train with it, and the run's resolved recipe, which writes
    it out, would then be refused."""
    from pydantic import ValidationError

    try:
        checked = type(params.__name__, (params,), {"model_config": {**params.model_config, "validate_default": True}})
        checked.model_validate({})
    except ValidationError as exc:
        for error in exc.errors():
            # only a field's own default: a required key has none, and a model validator (one that
            # asks the user to choose between keys) runs on every real recipe anyway
            field = params.model_fields.get(str(error["loc"][0])) if error["loc"] else None
            if error["type"] != "missing" and field is not None:
                where = ".".join(str(part) for part in error["loc"])
                default = field.get_default(call_default_factory=True)
                return (f"{owner}'s `Params` ({params.__name__}) has a default its own checks refuse: "
                        f"{where} = {default!r}: {error['msg']}; fix the default")
    except Exception:  # noqa: BLE001 - a model that cannot be subclassed: its defaults are checked in use
        return None
    return None


def _check_needs(item: Any) -> str | None:
    """Call ``needs()`` with the default params (when they exist) and check what comes back."""
    from typing import get_args

    from prefkit.api import ModelHead, Needs

    try:
        params = item.Params()
    except Exception:
        return None  # required params: needs() is checked when a recipe gives them
    try:
        needs = item.needs(params)
    except Exception as exc:
        return f"objective {item.name!r}: needs() raised {_describe(exc)}{_where(exc)}"
    if not isinstance(needs, Needs):
        return f"objective {item.name!r}: needs() returned {type(needs).__name__}, not a prefkit.api.Needs"
    if not isinstance(needs.data, str) or not needs.data:
        return f"objective {item.name!r}: Needs.data is {needs.data!r}; expected the name of a data kind"
    if needs.head not in get_args(ModelHead):
        return f"objective {item.name!r}: Needs.head is {needs.head!r}; expected one of {', '.join(get_args(ModelHead))}"
    for flag in ("reference", "reference_tokens", "mismatched", "reward", "generation", "hidden_states"):
        if not isinstance(getattr(needs, flag), bool):
            return f"objective {item.name!r}: Needs.{flag} is {getattr(needs, flag)!r}, not True or False"
    return None


# The class each kind of objective subclasses, and the methods it must define.
_KIND_CLASSES = {"offline": ("Objective", ("loss",)), "online": ("OnlineObjective", ("prepare", "loss")),
                 "inference": ("InferenceObjective", ("sample",))}


def _check_objective(item: Any) -> str | None:
    from prefkit import api

    if isinstance(item, type):
        return f"register_objectives got the class {item.__name__}; register an instance: register({item.__name__}())"
    if not isinstance(item, api.Objective):
        return f"register_objectives got {type(item).__name__}, not a prefkit.api.Objective instance"
    if not isinstance(getattr(item, "name", None), str) or not item.name:
        return f"{type(item).__name__} has no string `name`"
    if not NAME_PATTERN.match(item.name):
        return f"objective name {item.name!r} may hold only letters, digits, '_', '-' and '.'"
    problem = _check_params_model(getattr(item, "Params", None), f"objective {item.name!r}")
    if problem:
        return problem
    if not isinstance(getattr(item, "description", None), str):
        return f"objective {item.name!r} has no string `description`"
    kind = getattr(item, "kind", None)
    if kind not in _KIND_CLASSES:
        return f"objective {item.name!r} has kind {kind!r}; expected offline, online or inference"
    class_name, methods = _KIND_CLASSES[kind]
    base = getattr(api, class_name)
    if not isinstance(item, base):
        return f"objective {item.name!r} is {kind}; subclass prefkit.api.{class_name}"
    if not _takes(item.needs, None):
        return f"objective {item.name!r}: needs() must take one argument, the params"
    for method in methods:
        if getattr(type(item), method) is getattr(base, method):
            return f"objective {item.name!r} is {kind} but defines no `{method}`"
        arity = {"loss": 2, "prepare": 3, "sample": 7}[method]
        if not _takes(getattr(item, method), *([None] * arity), **({"seed": 0} if method == "sample" else {})):
            wanted = {"loss": "(params, inputs)", "prepare": "(params, rollout, state)",
                      "sample": "(params, model, tokenizer, prompt_ids, prompts, scorer, cfg, *, seed, ...)"}[method]
            return f"objective {item.name!r}: {method}() must take {wanted}"
    return _check_needs(item)


def _check_data_kind(item: Any) -> str | None:
    completions = getattr(item, "completions", None)
    if not isinstance(completions, tuple) or not all(isinstance(c, str) and c for c in completions):
        return f"data kind {item.name!r}: `completions` must be a tuple of names, got {completions!r}"
    if not isinstance(getattr(item, "columns", None), dict):
        return f"data kind {item.name!r}: `columns` must be a dict of column name -> description"
    return None


def _check_named(item: Any, kind: str) -> str | None:
    word = KIND_WORDS[kind]
    if isinstance(item, type):
        return f"got the class {item.__name__}; register an instance: register({item.__name__}(...))"
    if not isinstance(getattr(item, "name", None), str) or not item.name:
        expected = _expected_type(kind)
        hint = f"; register a {expected.__module__}.{expected.__name__}" if expected else ""
        return f"a {type(item).__name__} object has no string `name`{hint}"
    if not NAME_PATTERN.match(item.name):
        return f"{word} name {item.name!r} may hold only letters, digits, '_', '-' and '.'"
    expected = _expected_type(kind)
    if expected is not None and not isinstance(item, expected):
        return f"{word} {item.name!r} is a {type(item).__name__}, not a {expected.__module__}.{expected.__name__}"
    if kind in ("model_sources", "reward_functions"):
        params = getattr(item, "Params", None)
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            return f"{word} {item.name!r} has no pydantic `Params` model"
    if kind == "data_kinds":
        return _check_data_kind(item)
    return None


def _expected_type(kind: str) -> type | None:
    from prefkit import api

    return {"model_sources": api.ModelSource, "datasets": api.NamedDataset, "reward_functions": api.RewardFunction,
            "data_kinds": api.DataKind}.get(kind)


# ----------------------------------------------------------------------------- loading


def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("prefkit")
    pm.add_hookspecs(hookspecs)
    return pm


def hook_names() -> list[str]:
    """Every hook a plugin can implement (the functions marked ``@hookspec``)."""
    return sorted(
        name for name, value in vars(hookspecs).items()
        if callable(value) and hasattr(value, "prefkit_spec")
    )


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def selected_names() -> set[str] | None:
    """The names in ``PREFKIT_PLUGINS`` (normalised), or None when it is unset (load all)."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        return None
    return {_normalise(part.strip()) for part in value.split(",") if part.strip()}


def _info_for(ep: importlib.metadata.EntryPoint) -> PluginInfo:
    dist = ep.dist
    distribution = dist.name if dist is not None else "?"
    version = dist.version if dist is not None else "?"
    return PluginInfo(ep.name, distribution, version, module=ep.value,
                      builtin=_normalise(distribution) == BUILTIN_DISTRIBUTION)


def build_registry(extra_plugins: dict[str, Any] | None = None) -> Registry:
    """Load every entry point plugin (plus ``extra_plugins``, name -> module, for tests).

    Never raises for a broken plugin: its problems are collected in ``Registry.problems`` and in
    its ``PluginInfo.problems``, and everything it registered before failing is left out.
    """
    registry = Registry(selection=os.environ.get(ENV_VAR))
    pm = get_plugin_manager()
    wanted = selected_names()
    timeout, problem = import_timeout()
    if problem:
        registry._problem(None, problem)

    found = [(_info_for(ep), ep) for ep in _entry_points()]
    found.sort(key=lambda pair: (not pair[0].builtin, pair[0].name))  # built-ins first: they keep their names
    matched: set[str] = set()
    order: list[tuple[PluginInfo, Any]] = []
    for info, ep in found:
        if info.name in registry.plugins:
            other = registry.plugins[info.name]
            info.name = f"{info.name}@{info.distribution}"
            registry.plugins[info.name] = info
            info.loaded = False
            registry._problem(info, f"its entry point name is already used by {other.distribution}; not loaded")
            continue
        registry.plugins[info.name] = info
        if not info.builtin and wanted is not None:
            keys = {_normalise(info.name), _normalise(info.distribution)}
            matched |= keys & wanted
            if not keys & wanted:
                info.loaded, info.disabled = False, True
                continue
        plugin, failure = _import(ep, info, None if info.builtin else timeout)
        if failure is not None:
            info.loaded = False
            registry._problem(info, failure)
            continue
        if _register(registry, pm, info, plugin):
            order.append((info, plugin))
    for name, plugin in (extra_plugins or {}).items():
        info = PluginInfo(name, "<in-process>", "", module=getattr(plugin, "__name__", repr(plugin)))
        registry.plugins[name] = info
        if _register(registry, pm, info, plugin):
            order.append((info, plugin))

    if wanted is not None:
        for name in sorted(wanted - matched):
            installed = ", ".join(sorted(i.name for i in registry.plugins.values() if not i.builtin)) or "none"
            registry._problem(None, f"{ENV_VAR} names {name!r}, which is not an installed plugin "
                                    f"(third-party plugins installed: {installed})")

    for info, plugin in order:
        for hook_name, kind in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin and impl.plugin_name == info.name:
                    _collect(registry, kind, info, impl)
    _check_data_kinds_exist(registry)
    return registry


def import_timeout() -> tuple[float | None, str | None]:
    """Seconds to wait for one plugin's import (None: no limit), and a problem with the setting."""
    value = os.environ.get(TIMEOUT_VAR, "").strip()
    if not value:
        return DEFAULT_IMPORT_TIMEOUT, None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if math.isnan(seconds) or seconds < 0:
        return DEFAULT_IMPORT_TIMEOUT, (f"{TIMEOUT_VAR}={value!r} is not a number of seconds (0 waits forever); "
                                        f"using {DEFAULT_IMPORT_TIMEOUT:g}")
    return (None if seconds == 0 or math.isinf(seconds) else seconds), None


def _import(ep: importlib.metadata.EntryPoint, info: PluginInfo, timeout: float | None) -> tuple[Any, str | None]:
    """``(plugin, None)``, or ``(None, why it failed)``. With a timeout the import runs in a daemon
    thread; an import that does not finish in time is abandoned (see the module's docstring)."""
    if timeout is None:
        try:
            return ep.load(), None
        except BaseException as exc:  # noqa: BLE001 - a plugin raising KeyboardInterrupt/SystemExit is broken
            if isinstance(exc, KeyboardInterrupt) and info.builtin:
                raise
            return None, f"failed to import {ep.value}: {_describe(exc)}{_where(exc)}"
    outcome: dict[str, Any] = {}

    def load() -> None:
        try:
            outcome["plugin"] = ep.load()
        except BaseException as exc:  # noqa: BLE001 - reported, never re-raised in this thread
            outcome["error"] = exc

    before = set(sys.modules)
    thread = threading.Thread(target=load, name=f"prefkit-import-{ep.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        own = ep.value.split(":")[0].split(".")[0]
        stuck = sorted(name for name, module in list(sys.modules.items())
                       if name not in before and getattr(getattr(module, "__spec__", None), "_initializing", False))
        foreign = [name for name in stuck if name.split(".")[0] != own]
        if foreign:
            raise PluginError(
                f"plugin {info.name!r} ({info.source}) did not finish importing within {timeout:g} s and is stuck "
                f"importing {foreign[0]!r}, which prefkit may need too, so it cannot go on safely; uninstall the "
                f"plugin, leave it out with {ENV_VAR}, or wait longer with {TIMEOUT_VAR}"
            )
        return None, (f"did not finish importing within {timeout:g} s; skipped (set {TIMEOUT_VAR} to wait longer, "
                      f"or leave it out with {ENV_VAR})")
    if "error" in outcome:
        exc = outcome["error"]
        return None, f"failed to import {ep.value}: {_describe(exc)}{_where(exc)}"
    return outcome.get("plugin"), None


def _check_data_kinds_exist(registry: Registry) -> None:
    """An objective whose default needs name a data kind nobody registered is left out."""
    for name, objective in list(registry.objectives.items()):
        try:
            data = objective.needs(objective.Params()).data
        except Exception:
            continue  # required params: checked when a recipe gives them
        if data not in registry.data_kinds:
            info = registry.owner("objectives", name)
            known = ", ".join(sorted(registry.data_kinds)) or "none"
            text = registry._problem(info, f"invalid objective: objective {name!r} needs data kind {data!r}, "
                                           f"which no plugin registers (data kinds: {known})")
            info.rejected.append(("objectives", name, text))
            del registry.objectives[name]
            del registry.owners[("objectives", name)]
            info.registered["objectives"].remove(name)


def _register(registry: Registry, pm: pluggy.PluginManager, info: PluginInfo, plugin: Any) -> bool:
    """Register one plugin object with pluggy; report bad or misspelled hook implementations."""
    try:
        pm.register(plugin, name=info.name)
    except pluggy.PluginValidationError as exc:
        _unregister(pm, plugin)
        info.loaded = False
        registry._problem(info, f"invalid hook implementation: {_signature_problem(pm, plugin, exc)}")
        return False
    except ValueError as exc:  # the same object under two entry point names
        info.loaded = False
        registry._problem(info, f"cannot be registered: {exc}")
        return False
    specs = hook_names()
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.has_spec():
            continue
        impls = [impl for impl in caller.get_hookimpls() if impl.plugin is plugin and not impl.optionalhook]
        if not impls:
            continue
        close = difflib.get_close_matches(caller.name, specs, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; the hooks are: {', '.join(specs)}"
        registry._problem(info, f"implements {caller.name!r}, which is not a prefkit hook{hint}")
    implemented = {caller.name for caller in pm.get_hookcallers(plugin) or []}
    for name in specs:
        if name not in implemented and callable(getattr(plugin, name, None)):
            registry._problem(
                info,
                f"defines {name}() without the @hookimpl marker, so it is never called; "
                "add `from prefkit.api import hookimpl` and decorate it with @hookimpl",
            )
    return True


def _signature_problem(pm: pluggy.PluginManager, plugin: Any, exc: Exception) -> str:
    """Which hook implementation takes arguments its hook does not pass, in plain words."""
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        spec = getattr(hookspecs, (opts or {}).get("specname") or attr, None) if opts is not None else None
        if spec is None:
            continue
        try:
            impl_args = list(inspect.signature(getattr(plugin, attr)).parameters)
        except (TypeError, ValueError):
            continue
        spec_args = list(inspect.signature(spec).parameters)
        extra = [arg for arg in impl_args if arg not in spec_args]
        if extra:
            return (f"{attr}({', '.join(impl_args)}) takes {', '.join(map(repr, extra))}, which the hook does not "
                    f"pass; the hook passes ({', '.join(spec_args)})")
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _unregister(pm: pluggy.PluginManager, plugin: Any) -> None:
    try:
        pm.unregister(plugin)
    except Exception:  # pragma: no cover - half-registered plugins are simply ignored
        pass


def _collect(registry: Registry, kind: str, info: PluginInfo, impl: Any) -> None:
    table: dict[str, Any] = getattr(registry, kind)
    word = KIND_WORDS[kind]
    hook_name = next(name for name, k in KINDS.items() if k == kind)
    pending: list[Any] = []
    available = {"register": pending.append}
    try:
        impl.function(**{arg: available[arg] for arg in impl.argnames})
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        registry._problem(info, f"raised in {hook_name}: {_describe(exc)}{_where(exc)}; "
                                f"nothing it registered there is used")
        return
    for item in pending:
        try:
            problem = _check_objective(item) if kind == "objectives" else _check_named(item, kind)
            name = getattr(item, "name", None)
        except Exception as exc:  # an object so odd that checking it fails
            problem, name = f"checking {type(item).__name__} raised {_describe(exc)}{_where(exc)}", None
        if problem:
            text = registry._problem(info, f"invalid {word}: {problem}")
            if isinstance(name, str) and name:
                info.rejected.append((kind, name, text))
            continue
        if name in table:
            other = registry.plugins[registry.owners[(kind, name)]]
            text = registry._problem(
                info,
                f"registers {word} {name!r}, which plugin {other.name!r} ({other.source}) "
                f"already registered; keeping {other.name!r}'s (rename yours)",
            )
            info.rejected.append((kind, name, text))
            continue
        table[name] = item
        registry.owners[(kind, name)] = info.name
        info.registered.setdefault(kind, []).append(name)


# ----------------------------------------------------------------------------- calling plugins


def plugin_label(registry: Any, kind: str, name: str) -> str:
    """``model source 'x' (plugin 'ep', distribution prefkit-foo 1.0)``, as far as ``registry`` knows."""
    word = KIND_WORDS.get(kind, kind)
    try:
        info = registry.owner(kind, name)
    except (AttributeError, KeyError):
        return f"{word} {name!r}"
    return f"{word} {name!r} (plugin {info.name!r}, distribution {info.source})"


@contextlib.contextmanager
def plugin_errors(registry: Any, kind: str, name: str, what: str) -> Iterator[None]:
    """Run plugin code; an exception in it becomes a PluginError naming ``what`` it was doing, the
    item, its plugin and distribution. A PrefkitError (the plugin's own clear message) passes
    through; KeyboardInterrupt (the user's Ctrl-C) too."""
    try:
        yield
    except PrefkitError:
        raise
    except (Exception, SystemExit) as exc:
        raise PluginError(f"{plugin_label(registry, kind, name)}: {what} failed: {_describe(exc)}{_where(exc)}; "
                          "this is an error in the plugin (or what it needs): report it to its authors") from exc


@lru_cache(maxsize=1)
def load_registry() -> Registry:
    """The registry for this process (entry points are read once)."""
    return build_registry()


def type_text(annotation) -> str:
    """A short, readable form of a type annotation: ``'a' | 'b'``, ``list[float]``, ``int | None``."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(v) for v in args)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_text(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_text(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else getattr(origin, "__name__", str(origin))
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def parameter_rows(params_model) -> list[list[str]]:
    """A plugin's ``Params`` as rows of (name, type, default, meaning), for `prefkit objectives NAME`."""
    rows = []
    for name, info in params_model.model_fields.items():
        if info.is_required():
            default = "(required)"
        elif info.default_factory is not None:
            default = repr(info.default_factory())
        else:
            default = repr(info.default)
        rows.append([name, type_text(info.annotation), default, info.description or ""])
    return rows
