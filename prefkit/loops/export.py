"""``prefkit export``: any checkpoint of a run as a Hugging Face folder.

A checkpoint holds only what trains (all weights, or a LoRA adapter) plus optimizer and RNG
states, so it does not load with ``from_pretrained``. Exporting rebuilds the run's model from the
recipe saved in the checkpoint, loads the checkpoint's weights into it (after verifying its
manifest) and saves it as ``final/`` would be saved: safetensors, tokenizer, a merged LoRA
adapter with the adapter beside it, the objective's extra modules (PPO's value head) as
``NAME.safetensors``, and a model card.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from prefkit.api.errors import PrefkitError
from prefkit.loops.checkpoint import checkpoint_problem, load_trainable_state, step_folders

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_checkpoint(run_dir: Path, step: int | None) -> tuple[int, Path]:
    """The checkpoint of ``step`` (the newest when ``None``), verified against its manifest."""
    steps = step_folders(run_dir)  # a folder without its manifest too: it is reported as damaged
    if not steps:
        raise PrefkitError(f"{run_dir} has no checkpoints to export (a run keeps them with train.save_every; "
                           f"its final/ is already a Hugging Face folder)")
    if step is None:
        step, path = steps[-1]
    else:
        found = dict(steps)
        if step not in found:
            available = ", ".join(str(s) for s, _ in steps)
            raise PrefkitError(f"--step {step}: {run_dir} has no checkpoint of that step (it has: {available})")
        path = found[step]
    problem = checkpoint_problem(path)
    if problem is not None:
        intact = [str(s) for s, other in steps if other != path and checkpoint_problem(other) is None]
        choice = f"export another step (intact: {', '.join(intact)})" if intact else "no other checkpoint is intact"
        raise PrefkitError(f"checkpoint {path} is damaged ({problem}); {choice}")
    return step, path


@dataclass
class CheckpointModel:
    """A checkpoint's weights in the model its recipe builds (``model``: the causal LM or scalar
    model itself, or for an online objective the policy with its extra modules)."""

    step: int
    path: Path  # the checkpoint folder
    loaded: Any  # the checkpoint's LoadedRecipe
    handle: Any  # the LoadedModel the weights went into
    model: torch.nn.Module

    @property
    def policy(self) -> torch.nn.Module:
        """The language model alone (what generates)."""
        return getattr(self.model, "policy", self.model)


def load_checkpoint_model(run_dir: Path, step: int | None = None, *, registry: Any) -> CheckpointModel:
    """Checkpoint ``step`` of ``run_dir`` (the newest by default) loaded into the model its recipe
    builds, in memory. Raises PrefkitError for a folder, step or checkpoint that cannot be used."""
    from prefkit.loops.online import PolicyWithModules, hidden_size_of
    from prefkit.models.loading import load_model
    from prefkit.recipe import load_recipe

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PrefkitError(f"{run_dir} is not a run folder")
    step, path = find_checkpoint(run_dir, step)
    loaded = load_recipe(path / "recipe.resolved.yaml", [f"output_dir={run_dir}"], registry=registry)
    recipe, objective, params = loaded.recipe, loaded.objective, loaded.params
    needs = objective.needs(params)
    head = needs.head if objective.kind == "offline" else "lm"
    handle = load_model(recipe.model, loaded.model_options, recipe.resolved_cache_dir(), head=head, registry=registry)
    tensors = load_file(str(path / "trainable.safetensors"))
    try:
        if objective.kind == "online":
            model: torch.nn.Module = PolicyWithModules(handle.model, objective.modules(params, hidden_size_of(handle.model)),
                                                       needs.hidden_states)
        else:
            model = handle.model
        load_trainable_state(model, tensors)
    except ValueError as exc:  # the checkpoint's tensors do not fit the model the recipe builds
        raise PrefkitError(f"cannot load {path}: {exc}") from exc
    return CheckpointModel(step, path, loaded, handle, model)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return Path(path).expanduser().resolve().is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def export_checkpoint(run_dir: Path, *, step: int | None = None, out_dir: Path | None = None,
                      dtype: str = "fp32", registry: Any) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` (the newest by default) as a Hugging Face folder
    (default ``RUN/export/step-N``); return the folder."""
    from prefkit.inputs import InputError, check_writable_dir
    from prefkit.loops.online import save_final
    from prefkit.models.loading import save_pretrained

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PrefkitError(f"{run_dir} is not a run folder")
    if dtype not in DTYPES:
        raise PrefkitError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    step, path = find_checkpoint(run_dir, step)
    out = Path(out_dir) if out_dir is not None else run_dir / "export" / f"step-{step}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrefkitError(f"{out} already exists; choose another --output (nothing was changed)")
    if _inside(out, run_dir / "checkpoints"):
        raise PrefkitError(f"--output {str(out)!r} is inside the run's checkpoints/ folder, where it would be taken "
                           "for a checkpoint; choose another --output (nothing was changed)")
    try:
        check_writable_dir(out, "--output")
    except InputError as exc:
        raise PrefkitError(f"{exc} (nothing was changed)") from None

    found = load_checkpoint_model(run_dir, step, registry=registry)
    recipe, objective = found.loaded.recipe, found.loaded.objective
    named = registry.model_sources.get(recipe.model.source)
    options = {"dtype": DTYPES[dtype], "base_name": getattr(named, "hub_id", None) or recipe.model.source}
    if objective.kind == "online":
        save_final(found.model, found.handle.tokenizer, out, **options)
    else:
        save_pretrained(found.model, found.handle.tokenizer, out, **options)
    (out / "README.md").write_text(
        f"---\nlibrary_name: transformers\nbase_model: {options['base_name']}\ntags: [prefkit, {objective.name}]\n---\n\n"
        f"# {run_dir.name}, step {step}\n\nExported by `prefkit export` from `{path}`: objective `{objective.name}` "
        f"after {step} optimizer steps, weights saved as {dtype}. The run's recipe is "
        f"`recipe.resolved.yaml` in that checkpoint.\n"
    )
    return out
