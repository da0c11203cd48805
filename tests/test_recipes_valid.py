"""Every recipe under recipes/ (found recursively) validates."""

from pathlib import Path

import pytest

from prefkit.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))


def test_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "dpo_tiny.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_validates(path):
    loaded = load_recipe(path)
    assert loaded.recipe.output_dir
