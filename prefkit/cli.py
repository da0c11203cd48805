"""The ``prefkit`` command line: a thin layer over library functions."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

import prefkit
from prefkit import ui
from prefkit.errors import PrefkitError

app = typer.Typer(
    help="Align language models with preference data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prefkit {prefkit.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Align language models with preference data."""


def _fail(exc: PrefkitError, code: int = 2) -> None:
    ui.error(str(exc))
    raise typer.Exit(code)


def _report_plugin_problems() -> None:
    from prefkit.plugins import load_registry

    for problem in load_registry().problems:
        ui.warning(problem)


@app.command()
def validate(
    recipe: str = typer.Argument(..., help="The recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted.key=value overrides."),
) -> None:
    """Check a recipe and its objective's parameters without loading any model."""
    from prefkit.recipe import load_recipe

    _report_plugin_problems()
    try:
        loaded = load_recipe(recipe, overrides or [])
    except PrefkitError as exc:
        _fail(exc)
    ui.console.print(f"{recipe}: valid (objective {loaded.objective.name})")


@app.command()
def run(
    recipe: str = typer.Argument(..., help="The recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted.key=value overrides, e.g. output_dir=/tmp/x"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in output_dir."),
) -> None:
    """Train with the objective the recipe names."""
    from prefkit.engine import train
    from prefkit.recipe import load_recipe

    _report_plugin_problems()
    try:
        loaded = load_recipe(recipe, overrides or [])
        reporter = ui.RichReporter()
        try:
            summary = train(loaded, resume=resume, reporter=reporter)
        finally:
            reporter.finish()
    except PrefkitError as exc:
        _fail(exc, 1)
    ui.summary(summary)
    ui.console.print(f"run directory: {loaded.recipe.output_dir}")


@app.command()
def sample(
    recipe: str = typer.Argument(..., help="The recipe YAML file (model, prompts, sampling, optional reward)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted.key=value overrides, e.g. model.source=runs/x/final"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="JSONL file (default: OUTPUT_DIR/samples.jsonl)."),
) -> None:
    """Sample completions for the recipe's prompts from a policy (best-of-N when the objective is best_of_n)."""
    from pathlib import Path

    from prefkit.recipe import load_recipe
    from prefkit.sampling import sample_recipe

    _report_plugin_problems()
    try:
        loaded = load_recipe(recipe, overrides or [])
        summary = sample_recipe(loaded, Path(output) if output else None)
    except PrefkitError as exc:
        _fail(exc, 1)
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in summary.items()
            if not isinstance(v, (dict, list))]
    ui.table("samples", ["", "value"], rows)


@app.command()
def rewards() -> None:
    """List every registered reward function with the plugin that registered it."""
    from prefkit.plugins import load_registry

    registry = load_registry()
    rows = []
    for name in sorted(registry.reward_functions):
        info = registry.owner("reward_functions", name)
        rows.append([name, f"{info.distribution} {info.version} ({info.name})",
                     registry.reward_functions[name].description])
    ui.table("reward functions", ["reward", "plugin", "description"], rows)
    for problem in registry.problems:
        ui.warning(problem)


@app.command()
def objectives() -> None:
    """List every registered objective with the plugin that registered it."""
    from prefkit.plugins import load_registry

    registry = load_registry()
    rows = []
    for name in sorted(registry.objectives):
        info = registry.owner("objectives", name)
        rows.append([name, f"{info.distribution} {info.version} ({info.name})", registry.objectives[name].description])
    ui.table("objectives", ["objective", "plugin", "description"], rows)
    for problem in registry.problems:
        ui.warning(problem)


def entrypoint() -> None:  # pragma: no cover - used by ``python -m prefkit``
    sys.exit(app())
