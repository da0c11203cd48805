"""A broken plugin is harmless: one clear message naming the plugin and the cause, the rest works.

Each test installs a deliberately broken plugin distribution (a ``*.dist-info`` with entry points
and its module, on ``sys.path``: what ``pip install`` leaves behind, without pip) through the
``install_plugin`` fixture of ``prefkit.testing``, then builds the registry from the entry points.
"""

from __future__ import annotations

import json
import re
import textwrap

import pytest
from prefkit_builtins.dpo import DPO
from typer.testing import CliRunner

from prefkit.cli import app
from prefkit.plugins import build_registry
from prefkit.testing import install_plugin  # noqa: F401  (a fixture)

BUILTIN_OBJECTIVES = {"dpo", "bt_reward", "preferred_ft", "unlikelihood", "best_of_n"}

HEADER = """\
from prefkit.api.hookspecs import hookimpl
from prefkit.api.objective import LossOutput, Needs, Objective, ObjectiveParams
"""

GOOD_OBJECTIVE = """
class Fine(Objective):
    name = "fine_obj"
    description = "a valid objective"

    def loss(self, params, inputs):
        return LossOutput(losses=-inputs.chosen_logps)
"""


def plugin(install, dist: str, source: str, ep: str | None = None) -> str:
    """Install a one-module plugin distribution; return its entry point name."""
    module = dist.replace("-", "_")
    ep = ep or module.removeprefix("prefkit_")
    install(dist, entry_points={ep: module}, files={f"{module}.py": HEADER + textwrap.dedent(source)})
    return ep


def assert_rest_works(registry, broken: str) -> None:
    assert BUILTIN_OBJECTIVES <= set(registry.objectives)
    assert isinstance(registry.objectives["dpo"], DPO) and registry.owners[("objectives", "dpo")] == "dpo"
    assert {"tiny-llama", "smollm2-135m-instruct"} <= set(registry.model_sources)
    assert {"tiny-prefs", "tiny-sft"} <= set(registry.datasets)
    assert {"sentiment", "keywords"} <= set(registry.reward_functions)
    others = [info for info in registry.plugins.values() if info.name != broken]
    assert not [info.problems for info in others if info.problems]
    assert registry.plugins[broken].status == "broken"


def only_problem(registry, name: str) -> str:
    problems = registry.plugins[name].problems
    assert len(problems) == 1, problems
    assert registry.problems == problems
    assert problems[0].startswith(f"plugin {name!r} (prefkit-")
    return problems[0]


# ----------------------------------------------------------------------------- import errors


def test_plugin_that_fails_to_import(install_plugin):
    name = plugin(install_plugin, "prefkit-broken-import", "import prefkit_no_such_module_xyz\n")
    registry = build_registry()
    message = only_problem(registry, name)
    assert "(prefkit-broken-import 0.1.0)" in message
    assert "failed to import prefkit_broken_import" in message
    assert "ModuleNotFoundError: No module named 'prefkit_no_such_module_xyz'" in message
    assert "prefkit_broken_import.py:3" in message  # the line of the failing import
    assert registry.plugins[name].loaded is False
    assert_rest_works(registry, name)


def test_plugin_with_a_syntax_error(install_plugin):
    name = plugin(install_plugin, "prefkit-broken-syntax", "def oops(:\n    pass\n")
    registry = build_registry()
    message = only_problem(registry, name)
    assert "SyntaxError" in message and "prefkit_broken_syntax.py:3" in message
    assert_rest_works(registry, name)


def test_plugin_that_raises_or_exits_at_import(install_plugin):
    a = plugin(install_plugin, "prefkit-broken-raise", "raise RuntimeError('no GPU here')\n")
    b = plugin(install_plugin, "prefkit-broken-exit", "import sys\nsys.exit(3)\n")
    registry = build_registry()
    assert "RuntimeError: no GPU here" in registry.plugins[a].problems[0]
    assert "SystemExit: 3" in registry.plugins[b].problems[0]
    assert BUILTIN_OBJECTIVES <= set(registry.objectives)


# ----------------------------------------------------------------------------- hooks


def test_plugin_that_raises_inside_its_hook(install_plugin):
    name = plugin(install_plugin, "prefkit-broken-hook", GOOD_OBJECTIVE + """
@hookimpl
def register_objectives(register):
    register(Fine())
    raise ValueError("cannot find my config file")
""")
    registry = build_registry()
    message = only_problem(registry, name)
    assert "raised in register_objectives: ValueError: cannot find my config file" in message
    assert "prefkit_broken_hook.py:" in message
    assert "fine_obj" not in registry.objectives  # nothing from a hook that failed half-way
    assert_rest_works(registry, name)


def test_misspelled_hook_is_reported_not_ignored(install_plugin):
    name = plugin(install_plugin, "prefkit-misspelled", GOOD_OBJECTIVE + """
@hookimpl
def register_objective(register):
    register(Fine())
""")
    registry = build_registry()
    message = only_problem(registry, name)
    assert "implements 'register_objective', which is not a prefkit hook" in message
    assert "did you mean 'register_objectives'?" in message
    assert "fine_obj" not in registry.objectives
    assert_rest_works(registry, name)


def test_hook_without_the_marker_is_reported(install_plugin):
    name = plugin(install_plugin, "prefkit-unmarked", GOOD_OBJECTIVE + """
def register_objectives(register):
    register(Fine())
""")
    message = only_problem(build_registry(), name)
    assert "defines register_objectives() without the @hookimpl marker" in message


def test_hook_with_wrong_arguments_is_reported(install_plugin):
    name = plugin(install_plugin, "prefkit-bad-args", """
@hookimpl
def register_objectives(callback):
    pass
""")
    registry = build_registry()
    message = only_problem(registry, name)
    assert "invalid hook implementation" in message and "callback" in message
    assert_rest_works(registry, name)


def test_optional_hooks_unknown_to_this_prefkit_are_allowed(install_plugin):
    name = plugin(install_plugin, "prefkit-future", GOOD_OBJECTIVE + """
@hookimpl(optionalhook=True)
def register_evaluators(register):
    pass

@hookimpl
def register_objectives(register):
    register(Fine())
""")
    registry = build_registry()
    assert registry.problems == [] and registry.owners[("objectives", "fine_obj")] == name


# ----------------------------------------------------------------------------- names and validity


def test_duplicate_name_keeps_the_builtin_and_names_both_plugins(install_plugin):
    # "aaa" sorts before "dpo": built-ins still register first and keep their names
    name = plugin(install_plugin, "prefkit-dup", GOOD_OBJECTIVE + """
class FakeDPO(Fine):
    name = "dpo"

@hookimpl
def register_objectives(register):
    register(FakeDPO())
    register(Fine())
""", ep="aaa_dup")
    registry = build_registry()
    message = only_problem(registry, name)
    assert "registers objective 'dpo', which plugin 'dpo' (prefkit 0.1.0) already registered" in message
    assert "keeping 'dpo''s" in message
    assert registry.owners[("objectives", "fine_obj")] == name  # its other objective works
    assert registry.plugins[name].rejected == [("objectives", "dpo", message)]
    assert_rest_works(registry, name)


def test_duplicate_between_two_third_party_plugins(install_plugin):
    first = plugin(install_plugin, "prefkit-first", GOOD_OBJECTIVE + """
@hookimpl
def register_objectives(register):
    register(Fine())
""")
    second = plugin(install_plugin, "prefkit-second", GOOD_OBJECTIVE + """
@hookimpl
def register_objectives(register):
    register(Fine())
""")
    registry = build_registry()
    assert registry.owners[("objectives", "fine_obj")] == first
    assert registry.plugins[first].status == "ok"
    assert "which plugin 'first' (prefkit-first 0.1.0) already registered" in only_problem(registry, second)


def test_two_distributions_with_the_same_entry_point_name(install_plugin):
    for dist in ("prefkit-a", "prefkit-b"):
        obj = dist.removeprefix("prefkit-") + "_obj"
        plugin(install_plugin, dist, GOOD_OBJECTIVE.replace("fine_obj", obj) + """
@hookimpl
def register_objectives(register):
    register(Fine())
""", ep="same")
    registry = build_registry()
    kept, other = registry.plugins["same"], next(i for n, i in registry.plugins.items() if n.startswith("same@"))
    assert len(other.problems) == 1 and "its entry point name is already used by" in other.problems[0]
    assert {kept.distribution, other.distribution} == {"prefkit-a", "prefkit-b"}
    assert kept.status == "ok" and other.status == "broken"
    assert BUILTIN_OBJECTIVES <= set(registry.objectives)


INVALID_OBJECTIVES = {
    "params_missing": ("Params = None", "has no `Params` model"),
    "params_not_a_model": ("Params = dict", "is not a pydantic model"),
    "params_allow_unknown_keys": (
        "from pydantic import BaseModel\n    class Params(BaseModel):\n        beta: float = 0.1",
        "accepts unknown keys",
    ),
    "params_default_refused": (
        "class Params(ObjectiveParams):\n        beta: float = __import__('pydantic').Field(-1.0, gt=0)",
        "has a default its own checks refuse: beta = -1.0: Input should be greater than 0",
    ),
    "params_default_factory_refused": (
        "class Params(ObjectiveParams):\n        w: list[int] = __import__('pydantic').Field(default_factory=lambda: ['x'])",
        "has a default its own checks refuse: w.0 = ['x']",
    ),
    "needs_returns_junk": (
        "def needs(self, params):\n        return {'data': 'pairs'}",
        "needs() returned dict, not a prefkit.api.Needs",
    ),
    "needs_bad_data_kind": (
        "def needs(self, params):\n        return Needs(data='pair')",
        "needs data kind 'pair', which no plugin registers (data kinds: pairs, prompts, sft, unpaired)",
    ),
    "needs_raises": (
        "def needs(self, params):\n        raise KeyError('beta')",
        "needs() raised KeyError",
    ),
    "name_not_a_string": ("name = 42", "has no string `name`"),
    "kind_unknown": ("kind = 'batch'", "has kind 'batch'; expected offline, online or inference"),
    "loss_wrong_signature": (
        "def loss(self, inputs):\n        return None",
        "loss() must take (params, inputs)",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_OBJECTIVES))
def test_invalid_objective(install_plugin, case):
    body, expected = INVALID_OBJECTIVES[case]
    source = f"""
class Bad(Objective):
    name = "bad_obj"
    description = "broken on purpose"

    def loss(self, params, inputs):
        return LossOutput(losses=-inputs.chosen_logps)

    {body}

@hookimpl
def register_objectives(register):
    register(Bad())
"""
    name = plugin(install_plugin, "prefkit-invalid", source)
    registry = build_registry()
    message = only_problem(registry, name)
    assert "invalid objective: " in message and expected in message, message
    assert "bad_obj" not in registry.objectives
    assert_rest_works(registry, name)


def test_registering_the_class_instead_of_an_instance(install_plugin):
    name = plugin(install_plugin, "prefkit-class", GOOD_OBJECTIVE + """
@hookimpl
def register_objectives(register):
    register(Fine)
""")
    assert "register an instance: register(Fine())" in only_problem(build_registry(), name)


def test_offline_objective_without_a_loss(install_plugin):
    name = plugin(install_plugin, "prefkit-noloss", """
class NoLoss(Objective):
    name = "no_loss"
    description = "forgot the loss"

@hookimpl
def register_objectives(register):
    register(NoLoss())
""")
    assert "is offline but defines no `loss`" in only_problem(build_registry(), name)


def test_invalid_reward_function_and_dataset(install_plugin):
    name = plugin(install_plugin, "prefkit-bad-kinds", """
@hookimpl
def register_reward_functions(register):
    register(object())

@hookimpl
def register_datasets(register):
    register("tiny-prefs")
""")
    registry = build_registry()
    problems = registry.plugins[name].problems
    assert len(problems) == 2
    assert any("invalid reward function: a object object has no string `name`; register a "
               "prefkit.api.sources.RewardFunction" in p for p in problems)
    assert any("invalid dataset: a str object has no string `name`; register a prefkit.api.data.NamedDataset" in p
               for p in problems)
    assert_rest_works(registry, name)


# ----------------------------------------------------------------------------- PREFKIT_PLUGINS


def test_prefkit_plugins_selects_third_party_plugins(install_plugin, monkeypatch):
    for dist in ("prefkit-one", "prefkit-two"):
        obj = dist.replace("prefkit-", "") + "_obj"
        plugin(install_plugin, dist, GOOD_OBJECTIVE.replace("fine_obj", obj) + """
@hookimpl
def register_objectives(register):
    register(Fine())
""")
    monkeypatch.delenv("PREFKIT_PLUGINS", raising=False)
    assert {"one_obj", "two_obj"} <= set(build_registry().objectives)

    monkeypatch.setenv("PREFKIT_PLUGINS", "")
    registry = build_registry()
    assert set(registry.objectives) >= BUILTIN_OBJECTIVES and not {"one_obj", "two_obj"} & set(registry.objectives)
    assert registry.plugins["one"].status == "disabled" and registry.problems == []

    monkeypatch.setenv("PREFKIT_PLUGINS", " two ,prefkit-one")  # entry point or distribution names
    assert {"one_obj", "two_obj"} <= set(build_registry().objectives)

    monkeypatch.setenv("PREFKIT_PLUGINS", "two,tow")
    registry = build_registry()
    assert "two_obj" in registry.objectives and "one_obj" not in registry.objectives
    assert registry.problems == [
        "PREFKIT_PLUGINS names 'tow', which is not an installed plugin (third-party plugins installed: one, two)"
    ]


def test_prefkit_plugins_never_imports_a_left_out_plugin(install_plugin, monkeypatch):
    name = plugin(install_plugin, "prefkit-broken-import", "import prefkit_no_such_module_xyz\n")
    monkeypatch.setenv("PREFKIT_PLUGINS", "")
    registry = build_registry()
    assert registry.problems == [] and registry.plugins[name].status == "disabled"


# ----------------------------------------------------------------------------- the command line


runner = CliRunner()


@pytest.fixture
def broken_env(install_plugin, monkeypatch):
    monkeypatch.delenv("PREFKIT_PLUGINS", raising=False)
    plugin(install_plugin, "prefkit-broken-import", "import prefkit_no_such_module_xyz\n")
    plugin(install_plugin, "prefkit-invalid", """
class Bad(Objective):
    name = "bad_obj"
    description = "broken on purpose"
    Params = dict

    def loss(self, params, inputs):
        return None

@hookimpl
def register_objectives(register):
    register(Bad())
""")


def test_objectives_command_lists_the_rest_and_marks_the_broken(broken_env):
    result = runner.invoke(app, ["objectives"])
    assert result.exit_code == 0, result.output
    for name in BUILTIN_OBJECTIVES:
        assert name in result.output
    assert "BROKEN" in result.output and "bad_obj" in result.output
    table = re.sub(r"[\s│]+", " ", result.output.split("warning:")[0])  # the table, unwrapped
    assert "bad_obj (BROKEN)" in table and table.count("(BROKEN)") == 2  # its objective, and the unloadable plugin
    assert "is not a pydantic model" in table and "No module named" in table  # each row says why
    assert "warning: plugin 'broken_import' (prefkit-broken-import 0.1.0): failed to import" in result.output
    assert "warning: plugin 'invalid' (prefkit-invalid 0.1.0): invalid objective: objective 'bad_obj'" in result.output
    assert "Traceback" not in result.output


def test_plugins_command_table_and_json(broken_env):
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "prefkit-broken-import" in result.output and "BROKEN" in result.output

    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    assert plugins["dpo"]["status"] == "ok" and plugins["dpo"]["builtin"] is True
    assert plugins["dpo"]["registered"]["objectives"] == ["dpo"]
    assert plugins["model_sources"]["registered"]["model_sources"] == ["smollm2-135m-instruct", "tiny-llama"]
    assert plugins["broken_import"]["status"] == "broken" and plugins["broken_import"]["builtin"] is False
    assert plugins["broken_import"]["distribution"] == "prefkit-broken-import"
    assert plugins["broken_import"]["version"] == "0.1.0"
    assert plugins["invalid"]["rejected"] == [{"kind": "objectives", "name": "bad_obj",
                                               "problem": plugins["invalid"]["problems"][0]}]
    assert len(data["problems"]) == 2


def test_a_recipe_still_validates_with_a_broken_plugin_installed(broken_env):
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "dpo_tiny.yaml"
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "valid (objective dpo" in result.output and "prefkit-broken-import" in result.output


def test_params_that_ask_the_user_to_choose_are_not_a_bad_default(install_plugin):
    """A model validator that refuses the all-defaults params (set exactly one of a or b) runs on
    every real recipe: the objective is valid."""
    name = plugin(install_plugin, "prefkit-choose", """
from pydantic import model_validator

class P(ObjectiveParams):
    a: float | None = None
    b: float | None = None

    @model_validator(mode="after")
    def one(self):
        if (self.a is None) == (self.b is None):
            raise ValueError("set exactly one of a or b")
        return self

class Choose(Objective):
    name = "choose_obj"
    description = "a or b"
    Params = P

    def loss(self, params, inputs):
        return LossOutput(losses=-inputs.chosen_logps)

@hookimpl
def register_objectives(register):
    register(Choose())
""")
    registry = build_registry()
    assert registry.problems == [] and registry.owners[("objectives", "choose_obj")] == name
