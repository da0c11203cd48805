"""The life of a run directory, shared by the offline loop (engine.py) and the online one (rollout.py).

Before any heavy work: the run directory is checked (an existing run is never overwritten; a
resume must match the checkpoint's recipe), the precision is resolved and the tokenizer loaded.
Then the directory is opened, a checkpoint restored, and at the end a summary written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

import prefkit
from prefkit.loops.checkpoint import latest_checkpoint, load_checkpoint
from prefkit.api.errors import PrefkitError
from prefkit.loops.metrics import MetricsLog
from prefkit.recipe import LoadedRecipe, dump_yaml
from prefkit.loops.trackers import Trackers, check_trackers, start_trackers
from prefkit.models.precision import auto_precision


# Keys that may differ between a checkpoint's recipe and the recipe used to resume it.
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.save_every", "train.log_every",
                     "train.eval_every", "train.keep_checkpoints", "train.trackers", "train.project"}


class Reporter(Protocol):
    """What the engine tells a user interface. Library code never prints."""

    def message(self, text: str) -> None: ...
    def start(self, total_steps: int, first_step: int, description: str = "train") -> None: ...
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def finish(self) -> None: ...


class QuietReporter:
    def message(self, text: str) -> None:
        pass

    def start(self, total_steps: int, first_step: int, description: str = "train") -> None:
        pass

    def step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class Precision:
    name: str  # "fp32" | "bf16" | "fp16": what the forward passes run in
    accelerate: str  # accelerate's mixed_precision: "no" | "bf16" | "fp16"


def resolve_precision(requested: str, cache_dir: Path | None = None) -> Precision:
    cuda = torch.cuda.is_available()
    if requested == "auto":
        requested = auto_precision(cache_dir)  # on a CPU measured once per machine, cached in cache_dir
    if requested == "fp16" and not cuda:
        raise PrefkitError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on a CPU")
    return Precision(requested, "no" if requested == "fp32" else requested)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: data}


def prepare_run_dir(run_dir: Path, resolved: dict, resume: bool) -> Path | None:
    """Check the run directory before any heavy work; return the checkpoint to resume, if any."""
    checkpoint = latest_checkpoint(run_dir)
    started = (run_dir / "metrics.jsonl").exists() or checkpoint is not None or (run_dir / "final").exists()
    if not resume:
        if started:
            raise PrefkitError(
                f"output_dir {run_dir} already holds a run; pass --resume to continue it, "
                "or set output_dir=... to start a new one (nothing was changed)"
            )
        return None
    if checkpoint is None:
        return None
    saved = _flatten(yaml.safe_load((checkpoint / "recipe.resolved.yaml").read_text()))
    current = _flatten(resolved)
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    changed = [k for k in changed if k not in RESUMABLE_CHANGES]
    if changed:
        raise PrefkitError(
            f"cannot resume {checkpoint}: the recipe differs from the one it was trained with in "
            + ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in changed[:5])
        )
    return checkpoint


@dataclass
class RunSetup:
    """What every run knows before loading a model."""

    loaded: LoadedRecipe
    resolved: dict
    resolved_yaml: str
    run_dir: Path
    checkpoint: Path | None  # the checkpoint to resume from
    precision: Precision
    cache_dir: Path
    tokenizer: Any
    started: float


def begin_run(loaded: LoadedRecipe, resume: bool, registry: Any) -> RunSetup:
    """Checks that need no model: the run directory, the precision, and the tokenizer (for the data)."""
    from prefkit.models.loading import load_tokenizer, resolve_model_dir

    recipe = loaded.recipe
    resolved = loaded.resolved_dict()
    run_dir = Path(recipe.output_dir)
    checkpoint = prepare_run_dir(run_dir, resolved, resume)
    check_trackers(recipe.train.trackers)
    precision = resolve_precision(recipe.train.precision, recipe.resolved_cache_dir())
    started = time.perf_counter()
    cache_dir = recipe.resolved_cache_dir()
    model_dir = resolve_model_dir(recipe.model, loaded.model_options, cache_dir, registry=registry)
    tokenizer = load_tokenizer(recipe.model, model_dir, gguf_file=recipe.model.gguf_file)
    return RunSetup(loaded, resolved, dump_yaml(resolved), run_dir, checkpoint, precision, cache_dir, tokenizer,
                    started)


def plugin_call(objective, what: str, call):
    """Run ``call()`` (a method of the objective, its reward function, ...); an exception inside it
    becomes a PrefkitError that names the objective. A PrefkitError passes through unchanged."""
    try:
        return call()
    except PrefkitError:
        raise
    except Exception as exc:
        raise PrefkitError(f"objective {objective.name!r}: {what} raised {type(exc).__name__}: {exc}") from exc


def describe_data(kind: str, report) -> str:
    return (f"{kind} {report.source} ({report.split}): {report.rows_kept} of {report.rows_read} rows kept; "
            f"{report.rows_truncated} truncated, {report.rows_dropped_overlong} dropped as too long, "
            f"{report.rows_skipped_bad} bad rows skipped; format {report.format}, "
            f"chat template {'on' if report.chat_template else 'off'}")


def make_accelerator(setup: RunSetup) -> Accelerator:
    """Seed everything, then a fresh accelerate state (runs in one process may differ in precision)."""
    set_seed(setup.loaded.recipe.seed)
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=setup.precision.accelerate, cpu=not torch.cuda.is_available())


def start_run_trackers(setup: RunSetup, accelerator: Accelerator) -> Trackers:
    """TensorBoard / W&B / MLflow as the recipe asks (none by default); metrics.jsonl is always written."""
    train = setup.loaded.recipe.train
    return start_trackers(train.trackers, run_dir=setup.run_dir, project=train.project, config=setup.resolved,
                          main_process=accelerator.is_main_process)


def open_run_dir(setup: RunSetup) -> MetricsLog:
    setup.run_dir.mkdir(parents=True, exist_ok=True)
    (setup.run_dir / "recipe.resolved.yaml").write_text(setup.resolved_yaml)
    return MetricsLog(setup.run_dir / "metrics.jsonl")


def restore(setup: RunSetup, *, model, optimizer, scheduler, metrics_log: MetricsLog, reporter: Reporter,
            resume: bool) -> dict[str, Any] | None:
    """Load the checkpoint to resume from (if any) and forget metrics logged after it."""
    if setup.checkpoint is not None:
        state = load_checkpoint(setup.checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        metrics_log.truncate_after(state["step"])
        reporter.message(f"resumed from {setup.checkpoint} (step {state['step']})")
        return state
    if resume:
        metrics_log.truncate_after(0)
        reporter.message("no checkpoint to resume from; starting at step 0")
    return None


def last_logged(metrics_log: MetricsLog, last: dict) -> dict:
    if last:
        return last
    previous = metrics_log.read()
    return previous[-1] if previous else {}


def summary_head(setup: RunSetup, handle, objective, registry) -> dict[str, Any]:
    """The fields every run.json starts with."""
    recipe = setup.loaded.recipe
    return {
        "prefkit_version": prefkit.__version__,
        "plugins": plugin_versions(registry),
        "objective": objective.name,
        "objective_params": setup.resolved["objective"]["params"],
        "model": {"source": recipe.model.source, "path": handle.path, "lora": recipe.model.lora is not None,
                  "weights_fingerprint": handle.weights_fingerprint},
        "precision": setup.precision.name,
    }


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "run.json").write_text(json.dumps(summary, indent=2, default=str))


def plugin_versions(registry) -> dict[str, str]:
    return {name: f"{info.distribution} {info.version}" for name, info in sorted(registry.plugins.items())}
