"""Everything prefkit shows on a terminal: progress bars, tables, messages (rich lives here only)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
out = Console()

PROGRESS_METRICS = [("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
                    ("accuracy", "acc"), ("reward/mean", "reward"), ("kl", "kl"), ("tokens_per_s", "tok/s")]


class RichReporter:
    """Shows a progress bar with the latest loss, accuracy, margin and throughput."""

    def __init__(self, console: Console = console):
        self.console = console
        self.progress: Progress | None = None
        self.task = None

    def message(self, text: str) -> None:
        self.console.print(f"[dim]prefkit[/dim] {text}", highlight=False)

    def start(self, total_steps: int, first_step: int, description: str = "train") -> None:
        self.finish()
        self.progress = Progress(
            TextColumn(f"[bold]{description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total_steps, completed=first_step, stats="")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        stats = "  ".join(
            f"{label} {metrics[name]:.4g}" if name != "tokens_per_s" else f"{label} {metrics[name]:.0f}"
            for name, label in PROGRESS_METRICS
            if name in metrics
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=stats)
        evaluated = {name[len("eval/"):]: value for name, value in metrics.items() if name.startswith("eval/")}
        if evaluated:  # evaluation results, when computed, as a line above the bar
            shown = "  ".join(f"{name} {value:.4g}" for name, value in evaluated.items()
                              if isinstance(value, (int, float)))
            self.console.print(f"[dim]prefkit[/dim] eval at step {step}: {escape(shown)}", highlight=False)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def printable(text: str) -> str:
    """``text`` with what a terminal cannot take (unpaired surrogates, NULs) written as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def error(text: str) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(printable(text))}", highlight=False, soft_wrap=True)


def warning(text: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(printable(text))}", highlight=False, soft_wrap=True)


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title)
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*(escape(str(cell)) for cell in row))
    out.print(t)


def summary(summary: dict) -> None:
    metrics = {k: v for k, v in summary.get("final_metrics", {}).items() if k != "tokens_per_s"}  # the run's own below
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in metrics.items()]
    rows += [["reference_cache", summary["reference_cache"]], ["steps", str(summary["steps"])],
             ["tokens_per_s", str(summary["tokens_per_s"])], ["wall_seconds", str(summary["wall_seconds"])]]
    table("run summary", ["metric", "value"], rows)


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
    try:
        from datasets.utils import logging as ds_logging

        ds_logging.set_verbosity_error()
        ds_logging.disable_progress_bar()
    except ImportError:
        pass
