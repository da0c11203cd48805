"""The life of a run directory, shared by the offline loop (engine.py) and the online one (rollout.py).

Before any heavy work: the run directory is checked (an existing run is never overwritten; a
resume must match the checkpoint's recipe), the precision is resolved and the tokenizer loaded.
Then the directory is opened, a checkpoint restored, and at the end a summary written.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

import prefkit
from prefkit.loops.checkpoint import (
    CheckpointWriteError,
    NonFiniteWeights,
    checkpoint_steps,
    load_checkpoint,
    newest_intact_checkpoint,
    remove_leftovers,
    save_checkpoint,
)
from prefkit.api.errors import PrefkitError
from prefkit.api.reporting import Reporter
from prefkit.loops.metrics import Averager, MetricsLog
from prefkit.loops.optim import replan_schedule
from prefkit.recipe import LoadedRecipe, Recipe, dump_yaml
from prefkit.loops.trackers import Trackers, check_trackers, start_trackers
from prefkit.models import allocator
from prefkit.models.precision import auto_precision, cpu_attention_in_fp32


# Keys that may differ between a checkpoint's recipe and the recipe used to resume it.
# ``output_dir`` and ``cache_dir`` may differ too: a run folder can be moved or copied and resumed.
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.save_every", "train.log_every",
                     "train.eval_every", "train.keep_checkpoints", "train.trackers", "train.project",
                     "train.final_dtype",
                     "output_dir", "cache_dir"}


@dataclass
class Precision:
    name: str  # "fp32" | "bf16" | "fp16": what the forward passes run in
    accelerate: str  # accelerate's mixed_precision: "no" | "bf16" | "fp16"


def resolve_precision(requested: str, cache_dir: Path | None = None) -> Precision:
    """The run's precision; first the CPU allocator is set up, before the precision probe or any
    other tensor (prefkit.models.allocator, once per process)."""
    cuda = torch.cuda.is_available()
    allocator.tune_cpu_allocator(cuda)
    if requested == "auto":
        requested = auto_precision(cache_dir)  # on a CPU measured once per machine, cached in cache_dir
    if requested == "fp16" and not cuda:
        raise PrefkitError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on a CPU")
    if requested == "bf16" and not cuda:
        cpu_attention_in_fp32(cache_dir)  # settled now from the machine's cache entry, not mid-forward
    return Precision(requested, "no" if requested == "fp32" else requested)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: data}


_NO_DEFAULT = object()


def _default_of(dotted: str) -> Any:
    """The default of a recipe setting such as ``train.gradient_checkpointing`` (as the resolved
    recipe writes it), or ``_NO_DEFAULT``."""
    model: Any = Recipe
    *parents, name = dotted.split(".")
    for part in parents:
        field = getattr(model, "model_fields", {}).get(part)
        model = getattr(field, "annotation", None)
        if not isinstance(model, type):
            return _NO_DEFAULT
    field = getattr(model, "model_fields", {}).get(name)
    if field is None or field.is_required():
        return _NO_DEFAULT
    value = field.get_default(call_default_factory=True)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _holds_a_run(run_dir: Path) -> bool:
    """Whether a folder holds (part of) a prefkit run, rather than unrelated files."""
    return any((run_dir / name).exists() for name in ("recipe.resolved.yaml", "metrics.jsonl", "checkpoints", "run.json",
                                                     "final"))


def prepare_run_dir(run_dir: Path, resolved: dict, resume: bool) -> tuple[Path | None, list[str]]:
    """Check the run directory before any heavy work; return the checkpoint to resume (the newest
    intact one) and notes on any damaged newer ones."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PrefkitError(f"output_dir {run_dir} is a file, not a folder; set output_dir=... to a folder")
    started = run_dir.is_dir() and any(run_dir.iterdir())
    stub = started and never_trained(run_dir)
    if not resume:
        if stub:  # a start that failed (a model that would not load, ...): the fixed command may reuse it
            return None, [f"output_dir {run_dir} held only the recipe of a run that stopped before its first "
                          "step; starting it afresh"]
        if started and not _holds_a_run(run_dir):
            found = sorted(child.name for child in run_dir.iterdir())
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise PrefkitError(f"output_dir {run_dir} is not empty ({shown}) and holds no run; a run needs a folder "
                               "of its own: set output_dir=... to a new or empty folder (nothing was changed)")
        if started:
            raise PrefkitError(
                f"output_dir {run_dir} already holds a run; pass --resume to continue it, "
                "or set output_dir=... to start a new one (nothing was changed)"
            )
        return None, []
    if started and not _holds_a_run(run_dir):
        raise PrefkitError(f"--resume: {run_dir} holds no run to resume (no recipe.resolved.yaml, metrics.jsonl or checkpoints/); "
                           "leave out --resume and set output_dir=... to a new or empty folder (nothing was changed)")
    if not started:
        raise PrefkitError(f"--resume: {run_dir} holds no run to resume; leave out --resume to start one")
    if stub:
        raise PrefkitError(f"--resume: the run in {run_dir} stopped before its first step, so there is nothing to "
                           "continue; leave out --resume to start it again (nothing was changed)")
    checkpoint, damaged = newest_intact_checkpoint(run_dir)
    if checkpoint is None and damaged:
        reasons = "; ".join(f"{path.relative_to(run_dir)}: {problem}" for path, problem in reversed(damaged))
        raise PrefkitError(
            f"--resume: every checkpoint in {run_dir} is damaged or incomplete ({reasons}); nothing was changed. "
            f"Restore one from a copy, or start again with another output_dir=..."
        )
    if checkpoint is None:
        raise PrefkitError(
            f"--resume: {run_dir} has no checkpoint to continue from (set train.save_every to keep some); "
            f"nothing was changed. Start again with another output_dir=..., or delete {run_dir}"
        )
    notes = [f"checkpoint {path} is damaged ({problem}); skipped" for path, problem in damaged]
    saved = _flatten(yaml.safe_load((checkpoint / "recipe.resolved.yaml").read_text()))
    current = _flatten(resolved)
    for key in set(current) - set(saved):  # a setting newer than the checkpoint: it ran with the default
        default = _default_of(key)
        if default is not _NO_DEFAULT:
            saved[key] = default
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    changed = [k for k in changed if k not in RESUMABLE_CHANGES]
    if changed:
        raise PrefkitError(
            f"cannot resume {checkpoint}: the recipe differs from the one it was trained with in "
            + ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in changed[:5])
        )
    return checkpoint, notes


STUB_FILES = {"recipe.resolved.yaml", "metrics.jsonl"}  # what a run writes before its first step


def never_trained(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a run writes before its first step (its recipe, an empty
    metrics log): the trace of a start that failed, which a new run may replace. Anything else in
    the folder (a checkpoint, a logged step, a file of the user's) makes it a run to keep."""
    entries = list(run_dir.iterdir())
    if not entries or any(e.name not in STUB_FILES or not e.is_file() or e.is_symlink() for e in entries):
        return False
    metrics = run_dir / "metrics.jsonl"
    return not metrics.exists() or metrics.stat().st_size == 0


def checkpoint_state(checkpoint: Path | None) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint (cheap: no tensors), or ``{}``."""
    if checkpoint is None:
        return {}
    return json.loads((checkpoint / "state.json").read_text())


def check_resumable(setup: "RunSetup", *, total_steps: int, data_fingerprint: str) -> None:
    """Before the model loads: a resume must not retrain a finished run, nor continue on other data."""
    if setup.checkpoint is None:
        return
    state = checkpoint_state(setup.checkpoint)
    saved_data = state.get("data_fingerprint")
    if saved_data is not None and saved_data != data_fingerprint:
        raise PrefkitError(
            f"cannot resume {setup.checkpoint}: the training data changed since it was written "
            f"({setup.loaded.recipe.data.label()}); resuming would mix two datasets. Restore the data, or start "
            "a new run with another output_dir=... (nothing was changed)"
        )
    if state["step"] >= total_steps and (setup.run_dir / "run.json").exists():
        raise PrefkitError(
            f"--resume: the run in {setup.run_dir} already finished at step {state['step']} of {total_steps}; "
            "nothing to do (raise train.max_steps or train.epochs to train it further; nothing was changed)"
        )


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
    notes: list[str]  # what the user should know before training starts (e.g. damaged checkpoints skipped)
    base_name: str  # the base model as named outside this machine (see base_model_name)
    reporter: Any = None  # the run's Reporter, told of every checkpoint written (set by open_run_dir)


def begin_run(loaded: LoadedRecipe, resume: bool, registry: Any) -> RunSetup:
    """Checks that need no model: the run directory, the precision, and the tokenizer (for the data)."""
    from prefkit.models.loading import load_tokenizer, resolve_model_dir

    recipe = loaded.recipe
    resolved = loaded.resolved_dict()
    run_dir = Path(recipe.output_dir)
    checkpoint, notes = prepare_run_dir(run_dir, resolved, resume)
    check_trackers(recipe.train.trackers)
    precision = resolve_precision(recipe.train.precision, recipe.resolved_cache_dir())
    started = time.perf_counter()
    cache_dir = recipe.resolved_cache_dir()
    model_dir = resolve_model_dir(recipe.model, loaded.model_options, cache_dir, registry=registry)
    tokenizer = load_tokenizer(recipe.model, model_dir, gguf_file=recipe.model.gguf_file)
    named = registry.model_sources.get(recipe.model.source)
    base_name = getattr(named, "hub_id", None) or recipe.model.source
    return RunSetup(loaded, resolved, dump_yaml(resolved), run_dir, checkpoint, precision, cache_dir, tokenizer,
                    started, notes, base_name)


def plugin_call(objective, what: str, call):
    """Run ``call()`` (a method of the objective, its reward function, ...); an exception inside it
    becomes a PrefkitError that names the objective and the package it comes from. A PrefkitError
    passes through unchanged."""
    try:
        return call()
    except PrefkitError:
        raise
    except Exception as exc:
        hint = ""
        if what == "loss()" and getattr(objective, "kind", None) == "offline" and \
                isinstance(exc, (TypeError, AttributeError)) and "NoneType" in str(exc):
            hint = ("; if the loss reads an input its needs() does not declare, that input is None (ref_*_logps need "
                    "Needs(reference=True), *_rewards need head='scalar', *_logps the default head='lm', and each "
                    "completion name comes from the data kind: pairs chosen/rejected, sft chosen, unpaired completion)")
        raise PrefkitError(f"objective {objective.name!r}{distribution_of(objective)}: {what} raised "
                           f"{type(exc).__name__}: {exc}{hint}") from exc


def distribution_of(obj) -> str:
    """`` (from package NAME VERSION)`` for the installed distribution that holds ``obj``'s class."""
    from importlib import metadata

    top = type(obj).__module__.split(".")[0]
    try:
        names = metadata.packages_distributions().get(top) or []
        return f" (from package {names[0]} {metadata.version(names[0])})" if names else ""
    except Exception:  # metadata of a broken installation: the objective's name alone must do
        return ""


def describe_data(kind: str, report) -> str:
    text = (f"{kind} {report.source} ({report.split}): {report.rows_kept} of {report.rows_read} rows kept; "
            f"{report.rows_truncated} truncated, {report.rows_dropped_overlong} dropped as too long, "
            f"{report.rows_skipped_bad} bad rows skipped; format {report.format}, "
            f"chat template {'on' if report.chat_template else 'off'}")
    sources = getattr(report, "sources", None) or []
    if sources:
        text += "; mixture: " + ", ".join(f"{s['source']} gave {s['used']} of {s['examples']}" for s in sources)
    if getattr(report, "carved_for_eval", 0):
        text += f"; {report.carved_for_eval} carved out for evaluation"
    return text


def make_accelerator(setup: RunSetup) -> Accelerator:
    """Seed everything, then a fresh accelerate state (runs in one process may differ in precision).

    Under a launcher (``accelerate launch``, ``torchrun``) each worker dies with its launcher, and
    ``train.batch_size`` (the global batch) must split evenly over the processes."""
    set_seed(setup.loaded.recipe.seed)
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=setup.precision.accelerate, cpu=not torch.cuda.is_available())
    if accelerator.num_processes > 1:
        die_with_launcher()
        batch = setup.loaded.recipe.train.batch_size
        if batch % accelerator.num_processes:
            raise PrefkitError(f"train.batch_size: {batch} examples do not split evenly over "
                               f"{accelerator.num_processes} processes; use a multiple of {accelerator.num_processes}")
    return accelerator


def die_with_launcher() -> None:
    """Ask Linux to kill this worker when its parent (the launcher) dies, even by SIGKILL."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def reduce_window(accelerator: Accelerator, window: Averager) -> Averager:
    """The logging window summed over all processes (every process gets the same numbers)."""
    if accelerator.num_processes == 1:
        return window
    from accelerate.utils import gather_object

    names = sorted({name for names in gather_object([sorted(window.sums)]) for name in names})
    local = torch.tensor([[window.sums.get(n, 0.0), window.counts.get(n, 0.0)] for n in names],
                         dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum").cpu()
    merged = Averager()
    for name, (value, count) in zip(names, total.tolist()):
        merged.sums[name], merged.counts[name] = value, count
    return merged


def everyone_or_nobody(accelerator: Accelerator, action):
    """Run ``action()`` on the main process; if it fails, every process stops with its message."""
    if accelerator.num_processes == 1:
        return action()
    from accelerate.utils import broadcast_object_list

    failure = [None]
    if accelerator.is_main_process:
        try:
            action()
        except PrefkitError as exc:
            failure = [str(exc)]
    broadcast_object_list(failure, from_process=0)
    if failure[0] is not None:
        raise PrefkitError(failure[0])


def start_run_trackers(setup: RunSetup, accelerator: Accelerator) -> Trackers:
    """TensorBoard / W&B / MLflow as the recipe asks (none by default); metrics.jsonl is always written."""
    train = setup.loaded.recipe.train
    return start_trackers(train.trackers, run_dir=setup.run_dir, project=train.project, config=setup.resolved,
                          main_process=accelerator.is_main_process)


def open_run_dir(setup: RunSetup, reporter: Reporter, accelerator: Accelerator) -> MetricsLog:
    """Create the run folder (or reopen it), remove leftovers of killed writes, write the recipe.
    Process 0 does it, once every process has checked the folder as it was."""
    setup.reporter = reporter
    for note in setup.notes:
        reporter.message(note)

    def create():
        try:
            setup.run_dir.mkdir(parents=True, exist_ok=True)
            for leftover in remove_leftovers(setup.run_dir):
                reporter.message(f"removed {leftover.name}, left behind by an interrupted checkpoint write")
            (setup.run_dir / "recipe.resolved.yaml").write_text(setup.resolved_yaml)
        except OSError as exc:
            raise PrefkitError(f"output_dir {setup.run_dir} cannot be written: {exc.strerror or exc}") from exc

    accelerator.wait_for_everyone()
    everyone_or_nobody(accelerator, create)
    return MetricsLog(setup.run_dir / "metrics.jsonl")


@dataclass
class Restored:
    """Where a resumed run picks up (all zero for a fresh run)."""

    step: int = 0
    state: dict[str, Any] | None = None  # the checkpoint's state.json
    window: Averager | None = None  # the logging window's sums, so a resumed log equals an uninterrupted one


def restore(setup: RunSetup, *, model, optimizer, scheduler, metrics_log: MetricsLog, reporter: Reporter,
            total_steps: int, accelerator: Accelerator) -> Restored:
    """Load the checkpoint to resume from (if any), forget metrics logged after it, and re-plan the
    learning-rate schedule when the run was extended (see :func:`prefkit.loops.optim.replan_schedule`)."""
    if setup.checkpoint is None:
        return Restored(window=Averager())
    try:
        state = load_checkpoint(setup.checkpoint, model=model, optimizer=optimizer, scheduler=scheduler,
                                rank=accelerator.process_index)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise PrefkitError(f"cannot resume from {setup.checkpoint}: {type(exc).__name__}: {exc}") from exc
    note = replan_schedule(scheduler, saved_total=state.get("total_steps"), total_steps=total_steps)
    if note:
        reporter.message(note)
    dropped = metrics_log.truncate_after(state["step"]) if accelerator.is_main_process else 0
    if dropped:
        reporter.message(f"metrics.jsonl: {dropped} unreadable line(s) left by an interrupted write dropped")
    reporter.message(f"resumed from {setup.checkpoint} (step {state['step']})")
    return Restored(step=state["step"], state=state, window=Averager.from_state(state.get("window")))


def check_loss_output(objective, out, *, rows: int | None, needs_grad: bool):
    """What a plugin's ``loss()`` returned, checked before it is used: a :class:`LossOutput` whose
    ``losses`` is a floating tensor of ``[rows]`` (offline) or a 0-dim one (online, ``rows=None``),
    attached to the graph when there are weights to train. Returns ``out``."""
    from prefkit.api import LossOutput

    where = f"objective {objective.name!r}: loss()"
    if not isinstance(out, LossOutput):
        raise PrefkitError(f"{where} returned {type(out).__name__}; it must return prefkit.api.LossOutput")
    losses = out.losses
    shape = "a 0-dim tensor" if rows is None else f"a tensor of shape [{rows}] (one loss per example)"
    if not isinstance(losses, torch.Tensor):
        raise PrefkitError(f"{where} returned losses of type {type(losses).__name__}; it must be {shape}")
    if not losses.is_floating_point():
        raise PrefkitError(f"{where} returned losses of dtype {losses.dtype}; they must be floating point")
    expected = () if rows is None else (rows,)
    if tuple(losses.shape) != expected:
        raise PrefkitError(f"{where} returned losses of shape {list(losses.shape)}; they must be {shape}")
    if needs_grad and not losses.requires_grad:
        raise PrefkitError(f"{where} returned losses with no gradient (detached, or computed without the "
                           "model's outputs); nothing could be trained")
    check_metrics(objective, "loss()", out.metrics, scalars=rows is None)
    return out


def check_metrics(objective, what: str, metrics: Any, *, scalars: bool) -> dict:
    """The metrics a plugin's ``what`` returned, checked before they are logged: a dict of names to
    real numbers or real tensors (one-element ones where ``scalars``, else any non-empty shape, which
    the log averages). Returns ``metrics``."""
    where = f"objective {objective.name!r}: {what}"
    if not isinstance(metrics, dict):
        raise PrefkitError(f"{where} returned metrics of type {type(metrics).__name__}; it must be a dict")
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise PrefkitError(f"{where} returned a metric named {name!r}; metric names must be strings")
        if isinstance(value, torch.Tensor):
            wrong = value.is_complex() or value.numel() == 0 or (scalars and value.numel() != 1)
            if wrong:
                shape = "a one-element tensor" if scalars else "a non-empty real tensor"
                raise PrefkitError(f"{where} returned metric {name!r} as a {value.dtype} tensor of shape "
                                   f"{list(value.shape)}; it must be a number or {shape}")
        elif not isinstance(value, numbers.Real):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
            raise PrefkitError(f"{where} returned metric {name!r} = {shown} ({type(value).__name__}); metrics "
                               "must be numbers or tensors")
    return metrics


def check_step(objective, step: int, *, loss_finite: bool, grad_norm: float | None, precision: str) -> None:
    """Stop before a non-finite loss or gradient reaches the optimizer (and so the weights on disk)."""
    bad = [] if loss_finite else ["the loss"]
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append(f"the gradient norm ({grad_norm})")
    if bad:
        hint = "lower train.lr, set train.max_grad_norm"
        hint += ", use train.precision=fp32" if precision != "fp32" else ""
        raise PrefkitError(
            f"objective {objective.name!r}: {' and '.join(bad)} became non-finite at step {step}; the step was not "
            f"applied and no checkpoint holds it. Try to {hint}, or check the data and the objective's params"
        )


def gradient_norm(accelerator, trainable, max_grad_norm: float | None, precision: str) -> float | None:
    """The total gradient norm (clipped to ``max_grad_norm`` when set), as a float. With fp16 the
    loss scaler skips overflowing steps itself, so no norm is taken unless clipping is on."""
    if max_grad_norm is not None:
        return float(accelerator.clip_grad_norm_(trainable, max_grad_norm))
    if precision == "fp16":
        return None
    grads = [p.grad for p in trainable if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def final_dtype(setup: RunSetup) -> torch.dtype:
    wanted = setup.loaded.recipe.train.final_dtype
    if wanted == "auto":
        wanted = "bf16" if setup.precision.name == "bf16" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[wanted]


def save_final_model(setup: RunSetup, model, tokenizer, objective, summary: dict[str, Any], save=None) -> None:
    """``final/`` in the recipe's ``train.final_dtype``, with a model card; never with non-finite
    weights, and a full disk is one clear message."""
    from prefkit.loops.checkpoint import check_finite
    from prefkit.models.loading import save_pretrained

    bad = check_finite(model)
    if bad:
        raise PrefkitError(f"objective {objective.name!r}: the trained weights hold NaN or inf ({bad[0]}); "
                           f"final/ was not written and {_last_good(setup)}")
    out = setup.run_dir / "final"
    try:
        (save or save_pretrained)(model, tokenizer, out, dtype=final_dtype(setup),
                                  base_name=base_model_name(setup))
        (out / "README.md").write_text(model_card(setup, summary))
    except OSError as exc:
        raise PrefkitError(f"could not write {out}: {exc.strerror or exc}; "
                           f"{_last_good(setup)}. Free space and continue with --resume") from exc


def base_model_name(setup: RunSetup) -> str:
    """The base model as others can find it: a named source's hub id (when it has one), else the
    recipe's ``model.source`` as written (a hub id, a source name or a path)."""
    return setup.base_name


def model_card(setup: RunSetup, summary: dict[str, Any]) -> str:
    """``final/README.md``: what was trained, on what, how, and how it ended."""
    recipe = setup.loaded.recipe
    metrics = {k: v for k, v in (summary.get("final_metrics") or {}).items() if isinstance(v, (int, float))}
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base_model_name(setup)}",
        "tags: [prefkit, " + summary.get("objective", "") + "]",
        "---",
        "",
        f"# {setup.run_dir.name}",
        "",
        f"Trained with prefkit {summary.get('prefkit_version')} using the objective `{summary.get('objective')}` "
        f"for {summary.get('steps')} steps ({summary.get('examples_per_step')} examples a step, "
        f"{summary.get('processes', 1)} process(es), precision {summary.get('precision')}); weights saved as "
        f"{str(final_dtype(setup)).replace('torch.', '')}.",
        "",
        f"- base model: `{base_model_name(setup)}`",
        f"- training data: `{recipe.data.label()}` (fingerprint `{(summary.get('data') or {}).get('train_fingerprint')}`)",
        f"- objective parameters: `{json.dumps(summary.get('objective_params'), sort_keys=True)}`",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())],
        "",
        "## Recipe",
        "",
        "```yaml",
        setup.resolved_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_checkpoint(setup: RunSetup, step: int, *, model, optimizer, scheduler, state: dict[str, Any],
                     objective, accelerator: Accelerator) -> None:
    """A checkpoint, or one clear error that leaves the previous checkpoints as they were. Every
    process takes part (process 0 writes, with the others' generator states) and every process
    stops if the write fails."""
    other_ranks_rng = []
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        from prefkit.loops.checkpoint import rng_state

        other_ranks_rng = gather_object([rng_state()])[1:]
    everyone_or_nobody(accelerator, lambda: _write_checkpoint(setup, step, model=model, optimizer=optimizer,
                                                              scheduler=scheduler, state=state, objective=objective,
                                                              other_ranks_rng=other_ranks_rng))
    told = getattr(setup.reporter, "checkpoint", None)  # optional in the Reporter protocol
    if told is not None and accelerator.is_main_process:
        told(step, str(setup.run_dir / "checkpoints" / f"step-{step}"))


def _write_checkpoint(setup: RunSetup, step: int, *, model, optimizer, scheduler, state: dict[str, Any],
                      objective, other_ranks_rng) -> None:
    cfg = setup.loaded.recipe.train
    try:
        save_checkpoint(setup.run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                        keep=cfg.keep_checkpoints, recipe_yaml=setup.resolved_yaml, state=state,
                        other_ranks_rng=other_ranks_rng)
    except NonFiniteWeights as exc:
        raise PrefkitError(
            f"objective {objective.name!r}: at step {step} {exc}; the checkpoint was not written and "
            f"{_last_good(setup)}. Try a lower train.lr or train.max_grad_norm"
        ) from exc
    except (CheckpointWriteError, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PrefkitError(
            f"could not write the checkpoint of step {step} in {setup.run_dir / 'checkpoints'}: "
            f"{detail}; {_last_good(setup)}. Free space (or fix the folder's permissions) and "
            "continue with --resume"
        ) from exc


def _last_good(setup: RunSetup) -> str:
    steps = checkpoint_steps(setup.run_dir)
    return f"the last good checkpoint, step-{steps[-1][0]}, is kept" if steps else "there is no earlier checkpoint"


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
        "cpu_allocator": allocator.applied().mode,  # set up by resolve_precision
    }


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "run.json").write_text(json.dumps(summary, indent=2, default=str))


def plugin_versions(registry) -> dict[str, str]:
    return {name: f"{info.distribution} {info.version}" for name, info in sorted(registry.plugins.items())}
