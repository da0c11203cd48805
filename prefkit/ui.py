"""Everything prefkit shows on a terminal: progress bars, tables, messages (rich lives here only)."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Callable, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from prefkit.api.reporting import SilentReporter

console = Console(stderr=True)
out = Console()

PROGRESS_METRICS = [("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
                    ("accuracy", "acc"), ("reward/mean", "reward"), ("kl", "kl"), ("tokens_per_s", "tok/s")]

# How the CLI shows what a command does: "rich" (bars and tables), "quiet" (errors and the result
# line only) or "json" (one JSON object per event on stdout). Set by :func:`reporter_for`.
mode = "rich"


class RichReporter:
    """Shows a progress bar with the latest loss, accuracy, margin and throughput, evaluation results as
    lines above it, and the command's result as a table.

    Every reporter takes the same events (the loops' ``message``, ``start``, ``step``, ``finish`` and
    ``checkpoint``; the CLI's ``result``), so the three output modes show one stream of events."""

    def __init__(self, console: Console = console):
        self.console = console
        self.progress: Progress | None = None
        self.task = None
        self.shown: set[str] = set()

    def message(self, text: str) -> None:
        if text in self.shown:  # a compare's arms repeat the same data and cache notes: once is enough
            return
        self.shown.add(text)
        self.console.print(f"[dim]prefkit[/dim] {escape(printable(text))}", highlight=False)

    def start(self, total_steps: int, first_step: int, description: str = "train") -> None:
        self.finish()
        self.progress = Progress(
            TextColumn(f"[bold]{escape(description)}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("[dim]eta[/dim]"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total_steps, completed=first_step, stats="")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        stats = "  ".join(
            f"{label} {metrics[name]:.4g}" if name != "tokens_per_s" else f"{label} {metrics[name]:.0f}"
            for name, label in PROGRESS_METRICS
            if isinstance(metrics.get(name), (int, float))
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=stats)
        evaluated = {name[len("eval/"):]: value for name, value in metrics.items() if name.startswith("eval/")}
        if evaluated:  # evaluation results, when computed, as a line above the bar
            shown = "  ".join(f"{name} {value:.4g}" for name, value in evaluated.items()
                              if isinstance(value, (int, float)))
            self.console.print(f"[dim]prefkit[/dim] eval at step {step}: {escape(shown)}", highlight=False)

    def checkpoint(self, step: int, path: str) -> None:
        pass  # the bar says where training is; the folder is in the run summary

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def result(self, command: str, data: dict, *, line: str, show: Callable[[], None]) -> None:
        """The command's outcome: ``show()`` draws it (a table); the other modes use ``line`` / ``data``."""
        self.finish()
        show()


class QuietReporter(SilentReporter):
    """``--quiet``: no bars, no notes; errors (and warnings) on stderr, and one result line on stdout."""

    def result(self, command: str, data: dict, *, line: str, show: Callable[[], None]) -> None:
        out.print(printable(line), markup=False, highlight=False, soft_wrap=True)


class JsonReporter:
    """``--json``: one JSON object per line on stdout for every event, and nothing else there.

    Events: ``message`` (``text``), ``start`` (``task``, ``total``, ``first``), ``progress`` (``task``,
    ``done``, ``total``: a step of work that logs no metrics, e.g. a batch of reference log-probs),
    ``step`` (``step``, ``metrics``: the line written to metrics.jsonl without ``step`` and the
    ``eval/`` keys), ``eval`` (``step``, ``metrics``: the ``eval/`` keys), ``checkpoint`` (``step``,
    ``path``), ``end`` (``task``), ``warning`` and ``error`` (``text``), and last ``result``
    (``command`` and what the command produced: the run summary, the sample summary, ...). Every
    object has ``event`` and ``time`` (Unix seconds); non-finite numbers are written as null.
    """

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.task: tuple[str, int] | None = None

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        stream = self.stream or sys.stdout
        stream.write(json.dumps(_json_safe(record), ensure_ascii=False, default=str) + "\n")
        stream.flush()

    def message(self, text: str) -> None:
        self.emit("message", text=text)

    def start(self, total_steps: int, first_step: int, description: str = "train") -> None:
        self.finish()
        self.task = (description, total_steps)
        self.emit("start", task=description, total=total_steps, first=first_step)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        task, total = self.task or ("train", None)
        if not metrics:
            self.emit("progress", task=task, done=step, total=total)
            return
        logged = {k: v for k, v in metrics.items() if k != "step" and not k.startswith("eval/")}
        self.emit("step", task=task, step=step, metrics=logged)
        evaluated = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if evaluated:
            self.emit("eval", step=step, metrics=evaluated)

    def checkpoint(self, step: int, path: str) -> None:
        self.emit("checkpoint", step=step, path=str(path))

    def finish(self) -> None:
        if self.task is not None:
            self.emit("end", task=self.task[0])
            self.task = None

    def result(self, command: str, data: dict, *, line: str, show: Callable[[], None]) -> None:
        self.finish()
        self.emit("result", command=command, **data)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def reporter_for(quiet: bool = False, as_json: bool = False):
    """The reporter of a command's ``--quiet`` / ``--json`` choice; it also sets how errors show."""
    global mode
    if quiet and as_json:
        raise ValueError("--quiet and --json exclude each other")
    mode = "json" if as_json else "quiet" if quiet else "rich"
    return JsonReporter() if as_json else QuietReporter() if quiet else RichReporter()


def printable(text: str) -> str:
    """``text`` with what a terminal cannot take (unpaired surrogates, NULs) written as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def error(text: str) -> None:
    if mode == "json":
        JsonReporter().emit("error", text=text)
    console.print(f"[bold red]error:[/bold red] {escape(printable(text))}", highlight=False, soft_wrap=True)


def warning(text: str) -> None:
    if mode == "json":
        JsonReporter().emit("warning", text=text)
    console.print(f"[yellow]warning:[/yellow] {escape(printable(text))}", highlight=False, soft_wrap=True)


CHAT_PROMPT = "you> "


def note(text: str) -> None:
    """A line about what is happening (on stderr, so stdout keeps only results)."""
    console.print(f"[dim]prefkit[/dim] {escape(printable(text))}", highlight=False)


def _visible(text: str) -> str:
    """``text`` with control characters other than newline and tab written as escapes (a model's
    reply must not move the cursor or change the terminal's colours)."""
    return "".join(ch if ch in "\n\t" or (ord(ch) >= 32 and ord(ch) != 127) else f"\\x{ord(ch):02x}"
                   for ch in printable(text))


def chat_reply(text: str, interactive: bool) -> None:
    """A chat reply on stdout: after a coloured name in a terminal, as a plain line otherwise."""
    text = _visible(text)
    if interactive:
        out.print(f"[bold cyan]model>[/bold cyan] {escape(printable(text))}", highlight=False, soft_wrap=True)
    else:
        out.print(printable(text), markup=False, highlight=False, soft_wrap=True)


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title)
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*(escape(str(cell)) for cell in row))
    out.print(t)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SUMMARY_SKIP = {"step", "epoch", "tokens_per_s"}  # shown once, in the line under the table


def summary(summary: dict, run_dir: str) -> None:
    """A run's result: its last logged metrics beside the last evaluation's (one row per metric),
    then one line with the steps, time, throughput, reference cache and folder."""
    metrics = summary.get("final_metrics", {})
    evaluated = {k[len("eval/"):]: v for k, v in metrics.items() if k.startswith("eval/")}
    trained = {k: v for k, v in metrics.items() if not k.startswith("eval/") and k not in SUMMARY_SKIP}
    names = list(trained) + [k for k in evaluated if k not in trained]
    if evaluated:
        rows = [[k, _number(trained[k]) if k in trained else "", _number(evaluated[k]) if k in evaluated else ""]
                for k in names]
        table("run summary", ["metric", "train (last logged)", "eval"], rows)
    else:
        table("run summary", ["metric", "train (last logged)"], [[k, _number(trained[k])] for k in names])
    line = summary_line(summary, run_dir)
    head, folder = line.rsplit("; run directory ", 1)
    console.print(head, markup=False, highlight=False)
    console.print(f"run directory: {folder}", markup=False, highlight=False)


def summary_line(summary: dict, run_dir: str) -> str:
    """One line for a finished run (what ``--quiet`` prints)."""
    metrics = summary.get("final_metrics", {})
    parts = [f"{summary.get('objective', 'run')}: {summary['steps']} steps"]
    epoch = metrics.get("epoch")
    if isinstance(epoch, (int, float)):
        parts[0] += f" ({epoch:g} epochs)"
    shown = [f"{name} {_number(metrics[name])}" for name in ("loss", "eval/loss", "reward/mean", "kl")
             if isinstance(metrics.get(name), (int, float))]
    wall = summary.get("wall_seconds")
    speed = summary.get("tokens_per_s")
    tail = []
    if isinstance(wall, (int, float)):
        tail.append(f"{wall:.1f} s")
    if isinstance(speed, (int, float)):
        tail.append(f"{speed:,.0f} tokens/s")
    if summary.get("reference_cache") not in (None, "none"):
        tail.append(f"reference cache {summary['reference_cache']}")
    tail = [", ".join(tail)] if tail else []
    return "; ".join([", ".join(parts + shown), *tail, f"run directory {run_dir}"])


def quiet_libraries() -> None:
    """One terminal style: rich is prefkit's only output. transformers', datasets' and the hub's
    own tqdm bars ("Loading weights", "Writing model shards", "Converting ... GGUF tensors") and
    their informational logs and FutureWarnings are silenced; their errors still show.
    PREFKIT_LIBRARY_OUTPUT=1 keeps them (for debugging a library)."""
    import os
    import warnings

    if os.environ.get("PREFKIT_LIBRARY_OUTPUT") == "1":
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for module in ("transformers", "datasets", "accelerate", "huggingface_hub", "peft", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:  # the hub client's own warnings ("Retrying in 1s [Retry 1/5]" while offline)
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        from datasets.utils import logging as ds_logging

        ds_logging.set_verbosity_error()
        ds_logging.disable_progress_bar()
    except ImportError:
        pass
