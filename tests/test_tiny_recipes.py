"""Every tiny recipe under recipes/ runs as written through the CLI (the SmolLM2 ones are for people)."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefkit.cli import app
from prefkit.plugins import load_registry

RECIPES = sorted(p for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*_tiny.yaml")
                 if "arms" not in yaml.safe_load(p.read_text()))


def test_every_objective_has_a_tiny_recipe():
    named = {yaml.safe_load(p.read_text())["objective"]["name"] for p in RECIPES}
    registry = load_registry()
    built_in = {n for n in registry.objectives if registry.owner("objectives", n).distribution == "prefkit"}
    assert len(built_in) == 9 and built_in <= named  # dpo, bt_reward, preferred_ft, unlikelihood, best_of_n, ppo_kl, grpo, rloo, kto


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_tiny_recipe_runs(path, tmp_path):
    objective = load_registry().objectives[yaml.safe_load(path.read_text())["objective"]["name"]]
    command = "sample" if objective.kind == "inference" else "run"
    result = CliRunner().invoke(app, [command, str(path), f"output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    if command == "run":
        summary = json.loads((tmp_path / "run.json").read_text())
        assert summary["steps"] > 0 and (tmp_path / "final").is_dir()
    else:
        assert (tmp_path / "samples.jsonl").read_text().strip()
