"""Every recipe under recipes/ (found recursively) validates: run recipes with the run loader,
compare recipes (a top-level `arms:` list) with the compare loader."""

from pathlib import Path

import pytest
import yaml

from prefkit.recipe import load_recipe

from prefkit.plugins import load_registry

REGISTRY = load_registry()  # the installed plugins, passed explicitly

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))


def test_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "dpo_tiny.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_validates(path):
    if "arms" in (yaml.safe_load(path.read_text()) or {}):
        from prefkit.compare.recipe import load_compare

        assert load_compare(path, registry=REGISTRY).arms
    else:
        assert load_recipe(path, registry=REGISTRY).recipe.output_dir
