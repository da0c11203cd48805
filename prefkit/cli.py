"""The ``prefkit`` command line: a thin layer over library functions.

Every command runs inside :func:`_user_errors`: a :class:`~prefkit.api.errors.PrefkitError` (a
user's mistake, a broken plugin) or a pydantic ``ValidationError`` is printed as one message and
the command exits with code 2. Any other exception is a bug in prefkit and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import List, Optional

import typer
from pydantic import ValidationError

import prefkit
from prefkit import ui
from prefkit.api.errors import PrefkitError

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
    ui.mode = "rich"  # until a command's --quiet / --json says otherwise
    ui.quiet_libraries()


USER_ERROR = 2  # the exit code of every user mistake

QUIET_HELP = "Print only errors and one result line."
JSON_HELP = ("Print one JSON object per line on stdout for every event (start, step metrics, evaluations, "
             "checkpoints, the result) and nothing else there; for scripts.")


def _reporter(quiet: bool, as_json: bool):
    """The reporter for a command's --quiet / --json (both at once is refused)."""
    if quiet and as_json:
        raise PrefkitError("--quiet and --json: choose one")
    return ui.reporter_for(quiet=quiet, as_json=as_json)


def _fail(exc: PrefkitError, code: int = USER_ERROR) -> None:
    ui.error(str(exc))
    raise typer.Exit(code)


def _validation_message(exc: ValidationError) -> str:
    lines = [f"invalid {exc.title}:"]
    for item in exc.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<top level>"
        lines.append(f"  {path}: {item['msg']}")
    return "\n".join(lines)


def _user_errors(command):
    """Print a user error as one message and exit with code 2; let bugs keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PrefkitError as exc:
            _fail(exc)
        except ValidationError as exc:
            ui.error(_validation_message(exc))
            raise typer.Exit(USER_ERROR) from None

    return wrapper


def _registry():
    """The plugins of this process (entry points are read once); problems are warned about."""
    from prefkit.plugins import load_registry

    return load_registry()


def _report_plugin_problems():
    registry = _registry()
    for problem in registry.problems:
        ui.warning(problem)
    return registry


@app.command()
@_user_errors
def validate(
    recipe: str = typer.Argument(..., help="The recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted.key=value overrides."),
) -> None:
    """Check a recipe, its objective's parameters, its folders and its local data without loading any model."""
    from prefkit.loops import check_recipe
    from prefkit.loops.preflight import preflight
    from prefkit.recipe import load_recipe

    from prefkit.inputs import InputError, load_yaml, read_text

    registry = _report_plugin_problems()
    try:
        raw = load_yaml(read_text(recipe), recipe)
    except InputError as exc:
        raise PrefkitError(str(exc)) from None
    if isinstance(raw, dict) and "arms" in raw:  # a compare recipe: validate it as one
        from prefkit.compare.recipe import load_compare
        from prefkit.compare.recipe import preflight_compare

        loaded_compare = load_compare(recipe, overrides or [], registry=registry)
        preflight_compare(loaded_compare, registry)
        arms = ", ".join(f"{a.name} ({a.loaded.objective.name})" for a in loaded_compare.arms)
        ui.console.print(f"{recipe}: a valid compare recipe (arms: {arms}); run it with `prefkit compare {recipe}`",
                         markup=False, highlight=False)
        return
    loaded = load_recipe(recipe, overrides or [], registry=registry)
    if loaded.objective is not None:  # a recipe without one is a sampling recipe: nothing to train
        check_recipe(loaded)
    preflight(loaded, registry, command="validate")
    if loaded.objective is None:
        what = "no objective: a sampling recipe for `prefkit sample`; `prefkit run` needs objective.name"
    else:
        what = f"objective {loaded.objective.name}, {loaded.objective.kind}"
    ui.console.print(f"{recipe}: valid ({what})", markup=False, highlight=False)


@app.command()
@_user_errors
def run(
    recipe: str = typer.Argument(..., help="The recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted.key=value overrides, e.g. output_dir=/tmp/x"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in output_dir."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train with the objective the recipe names."""
    from prefkit.loops import train
    from prefkit.recipe import load_recipe

    reporter = _reporter(quiet, as_json)
    registry = _report_plugin_problems()
    loaded = load_recipe(recipe, overrides or [], registry=registry)
    try:  # train() checks the recipe and runs the preflight before anything else
        summary = train(loaded, resume=resume, reporter=reporter, registry=registry)
    finally:
        reporter.finish()
    run_dir = loaded.recipe.output_dir
    reporter.result("run", {"run_dir": run_dir, "summary": summary}, line=ui.summary_line(summary, run_dir),
                    show=lambda: ui.summary(summary, run_dir))


@app.command()
@_user_errors
def sample(
    recipe: str = typer.Argument(..., help="The recipe YAML file (model, prompts, sampling, optional reward)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted.key=value overrides, e.g. model.source=runs/x/final"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="JSONL file (default: OUTPUT_DIR/samples.jsonl)."),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Sample completions for the recipe's prompts from a policy (best-of-N when the objective is best_of_n).

    The recipe needs no objective: model, data (the prompts) and sampling are enough."""
    from pathlib import Path

    from prefkit.models.sampling import sample_recipe
    from prefkit.loops.preflight import preflight
    from prefkit.recipe import load_recipe

    reporter = _reporter(quiet, as_json)
    registry = _report_plugin_problems()
    loaded = load_recipe(recipe, overrides or [], registry=registry)
    target = Path(output) if output else Path(loaded.recipe.output_dir) / "samples.jsonl"
    preflight(loaded, registry, command="sample", output=target, force=force)
    started = []

    def progress(done: int, total: int) -> None:
        if not started:
            reporter.start(total, 0, "sample")
            started.append(True)
        reporter.step(done, {})

    try:
        summary = sample_recipe(loaded, Path(output) if output else None, registry=registry, progress=progress)
    finally:
        reporter.finish()
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in summary.items()
            if not isinstance(v, (dict, list)) and v is not None]
    score = f", mean score {summary['mean_score']:.4g}" if summary.get("mean_score") is not None else ""
    line = (f"{summary['output']}: {summary['samples']} samples of {summary['prompts']} prompts{score}, "
            f"mean length {summary['mean_length']:.1f} tokens; {summary['seconds']:.1f} s")
    reporter.result("sample", summary, line=line, show=lambda: ui.table("samples", ["field", "value"], rows))


CHAT_COMMANDS = "/reset forgets the conversation, /exit (or Ctrl-D) ends it, /help shows this"


@app.command()
@_user_errors
def chat(
    source: str = typer.Argument(..., help="A run folder (its final/, else its newest checkpoint), a recipe (its "
                                           "model), a named model source (`prefkit models`), a model folder or a hub id."),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt, kept through /reset."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling threshold."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens; 0 keeps all."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Makes the replies reproducible (default: a random one)."),
    step: Optional[int] = typer.Option(None, "--step", help="A run's checkpoint of this step instead of final/."),
) -> None:
    """Chat with a model through its chat template, one message a line; the conversation is kept.

    /reset forgets it, /exit or Ctrl-D ends the chat. A model without a chat template continues the
    conversation as plain text. Messages come from the terminal or from stdin (one per line)."""
    from prefkit.chat import open_chat

    registry = _report_plugin_problems()
    session = open_chat(source, system=system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, seed=seed, step=step, registry=registry)
    interactive = sys.stdin.isatty()
    try:  # bytes that are not UTF-8 come through as lone surrogates, and the line is refused below
        sys.stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):
        pass
    how = "chat template" if session.templated else \
        "no chat template: the conversation is continued as plain text"
    ui.note(f"chatting with {session.label} ({how}; seed {session.seed}); {CHAT_COMMANDS}")
    try:
        while True:
            try:
                line = input(ui.CHAT_PROMPT) if interactive else sys.stdin.readline()
            except EOFError:  # Ctrl-D in a terminal
                line = ""
                if interactive:
                    ui.console.print()
            if not line:  # end of input
                break
            text = line.rstrip("\r\n")
            command = text.strip().lower()
            if not command:
                continue
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                ui.note("the conversation was forgotten" + (" (the system prompt is kept)" if system else ""))
                continue
            if command == "/help":
                ui.note(CHAT_COMMANDS)
                continue
            if command.startswith("/") and " " not in command:
                ui.note(f"unknown command {command}; {CHAT_COMMANDS}")
                continue
            bad = _not_text(text)
            if bad:
                ui.warning(f"that message was not sent: {bad}")
                continue
            reply = session.send(text)
            for note in session.notes:
                ui.warning(note)
            ui.chat_reply(reply, interactive)
    except KeyboardInterrupt:  # Ctrl-C ends the chat like /exit
        if interactive:
            ui.console.print()
    if interactive:
        ui.note("bye")


def _not_text(text: str) -> str | None:
    """Why a line read from the terminal or stdin is not text a tokenizer can take (bytes that are
    not UTF-8 arrive as lone surrogates), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = text[exc.start]
        byte = f"byte 0x{ord(raw) - 0xDC00:02x}" if 0xDC80 <= ord(raw) <= 0xDCFF else f"character U+{ord(raw):04X}"
        return f"it is not valid UTF-8 text ({byte} at column {exc.start + 1})"
    return None


recipes_app = typer.Typer(help="List the shipped recipes, or copy one to edit (like torchtune's `tune ls` / `tune cp`).",
                          invoke_without_command=True, no_args_is_help=False)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
@_user_errors
def recipes(ctx: typer.Context) -> None:
    """List the shipped recipes: name, command, objective, description; `copy NAME [DEST]` writes one."""
    if ctx.invoked_subcommand is not None:
        return
    from prefkit.catalog import list_recipes, recipes_root

    rows = []
    for item in list_recipes(_registry()):
        text = item.description + (f" [{item.note()}]" if item.needs else "")
        rows.append([item.name, item.command, item.objective or "-", text])
    ui.table(f"recipes ({recipes_root()})", ["recipe", "command", "objective", "description"], rows)
    ui.note("copy one to edit it: prefkit recipes copy NAME [DEST]; a folder (e.g. sentiment) copies with its "
            "README and script")


@recipes_app.command("copy")
@_user_errors
def recipes_copy(
    name: str = typer.Argument(..., help="A recipe (dpo_tiny, sentiment/sample_tiny) or a folder (sentiment)."),
    dest: Optional[str] = typer.Argument(None, help="Where to write it (default: its own name, here)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing file."),
) -> None:
    """Copy a shipped recipe (or a folder of them) to DEST, never over an existing file unless --force."""
    from prefkit.catalog import copy, list_recipes

    written = copy(name, dest, force=force)
    for path in written:
        ui.out.print(f"wrote {path}", markup=False, highlight=False)
    for item in list_recipes():  # a recipe that reads what earlier steps write says so
        if item.name == name.strip("/").removesuffix(".yaml") and item.needs:
            ui.note(f"{item.name} {item.note()}")


@recipes_app.command("show")
@_user_errors
def recipes_show(name: str = typer.Argument(..., help="A recipe name, as `prefkit recipes` lists it.")) -> None:
    """Print a shipped recipe."""
    from prefkit.catalog import show

    typer.echo(show(name), nl=False)


@app.command()
@_user_errors
def rewards() -> None:
    """List every registered reward function with the plugin that registered it."""
    registry = _registry()
    rows = []
    for name in sorted(registry.reward_functions):
        info = registry.owner("reward_functions", name)
        rows.append([name, f"{info.distribution} {info.version} ({info.name})",
                     registry.reward_functions[name].description])
    ui.table("reward functions", ["reward", "plugin", "description"], rows)
    for problem in registry.problems:
        ui.warning(problem)


@app.command()
@_user_errors
def models() -> None:
    """List every named model source (model.source) with the plugin that registered it."""
    registry = _registry()
    rows = [[name, registry.owner("model_sources", name).label, registry.model_sources[name].description]
            for name in sorted(registry.model_sources)]
    ui.table("model sources", ["model source", "plugin", "description"], rows)
    for problem in registry.problems:
        ui.warning(problem)


@app.command()
@_user_errors
def datasets() -> None:
    """List every named dataset (data.train, data.eval) with its splits and the plugin that registered it."""
    registry = _registry()
    rows = []
    for name in sorted(registry.datasets):
        dataset = registry.datasets[name]
        files = dataset.files if isinstance(dataset.files, dict) else {}
        rows.append([name, ", ".join(sorted(map(str, files))) or "-", registry.owner("datasets", name).label,
                     dataset.description])
    ui.table("datasets", ["dataset", "splits", "plugin", "description"], rows)
    for problem in registry.problems:
        ui.warning(problem)


@app.command()
@_user_errors
def objectives(
    name: Optional[str] = typer.Argument(None, help="One objective: show its parameters with their defaults."),
) -> None:
    """List every registered objective with its kind and the plugin that registered it (broken plugins marked);
    with a NAME, that objective's parameter table."""
    registry = _registry()
    if name is not None:
        from prefkit.plugins import parameter_rows

        if name not in registry.objectives:
            from prefkit.inputs import did_you_mean

            raise PrefkitError(f"unknown objective {name!r}{did_you_mean(name, registry.objectives)} "
                               f"(registered: {', '.join(sorted(registry.objectives))})")
        objective = registry.objectives[name]
        info = registry.owner("objectives", name)
        ui.console.print(f"{name} ({objective.kind}, from {info.label}): {objective.description}", markup=False,
                         highlight=False)
        ui.table(f"{name}: objective.params", ["parameter", "type", "default", "meaning"],
                 parameter_rows(objective.Params))
        return
    rows = []
    for name in sorted(registry.objectives):
        info = registry.owner("objectives", name)
        objective = registry.objectives[name]
        rows.append([name, objective.kind, info.label, objective.description])
    for info in registry.broken_plugins():
        for kind, name, why in info.rejected:
            if kind == "objectives":
                rows.append([f"{name} (BROKEN)", "", info.label, info.cause(why)])
        general = info.general_problems()
        if general:  # e.g. it failed to import: which objectives it holds is unknown
            rows.append(["(BROKEN)", "", info.label, info.cause(general[0])])
    ui.table("objectives", ["objective", "kind", "plugin", "description"], rows)
    for problem in registry.problems:
        ui.warning(problem)


@app.command("data-kinds")
@_user_errors
def data_kinds() -> None:
    """List every registered data kind: its completions, extra columns and plugin."""
    registry = _registry()
    rows = []
    for name in sorted(registry.data_kinds):
        kind = registry.data_kinds[name]
        rows.append([name, ", ".join(kind.completions) or "-", ", ".join(kind.columns) or "-",
                     registry.owner("data_kinds", name).label, kind.description])
    ui.table("data kinds", ["data kind", "completions", "columns", "plugin", "description"], rows)


@app.command()
@_user_errors
def plugins(
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines instead of a table."),
) -> None:
    """List every plugin found: distribution, version, status and what it registered.

    PREFKIT_PLUGINS (comma-separated entry point or distribution names) restricts which
    third-party plugins load; empty loads none besides the built-ins.
    """
    import json

    from prefkit.plugins import KIND_WORDS

    registry = _registry()
    if as_json:
        typer.echo(json.dumps(registry.to_dict(), indent=2))
        return
    rows = []
    for info in registry.plugins.values():
        registered = "; ".join(f"{KIND_WORDS[kind]}s: {', '.join(names)}"
                               for kind, names in info.registered.items() if names)
        rows.append([info.name, info.distribution, info.version, info.status.upper() if info.broken else info.status,
                     registered or "-"])
    ui.table("plugins", ["plugin", "distribution", "version", "status", "registered"], rows)
    for problem in registry.problems:
        ui.warning(problem)


@app.command("new-objective")
@_user_errors
def new_objective(
    name: str = typer.Argument(..., help="The objective's name, as recipes will write it (e.g. simpo)."),
    directory: str = typer.Option(".", "--directory", "-d", help="Where to create the package folder."),
) -> None:
    """Write the skeleton of a plugin package for a new objective (it passes its own test)."""
    from pathlib import Path

    from prefkit.scaffold import new_objective as scaffold

    created = scaffold(name, Path(directory), registry=_registry())
    lines = [f"created {created}/"] + [f"  {p.relative_to(created)}" for p in sorted(created.rglob("*")) if p.is_file()]
    lines.append(f"next: edit {created / (created.name.replace('-', '_') + '.py')}, then: pytest {created}")
    for line in lines:
        ui.console.print(line, markup=False, highlight=False)


# --------------------------------------------------------------------------- compare and label


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


@app.command()
@_user_errors
def compare(
    recipe: str = typer.Argument(..., help="The compare recipe YAML file: arms, shared budget, evaluation."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="dotted.key=value overrides, e.g. output_dir=/tmp/c arms.dpo-b0.1.params.beta=0.2"),
    validate_only: bool = typer.Option(False, "--validate", help="Check the recipe and every arm; load no model."),
    arms: Optional[str] = typer.Option(None, "--arms", help="Only these arms, comma-separated (finished ones are "
                                       "reused); paired tests naming other arms are dropped."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train several objectives on the same data, seed and budget, then evaluate them identically."""
    from prefkit.compare.harness import run_compare
    from prefkit.compare.recipe import load_compare
    from prefkit.compare.recipe import preflight_compare

    reporter = _reporter(quiet, as_json)
    registry = _report_plugin_problems()
    selected = None if arms is None else [a.strip() for a in arms.split(",") if a.strip()]
    loaded = load_compare(recipe, overrides or [], registry=registry, arms=selected)
    preflight_compare(loaded, registry)
    if validate_only:
        arms = ", ".join(f"{a.name} ({a.loaded.objective.name})" for a in loaded.arms)
        ui.console.print(f"{recipe}: valid compare recipe; arms: {arms}", highlight=False, markup=False)
        return
    try:
        result = run_compare(loaded, reporter=reporter, registry=registry)
    finally:
        reporter.finish()
    from prefkit.compare.report import console_table

    out_dir = loaded.compare.output_dir

    def show() -> None:
        ui.table(*console_table(result, loaded))
        ui.console.print(f"compare directory: {out_dir} (report.md, results.jsonl, aggregate.jsonl, "
                         "paired.jsonl, budget.jsonl and their .csv, frontier.png, winrate.png)", highlight=False)

    arms = sorted({row["arm"] for row in result.aggregate})
    reporter.result("compare", {"output_dir": str(out_dir), "aggregate": result.aggregate, "notes": result.notes},
                    line=f"{out_dir}: {len(arms)} arms compared ({', '.join(arms)}); report.md, results.jsonl",
                    show=show)


@app.command()
@_user_errors
def label(
    samples: str = typer.Argument(..., help="The samples JSONL written by `prefkit sample`."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="The pairs JSONL to write (default: pairs.jsonl beside SAMPLES)."),
    reward: Optional[str] = typer.Option(
        None, "--reward", help="The gold reward function (`prefkit rewards`); without it the file's scores are used."),
    reward_params: Optional[List[str]] = typer.Option(
        None, "--reward-param", help="A key=value parameter of the reward (repeatable; values read as YAML)."),
    mode: str = typer.Option("best-worst", "--mode", help="best-worst (one pair per prompt), all-pairs, or "
                             "unpaired (KTO rows: above the prompt's mean score desirable)."),
    rescore: bool = typer.Option(False, "--rescore", help="Score with --reward even when the file has scores."),
    margin: bool = typer.Option(True, "--margin/--no-margin", help="Write the score difference as `margin`."),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists."),
) -> None:
    """Label preference pairs from sampled completions with a gold reward (ties dropped)."""
    from pathlib import Path

    from prefkit.compare.labeling import check_mode, label_samples, reward_from_options
    from prefkit.inputs import InputError, check_readable_file
    from prefkit.loops.preflight import check_output_file

    check_mode(mode)
    registry = _report_plugin_problems()
    reward_cfg, params = reward_from_options(reward, reward_params, registry) if reward else (None, None)
    if reward is None and reward_params:
        raise PrefkitError("--reward-param needs --reward")
    target = Path(output) if output else Path(samples).with_name("pairs.jsonl")
    try:
        check_readable_file(samples)
        check_output_file(target, inputs={"the samples file": samples}, force=force)
    except InputError as exc:
        raise PrefkitError(str(exc)) from None
    report = label_samples(samples, target, reward=reward_cfg, reward_params=params, mode=mode,
                           rescore=rescore, margin=margin, registry=registry)
    ui.table("label", ["", "value"], [[k, _fmt(v)] for k, v in report.to_dict().items()])


@app.command("eval")
def eval_(
    target: str = typer.Argument(..., help="A run folder, or a recipe (its model is then the reference)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted.key=value overrides, e.g. data.eval=pairs.jsonl"),
    model: Optional[str] = typer.Option(None, "--model", help="The policy to judge (default: the run's final/)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """An offline objective's loss and metrics (accuracy, margins) on a preference set, without training."""
    from prefkit.workflows import evaluate

    try:
        reporter = _reporter(quiet, as_json)
        registry = _report_plugin_problems()
        metrics = evaluate(target, overrides or [], model=model, registry=registry, reporter=reporter)
    except PrefkitError as exc:
        _fail(exc)
    judged = model or target
    line = f"{judged}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    reporter.result("eval", {"model": str(judged), "metrics": metrics}, line=line,
                    show=lambda: ui.table(f"evaluation of {judged}", ["metric", "value"],
                                          [[k, f"{v:.6g}"] for k, v in metrics.items()]))


@app.command()
@_user_errors
def export(
    run_dir: str = typer.Argument(..., help="A run folder (output_dir of `prefkit run`)."),
    step: Optional[int] = typer.Option(None, "--step", help="The checkpoint's step (default: the newest)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Where to write (default: RUN/export/step-N)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
) -> None:
    """Write a checkpoint of a run as a Hugging Face folder (loads with from_pretrained)."""
    from pathlib import Path

    from prefkit.loops.export import export_checkpoint

    registry = _report_plugin_problems()
    out = export_checkpoint(Path(run_dir), step=step, out_dir=Path(output) if output else None, dtype=dtype,
                            registry=registry)
    ui.console.print(f"exported to {out}")


MIN_COLUMNS = 40  # narrower, the usage errors' boxes have no room for their text


def readable_width() -> None:
    """A terminal narrower than :data:`MIN_COLUMNS` (``COLUMNS=1``) is drawn as that wide: at width 1
    a usage error's box held its borders and none of its words."""
    value = os.environ.get("COLUMNS", "")
    if value.strip().isdigit() and int(value) < MIN_COLUMNS:
        os.environ["COLUMNS"] = str(MIN_COLUMNS)


def close_process_group() -> None:
    """Under ``accelerate launch``, close torch's process group before the interpreter shuts down:
    left open, its communication threads were still running at exit and a process could abort
    (``terminate called without an active exception``, SIGABRT) after its run had finished."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def entrypoint() -> None:  # pragma: no cover - the `prefkit` script and ``python -m prefkit``
    import atexit

    readable_width()
    atexit.register(close_process_group)
    sys.exit(app())


if __name__ == "__main__":  # ``python -m prefkit.cli`` (and ``accelerate launch -m prefkit.cli``) as ``-m prefkit``
    entrypoint()
