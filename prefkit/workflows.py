"""The Python API: what the CLI's commands do, as functions (``prefkit.train``, ``prefkit.evaluate``,
``prefkit.export``, ``prefkit.load``). Documented in docs/python.md.

A recipe is a YAML path, a dict, or a :class:`~prefkit.recipe.LoadedRecipe`; overrides are the
CLI's ``dotted.key=value`` strings. Data can also be handed over in memory (a ``datasets.Dataset``,
a ``DatasetDict`` or a list of dicts): it is written once, as JSONL, to the cache folder (named by a
hash of its rows), and the recipe points at that file, so a run, its resume and its reference cache
behave exactly as with a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from prefkit.api.errors import DataError, PrefkitError


def load(recipe: Any, overrides: Iterable[str] = (), *, registry: Any = None):
    """A validated recipe (:class:`~prefkit.recipe.LoadedRecipe`) from a path, a dict or a loaded recipe."""
    from prefkit.recipe import LoadedRecipe, apply_overrides, load_recipe, validate_recipe

    registry = registry if registry is not None else _default_registry()
    overrides = list(overrides)
    if isinstance(recipe, LoadedRecipe):
        recipe = recipe.resolved_dict()
    if isinstance(recipe, dict):
        return validate_recipe(apply_overrides(json.loads(json.dumps(recipe)), overrides), "<recipe dict>",
                               registry=registry)
    return load_recipe(recipe, overrides, registry=registry)


def train(recipe: Any, overrides: Iterable[str] = (), *, train_dataset: Any = None, eval_dataset: Any = None,
          resume: bool = False, reporter: Any = None, registry: Any = None) -> dict[str, Any]:
    """Train as ``prefkit run`` does; returns the run summary (also in ``OUTPUT_DIR/run.json``).

    ``train_dataset`` / ``eval_dataset`` replace ``data.train`` / ``data.eval`` with in-memory rows.
    """
    from prefkit import loops

    registry = registry if registry is not None else _default_registry()
    overrides = list(overrides)
    loaded = load(recipe, overrides, registry=registry)
    extra = []
    cache = loaded.recipe.resolved_cache_dir()
    if train_dataset is not None:
        extra.append(f"data.train={dataset_file(train_dataset, cache, split=loaded.recipe.data.train_split)}")
        extra.append("data.mix_rows=null")  # the recipe's mixture, if any, is replaced
    if eval_dataset is not None:
        extra.append(f"data.eval={dataset_file(eval_dataset, cache, split=loaded.recipe.data.eval_split)}")
    if extra:
        loaded = load(loaded, extra, registry=registry)
    return loops.train(loaded, resume=resume, reporter=reporter, registry=registry)


def _policy_problem(model: str, registry: Any, head: str) -> str | None:
    """Why ``model`` cannot be the policy evaluate loads, found without loading anything."""
    from prefkit.inputs import is_dir
    from prefkit.models.loading import classifier_problem, model_folder_problem, source_path_problem

    if is_dir(model):
        return model_folder_problem(model) or (classifier_problem(model) if head == "lm" else None)
    if model in registry.model_sources:
        return None
    return source_path_problem(model, registry)


def evaluate(run_or_recipe: Any, overrides: Iterable[str] = (), *, model: str | None = None,
             eval_dataset: Any = None, registry: Any = None, reporter: Any = None) -> dict[str, float]:
    """An offline objective's loss and metrics on a preference set (``eval/loss``,
    ``eval/rewards/accuracies``, ``eval/rewards/margins``, ...), without training.

    ``run_or_recipe`` is a run folder (its recipe, its ``final/`` as the policy, the recipe's model
    as the reference) or a recipe (its model is the reference; ``model=`` names the policy to
    judge, by default the reference itself). The data is ``eval_dataset``, else the recipe's
    ``data.eval``, else its training data.
    """
    from prefkit.loops.offline import evaluate as evaluate_loop
    from prefkit.loops.offline import evaluation_batches, reference_for
    from prefkit.api.reporting import SilentReporter
    from prefkit.loops.runs import resolve_precision
    from prefkit.data.prepare import prepare_dataset
    from prefkit.models.loading import load_model
    from prefkit.recipe import ModelConfig

    registry = registry if registry is not None else _default_registry()
    overrides = list(overrides)
    reporter = reporter or SilentReporter()
    path = Path(run_or_recipe) if isinstance(run_or_recipe, (str, os.PathLike)) else None
    if path is not None and path.is_dir():
        if not (path / "recipe.resolved.yaml").is_file():
            raise PrefkitError(f"{path} is not a run folder (it has no recipe.resolved.yaml)")
        if model is None:
            if not (path / "final").is_dir():
                raise PrefkitError(f"{path} has no final/ (the run has not finished); give a model folder "
                                   "(--model PATH; model=... in Python), for example a checkpoint exported with "
                                   "`prefkit export` first")
            model = str(path / "final")
        loaded = load(path / "recipe.resolved.yaml", [f"output_dir={path}", *overrides], registry=registry)
    else:
        loaded = load(run_or_recipe, overrides, registry=registry)
    from prefkit.loops import require_objective

    require_objective(loaded, "eval")
    if eval_dataset is not None:
        written = dataset_file(eval_dataset, loaded.recipe.resolved_cache_dir(), split=loaded.recipe.data.eval_split)
        loaded = load(loaded, [f"data.eval={written}"], registry=registry)
    elif not loaded.recipe.data.eval:
        train = loaded.recipe.data.model_dump(mode="json", exclude_none=True)["train"]
        loaded = load(loaded, [f"data.eval={json.dumps(train)}", f"data.eval_split={loaded.recipe.data.train_split}"],
                      registry=registry)
    recipe, objective, params = loaded.recipe, loaded.objective, loaded.params
    if objective.kind != "offline":
        raise PrefkitError(f"objective {objective.name!r} is {objective.kind}: it has no loss on fixed data; "
                           "evaluate its samples with `prefkit compare` (gold reward, KL, win rate)")
    needs = objective.needs(params)
    if model is not None:  # the policy's folder, checked before the reference loads and runs
        problem = _policy_problem(str(model), registry, needs.head)
        if problem:
            raise PrefkitError(f"--model (model= in Python): {problem}")
    cache_dir = recipe.resolved_cache_dir()
    precision = resolve_precision(recipe.train.precision, cache_dir)
    accelerator = _single_process(precision)

    reference = load_model(recipe.model, loaded.model_options, cache_dir, head=needs.head, registry=registry)
    data = prepare_dataset(recipe.data, reference.tokenizer, registry.data_kinds[needs.data], split="eval",
                           registry=registry, mismatched=needs.mismatched)
    ref = None
    if needs.reference:
        batches = [evaluation_batches(len(data.examples), recipe.train.batch_size, 0, 1)]  # evaluate_loop's
        ref, _ = reference_for(data, batches=batches, model_handle=reference, recipe=recipe, precision=precision,
                               tokens=needs.reference_tokens, accelerator=accelerator,
                               pad_id=reference.tokenizer.pad_token_id, reporter=reporter)
    if model is None:
        policy = reference
    else:
        policy = load_model(ModelConfig(source=str(model)), None, cache_dir, head=needs.head, registry=registry)
        if policy.tokenizer_fingerprint != reference.tokenizer_fingerprint:
            raise PrefkitError(f"model {model}: its tokenizer differs from the reference's ({recipe.model.source}); "
                               "the log-probs would not be comparable")
    return evaluate_loop(policy.model.to(accelerator.device), objective, params, needs, data, ref,
                         batch_size=recipe.train.batch_size, pad_id=policy.tokenizer.pad_token_id,
                         accelerator=accelerator)


def export(run_dir: str | os.PathLike, *, step: int | None = None, output: str | os.PathLike | None = None,
           dtype: str = "fp32", registry: Any = None) -> Path:
    """Write a checkpoint of a run as a Hugging Face folder, as ``prefkit export`` does."""
    from prefkit.loops.export import export_checkpoint

    registry = registry if registry is not None else _default_registry()
    return export_checkpoint(Path(run_dir), step=step, out_dir=Path(output) if output else None, dtype=dtype,
                             registry=registry)


# ----------------------------------------------------------------------------- helpers


def _default_registry():
    from prefkit.plugins import load_registry

    return load_registry()


def _single_process(precision):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    import torch

    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision.accelerate, cpu=not torch.cuda.is_available())


def dataset_rows(dataset: Any, split: str) -> list[dict]:
    """Plain dict rows from a ``datasets.Dataset``, one split of a ``DatasetDict``, or a list of dicts."""
    if hasattr(dataset, "keys") and hasattr(dataset, "column_names") and isinstance(dataset.column_names, dict):
        if split not in dataset:
            raise DataError(f"in-memory DatasetDict: no split {split!r}; its splits: {', '.join(dataset.keys())}")
        dataset = dataset[split]
    if hasattr(dataset, "to_list"):
        return dataset.to_list()
    if isinstance(dataset, (list, tuple)) and all(isinstance(row, dict) for row in dataset):
        return list(dataset)
    raise DataError(f"in-memory data must be a datasets.Dataset, a DatasetDict or a list of dicts, not "
                    f"{type(dataset).__name__}")


def dataset_file(dataset: Any, cache_dir: Path, split: str) -> Path:
    """Write in-memory rows once as ``<cache_dir>/datasets/<sha256 of the rows>.jsonl``; return it."""
    rows = dataset_rows(dataset, split)
    if not rows:
        raise DataError("in-memory data: it has no rows")
    try:
        lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in rows]
    except (TypeError, ValueError) as exc:
        raise DataError(f"in-memory data: a row holds a value JSON cannot store ({exc})") from exc
    text = "".join(line + "\n" for line in lines)
    folder = Path(cache_dir) / "datasets"
    target = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.jsonl"
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        raise DataError(f"in-memory data: cannot write it to {folder} ({exc.strerror or exc})") from exc
    return target
