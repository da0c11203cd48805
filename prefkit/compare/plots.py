"""The compare plots, drawn with matplotlib's Agg canvas (no display, no global backend change).

Both read the rows over seeds (``aggregate.jsonl``) and draw every interval as an error bar.

- ``frontier.png``: gold reward against KL(π‖π_ref), one panel per evaluation temperature. Each
  trained arm is a curve over its training: from the starting policy (the black star) through
  its evaluated checkpoints (small markers) to its final step (a large marker). Best-of-N arms
  that differ only in N are one dashed curve over N (their KL is the analytic bound, so they
  have no horizontal bar). When best-of-N reaches more than three times the trained arms' largest
  KL, a second row shows the trained arms alone, closer. With ``evaluation.panels`` the arms are
  split into panels side by side instead, each with one message. The DPO paper's Fig. 2.
- ``winrate.png``: each arm's win rate at its final step against the baseline, one panel per
  temperature, arms top to bottom; a filled marker when its interval excludes ½, hollow when
  the arm is within noise of a tie.

Colours belong to arms (the same in both plots) and are named in one legend; nothing is written
on the data, so no label can cover another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefkit.api.errors import PrefkitError

REFERENCE = "reference"
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*"]


def _grid(width: float, height: float, nrows: int = 1, ncols: int = 1, *, sharey: bool | str = False,
          sharex: bool | str = False):
    """A figure on matplotlib's Agg canvas (no display, no global backend) and its nrows x ncols axes
    (``sharex``/``sharey``: as matplotlib's ``subplots``, e.g. ``"col"``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a core dependency, but may be uninstalled
        raise PrefkitError("the compare plots need matplotlib: pip install matplotlib") from None
    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(nrows, ncols, squeeze=False, sharey=sharey, sharex=sharex)


def _figure(width: float, height: float, ncols: int = 1, *, sharey: bool = True, sharex: bool = False):
    figure, grid = _grid(width, height, 1, ncols, sharey=sharey, sharex=sharex)
    return figure, list(grid[0])


def _temperatures(rows: list[dict[str, Any]]) -> list[float]:
    return sorted({float(r["temperature"]) for r in rows})


def _is_inference(row: dict[str, Any]) -> bool:
    return row["kl_method"] not in ("token_kl", None) and row["arm"] != REFERENCE


def families(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Inference arms (best-of-N) that differ only in N, as ``{label: [arms, by N]}``."""
    groups: dict[str, list[tuple[int, str]]] = {}
    labels: dict[str, str] = {}
    for row in rows:
        if not _is_inference(row):
            continue
        rest = {k: v for k, v in (row["params"] or {}).items() if k != "n"}
        key = json.dumps([row["objective"], row["reward"], rest], sort_keys=True)
        if all(arm != row["arm"] for _, arm in groups.get(key, [])):
            groups.setdefault(key, []).append((int(row.get("samples_per_output") or 1), row["arm"]))
        labels.setdefault(key, row["objective"].replace("_", "-"))
    out: dict[str, list[str]] = {}
    for key, members in groups.items():
        members.sort()
        label = f"{labels[key]} (N = {', '.join(str(n) for n, _ in members)})"
        if row_reward := json.loads(key)[1]:
            label += f", {row_reward}"
        out[label] = [arm for _, arm in members]
    return out


def arm_styles(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A colour and marker per trained arm and per best-of-N family (keyed by the family's label)."""
    from matplotlib import colormaps

    names: list[str] = []
    for row in rows:
        if row["arm"] != REFERENCE and not _is_inference(row) and row["arm"] not in names:
            names.append(row["arm"])
    names += list(families(rows))
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: {"color": palette(i % palette.N), "marker": MARKERS[i % len(MARKERS)]}
            for i, name in enumerate(names)}


def _errors(points: list[dict[str, Any]], key: str) -> list[list[float]]:
    return [[max(0.0, p[key] - p[f"{key}_lo"]) for p in points], [max(0.0, p[f"{key}_hi"] - p[key]) for p in points]]


ZOOM = 3.0  # a zoomed row on the trained arms when the whole plot's KL range is this many times theirs


def _frontier_panel(ax, at: list[dict[str, Any]], styles: dict[str, dict[str, Any]], groups: dict[str, list[str]],
                    handles: dict[str, Any], *, trained_only: bool = False) -> None:
    """One temperature's curves on ``ax``; the legend's handles are collected in ``handles``."""
    from matplotlib.lines import Line2D

    start = [r for r in at if r["arm"] == REFERENCE]
    for name, style in styles.items():
        if name in groups:  # a best-of-N family: one dashed curve over N
            if trained_only:
                continue
            points = [r for arm in groups[name] for r in at if r["arm"] == arm]
            linestyle, face = "--", "white"
        else:
            points = sorted((r for r in at if r["arm"] == name), key=lambda r: r["step"])
            linestyle, face = "-", style["color"]
        if not points:
            continue
        curve = (start if name not in groups else []) + points
        ax.plot([p["kl"] for p in curve], [p["gold_reward"] for p in curve], linestyle=linestyle,
                color=style["color"], linewidth=1.4, alpha=0.9, zorder=3)
        small = [p for p in points if not p["final"]]
        big = [p for p in points if p["final"]]
        for part, alpha, width in ((small, 0.3, 0.8), (big, 0.75, 1.2)):  # the final step's bars stand out
            if part:
                ax.errorbar([p["kl"] for p in part], [p["gold_reward"] for p in part],
                            xerr=_errors(part, "kl"), yerr=_errors(part, "gold_reward"), fmt="none",
                            ecolor=style["color"], elinewidth=width, capsize=2.5, alpha=alpha, zorder=2)
        ax.scatter([p["kl"] for p in small], [p["gold_reward"] for p in small], s=18, marker=style["marker"],
                   color=style["color"], zorder=4)
        ax.scatter([p["kl"] for p in big], [p["gold_reward"] for p in big], s=64, marker=style["marker"],
                   facecolors=face, edgecolors=style["color"] if face == "white" else "black",
                   linewidths=1.0, zorder=5)
        handles.setdefault(name, Line2D([], [], color=style["color"], linestyle=linestyle, marker=style["marker"],
                                        markerfacecolor=face, markeredgecolor=style["color"], markersize=7))
    if start:
        ref = start[0]
        ax.errorbar([ref["kl"]], [ref["gold_reward"]], yerr=_errors([ref], "gold_reward"), fmt="none",
                    ecolor="black", elinewidth=0.9, capsize=3, zorder=6)
        ax.scatter([ref["kl"]], [ref["gold_reward"]], s=150, marker="*", color="black", zorder=7)
        handles.setdefault(REFERENCE, Line2D([], [], color="black", marker="*", linestyle="none", markersize=11))
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.06, y=0.08)


def plot_frontier(rows: list[dict[str, Any]], path: Path | str,
                  panels: list[tuple[str, list[str]]] | None = None) -> Path:
    """Gold reward (y) against KL (x) with bootstrap error bars, a curve per arm over its training,
    a panel per temperature (rows over seeds: ``aggregate.jsonl``). When best-of-N's KL reaches
    far past the trained arms' (more than ``ZOOM`` times), a second row shows the trained arms alone.

    With ``panels`` (``(title, arm names)``, from ``evaluation.panels``) each temperature is a row of
    panels instead, one per group of arms, each with the starting policy; an arm keeps its colour
    in every panel."""
    path = Path(path)
    temperatures = _temperatures(rows)
    styles = arm_styles(rows)
    groups = families(rows)
    if panels:
        return _paneled_frontier(rows, path, panels, temperatures, styles, groups)
    trained = [r for r in rows if r["arm"] != REFERENCE and not _is_inference(r)]
    widest = max((r["kl_hi"] for r in rows), default=0.0)
    trained_widest = max((r["kl_hi"] for r in trained), default=0.0)
    zoom = bool(trained) and trained_widest > 0 and widest > ZOOM * trained_widest
    ncols = max(1, len(temperatures))
    figure, grid = _grid(4.6 * ncols + 2.6, 4.6 * (2 if zoom else 1), 2 if zoom else 1, ncols)
    handles: dict[str, Any] = {}
    for col, temperature in enumerate(temperatures):
        at = [r for r in rows if float(r["temperature"]) == temperature]
        ax = grid[0][col]
        _frontier_panel(ax, at, styles, groups, handles)
        ax.set_title(f"temperature {temperature:g}", fontsize=10)
        if zoom:
            close = grid[1][col]
            _frontier_panel(close, at, styles, groups, handles, trained_only=True)
            close.set_title(f"temperature {temperature:g}: the trained arms, closer", fontsize=10)
            close.set_xlabel("KL(π‖π_ref), nats per sequence")
        else:
            ax.set_xlabel("KL(π‖π_ref), nats per sequence")
    for row in grid:
        row[0].set_ylabel("mean gold reward")
        for ax in row[1:]:
            ax.sharey(row[0])
            ax.tick_params(labelleft=False)
    _finish_frontier(figure, styles, handles, path)
    return path


def _finish_frontier(figure: Any, styles: dict[str, dict[str, Any]], handles: dict[str, Any], path: Path) -> None:
    order = [REFERENCE] + [name for name in styles if name in handles]
    labels = ["reference (start)" if name == REFERENCE else name for name in order if name in handles]
    figure.legend([handles[name] for name in order if name in handles], labels, loc="outside right center",
                  fontsize=8, title="arm", title_fontsize=9)
    figure.suptitle("Gold reward vs KL over training (curves: start → checkpoints → final, large marker); "
                    "bars: bootstrap intervals", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def _paneled_frontier(rows: list[dict[str, Any]], path: Path, panels: list[tuple[str, list[str]]],
                      temperatures: list[float], styles: dict[str, dict[str, Any]],
                      groups: dict[str, list[str]]) -> Path:
    nrows = max(1, len(temperatures))
    # gold reward on one scale; KL per panel, so that one far-reaching arm does not squeeze the others
    figure, grid = _grid(4.4 * len(panels) + 2.6, 4.4 * nrows, nrows, len(panels), sharex="col", sharey=True)
    handles: dict[str, Any] = {}
    for r, temperature in enumerate(temperatures):
        for c, (title, arms) in enumerate(panels):
            keep = set(arms) | {REFERENCE}
            at = [row for row in rows if float(row["temperature"]) == temperature and row["arm"] in keep]
            ax = grid[r][c]
            _frontier_panel(ax, at, styles, groups, handles)
            ax.set_title(title if len(temperatures) == 1 else f"{title}, temperature {temperature:g}", fontsize=10)
            if r == nrows - 1:
                ax.set_xlabel("KL(π‖π_ref), nats per sequence")
            if c == 0:
                ax.set_ylabel("mean gold reward")
            else:
                ax.tick_params(labelleft=False)
    _finish_frontier(figure, styles, handles, path)
    return path


def plot_winrate(rows: list[dict[str, Any]], path: Path | str) -> Path:
    """Each arm's win rate at its final step with its interval, a panel per temperature
    (rows over seeds: ``aggregate.jsonl``); hollow markers: the interval covers ½."""
    path = Path(path)
    temperatures = _temperatures(rows)
    styles = arm_styles(rows)
    groups = families(rows)
    family_of = {arm: label for label, arms in groups.items() for arm in arms}
    against = rows[0]["win_against"] if rows else "reference"
    arms: list[str] = []
    for row in rows:
        if row["arm"] not in arms and not (row["arm"] == REFERENCE and against == "reference"):
            arms.append(row["arm"])
    figure, axes = _figure(3.6 * max(1, len(temperatures)) + 1.6, 0.9 + 0.32 * max(len(arms), 3),
                           max(1, len(temperatures)), sharey=True, sharex=True)
    for ax, temperature in zip(axes, temperatures):
        for y, arm in enumerate(arms):
            finals = [r for r in rows if r["arm"] == arm and float(r["temperature"]) == temperature and r["final"]]
            if not finals:
                continue
            point = max(finals, key=lambda r: r["step"])
            style = styles.get(family_of.get(arm, arm), {"color": "black", "marker": "*"})
            covers = point["win_rate_lo"] <= 0.5 <= point["win_rate_hi"]
            ax.errorbar([point["win_rate"]], [y], xerr=_errors([point], "win_rate"), fmt="none",
                        ecolor=style["color"], elinewidth=1.2, capsize=3, zorder=2)
            ax.scatter([point["win_rate"]], [y], s=46, marker=style["marker"], edgecolors=style["color"],
                       facecolors="white" if covers else style["color"], linewidths=1.3, zorder=3)
        ax.axvline(0.5, color="0.5", linewidth=0.9, linestyle=":", zorder=1)
        ax.set_title(f"temperature {temperature:g}", fontsize=10)
        ax.set_xlabel("win rate at the final step")
        ax.set_xlim(-0.03, 1.03)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(arms)))
    axes[0].set_yticklabels(arms, fontsize=8)
    axes[0].set_ylim(len(arms) - 0.5, -0.5)  # the recipe's order, top to bottom
    baseline = "the reference policy's samples" if against == "reference" else "the chosen answers"
    figure.suptitle(f"Win rate against {baseline} (ties ½)\nbars: bootstrap intervals; "
                    "hollow: within noise of ½", fontsize=9)  # two lines: one panel is narrow
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
