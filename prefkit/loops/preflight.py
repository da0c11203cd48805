"""Checks before any heavy work, for what a recipe document alone cannot tell.

:func:`prefkit.recipe.load_recipe` checks the document (types, bounds, names). :func:`preflight`
then looks at the world the recipe points to, cheaply and without loading a model:

- the folders prefkit will write (``output_dir``, the cache, an output file's folder) can be
  created and written;
- the model's positions (``max_position_embeddings``) hold ``data.max_length`` and sampling's
  ``max_new_tokens``, where they can be read without loading weights: a named source's options
  (``tiny-llama``), a ``max_position_embeddings`` attribute a named source declares, or a local
  folder's ``config.json``;
- local and named data files can be read (not UTF-8, corrupt, a directory, ... fail here, with
  the file named), their rows pass the objective's data kind's checks (under
  ``data.bad_rows: error``), and the budget fits the rows that are usable: ``train.batch_size`` (or an online objective's
  ``rollout_batch_size``) is not more than the rows there are, and ``epochs`` over those rows
  do not ask for an absurd number of steps, nor fewer steps than ``warmup_steps``.

The rows read here are kept (keyed by file, size and modification time), so the run that follows
does not parse the files again. Every problem raises a :class:`~prefkit.api.PrefkitError` naming
the recipe file and the key. A compare recipe's arms go through the same checks
(:func:`prefkit.compare.recipe.preflight_compare`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from prefkit.api.errors import PrefkitError, RecipeError
from prefkit.inputs import InputError, check_writable_dir, is_dir, is_file, path_problem
from prefkit.data.positions import folder_positions
from prefkit.recipe import MAX_STEPS, LoadedRecipe, warmup_beyond_run

def preflight(loaded: LoadedRecipe, registry: Any, *, command: str = "run", output: Path | str | None = None,
              force: bool = False, check_output_dir: bool = True) -> None:
    """Refuse, before a model loads, what ``command`` ("validate", "run", "sample", "compare") would
    fail on later: a bad ``PREFKIT_CPU_ALLOCATOR``, unwritable folders, an ``output`` file that is
    one of the recipe's data files or (without ``force``) already exists, unreadable data, a budget
    the data cannot fill, a ``max_length`` beyond the model. Raises PrefkitError (RecipeError for
    key problems)."""
    from prefkit.models.allocator import requested_mode

    requested_mode()
    recipe, where = loaded.recipe, loaded.path
    try:
        if check_output_dir and command in ("run", "validate", "compare"):
            check_writable_dir(recipe.output_dir, "output_dir")
        check_writable_dir(recipe.resolved_cache_dir(), recipe.cache_dir_origin())
        if output is not None:
            inputs = {"the recipe file": where,
                      **{f"the recipe's {key}": source for key, source in recipe.data.source_names()}}
            check_output_file(output, inputs=inputs, force=force)
    except InputError as exc:
        raise PrefkitError(f"{where}: {exc}") from None

    problems = model_problems(loaded, registry)
    if command in ("run", "validate", "compare"):
        problems += setting_problems(loaded)
    positions = model_positions(loaded, registry)
    if positions is not None:
        count, origin = positions
        if recipe.data.max_length > count:
            problems.append(("data.max_length", f"{recipe.data.max_length} is more than the model's {count} positions "
                                                f"({origin}); use at most {count}"))
        samples = command == "sample" or loaded.objective is None or loaded.objective.kind == "inference" or \
            loaded.objective.needs(loaded.params).generation
        if samples and \
                recipe.sampling.max_new_tokens >= count:
            problems.append(("sampling.max_new_tokens", f"{recipe.sampling.max_new_tokens} leaves no room for the "
                                                        f"prompt in the model's {count} positions ({origin})"))
    found, rows = data_problems(loaded, registry, command)
    problems += found
    scores = command == "sample" or loaded.objective is None or loaded.objective.needs(loaded.params).reward
    if recipe.reward is not None and scores:
        problems += reward_problems(recipe.reward, loaded.reward_params, registry, "reward")
    if command in ("run", "validate", "compare"):
        problems += budget_problems(loaded, rows)
    if problems:
        raise RecipeError(where, problems)


def reward_problems(cfg: Any, params: Any, registry: Any, key: str) -> list[tuple[str, str]]:
    """What a reward function's ``problems`` finds in its params (a missing model folder, ...),
    as ``(key path, message)``; a plugin that raises there is named like any other plugin error."""
    from prefkit.plugins import plugin_errors

    function = registry.reward_functions.get(cfg.name)
    if function is None or params is None:
        return []  # an unknown name or bad params: refused with the recipe already
    with plugin_errors(registry, "reward_functions", cfg.name, "checking its params (problems)"):
        found = function.problems(params)
    if found is not None and (not isinstance(found, (list, tuple)) or not all(isinstance(p, str) for p in found)):
        from prefkit.plugins import PluginError, plugin_label

        raise PluginError(f"{plugin_label(registry, 'reward_functions', cfg.name)}: problems() returned {found!r}, not "
                          "a list of sentences; report it to the plugin's authors")
    out = []
    for problem in found or []:
        head, sep, rest = str(problem).partition(": ")
        out.append((f"{key}.{head}", rest) if sep and head.startswith("params") else (key, str(problem)))
    return out


def check_output_file(output: Path | str, *, inputs: dict[str, Any] | None = None, force: bool = False) -> None:
    """An output file: not a directory, its folder can be made and written, not one of the command's
    ``inputs`` (``{what: path}``; never, whatever ``force``), and not an existing file unless ``force``.
    Nothing that is already on disk is replaced without being asked for."""
    path = Path(output).expanduser()
    problem = path_problem(str(output))
    if problem:
        raise InputError(None, f"the output {str(output)!r} {problem}")
    if is_dir(path):
        raise InputError(None, f"the output {str(output)!r} is a directory; name a file")
    for what, source in (inputs or {}).items():
        if source is not None and _same_file(path, source):
            raise InputError(None, f"the output {str(output)!r} is {what} itself; writing it would destroy its "
                                   "input. Choose another --output (nothing was written)")
    if is_file(path) and not force:
        raise InputError(None, f"the output {str(output)!r} already exists; pass --force to replace it, or "
                               "choose another --output (nothing was written)")
    try:
        check_writable_dir(path.parent if str(path.parent) else Path("."), "its folder")
    except InputError as exc:
        raise InputError(None, f"the output {str(output)!r} cannot be written: {exc}") from None


def _same_file(a: Path, b: Any) -> bool:
    """Whether two paths name one file (a link or another spelling of the same path included)."""
    try:
        b = Path(b).expanduser()
        if not b.exists():  # a dataset's name, or a file not there: nothing to destroy
            return False
        return a.resolve() == b.resolve() or (a.exists() and os.path.samefile(a, b))
    except (OSError, ValueError, TypeError, RuntimeError):
        return False


# ----------------------------------------------------------------------------- the model


def setting_problems(loaded: LoadedRecipe) -> list[tuple[str, str]]:
    """Settings this machine cannot honour: fp16 without a GPU, a tracker whose package is missing."""
    from prefkit.loops.trackers import check_trackers

    train = loaded.recipe.train
    problems: list[tuple[str, str]] = []
    if train.precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            problems.append(("train.precision", "fp16 needs a CUDA GPU; use bf16 or fp32 on a CPU"))
    try:
        check_trackers(train.trackers)
    except PrefkitError as exc:
        problems.append(("train.trackers", str(exc).removeprefix("train.trackers: ")))
    return problems


def model_problems(loaded: LoadedRecipe, registry: Any) -> list[tuple[str, str]]:
    """A local model folder (or tokenizer) that cannot be one, found without loading anything."""
    from prefkit.models.loading import (
        _is_hub_id,
        classifier_problem,
        load_tokenizer,
        lora_target_problem,
        model_folder_problem,
        source_path_problem,
    )

    model = loaded.recipe.model
    problems: list[tuple[str, str]] = []
    named = model.source in registry.model_sources
    found = None if named else source_path_problem(model.source, registry)
    if found:
        return [("model.source", found)]
    if named and model.gguf_file:
        problems.append(("model.gguf_file", f"{model.gguf_file!r}: {model.source!r} is a named model source, which "
                                            "builds its own model folder; model.gguf_file names a file inside a local "
                                            "folder or hub repository given as model.source"))
    local_model = not named and is_dir(model.source)
    if local_model:
        folder = Path(model.source).expanduser()
        if model.gguf_file:
            if not is_file(folder / model.gguf_file):
                found = ", ".join(sorted(p.name for p in folder.glob("*.gguf"))) or "none"
                problems.append(("model.gguf_file", f"{model.gguf_file!r} is not in {model.source!r} "
                                                    f"(GGUF files there: {found})"))
        elif model_folder_problem(model.source):
            problems.append(("model.source", model_folder_problem(model.source)))
        elif loaded.objective is None or loaded.objective.needs(loaded.params).head == "lm":
            found = classifier_problem(model.source)
            if found:
                problems.append(("model.source", found))
    if model.tokenizer and not is_dir(model.tokenizer) and not _is_hub_id(model.tokenizer):
        problems.append(("model.tokenizer", f"{model.tokenizer!r}: no such folder, and not a hub id (org/name)"))
    # A tokenizer from a local folder is loaded as the run will load it (a fraction of a second, no
    # model): a folder without tokenizer files, or with damaged ones, is refused here.
    key, folder = ("model.tokenizer", model.tokenizer) if model.tokenizer else ("model.source", model.source)
    if (model.tokenizer or (local_model and not model.gguf_file and not problems)) and is_dir(folder):
        try:
            load_tokenizer(model, model.source)
        except PrefkitError as exc:
            problems.append((key, str(exc)))
    # LoRA target modules that match nothing, found on the model's skeleton (no weights loaded)
    if model.lora is not None and local_model and not model.gguf_file and not problems:
        head = loaded.objective.needs(loaded.params).head if loaded.objective is not None else "lm"
        found = lora_target_problem(model.source, model.lora, head)
        if found:
            problems.append(("model.lora.target_modules", f"{model.lora.target_modules!r}: {found}"))
    return problems


def model_positions(loaded: LoadedRecipe, registry: Any) -> tuple[int, str] | None:
    """How many positions the recipe's model has, when that is known without loading it."""
    model = loaded.recipe.model
    source = registry.model_sources.get(model.source)
    if source is not None:
        value = getattr(loaded.model_options, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value, "model.options.max_position_embeddings"
        value = getattr(source, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value, f"model source {model.source!r}"
        return None
    if model.gguf_file:
        return None
    return folder_positions(model.source) if is_dir(model.source) else None


# ----------------------------------------------------------------------------- the data and the budget


def local_rows(source: str, split: str, cfg, registry: Any, limit: int | None, kind: Any = None,
                needed_by: str | None = None, subset: str | None = None) -> int | None:
    """How many usable rows a named dataset or a local file holds, reading it (a bad file, or bad
    rows under ``data.bad_rows: error``, fail here as they would when the data is prepared);
    None for hub data, which is not read here."""
    from prefkit.api import DataError
    from prefkit.data.io import is_local_source, load_rows
    from prefkit.data.prepare import _bad_rows_message, check_source_rows, nothing_left_message, use_chat_template

    if not is_local_source(source, registry):
        return None
    rows, shown = load_rows(source, split, subset=subset if subset is not None else cfg.subset, registry=registry)
    rows = rows[:limit] if limit else rows
    if kind is None or not rows:
        return len(rows)
    checked, fmt, found = check_source_rows(rows, kind, cfg.format, f"{shown} ({split})", needed_by)
    if cfg.chat_template == "never":  # the rule needs no tokenizer then: conversations cannot be read
        use_chat_template(None, "never", fmt, f"{shown} ({split})",
                          plain_text=found.is_language_modeling and fmt == "standard")
    if checked.problems and cfg.bad_rows == "error":
        raise DataError(_bad_rows_message(f"{shown} ({split})", checked.problems, kind.name))
    if checked.problems and not checked.examples:  # data.bad_rows: skip, and every row was bad
        raise DataError(nothing_left_message(f"{shown} ({split})", len(rows), checked.bad_rows, 0, checked.problems))
    return len(checked.examples)


def data_problems(loaded: LoadedRecipe, registry: Any, command: str) -> tuple[list[tuple[str, str]], int | None]:
    """Read the local data the command will use (bad files fail here, naming the file); return
    problems with empty splits, a mixture or a carved split, and the number of training examples
    (None: hub data, not counted). Every source of a mixture is read."""
    from prefkit.data.mixture import carve_count, mixture_counts, source_parts
    from prefkit.recipe import FromTrain

    data = loaded.recipe.data
    if loaded.objective is None:  # a sampling recipe: its data are prompts, whatever the command
        command = "sample"
    kind = registry.data_kinds.get("prompts" if command == "sample" else loaded.objective.needs(loaded.params).data)
    reader = "`prefkit sample`" if command == "sample" else f"objective {loaded.objective.name!r}"
    carved = isinstance(data.eval, FromTrain)
    if command == "sample":  # the prompts: data.eval if set (or carved from data.train), else data.train
        which = ["eval"] if data.eval is not None and not carved else ["train"]
    else:
        which = ["train"] + (["eval"] if data.eval is not None and not carved else [])
    problems: list[tuple[str, str]] = []
    counts: dict[str, int | None] = {}
    for split in which:
        key = f"data.{split}"
        parts, is_mixture = source_parts(data, split)
        sizes: list[int | None] = []
        for i, part in enumerate(parts):
            if is_mixture and part.weight == 0:
                continue
            count = local_rows(part.source, part.split, data, registry, part.limit, kind, reader, part.subset)
            if count == 0:
                problems.append((f"{key}.{i}.source" if is_mixture else key, f"{part.source} ({part.split}): the "
                                                                              "split has no rows"))
            sizes.append(count)
        if any(size is None for size in sizes) or not sizes:
            counts[key] = None
        elif is_mixture:
            weights = [part.weight for part in parts if part.weight is None or part.weight > 0]
            counts[key] = sum(mixture_counts([int(size or 0) for size in sizes],
                                             None if weights[0] is None else weights,
                                             total=data.mix_rows if split == "train" else None,
                                             cap=data.max_rows if split == "train" else data.max_eval_rows))
        else:
            counts[key] = sizes[0]
    rows = counts.get("data.train")
    if carved and rows:
        taken = carve_count(data.eval.from_train, rows)
        if taken >= rows:
            problems.append(("data.eval.from_train", f"carving {data.eval.from_train} of the {rows} training "
                                                     f"examples of {data.label()} takes {taken}, leaving none for "
                                                     "training"))
        rows -= taken
    return problems, rows


def budget_problems(loaded: LoadedRecipe, rows: int | None) -> list[tuple[str, str]]:
    """The training budget against the ``rows`` the training data has (None: unknown, not checked)."""
    recipe, objective = loaded.recipe, loaded.objective
    data, train = recipe.data, recipe.train
    if objective is None or objective.kind == "inference" or not rows:
        return []
    shown = f"{data.label()} ({data.train_split})"
    problems: list[tuple[str, str]] = []
    if objective.kind == "online":
        per_step = getattr(loaded.params, "rollout_batch_size", None)
        if isinstance(per_step, int) and per_step > rows:
            problems.append(("objective.params.rollout_batch_size",
                             f"{per_step} prompts per rollout, but {shown} has only {rows} rows; use at most {rows}"))
            return problems
        batches = math.ceil(rows / per_step) if isinstance(per_step, int) and per_step > 0 else rows
        steps = train.max_steps or max(1, math.ceil(train.epochs * batches))
        update_epochs = getattr(loaded.params, "update_epochs", 1)
        if isinstance(per_step, int) and isinstance(update_epochs, int) and update_epochs > 0:
            sequences = per_step * recipe.sampling.num_samples
            mini = getattr(loaded.params, "mini_batch_size", None) or sequences
            updates = steps * update_epochs * math.ceil(sequences / max(1, min(mini, sequences)))
            if updates > MAX_STEPS:
                problems.append(("objective.params.update_epochs",
                                 f"{steps:,} rollouts x {update_epochs:,} update epochs is {updates:,} optimizer "
                                 f"steps, more than {MAX_STEPS:,}; lower update_epochs or the number of rollouts"))
                return problems
    else:
        if train.batch_size > rows:
            problems.append(("train.batch_size", f"{train.batch_size} is more than the {rows} training rows of "
                                                 f"{shown}; use at most {rows}"))
            return problems
        steps = train.max_steps or max(1, math.ceil(train.epochs * math.ceil(rows / train.batch_size)
                                                    / train.grad_accum_steps))
    if steps > MAX_STEPS:
        problems.append(("train.epochs", f"{train.epochs:g} epochs over {rows} rows is {steps:,} steps, more than "
                                         f"{MAX_STEPS:,}; set fewer epochs or train.max_steps"))
    elif warmup_beyond_run(train.warmup_steps, steps):
        problems.append(("train.warmup_steps", f"{train.warmup_steps} is more than the run's {steps} steps "
                                               f"({train.epochs:g} epoch(s) over {rows} rows), so the learning rate "
                                               "would never reach train.lr; lower it"))
    return problems
