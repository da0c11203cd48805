"""Atomic checkpoints that hold everything an exact resume needs.

``checkpoints/step-N/`` contains:
  trainable.safetensors  the trainable parameters (all weights, or only the LoRA adapter)
  optimizer.pt           optimizer state (loaded with weights_only=True)
  scheduler.pt           learning-rate scheduler state
  rng.safetensors        torch (CPU and CUDA) generator states
  rng.json               Python's and NumPy's generator states
  state.json             step, micro-batch position, tokens seen, elapsed time
  recipe.resolved.yaml   the recipe the run was started with
  manifest.json          every other file's size and sha256, written last
A checkpoint is written to a temporary folder and renamed into place, so a run killed at
any moment leaves either the whole checkpoint or none of it. Only folders with a manifest are
listed, and a resume verifies the manifest before it trusts a checkpoint (a damaged newest one,
a step folder without its manifest included, is reported and skipped for the newest intact one;
it is kept until the run writes that step again, or rotation passes it). Old checkpoints are
renamed aside before they are deleted, so a kill during rotation never leaves a half-deleted one
in the list; leftovers of killed writes are removed when the run directory is opened again.

Nothing non-finite is ever written: :func:`save_checkpoint` refuses weights with NaN or inf, so a
bad step can never push out the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from prefkit.api.errors import PrefkitError
from prefkit.manifest import MANIFEST, verify_manifest, write_manifest

STEP_DIR = re.compile(r"^step-(\d+)$")
LEFTOVER = re.compile(r"^\.(tmp|old|trash)-step-")  # folders a killed write or rotation leaves behind


class NonFiniteWeights(PrefkitError):
    """The weights hold NaN or inf; they are not written."""


class CheckpointWriteError(Exception):
    """Writing a checkpoint failed (full disk, read-only folder, ...); nothing of it was kept."""


def describe_write_error(exc: BaseException, folder: Path) -> str:
    """An OSError's own words; for other errors (``torch.save`` reports a full disk as a
    RuntimeError) their text plus the free space left."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = f"{type(exc).__name__}: {exc}"
    try:
        free = shutil.disk_usage(folder).free
        text += f" ({free} bytes free on that disk" + ("; No space left on device)" if free < (1 << 20) else ")")
    except OSError:
        pass
    return text


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not match the model (missing {missing[:3]}, unexpected {unknown[:3]})")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    plain = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """Every ``checkpoints/step-N`` folder, oldest first, with its manifest or not."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def checkpoint_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """The checkpoints of a run, oldest first: the step folders that have a manifest."""
    return [(step, path) for step, path in step_folders(run_dir) if (path / MANIFEST).exists()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = checkpoint_steps(run_dir)
    return steps[-1][1] if steps else None


def older_than_kept(run_dir: Path, keep: int) -> list[tuple[int, Path]]:
    """The step folders a rotation keeping the newest ``keep`` intact checkpoints removes: every one
    older than the oldest kept (a damaged one among them too: nothing would ever read it again)."""
    kept = checkpoint_steps(run_dir)[-keep:] if keep > 0 else []
    oldest = kept[0][0] if kept else math.inf
    return [(step, path) for step, path in step_folders(run_dir) if step < oldest]


def checkpoint_problem(path: Path) -> str | None:
    """``None`` if the checkpoint folder is intact; else what is wrong with it (the first bad file)."""
    if not (Path(path) / MANIFEST).exists():
        return f"{MANIFEST} is missing"
    return verify_manifest(path)


def newest_intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint, and each damaged newer step folder with what is wrong with it
    (newest first)."""
    damaged = []
    for _, path in reversed(step_folders(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary folders of killed checkpoint writes and rotations; return them."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    # a step folder without its manifest is not a leftover: it is a damaged checkpoint, reported by
    # newest_intact_checkpoint and kept until the run writes that step again or rotation passes it
    found = [child for child in root.iterdir() if child.is_dir() and LEFTOVER.match(child.name)]
    for child in found:
        shutil.rmtree(child, ignore_errors=True)
    return found


def _discard(folder: Path) -> None:
    """Rename a checkpoint aside (atomic: it leaves the list at once), then delete it."""
    trash = folder.parent / f".trash-{folder.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_finite(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters holding NaN or inf (empty when all are finite)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    recipe_yaml: str,
    keep: int,
    other_ranks_rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = (),
) -> Path:
    """Write ``checkpoints/step-N`` atomically (see the module docstring). ``other_ranks_rng``: the
    generator states of processes 1..W-1 of a multi-process run, saved as ``rng-rank<r>.*``."""
    bad = check_finite(model)
    if bad:
        raise NonFiniteWeights(f"{len(bad)} weight tensors hold NaN or inf (first: {bad[0]})")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root))
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng_tensors, rng_plain = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "rng.json").write_text(json.dumps(rng_plain))
        for rank, (tensors, plain) in enumerate(other_ranks_rng, start=1):
            save_file(tensors, str(tmp / f"rng-rank{rank}.safetensors"))
            (tmp / f"rng-rank{rank}.json").write_text(json.dumps(plain))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        (tmp / "recipe.resolved.yaml").write_text(recipe_yaml)
        write_manifest(tmp)
        final = root / f"step-{step}"
        if final.exists():  # re-written after a resume: move the old one aside first
            _discard(final)
        os.rename(tmp, final)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(describe_write_error(exc, root)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, stale in older_than_kept(run_dir, keep):
        _discard(stale)
    return final


def load_checkpoint(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this process's RNG states (process 0's when the
    checkpoint was written by fewer processes); return the saved ``state``."""
    path = Path(path)
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    stem = f"rng-rank{rank}" if rank and (path / f"rng-rank{rank}.json").exists() else "rng"
    set_rng_state(load_file(str(path / f"{stem}.safetensors")), json.loads((path / f"{stem}.json").read_text()))
    return json.loads((path / "state.json").read_text())
