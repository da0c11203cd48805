"""`prefkit new-objective NAME` writes a plugin package that passes its own tests as generated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefkit.cli import app
from prefkit.api.errors import PrefkitError
from prefkit.scaffold import new_objective, package_names, render
from prefkit.testing import install_plugin  # noqa: F401  (a fixture)

runner = CliRunner()


def test_names():
    assert package_names("my_loss") == {"__NAME__": "my_loss", "__DIST__": "prefkit-my-loss",
                                        "__MODULE__": "prefkit_my_loss", "__CLASS__": "MyLoss"}
    assert set(render("my_loss")) == {"pyproject.toml", "prefkit_my_loss.py", "tests/test_my_loss.py",
                                      "my_loss_tiny.yaml", "README.md"}
    pyproject = render("my_loss")["pyproject.toml"]
    assert '[project.entry-points.prefkit]\nmy_loss = "prefkit_my_loss"' in pyproject


@pytest.mark.parametrize("name", ["needs", "loss_output", "f", "field", "objective", "objective_params", "loss_inputs"])
def test_a_name_that_matches_what_the_module_imports_still_gives_a_conforming_objective(name):
    """`needs` made a class Needs that shadowed prefkit.api.Needs, and its own test failed."""
    import types

    from prefkit.api import Needs, Objective, ObjectiveParams
    from prefkit.testing import check_objective

    names = package_names(name)
    assert names["__CLASS__"].endswith("Objective")
    module = types.ModuleType(names["__MODULE__"])
    exec(compile(render(name)[f"{names['__MODULE__']}.py"], "generated", "exec"), module.__dict__)
    cls, params = getattr(module, names["__CLASS__"]), getattr(module, names["__CLASS__"] + "Params")
    assert issubclass(cls, Objective) and issubclass(params, ObjectiveParams) and module.Needs is Needs
    check_objective(cls(), params(beta=1.0))


def test_generated_package_passes_its_own_tests(tmp_path):
    target = new_objective("hinge_test", tmp_path)
    assert target == tmp_path / "prefkit-hinge-test"
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # only what the package itself asks for
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(target)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed, 1 skipped" in done.stdout  # the entry point test waits for `pip install`


def test_generated_package_registers_validates_and_trains(tmp_path, install_plugin):
    from prefkit.loops.offline import train
    from prefkit.plugins import build_registry
    from prefkit.recipe import load_recipe

    target = new_objective("hinge_test", tmp_path)
    files = {path.name: path.read_text() for path in target.glob("*.py")}
    install_plugin("prefkit-hinge-test", entry_points={"hinge_test": "prefkit_hinge_test"}, files=files)
    registry = build_registry()
    assert registry.problems == []
    assert registry.owner("objectives", "hinge_test").distribution == "prefkit-hinge-test"
    loaded = load_recipe(target / "hinge_test_tiny.yaml", [f"output_dir={tmp_path / 'run'}", "train.max_steps=2"],
                         registry=registry)
    summary = train(loaded, registry=registry)
    assert summary["steps"] == 2 and summary["objective"] == "hinge_test"
    assert summary["plugins"]["hinge_test"] == "prefkit-hinge-test 0.1.0"


def test_cli(tmp_path):
    result = runner.invoke(app, ["new-objective", "my_loss", "--directory", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "prefkit_my_loss.py" in result.output and (tmp_path / "prefkit-my-loss" / "pyproject.toml").is_file()

    result = runner.invoke(app, ["new-objective", "my_loss", "--directory", str(tmp_path)])
    assert result.exit_code == 2 and "already exists" in result.output and "nothing was written" in result.output

    result = runner.invoke(app, ["new-objective", "My-Loss", "--directory", str(tmp_path)])
    assert result.exit_code == 2 and "lower-case letters" in result.output

    result = runner.invoke(app, ["new-objective", "dpo", "--directory", str(tmp_path)])
    assert result.exit_code == 2 and "already registered by prefkit 0.1.0 (dpo)" in result.output
    assert not (tmp_path / "prefkit-dpo").exists()
    assert "Traceback" not in result.output


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "prefkit-x").mkdir()
    with pytest.raises(PrefkitError, match="already exists"):
        new_objective("x", tmp_path)
    assert list(Path(tmp_path / "prefkit-x").iterdir()) == []
