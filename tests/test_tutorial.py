"""The plugin tutorial and its package stay in step, and the package works.

The full tutorial (every command of docs/plugins/tutorial.md, with a real `pip install`) runs in
CI through docs/plugins/tutorial/run_tutorial.sh; these tests check, quickly and without pip, that
the page shows exactly the files kept in docs/plugins/tutorial/prefkit-simpo/, that those are the
`prefkit new-objective simpo` skeleton with the files the page replaces, and that the package
registers, passes its own tests and trains through `prefkit run`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from prefkit.cli import app
from prefkit.scaffold import render
from prefkit.testing import install_plugin  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "plugins" / "tutorial.md"
PACKAGE = ROOT / "docs" / "plugins" / "tutorial" / "prefkit-simpo"


def runner_module():
    spec = importlib.util.spec_from_file_location("prefkit_run_tutorial", ROOT / "docs/plugins/tutorial/run_tutorial.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("prefkit_run_tutorial", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


STEPS = runner_module().parse(TUTORIAL.read_text())


def package_files() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}


def test_every_listing_is_the_file_in_the_package():
    listings = {s.path: s.text for s in STEPS if s.kind == "file"}
    assert listings, "no file listings found"
    files = package_files()
    for path, text in listings.items():
        relative = path.removeprefix("prefkit-simpo/")
        assert relative in files, f"tutorial.md shows {path}, which docs/plugins/tutorial/prefkit-simpo lacks"
        assert text == files[relative], f"tutorial.md and {PACKAGE / relative} differ: update one from the other"


def test_the_package_is_the_skeleton_plus_the_listings():
    listed = {s.path.removeprefix("prefkit-simpo/") for s in STEPS if s.kind == "file"}
    skeleton = render("simpo")
    files = package_files()
    assert set(files) == set(skeleton)
    for path, text in files.items():
        assert path in listed or text == skeleton[path], f"{path} is neither shown in tutorial.md nor the skeleton's"


def test_the_commands_run_in_the_order_a_user_needs():
    commands = [line for s in STEPS if s.kind == "bash" for line in s.text.splitlines() if line.strip()]
    first = {c: next(i for i, line in enumerate(commands) if line.startswith(c)) for c in [
        "prefkit new-objective simpo", "pytest prefkit-simpo", "pip install ./prefkit-simpo",
        "prefkit objectives", "prefkit run prefkit-simpo/simpo_tiny.yaml", "pip uninstall -y prefkit-simpo"]}
    assert list(first.values()) == sorted(first.values())
    assert commands[-1] == "pip uninstall -y prefkit-simpo"
    assert any(s.expect for s in STEPS if s.kind == "bash")
    script = (ROOT / "docs/plugins/tutorial/run_tutorial.sh").read_text()
    assert "run_tutorial.py" in script and "tutorial.md" in script


def install_simpo(install_plugin):
    module = (PACKAGE / "prefkit_simpo.py").read_text()
    return install_plugin("prefkit-simpo", entry_points={"simpo": "prefkit_simpo"},
                          files={"prefkit_simpo.py": module})


def test_the_package_tests_pass(install_plugin):
    site = install_simpo(install_plugin)  # so its entry point test runs instead of skipping
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "prefkit.testing",
                           str(PACKAGE)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout


def test_its_tiny_recipe_runs_through_prefkit_run(install_plugin, tmp_path, monkeypatch):
    install_simpo(install_plugin)
    monkeypatch.delenv("PREFKIT_PLUGINS", raising=False)
    result = CliRunner().invoke(app, ["objectives"])
    assert "simpo" in result.output and "prefkit-simpo 0.1.0" in result.output
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(PACKAGE / "simpo_tiny.yaml"), f"output_dir={out}",
                                      "train.max_steps=3", "data.eval=null"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run.json").read_text())
    assert summary["objective"] == "simpo" and summary["steps"] == 3
    assert summary["plugins"]["simpo"] == "prefkit-simpo 0.1.0"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("rewards/margins" in r for r in rows)
