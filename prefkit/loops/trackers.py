"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, through accelerate's trackers.

Off by default: a recipe turns them on with ``train.trackers: [tensorboard, wandb, mlflow]``
(any of them). ``metrics.jsonl`` is always written whatever the trackers. They are
offline-safe, nothing leaves the machine unless the user asks for it:

- ``tensorboard`` writes event files to ``RUN_DIR/tensorboard/`` (``tensorboard --logdir runs``);
- ``wandb`` runs in offline mode, writing to ``RUN_DIR/wandb/``, unless ``WANDB_MODE`` is set
  (``WANDB_MODE=online`` to sync; ``wandb sync`` uploads an offline run later);
- ``mlflow`` logs to a local file store ``RUN_DIR/mlruns/`` unless ``MLFLOW_TRACKING_URI`` is set
  (``mlflow ui --backend-store-uri RUN_DIR/mlruns``).

The project (wandb project, mlflow experiment) is ``train.project``; the run name is the run
directory's name. A tracker whose package is not installed is a clear :class:`PrefkitError`
naming the ``pip install`` command, raised by :func:`check_trackers` before any heavy work.

Usage in a training loop (only the main process logs)::

    check_trackers(names)                       # early: unknown names, missing packages
    trackers = start_trackers(names, run_dir=run_dir, project=project, config=resolved_recipe,
                              main_process=accelerator.is_main_process)
    trackers.log(record, step)                  # every logged step, next to metrics.jsonl
    trackers.finish()
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefkit.api.errors import PrefkitError

TRACKERS = ("tensorboard", "wandb", "mlflow")
# tracker -> (importable modules, any of which will do; the install command)
PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
}


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_trackers(names: Sequence[str]) -> None:
    """Refuse unknown tracker names and trackers whose package is missing, all in one message."""
    problems = []
    for name in names:
        if name not in PACKAGES:
            problems.append(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
            continue
        modules, command = PACKAGES[name]
        if not any(_installed(module) for module in modules):
            problems.append(f"tracker {name!r} needs the package {modules[0]}, which is not installed; run: {command}")
    if problems:
        raise PrefkitError("train.trackers: " + "; ".join(problems))


def flat_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested recipe as flat ``a.b.c`` keys with bool/int/float/str values (lists as JSON)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flat_config(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, (bool, int, float, str)):
        out[prefix] = data
    elif data is None:
        out[prefix] = "null"
    else:
        out[prefix] = json.dumps(data, default=str)
    return out


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a ``metrics.jsonl`` record, without its ``step``."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The started trackers of one run; empty (and free) when none are configured."""

    def __init__(self, trackers: list[Any] | None = None):
        self.trackers = list(trackers or [])

    @property
    def names(self) -> list[str]:
        return [tracker.name for tracker in self.trackers]

    def log(self, metrics: dict[str, Any], step: int) -> None:
        values = scalars(metrics)
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()

    def __bool__(self) -> bool:
        return bool(self.trackers)


def _build(name: str, run_dir: Path, project: str, run_name: str) -> Any:
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker("", run_dir / "tensorboard")
    if name == "wandb":
        kwargs: dict[str, Any] = {"name": run_name, "dir": str(run_dir)}
        if not os.environ.get("WANDB_MODE"):
            kwargs["mode"] = "offline"
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        return WandBTracker(project, **kwargs)
    if name == "mlflow":
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run_dir / "mlruns").absolute().as_uri())
        return MLflowTracker(experiment_name=project, run_name=run_name)
    raise PrefkitError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")


def start_trackers(names: Sequence[str], *, run_dir: Path | str, project: str = "prefkit",
                   run_name: str | None = None, config: dict[str, Any] | None = None,
                   main_process: bool = True) -> Trackers:
    """Start the named trackers for a run and log ``config`` (the resolved recipe) as its
    hyper-parameters. Returns an empty :class:`Trackers` when ``names`` is empty or on processes
    other than the main one."""
    if not names or not main_process:
        return Trackers()
    check_trackers(names)
    from accelerate.state import PartialState

    PartialState()  # accelerate's tracker logging needs it; a no-op when an Accelerator exists
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_name = run_name or run_dir.absolute().name
    started: list[Any] = []
    try:
        for name in dict.fromkeys(names):  # each once, in order
            tracker = _build(name, run_dir, project, run_name)
            tracker.main_process_only = False  # the caller logs from the main process only
            tracker.start()
            if config:
                tracker.store_init_configuration(flat_config(config))
            started.append(tracker)
    except PrefkitError:
        Trackers(started).finish()
        raise
    except Exception as exc:
        Trackers(started).finish()
        raise PrefkitError(f"train.trackers: starting {name!r} failed: {type(exc).__name__}: {exc}") from exc
    return Trackers(started)


def from_recipe(recipe: Any, run_dir: Path | str, *, config: dict[str, Any] | None = None,
                main_process: bool = True) -> Trackers:
    """:func:`start_trackers` with ``recipe.train.trackers`` and ``recipe.train.project``."""
    train = recipe.train
    return start_trackers(getattr(train, "trackers", []) or [], run_dir=run_dir,
                          project=getattr(train, "project", "prefkit"), config=config, main_process=main_process)
