"""The report's figures, drawn with matplotlib (Agg, no display needed):

* ``report.png``: bar charts, one row of panels per data set, one panel per score, one bar per
  setting (the mean, with a whisker of +- the std over seeds when the row has several);
* ``report_clients.png``: per run, the client x class heat map of per-class FID (test) of each
  client's local model, with the global model as the last row, and a colour bar;
* ``<run>_curves.png``: one run's metrics.jsonl against the round: loss, the scores of the
  evaluated rounds, epsilon, bytes per round and the wait for the slowest rank; a panel only
  for what the records have (and is not zero throughout, as wait_s of one process).
* ``<run>_staleness.png``: a FedBuff run's (fedrun/federated/fedbuff.py) histogram of how many
  server steps stale its used updates were, over the whole run, with the mean and the wasted work.

Figures are built on ``matplotlib.figure.Figure`` directly, not pyplot: no global state, no
backend to pick, nothing kept alive between calls.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .runs import Run, dataset_title, series
from .table import SCORES, Table, client_rows, columns

DPI = 110
BETTER = {"is_mean": "↑", "fid_train": "↓", "fid_test": "↓", "class_acc": "↑"}  # shown in titles


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # attaches itself to the figure: PNG through Agg, whatever the backend
    fig.savefig(path, dpi=DPI, facecolor="white")


def _colours(n: int) -> list[Any]:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)] if n <= 20 else \
        [colormaps["hsv"](i / n) for i in range(n)]


def _fmt_value(key: str, value: float) -> str:
    return f"{value:.3f}" if key == "class_acc" else f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


# --------------------------------------------------------------------------------------------
# report.png


def png_panels(table: Table) -> list[tuple[str, str]]:
    """The scores drawn: the paper's, and class accuracy when some run has it."""
    return list(SCORES) + [(k, n) for k, n in columns(table) if k == "class_acc"]


def bar_figure(table: Table) -> Figure:
    """Horizontal bars: settings on the y axis (named once per row of panels), scores on x."""
    panels = png_panels(table)
    labels = table.labels
    seeds = [max((len(table.runs_of(label, d)) for d in table.datasets), default=1) for label in labels]
    names = [label + (f"  (n={n})" if n > 1 else "") for label, n in zip(labels, seeds, strict=True)]
    label_w = 0.5 + 0.068 * max(len(n) for n in names)  # inches for the y tick labels
    width = label_w + 3.1 * len(panels)
    height = len(table.datasets) * (1.3 + 0.32 * len(labels))
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(len(table.datasets), len(panels), squeeze=False, sharey="row")
    colours = _colours(len(labels))
    y = np.arange(len(labels))
    for row, dataset in enumerate(table.datasets):
        for col, (key, name) in enumerate(panels):
            ax = axes[row][col]
            stats = [table.stats(label, dataset, key) for label in labels]
            means = np.array([m if m is not None else 0.0 for m, _, _ in stats])
            stds = np.array([s or 0.0 for _, s, _ in stats])
            has = [m is not None for m, _, _ in stats]
            ax.barh(y, np.where(has, means, 0.0), color=colours, height=0.7)
            if stds.any():  # whiskers only where a row has several seeds
                idx = [i for i, (m, s, _) in enumerate(stats) if m is not None and s]
                ax.errorbar(means[idx], y[idx], xerr=stds[idx], fmt="none", ecolor="black",
                            elinewidth=1.2, capsize=4)
            peak = max([m + s for (m, _, _), s in zip(stats, stds, strict=True) if m is not None] + [1e-9])
            ax.set_xlim(0, peak * 1.3)
            for i, (m, s, _) in enumerate(stats):
                if m is None:
                    ax.text(peak * 0.02, i, "n/a", va="center", ha="left", color="grey", fontsize=8)
                    continue
                text = _fmt_value(key, m) + (f" ± {_fmt_value(key, s)}" if s else "")
                ax.text(max(m, 0.0) + (s or 0.0) + peak * 0.02, i, text, va="center", ha="left", fontsize=8)
            ax.set_title(f"{dataset_title(dataset)}: {name} {BETTER.get(key, '')}".rstrip(), fontsize=10)
            ax.grid(axis="x", alpha=0.3)
            ax.set_axisbelow(True)
            ax.tick_params(labelsize=8)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
        axes[row][0].set_yticks(y, names)
        axes[row][0].invert_yaxis()  # first row of the table at the top
    if any(n > 1 for n in seeds):
        fig.suptitle("bars: mean over seeds; whiskers: ± std over seeds", fontsize=9, color="dimgrey")
    return fig


def write_png(table: Table, path: Path) -> None:
    _save(bar_figure(table), path)


# --------------------------------------------------------------------------------------------
# report_clients.png


def heatmap_panels(runs: list[Run]) -> list[tuple[str, list[tuple[str, list[float | None]]]]]:
    """(title, rows) per run with per-class scores: a row per client (its local model right after
    local training), the global model last."""
    panels = []
    for run in runs:
        last, rows = client_rows(run)
        grid = [(f"client {r['client']}", list(r["per_class_fid_test"]))
                for r in rows if r["per_class_fid_test"]]
        if run.scores.get("per_class"):
            grid.append(("global model", list(run.scores["per_class"]["fid_test"])))
        if grid:
            where = (f"local models after round {last}, global model last" if last is not None
                     else "global model")
            title = f"{run.title} / {dataset_title(run.dataset)}\nper-class FID (test): {where}"
            panels.append((title, grid))
    return panels


def heatmap_figure(runs: list[Run]) -> Figure | None:
    """One panel per run with per-class scores; None when no run has any."""
    panels = heatmap_panels(runs)
    if not panels:
        return None
    classes = max(len(values) for _, grid in panels for _, values in grid)
    heights = [len(grid) for _, grid in panels]
    width = 2.3 + 0.55 * classes + 1.0
    fig = Figure(figsize=(max(width, 6.0), sum(0.42 * h + 1.8 for h in heights)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=[h + 2.5 for h in heights])
    # green = low FID (close to the test images of that class); grey = no score
    cmap = colormaps["RdYlGn_r"].with_extremes(bad="#dddddd")
    for ax, (title, grid) in zip(axes[:, 0], panels, strict=True):
        data = np.full((len(grid), classes), np.nan)
        for i, (_, values) in enumerate(grid):
            for c, v in enumerate(values):
                if v is not None and math.isfinite(v):
                    data[i, c] = v
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=lo, vmax=max(hi, lo + 1e-9), aspect="auto")
        for i in range(len(grid)):
            for c in range(classes):
                v = data[i, c]
                text = "–" if not math.isfinite(v) else f"{v:.0f}" if v >= 100 else f"{v:.1f}"
                t = 0.5 if not math.isfinite(v) or hi <= lo else (v - lo) / (hi - lo)
                ax.text(c, i, text, ha="center", va="center", fontsize=8,
                        color="white" if t > 0.85 or t < 0.15 else "black")
        ax.set_xticks(range(classes), [str(c) for c in range(classes)])
        ax.set_yticks(range(len(grid)), [name for name, _ in grid])
        ax.set_xlabel("class")
        ax.tick_params(labelsize=8, length=0)
        if grid[-1][0] == "global model" and len(grid) > 1:
            ax.axhline(len(grid) - 1.5, color="black", linewidth=1.5)  # the global row apart
        ax.set_title(title, fontsize=9)
        bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        bar.set_label("FID (lower is better)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig


def write_heatmap(runs: list[Run], path: Path) -> bool:
    """report_clients.png; False (nothing written) when no run has per-class scores."""
    fig = heatmap_figure(runs)
    if fig is None:
        return False
    _save(fig, path)
    return True


# --------------------------------------------------------------------------------------------
# <run>_curves.png


BYTES = ("allreduce_bytes", "bytes_up", "bytes_down", "bytes_up_total")
# (panel title, y label, [(record key, legend name)]): a panel is drawn when any key has values
CURVES: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("training loss", "loss", (("loss", "loss"),)),
    ("FID ↓ (evaluated rounds)", "FID", (("scores.fid_test", "test"), ("scores.fid_train", "train"))),
    ("class accuracy ↑ (evaluated rounds)", "accuracy", (("scores.class_acc", "class acc"),)),
    ("privacy spent", "epsilon", (("epsilon", "epsilon"),)),
    ("bytes per round", "MB", tuple((k, k) for k in BYTES)),
    ("wait for the slowest rank", "seconds", (("wait_s", "wait_s"),)),
)


def curves_figure(run: Run, records: list[dict[str, Any]]) -> Figure | None:
    """A panel per quantity of ``records`` that has values; None when there is none."""
    panels = []
    for title, ylabel, keys in CURVES:
        lines = [(name, *series(records, key)) for key, name in keys]
        # a quantity that is zero throughout says nothing (wait_s of a single process)
        lines = [(name, xs, ys) for name, xs, ys in lines if xs and any(ys)]
        if lines:
            scale = 1e-6 if ylabel == "MB" else 1.0
            panels.append((title, ylabel, [(n, xs, [v * scale for v in ys]) for n, xs, ys in lines]))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.8 * cols, 2.7 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    # a centralized run's "round" is E epochs (its records say how many so far)
    per_round = next((r["epochs"] // int(r["round"]) for r in records
                      if isinstance(r.get("epochs"), int) and int(r["round"]) > 0), None)
    xlabel = f"round ({per_round} epoch{'s' if per_round > 1 else ''} each)" if per_round else "round"
    first, last = int(records[0]["round"]), int(records[-1]["round"])
    pad = max(0.5, 0.03 * (last - first))  # every panel spans the whole run: scores sit in context
    for ax, (title, ylabel, lines) in zip(axes.flat, panels, strict=False):
        for (name, xs, ys), style in zip(lines, ("-", "--", ":", "-."), strict=False):
            # dashes and dots keep lines that coincide (bytes up = bytes down) apart
            ax.plot(xs, ys, linestyle=style, marker="o" if len(xs) <= 30 else None, markersize=3.5,
                    linewidth=1.4, label=name)
        positive = [v for _, _, ys in lines for v in ys if v > 0]
        if ylabel in ("loss", "MB") and positive and max(positive) / min(positive) > 20:
            ax.set_yscale("log")  # a loss falling by orders of magnitude; bytes of unlike kinds
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
        ax.set_xlim(first - pad, last + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{run.path.name}: {run.title or run.flat.get('run.mode', '')}", fontsize=11)
    return fig


def _save_some(fig: Figure | None, path: Path) -> bool:
    """Save ``fig`` to ``path``; False (nothing written) when there is no figure."""
    if fig is None:
        return False
    _save(fig, path)
    return True


def write_curves(run: Run, records: list[dict[str, Any]], path: Path) -> bool:
    """``path`` from one run's metrics records; False (nothing written) without records."""
    return _save_some(curves_figure(run, records), path)


# <run>_staleness.png


def staleness_figure(run: Run, records: list[dict[str, Any]]) -> Figure | None:
    """The histogram of the used updates' staleness (FedBuff's records); None without any."""
    counts: dict[int, int] = {}
    for rec in records:
        for tau in rec.get("staleness", ()):
            counts[int(tau)] = counts.get(int(tau), 0) + 1
    if not counts:
        return None
    taus = list(range(max(counts) + 1))
    heights = [counts.get(t, 0) for t in taus]
    total = sum(heights)
    mean = sum(t * n for t, n in zip(taus, heights, strict=True)) / total
    last = records[-1]
    fig = Figure(figsize=(5.5, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.bar(taus, heights, width=0.85, color=_colours(1)[0])
    ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.2f}")
    ax.set_xlabel("staleness (server steps between a client's start and its update's use)", fontsize=8)
    ax.set_ylabel("updates", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    wasted = last.get("wasted_total")
    waste = f", {wasted} wasted (offline, late, too stale)" if wasted is not None else ""
    ax.set_title(f"{run.path.name}: {total} updates used{waste}", fontsize=9)
    return fig


def write_staleness(run: Run, records: list[dict[str, Any]], path: Path) -> bool:
    """``path``: the staleness histogram; False (nothing written) for a run without staleness."""
    return _save_some(staleness_figure(run, records), path)
