"""The compare plots, drawn with matplotlib's Agg canvas (no display, no global backend change).

- ``frontier.png``: gold reward against KL(π‖π_ref), one marker style per objective, each point
  labelled with its arm; one panel per evaluation temperature. The DPO paper's reward-vs-KL frontier.
- ``winrate.png``: win rate against temperature, one line per arm, with the 0.5 line (a tie with
  the baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefkit.api.errors import PrefkitError

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
REFERENCE_STYLE = {"marker": "*", "color": "black"}


def _figure(width: float, height: float, ncols: int = 1):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency of the plots extra
        raise PrefkitError("the compare plots need matplotlib: pip install 'prefkit[plots]'") from None
    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, ncols, squeeze=False, sharey=True)[0]
    return figure, list(axes)


def _objective_styles(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    styles: dict[str, dict[str, Any]] = {}
    for row in rows:
        objective = row["objective"]
        if objective in styles:
            continue
        if objective == "reference":
            styles[objective] = dict(REFERENCE_STYLE)
        else:
            i = len([o for o in styles if o != "reference"])
            styles[objective] = {"marker": MARKERS[i % len(MARKERS)], "color": palette(i % 10)}
    return styles


def _temperatures(rows: list[dict[str, Any]]) -> list[float]:
    return sorted({float(r["temperature"]) for r in rows})


def _label_groups(rows: list[dict[str, Any]], tolerance: float = 0.02) -> list[tuple[tuple[float, float], list[str]]]:
    """Arms whose points (nearly) coincide share one label, so names do not print over each other."""
    xs = [r["kl"] for r in rows]
    ys = [r["gold_reward"] for r in rows]
    dx = (max(xs) - min(xs)) or 1.0
    dy = (max(ys) - min(ys)) or 1.0
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for r in rows:
        for (x, y), names in groups:
            if abs(r["kl"] - x) <= tolerance * dx and abs(r["gold_reward"] - y) <= tolerance * dy:
                names.append(r["arm"])
                break
        else:
            groups.append(((r["kl"], r["gold_reward"]), [r["arm"]]))
    return groups


def plot_frontier(rows: list[dict[str, Any]], path: Path | str) -> Path:
    """Gold reward (y) against KL (x), one marker per objective, labelled points; a panel per temperature."""
    path = Path(path)
    temperatures = _temperatures(rows)
    styles = _objective_styles(rows)
    figure, axes = _figure(4.8 * max(1, len(temperatures)) + 1.8, 4.4, max(1, len(temperatures)))
    for ax, temperature in zip(axes, temperatures):
        at = [r for r in rows if float(r["temperature"]) == temperature]
        for objective, style in styles.items():
            points = [r for r in at if r["objective"] == objective]
            if not points:
                continue
            reference = objective == "reference"
            ax.scatter([r["kl"] for r in points], [r["gold_reward"] for r in points], s=110 if reference else 70,
                       label=objective, marker=style["marker"], color=style["color"], edgecolors="black",
                       linewidths=0.5, zorder=5 if reference else 3)
            bound = [r for r in points if r["kl_method"] not in ("token_kl", None)]
            if bound:  # an analytic bound, not a measurement: ringed
                ax.scatter([r["kl"] for r in bound], [r["gold_reward"] for r in bound], s=190, marker="o",
                           facecolors="none", edgecolors=style["color"], linewidths=1.0, zorder=2)
        for (x, y), names in _label_groups(at):
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(6, 5), fontsize=7)
        ax.axvline(0.0, color="0.8", linewidth=0.8, zorder=1)
        ax.set_title(f"temperature {temperature:g}", fontsize=10)
        ax.set_xlabel("KL(π‖π_ref), nats per sequence")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.12, y=0.1)
    axes[0].set_ylabel("mean gold reward")
    handles, labels_seen = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels_seen:
                handles.append(handle)
                labels_seen.append(label)
    figure.legend(handles, labels_seen, loc="outside right center", title="objective", fontsize=8)
    figure.suptitle("Gold reward vs KL to the reference (ringed: best-of-N, whose KL is the analytic bound)",
                    fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


LINESTYLES = ["-", "--", ":", "-."]


def plot_winrate(rows: list[dict[str, Any]], path: Path | str) -> Path:
    """Win rate (y) against temperature (x): one line per arm, coloured and marked by objective."""
    path = Path(path)
    styles = _objective_styles(rows)
    figure, axes = _figure(7.8, 4.4)
    ax = axes[0]
    arms: list[tuple[str, str]] = []
    for row in rows:
        if (row["arm"], row["objective"]) not in arms:
            arms.append((row["arm"], row["objective"]))
    within: dict[str, int] = {}
    for arm, objective in arms:
        points = sorted((r for r in rows if r["arm"] == arm), key=lambda r: float(r["temperature"]))
        style = styles[objective]
        k = within[objective] = within.get(objective, -1) + 1
        reference = objective == "reference"
        ax.plot([float(r["temperature"]) for r in points], [r["win_rate"] for r in points], label=arm,
                marker=style["marker"], color=style["color"], linestyle=LINESTYLES[k % len(LINESTYLES)],
                linewidth=1.0 if reference else 1.5, markersize=9 if reference else 6,
                markerfacecolor=style["color"] if k % 2 == 0 else "white", zorder=5 if reference else 3)
    ax.axhline(0.5, color="0.6", linewidth=0.8, linestyle=":", zorder=1)
    against = rows[0]["win_against"] if rows else "reference"
    baseline = "the reference policy's samples" if against == "reference" else "the chosen answers"
    ax.set_title(f"Win rate against {baseline} (judge: ties count 1/2)", fontsize=10)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate")
    temperatures = _temperatures(rows)
    ax.set_xticks(temperatures)
    if len(temperatures) == 1:
        ax.set_xlim(temperatures[0] - 0.5, temperatures[0] + 0.5)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
    figure.legend(loc="outside right center", fontsize=8, title="arm")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
