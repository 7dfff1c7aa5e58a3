"""``fedrun report RUN_DIR... [--out DIR]``: one results table over finished runs.

Reads ``<run>/summary.json`` of every run, labels each run by the config settings that differ
between runs of the same data set, and writes, in the paper's layout (rows = settings, columns =
IS / FID(train) / FID(test) grouped per data set)::

    <out>/report.md    markdown table, IS as "mean ± std", plus which run fed each row
    <out>/report.csv   the same table, raw numbers, one column per (data set, score)
    <out>/report.png   bar charts: one row of panels per data set, one panel per score

``--out`` defaults to the common parent folder of the run dirs (e.g. ``runs/``).

summary.json schema (keys the report reads; anything else is ignored)::

    {
      "config": {"run": {...}, "data": {...}, "model": {...}, "diffusion": {...}, "fed": {...},
                 "optim": {...}, "train": {...}, "checkpoint": {...}, "sample": {...},
                 "eval": {...}},           # Config.to_dict() of the resolved config (required)
      "scores": {                          # {} or null when the run was not scored
        "is_mean": float, "is_std": float, # Inception Score over 10 splits
        "fid_train": float,                # FD to the whole train split
        "fid_test": float,                 # FD to the whole test split
        "extractor": "inception" | "classifier",
        "num_samples": int, "class_acc": float | null   # optional
      }
    }

i.e. ``fedrun.metrics.Scorer.score``'s dict goes under "scores" unchanged.

How runs are labelled: a config key becomes part of the label when its value differs between
two runs of the same data set (bookkeeping keys such as run.name, paths, checkpoint and
sampling settings never do). Keys that do not apply to a run are left out of its label: the
federated settings of a centralized run (except fed.rounds / fed.local_epochs, which set its
epochs), fed.alpha of an IID partition. "run.mode=fedavg" is dropped when a fed.* setting
already says so. Runs of different data sets with the same label share a row.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .grids import class_colours

SCORES = (("is_mean", "IS"), ("fid_train", "FID (train)"), ("fid_test", "FID (test)"))
# In report.md and report.csv when some run has them (older runs do not).
EXTRA_SCORES = (("kid_test", "KID x1e3 (test)"), ("precision", "precision"), ("recall", "recall"),
                ("density", "density"), ("coverage", "coverage"))
KID_SCALE = 1e3  # KID is printed x1e3, as in the KID literature; the CSV keeps raw values

# Never labels: they name, place or schedule a run without changing its model.
IGNORED = {
    "run.name", "run.out_dir", "run.device", "run.threads",
    "data.root", "data.download", "train.compile", "train.channels_last",
    "eval.every", "eval.enabled", "eval.batch_size", "eval.cache_dir", "eval.inception_weights",
    "eval.local_models_at", "eval.per_class", "eval.client_samples",
}
IGNORED_SECTIONS = ("checkpoint", "sample")
CENTRALIZED_FED_KEYS = {"fed.rounds", "fed.local_epochs"}

# Column order and titles of the paper; other data sets follow in order of appearance.
DATASET_TITLES = {"cifar10": "CIFAR-10", "fashion_mnist": "Fashion-MNIST", "svhn": "SVHN",
                  "image_folder": "CT scans", "digits": "digits", "synthetic": "synthetic"}


class ReportError(RuntimeError):
    """A run dir cannot be reported on. The message names the file and the fix."""


@dataclass
class Run:
    path: Path
    flat: dict[str, Any]  # "section.key" -> value (lists as tuples)
    scores: dict[str, Any]
    dataset: str  # column group
    client_scores: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # round -> rows
    label: str = ""
    parts: list[tuple[str, Any]] = field(default_factory=list)


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": tuple(v) if isinstance(v, list) else v
            for section, body in config.items() if isinstance(body, dict) for key, v in body.items()}


def dataset_of(flat: dict[str, Any]) -> str:
    name = str(flat.get("data.name", "?"))
    if name == "image_folder":  # several folders may be compared: name them by their folder
        root = Path(str(flat.get("data.root", ""))).name
        return f"{name}:{root}" if root else name
    return name


def dataset_title(dataset: str) -> str:
    name, _, root = dataset.partition(":")
    return root if root else DATASET_TITLES.get(name, name)


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    summary = path / "summary.json"
    if not summary.is_file():
        raise ReportError(f"{summary}: not found; a run writes it when it finishes (is {path} a run dir?)")
    try:
        data = json.loads(summary.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{summary}: not valid JSON ({exc})") from None
    if not isinstance(data.get("config"), dict):
        raise ReportError(f"{summary}: has no 'config' table; it was not written by fedrun train")
    flat = flatten(data["config"])
    return Run(path, flat, dict(data.get("scores") or {}), dataset_of(flat),
               client_scores=dict(data.get("client_scores") or {}))


# --------------------------------------------------------------------------------------------
# Labels


def _applies(key: str, flat: dict[str, Any]) -> bool:
    if key.startswith("fed.") and flat.get("run.mode") == "centralized":
        return key in CENTRALIZED_FED_KEYS
    if key in ("fed.alpha", "fed.min_client_size", "fed.max_resample"):
        return flat.get("fed.partition") != "iid"
    if key == "fed.server_momentum":
        return flat.get("fed.server_opt") != "fedavg"
    return True


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # 1.0 stays "1.0": the key is a float
    if isinstance(value, tuple):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def label_runs(runs: list[Run]) -> list[str]:
    """Set ``run.label`` from the settings that vary within a data set; returns the keys used."""
    order = list(runs[0].flat)
    keys = [k for r in runs for k in r.flat if k not in order]
    order += list(dict.fromkeys(keys))
    usable = [k for k in order if k not in IGNORED and k.split(".")[0] not in IGNORED_SECTIONS
              and k != "data.name"]  # the data set is the column group

    def varies(key: str, group: list[Run]) -> bool:
        return len({r.flat.get(key) for r in group}) > 1

    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.dataset, []).append(r)
    label_keys = [k for k in usable if any(varies(k, g) for g in groups.values())]
    if not label_keys:  # one run per data set: what differs apart from the data, else the mode
        label_keys = [k for k in usable if varies(k, runs) and not k.startswith("data.")] or ["run.mode"]
    # run.* first (mode, seed), then the sections in config order
    label_keys.sort(key=lambda k: (not k.startswith("run."), order.index(k)))

    for r in runs:
        r.parts = [(k, r.flat.get(k)) for k in label_keys if _applies(k, r.flat)]
        if any(k.startswith("fed.") for k, _ in r.parts):
            r.parts = [(k, v) for k, v in r.parts if not (k == "run.mode" and v == "fedavg")]
        r.label = ", ".join(f"{k}={_fmt(v)}" for k, v in r.parts) or "default"
    seen: dict[tuple[str, str], int] = {}
    for r in runs:
        seen[(r.dataset, r.label)] = seen.get((r.dataset, r.label), 0) + 1
    for r in runs:  # two runs would fill one cell: tell them apart by their folder
        if seen[(r.dataset, r.label)] > 1:
            r.label = f"{r.label} ({r.path.name})"
    return label_keys


# --------------------------------------------------------------------------------------------
# The table


@dataclass
class Table:
    datasets: list[str]
    labels: list[str]
    cells: dict[tuple[str, str], Run]  # (label, dataset) -> run
    label_keys: list[str]

    def score(self, label: str, dataset: str, key: str) -> float | None:
        run = self.cells.get((label, dataset))
        value = run.scores.get(key) if run is not None else None
        return float(value) if isinstance(value, (int, float)) else None


def build_table(runs: list[Run]) -> Table:
    label_keys = label_runs(runs)
    datasets = list(dict.fromkeys(r.dataset for r in runs))
    paper = list(DATASET_TITLES)
    datasets.sort(key=lambda d: paper.index(d.split(":")[0]) if d.split(":")[0] in paper else len(paper))

    def sort_key(r: Run) -> tuple:  # e.g. centralized first, then alpha ascending
        def one(key: str) -> tuple:
            v = r.flat.get(key)
            if not _applies(key, r.flat):
                return (-1, "")
            return (1, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (0, str(v))
        return tuple(one(k) for k in label_keys)

    labels = list(dict.fromkeys(r.label for r in sorted(runs, key=sort_key)))
    return Table(datasets, labels, {(r.label, r.dataset): r for r in runs}, label_keys)


def _cell(table: Table, label: str, dataset: str, key: str) -> str:
    value = table.score(label, dataset, key)
    if value is None:
        return "–"
    if key == "is_mean":
        std = table.score(label, dataset, "is_std")
        return f"{value:.2f} ± {std:.2f}" if std is not None else f"{value:.2f}"
    if key == "kid_test":
        return f"{value * KID_SCALE:.2f}"
    if key in ("precision", "recall", "density", "coverage"):
        return f"{value:.3f}"
    return f"{value:.2f}"


def columns(table: Table) -> list[tuple[str, str]]:
    """The paper's scores, then those of EXTRA_SCORES that some run has."""
    runs = table.cells.values()
    return list(SCORES) + [(k, n) for k, n in EXTRA_SCORES if any(r.scores.get(k) is not None for r in runs)]


def header(table: Table) -> list[str]:
    return ["setting"] + [f"{dataset_title(d)} {name}" for d in table.datasets for _, name in columns(table)]


def _extractor_names(scores: dict[str, Any]) -> str:
    fid, is_ = scores.get("extractor"), scores.get("is_extractor", scores.get("extractor"))
    return str(fid) if fid == is_ else f"{fid} (IS: {is_})"


def write_markdown(table: Table, path: Path) -> None:
    cols = columns(table)
    lines = ["| " + " | ".join(header(table)) + " |",
             "|" + "---|" + "---:|" * (len(header(table)) - 1)]
    for label in table.labels:
        row = [label] + [_cell(table, label, d, k) for d in table.datasets for k, _ in cols]
        lines.append("| " + " | ".join(row) + " |")
    extractors = sorted({_extractor_names(r.scores) for r in table.cells.values()
                         if r.scores.get("extractor")})
    lines.append("")
    if extractors:
        lines.append(f"Features: {', '.join(extractors)}." + (
            " Scores from the proxy classifier compare runs of this repo only, not published numbers."
            if any("classifier" in e for e in extractors) else ""))
    if any(not r.scores for r in table.cells.values()):
        lines.append("– : the run has no scores (eval.enabled = false, or it did not finish).")
    lines += ["", "Runs:", ""]
    lines += [f"- {label} / {dataset_title(d)}: `{table.cells[(label, d)].path}`"
              for label in table.labels for d in table.datasets if (label, d) in table.cells]
    path.write_text("\n".join(lines) + "\n")


def write_csv(table: Table, path: Path) -> None:
    cols = [("is_mean", "IS"), ("is_std", "IS std"), ("fid_train", "FID (train)"), ("fid_test", "FID (test)")]
    cols += [(k, "KID (test)" if k == "kid_test" else n) for k, n in columns(table)[len(SCORES):]]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting"] + [f"{dataset_title(d)} {name}" for d in table.datasets for _, name in cols])
        for label in table.labels:
            values = [table.score(label, d, k) for d in table.datasets for k, _ in cols]
            w.writerow([label] + ["" if v is None else repr(v) for v in values])


def write_png(table: Table, path: Path, panel_w: int = 240, panel_h: int = 170) -> None:
    """One row of panels per data set, one panel per score, one coloured bar per setting."""
    font = ImageFont.load_default()
    colours = class_colours(len(table.labels))
    legend_h = 18 * len(table.labels) + 10
    pad_l, pad_t, pad_b = 10, 28, 14
    width = len(SCORES) * panel_w + 2 * pad_l
    height = legend_h + len(table.datasets) * (panel_h + pad_t + pad_b)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, label in enumerate(table.labels):
        y = 6 + 18 * i
        draw.rectangle([pad_l, y, pad_l + 11, y + 11], fill=colours[i])
        draw.text((pad_l + 18, y), label, fill="black", font=font)
    for row, dataset in enumerate(table.datasets):
        top = legend_h + row * (panel_h + pad_t + pad_b)
        for col, (key, name) in enumerate(SCORES):
            x0 = pad_l + col * panel_w
            draw.text((x0 + panel_w // 2, top + 6), f"{dataset_title(dataset)}: {name}", fill="black",
                      font=font, anchor="mt")
            values = [table.score(label, dataset, key) for label in table.labels]
            peak = max([v for v in values if v is not None] + [1e-9])
            base = top + pad_t + panel_h
            slot = (panel_w - 20) / max(1, len(values))
            draw.line([x0 + 8, base, x0 + panel_w - 8, base], fill="black")
            for i, v in enumerate(values):
                bx = x0 + 10 + i * slot
                if v is None:
                    draw.text((bx + slot / 2, base - 4), "n/a", fill="gray", font=font, anchor="mb")
                    continue
                h = max(0.0, v) / peak * (panel_h - 24)
                draw.rectangle([round(bx + slot * 0.15), round(base - h), round(bx + slot * 0.85), base - 1],
                               fill=colours[i])
                draw.text((bx + slot / 2, base - h - 2), f"{v:.1f}", fill="black", font=font, anchor="mb")
    img.save(path)


# --------------------------------------------------------------------------------------------
# Per client and per class: the non-IID story as numbers


def client_rows(run: Run) -> tuple[str | None, list[dict[str, Any]]]:
    """(round, rows) of the run's last per-client scores: local-model scores joined with the
    final global model's scores against the same client's data."""
    global_rows = {r["client"]: r for r in run.scores.get("clients") or []}
    last = max(run.client_scores, key=int) if run.client_scores else None
    local = {r["client"]: r for r in run.client_scores.get(last, [])} if last is not None else {}
    rows = []
    for k in sorted(set(local) | set(global_rows)):
        lo, gl = local.get(k, {}), global_rows.get(k, {})
        rows.append({"client": k, "images": lo.get("images", gl.get("images")),
                     "local_fid_own": lo.get("fid_own"), "local_fid_test": lo.get("fid_test"),
                     "local_kid_own": lo.get("kid_own"), "local_kid_test": lo.get("kid_test"),
                     "global_fid_own": gl.get("fid_own"), "global_kid_own": gl.get("kid_own"),
                     "per_class_fid_test": lo.get("per_class_fid_test")})
    return last, rows


CLIENT_COLUMNS = (("images", "images"), ("local_fid_own", "local FID (own)"),
                  ("local_fid_test", "local FID (test)"), ("global_fid_own", "global FID (own)"),
                  ("local_kid_own", "local KID x1e3 (own)"), ("local_kid_test", "local KID x1e3 (test)"),
                  ("global_kid_own", "global KID x1e3 (own)"))


def _fmt_score(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "images":
        return str(value)
    return f"{value * KID_SCALE:.2f}" if "kid" in key else f"{value:.2f}"


def client_markdown(runs: list[Run]) -> list[str]:
    lines: list[str] = []
    for run in runs:
        last, rows = client_rows(run)
        per_class = run.scores.get("per_class")
        if not rows and not per_class:
            continue
        lines += ["", f"## {run.label} / {dataset_title(run.dataset)}: per client and per class", ""]
        if rows:
            lines.append(f"Local models right after their local training in round {last or '–'}; the "
                         f"global model of the last evaluation. own = the client's own train images "
                         f"(generated set cut to its class mix), test = the whole test split.")
            lines += ["", "| client | " + " | ".join(n for _, n in CLIENT_COLUMNS) + " |",
                      "|---:|" + "---:|" * len(CLIENT_COLUMNS)]
            lines += ["| " + " | ".join([str(r["client"])] + [_fmt_score(k, r[k]) for k, _ in CLIENT_COLUMNS])
                      + " |" for r in rows]
        if per_class:
            classes = range(len(per_class["fid_test"]))
            lines += ["", "Global model per class (samples of class c against the test images of class c):",
                      "", "| | " + " | ".join(str(c) for c in classes) + " |",
                      "|---|" + "---:|" * len(per_class["fid_test"])]
            for key, name in (("fid_test", "FID"), ("kid_test", "KID x1e3")):
                lines.append(f"| {name} | " + " | ".join(_fmt_score(key, v) for v in per_class[key]) + " |")
    return lines


def write_clients_csv(runs: list[Run], path: Path) -> bool:
    """One row per (run, client); False (nothing written) when no run has per-client scores."""
    table = [(run, *client_rows(run)) for run in runs]
    if not any(rows for _, _, rows in table):
        return False
    num_classes = max((len(r["per_class_fid_test"] or []) for _, _, rows in table for r in rows), default=0)
    keys = [k for k, _ in CLIENT_COLUMNS]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "setting", "data set", "round", "client", *keys,
                    *[f"local FID (test) class {c}" for c in range(num_classes)]])
        for run, last, rows in table:
            for r in rows:
                pc = list(r["per_class_fid_test"] or []) + [None] * num_classes
                w.writerow([str(run.path), run.label, dataset_title(run.dataset), last or "", r["client"],
                            *["" if r[k] is None else repr(r[k]) for k in keys],
                            *["" if v is None else repr(v) for v in pc[:num_classes]]])
    return True


def _heat(value: float | None, lo: float, hi: float) -> tuple[int, int, int]:
    if value is None or not math.isfinite(value):
        return (225, 225, 225)
    t = 0.0 if hi <= lo else min(1.0, max(0.0, (value - lo) / (hi - lo)))
    return (int(60 + 190 * t), int(175 - 120 * t), int(90 - 40 * t))  # green (low FID) to red


def write_heatmap(runs: list[Run], path: Path, cell: int = 40) -> bool:
    """One panel per run with per-client scores: rows = clients (local model right after local
    training) and a last row for the global model, columns = classes, colour and number = FID of
    class c against the test images of class c. False (nothing written) without such runs."""
    panels = []
    for run in runs:
        last, rows = client_rows(run)
        grid = [(f"client {r['client']}", r["per_class_fid_test"]) for r in rows if r["per_class_fid_test"]]
        if run.scores.get("per_class"):
            grid.append(("global", run.scores["per_class"]["fid_test"]))
        if grid:
            panels.append((f"{run.label} / {dataset_title(run.dataset)}: per-class FID (test), "
                           f"local models at round {last or '–'}", grid))
    if not panels:
        return False
    font = ImageFont.load_default()
    left, top_pad = 70, 36
    classes = max(len(values) for _, grid in panels for _, values in grid)
    width = left + classes * cell + 20
    heights = [top_pad + len(grid) * cell + 16 for _, grid in panels]
    width = max(width, max(8 * len(title) for title, _ in panels) // 1 + 20)
    img = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(img)
    y0 = 0
    for (title, grid), h in zip(panels, heights, strict=True):
        draw.text((8, y0 + 6), title, fill="black", font=font)
        values = [v for _, row in grid for v in row if v is not None and math.isfinite(v)]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        for c in range(classes):
            draw.text((left + c * cell + cell // 2, y0 + top_pad - 4), str(c), fill="black", font=font,
                      anchor="mb")
        for i, (name, row) in enumerate(grid):
            y = y0 + top_pad + i * cell
            draw.text((left - 6, y + cell // 2), name, fill="black", font=font, anchor="rm")
            for c in range(classes):
                v = row[c] if c < len(row) else None
                x = left + c * cell
                draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=_heat(v, lo, hi))
                draw.text((x + cell // 2 - 1, y + cell // 2 - 1), "–" if v is None else f"{v:.0f}"
                          if v >= 100 else f"{v:.1f}", fill="black", font=font, anchor="mm")
        y0 += h
    img.save(path)
    return True


def print_table(table: Table) -> None:
    """The paper layout if the terminal is wide enough, else one table per data set."""
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    setting_w = max(len(label) for label in table.labels) + 4
    wide = setting_w + 16 * len(SCORES) * len(table.datasets) <= console.width
    groups = [table.datasets] if wide else [[d] for d in table.datasets]
    for datasets in groups:
        t = RichTable(title="fedrun report" if wide else dataset_title(datasets[0]))
        t.add_column("setting", no_wrap=True)
        for d in datasets:
            for _, name in SCORES:
                t.add_column(f"{dataset_title(d)}\n{name}" if wide else name, justify="right", no_wrap=True)
        for label in table.labels:
            t.add_row(label, *[_cell(table, label, d, k) for d in datasets for k, _ in SCORES])
        console.print(t)


# --------------------------------------------------------------------------------------------
# Entry points


def make_report(run_dirs: Sequence[str | Path],
                out_dir: str | Path | None = None) -> tuple[Table, dict[str, Path]]:
    """Write report.md/.csv/.png for ``run_dirs``; returns the table and the three paths."""
    if not run_dirs:
        raise ReportError("no run dirs given; usage: fedrun report RUN_DIR... [--out DIR]")
    runs = [load_run(d) for d in run_dirs]
    table = build_table(runs)
    out = Path(out_dir) if out_dir is not None else Path(
        os.path.commonpath([str(r.path.resolve().parent) for r in runs]))
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    write_markdown(table, paths["md"])
    ordered = [table.cells[(label, d)] for label in table.labels for d in table.datasets
               if (label, d) in table.cells]
    extra = client_markdown(ordered)
    if extra:
        with paths["md"].open("a") as f:
            f.write("\n".join(extra) + "\n")
    write_csv(table, paths["csv"])
    write_png(table, paths["png"])
    if write_clients_csv(ordered, out / "report_clients.csv"):
        paths["clients_csv"] = out / "report_clients.csv"
    if write_heatmap(ordered, out / "report_clients.png"):
        paths["clients_png"] = out / "report_clients.png"
    return table, paths


def main(argv: Sequence[str] | None = None) -> int:
    """``fedrun report`` subcommand; returns the process exit code (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="fedrun report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding summary.json")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where report.md/.csv/.png go (default: the run dirs' common parent)")
    args = parser.parse_args(argv)
    try:
        table, paths = make_report(args.run_dirs, args.out)
    except ReportError as exc:
        print(f"fedrun report: {exc}", file=sys.stderr)
        return 2
    print_table(table)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
