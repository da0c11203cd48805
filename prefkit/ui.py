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
    metrics = summary.get("final_metrics", {})
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in metrics.items()]
    rows += [["reference_cache", summary["reference_cache"]], ["steps", str(summary["steps"])],
             ["tokens_per_s", str(summary["tokens_per_s"])], ["wall_seconds", str(summary["wall_seconds"])]]
    table("run summary", ["metric", "value"], rows)
