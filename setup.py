"""Which packages the wheel holds (everything else is in pyproject.toml).

The repository keeps the shipped recipes in its top-level ``recipes/`` folder; the wheel installs them
as the data package ``prefkit_recipes`` (``prefkit recipes`` lists and copies them), so they exist
after a plain ``pip install``. ``prefkit_builtins`` lives in ``plugins/``.
"""

from pathlib import Path

from setuptools import find_namespace_packages, find_packages, setup

HERE = Path(__file__).resolve().parent
RECIPES = ["prefkit_recipes"] + [f"prefkit_recipes.{p}" for p in
                                 find_namespace_packages(str(HERE / "recipes"), exclude=["*.*"])]

setup(
    packages=find_packages(str(HERE), include=["prefkit", "prefkit.*"])
    + find_packages(str(HERE / "plugins"), include=["prefkit_builtins", "prefkit_builtins.*"])
    + RECIPES,
    package_dir={"prefkit_builtins": "plugins/prefkit_builtins", "prefkit_recipes": "recipes"},
)
