"""``fedrun report RUN_DIR... [--out DIR]``: one results table over finished runs.

Reads ``<run>/summary.json`` (and ``<run>/audit.json`` when present) of every run, labels each
run by the config settings that differ between runs of the same data set, and writes, in the
paper's layout (rows = settings, columns = IS / FID(train) / FID(test) grouped per data set)::

    <out>/report.md    markdown table, "mean ± std", plus which runs fed each row
    <out>/report.csv   the same table, raw numbers, one column per (data set, score)
    <out>/report.png   bar charts: one row of panels per data set, one panel per score; bars are
                       means, whiskers the std over seeds

``--out`` defaults to the common parent folder of the run dirs (e.g. ``runs/``).

summary.json schema (keys the report reads; anything else is ignored)::

    {
      "config": {"run": {...}, "data": {...}, "model": {...}, "diffusion": {...}, "fed": {...},
                 "optim": {...}, "train": {...}, "ema": {...}, "privacy": {...},
                 "checkpoint": {...}, "sample": {...},
                 "eval": {...}},           # Config.to_dict() of the resolved config (required)
      "scores": {                          # {} or null when the run was not scored
        "is_mean": float, "is_std": float, # Inception Score over 10 splits
        "fid_train": float,                # FD to the whole train split
        "fid_test": float,                 # FD to the whole test split
        "extractor": "inception" | "classifier",
        "num_samples": int, "class_acc": float | null   # optional
      },
      "privacy": {"epsilon_max": float}    # optional: the largest epsilon spent (DP runs)
    }

i.e. ``fedrun.metrics.Scorer.score``'s dict goes under "scores" unchanged. ``audit.json``
(optional): ``{"auc": float, "near_copies": int | float | list}`` (a list counts its items).

How runs are labelled: a config key becomes part of the label when its value differs between
two runs of the same data set (bookkeeping keys such as run.name, run.seed, paths, checkpoint and
sampling settings never do). Keys that do not apply to a run are left out of its label: the
federated settings of a centralized run (except fed.rounds / fed.local_epochs, which set its
epochs), fed.alpha of an IID partition, fed.prox_mu unless fed.drift = "fedprox", server
optimizer settings of plain FedAvg, optim.min_lr_ratio of a constant lr, privacy.* of a run
without privacy. When more than one key labels the table, a method that is off (ema.sigma_rel
= 0, fed.drift = "none", ..., see OFF) is not named, and rows with a method off sort first.
"run.mode=fedavg" is dropped when the label names anything else (centralized rows keep their
mode). Runs of different data sets with the same label share a row.

Seeds: runs that differ only in run.seed form one row; every score is then the mean over the
seeds ± the sample std (n - 1), "(n=3)" saying how many runs had that score. Runs with the
same label and the same seed are told apart by their folder instead.

"FID / centralized": present when the table holds a centralized run (run.mode = centralized) of
the same data set and budget (fed.rounds x fed.local_epochs epochs): the row's FID (test) mean
divided by that centralized row's. With several such centralized rows, the one that agrees
with the row on most other label keys (e.g. ema.sigma_rel) is the reference.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
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
                ("density", "density"), ("coverage", "coverage"), ("class_acc", "class acc"),
                ("epsilon", "epsilon"), ("audit_auc", "audit AUC"), ("near_copies", "near copies"))
RATIO = ("fid_ratio", "FID / centralized")  # derived: a row's FID (test) / the centralized row's
KID_SCALE = 1e3  # KID is printed x1e3, as in the KID literature; the CSV keeps raw values
THREE_DIGITS = {"precision", "recall", "density", "coverage", "class_acc", "audit_auc"}

# Never labels: they name, place or schedule a run without changing its model.
IGNORED = {
    "run.name", "run.out_dir", "run.device", "run.threads", "run.seed",
    "data.root", "data.download", "train.compile", "train.channels_last",
    "eval.every", "eval.enabled", "eval.batch_size", "eval.cache_dir", "eval.inception_weights",
    "eval.local_models_at", "eval.per_class", "eval.client_samples",
}
IGNORED_SECTIONS = ("checkpoint", "sample")
CENTRALIZED_FED_KEYS = {"fed.rounds", "fed.local_epochs"}
# A method switched off: not named in a label when several keys label the table.
OFF = {"ema.sigma_rel": 0.0, "model.label_dropout": 0.0, "diffusion.guidance": 0.0, "fed.drift": "none",
       "fed.client_optimizer": "reset", "optim.lr_schedule": "constant", "fed.server_opt": "fedavg",
       "privacy.level": "none"}

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
    extra: dict[str, float] = field(default_factory=dict)  # epsilon, audit_auc, near_copies
    label: str = ""
    parts: list[tuple[str, Any]] = field(default_factory=list)
    seeded: bool = False  # one of several seeds of its row
    wall_s: float | None = None  # the run's wall time (summary.json)

    def value(self, key: str) -> float | None:
        v = self.scores.get(key, self.extra.get(key))
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    @property
    def title(self) -> str:
        """The row label, plus the seed when the row averages several."""
        return f"{self.label} [seed {self.flat.get('run.seed')}]" if self.seeded else self.label


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


def _number(value: Any) -> float | None:
    if isinstance(value, list):
        return float(len(value))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _extra(data: dict[str, Any], path: Path) -> dict[str, float]:
    """epsilon from summary.json's "privacy", audit_auc / near_copies from audit.json."""
    out: dict[str, float] = {}
    privacy = data.get("privacy")
    if isinstance(privacy, dict) and _number(privacy.get("epsilon_max")) is not None:
        out["epsilon"] = _number(privacy["epsilon_max"])
    audit_path = path / "audit.json"
    if audit_path.is_file():
        try:
            audit = json.loads(audit_path.read_text())
        except json.JSONDecodeError as exc:
            raise ReportError(f"{audit_path}: not valid JSON ({exc}); delete it or rerun the audit") from None
        for src, dst in (("auc", "audit_auc"), ("near_copies", "near_copies")):
            if isinstance(audit, dict) and _number(audit.get(src)) is not None:
                out[dst] = _number(audit[src])
    return out


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
               client_scores=dict(data.get("client_scores") or {}), extra=_extra(data, path),
               wall_s=_number(data.get("wall_s")))


# --------------------------------------------------------------------------------------------
# Labels


def _applies(key: str, flat: dict[str, Any]) -> bool:
    if key.startswith("fed.") and flat.get("run.mode") == "centralized":
        return key in CENTRALIZED_FED_KEYS
    if key in ("fed.alpha", "fed.min_client_size", "fed.max_resample"):
        return flat.get("fed.partition") != "iid"
    if key in ("fed.server_momentum", "fed.server_lr"):
        return flat.get("fed.server_opt", "fedavg") != "fedavg"
    if key == "fed.server_beta2":
        return flat.get("fed.server_opt") in ("fedadam", "fedyogi")
    if key == "fed.server_tau":
        return flat.get("fed.server_opt") in ("fedadam", "fedyogi", "fedadagrad")
    if key == "fed.prox_mu":
        return flat.get("fed.drift") == "fedprox"
    if key == "optim.min_lr_ratio":
        return flat.get("optim.lr_schedule", "constant") != "constant"
    if key.startswith("privacy.") and key != "privacy.level":
        return flat.get("privacy.level", "none") != "none"
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
    # run.* first (mode), then the sections in config order
    label_keys.sort(key=lambda k: (not k.startswith("run."), order.index(k)))

    for r in runs:
        r.parts = [(k, r.flat.get(k)) for k in label_keys if _applies(k, r.flat)]
        if len(label_keys) > 1:
            r.parts = [(k, v) for k, v in r.parts if k not in OFF or OFF[k] != v]
        if len(r.parts) > 1:  # e.g. "fed.alpha=0.1" says FedAvg; centralized rows keep their mode
            r.parts = [(k, v) for k, v in r.parts if not (k == "run.mode" and v == "fedavg")]
        r.label = ", ".join(f"{k}={_fmt(v)}" for k, v in r.parts) or "default"
    same: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        same.setdefault((r.dataset, r.label), []).append(r)
    for group in same.values():
        if len(group) == 1:
            continue
        seeds = [r.flat.get("run.seed") for r in group]
        if len(set(seeds)) == len(seeds):  # the seeds of one setting: one row, averaged
            for r in group:
                r.seeded = True
        else:  # two runs would fill one cell: tell them apart by their folder
            for r in group:
                r.label = f"{r.label} ({r.path.name})"
    return label_keys


# --------------------------------------------------------------------------------------------
# The table


def budget(flat: dict[str, Any]) -> Any:
    """Epochs of training: fed.rounds x fed.local_epochs (a centralized run gets R x E epochs)."""
    rounds, epochs = flat.get("fed.rounds"), flat.get("fed.local_epochs")
    return rounds * epochs if isinstance(rounds, int) and isinstance(epochs, int) else None


@dataclass
class Table:
    datasets: list[str]
    labels: list[str]
    cells: dict[tuple[str, str], list[Run]]  # (label, dataset) -> its runs (one per seed)
    label_keys: list[str]
    reference: dict[tuple[str, str], str] = field(default_factory=dict)  # -> centralized label

    def stats(self, label: str, dataset: str, key: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std or None, n) of ``key`` over the cell's runs that have it."""
        if key == RATIO[0]:
            return self.ratio(label, dataset), None, 0
        values = [v for r in self.cells.get((label, dataset), []) if (v := r.value(key)) is not None]
        if not values:
            return None, None, 0
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std, len(values)

    def score(self, label: str, dataset: str, key: str) -> float | None:
        """The mean of ``key`` over the cell's runs (None when no run has it)."""
        return self.stats(label, dataset, key)[0]

    def runs_of(self, label: str, dataset: str) -> list[Run]:
        return self.cells.get((label, dataset), [])

    def ratio(self, label: str, dataset: str) -> float | None:
        ref = self.reference.get((label, dataset))
        if ref is None:
            return None
        mine, central = self.score(label, dataset, "fid_test"), self.score(ref, dataset, "fid_test")
        return mine / central if mine is not None and central else None


def _references(table: Table) -> dict[tuple[str, str], str]:
    """(label, dataset) -> label of the centralized row of the same data set and budget."""
    out: dict[tuple[str, str], str] = {}
    agree_keys = [k for k in table.label_keys if k != "run.mode" and not k.startswith("fed.")]
    for dataset in table.datasets:
        central = [label for label in table.labels if (label, dataset) in table.cells
                   and table.cells[(label, dataset)][0].flat.get("run.mode") == "centralized"]
        for label in table.labels:
            runs = table.cells.get((label, dataset))
            if not runs:
                continue
            mine = runs[0].flat
            candidates = [c for c in central if budget(table.cells[(c, dataset)][0].flat) == budget(mine)
                          and budget(mine) is not None]
            if candidates:
                agreement = [sum(table.cells[(c, dataset)][0].flat.get(k) == mine.get(k) for k in agree_keys)
                             for c in candidates]
                out[(label, dataset)] = candidates[agreement.index(max(agreement))]  # first of the best
    return out


def build_table(runs: list[Run]) -> Table:
    label_keys = label_runs(runs)
    datasets = list(dict.fromkeys(r.dataset for r in runs))
    paper = list(DATASET_TITLES)
    datasets.sort(key=lambda d: paper.index(d.split(":")[0]) if d.split(":")[0] in paper else len(paper))

    def sort_key(r: Run) -> tuple:  # e.g. centralized first, then alpha ascending
        def one(key: str) -> tuple:
            v = r.flat.get(key)
            if not _applies(key, r.flat):
                return (-2, "")
            if key in OFF and v == OFF[key]:  # the method off (plain FedAvg) before its variants
                return (-1, "")
            return (1, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (0, str(v))
        return (*(one(k) for k in label_keys), r.flat.get("run.seed", 0))

    ordered = sorted(runs, key=sort_key)
    labels = list(dict.fromkeys(r.label for r in ordered))
    cells: dict[tuple[str, str], list[Run]] = {}
    for r in ordered:
        cells.setdefault((r.label, r.dataset), []).append(r)
    table = Table(datasets, labels, cells, label_keys)
    table.reference = _references(table)
    return table


def _one(key: str, value: float) -> str:
    if key == "kid_test":
        return f"{value * KID_SCALE:.2f}"
    if key in THREE_DIGITS:
        return f"{value:.3f}"
    if key == "near_copies" and value == int(value):
        return str(int(value))
    return f"{value:.2f}"


def _cell(table: Table, label: str, dataset: str, key: str) -> str:
    mean, std, n = table.stats(label, dataset, key)
    if mean is None:
        return "–"
    if len(table.runs_of(label, dataset)) > 1 and key != RATIO[0]:  # several seeds
        spread = f" ± {_one(key, std)}" if std is not None else ""
        return f"{_one(key, mean)}{spread} (n={n})"
    if key == "is_mean":
        is_std = table.score(label, dataset, "is_std")
        return f"{mean:.2f} ± {is_std:.2f}" if is_std is not None else f"{mean:.2f}"
    return _one(key, mean)


def columns(table: Table) -> list[tuple[str, str]]:
    """The paper's scores, then those of EXTRA_SCORES that some run has, then the FID ratio
    to the centralized row where the table has one."""
    runs = [r for rs in table.cells.values() for r in rs]
    cols = list(SCORES) + [(k, n) for k, n in EXTRA_SCORES if any(r.value(k) is not None for r in runs)]
    return cols + ([RATIO] if table.reference else [])


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
    runs = [r for rs in table.cells.values() for r in rs]
    extractors = sorted({_extractor_names(r.scores) for r in runs if r.scores.get("extractor")})
    lines.append("")
    if any(len(rs) > 1 for rs in table.cells.values()):
        lines.append("Rows of several seeds: mean ± sample std over the seeds (n = runs with that score).")
    if table.reference:
        refs = sorted({ref for ref in table.reference.values()})
        lines.append(f"FID / centralized: FID (test) over that of the centralized row of the same data set "
                     f"and epochs ({'; '.join(refs)}).")
    if extractors:
        lines.append(f"Features: {', '.join(extractors)}." + (
            " Scores from the proxy classifier compare runs of this repo only, not published numbers."
            if any("classifier" in e for e in extractors) else ""))
    if any(not r.scores for r in runs):
        lines.append("– : the run has no scores (eval.enabled = false, or it did not finish).")
    lines += ["", "Runs:", ""]
    lines += [f"- {label} / {dataset_title(d)}: " + ", ".join(f"`{r.path}`" for r in table.cells[(label, d)])
              for label in table.labels for d in table.datasets if (label, d) in table.cells]
    path.write_text("\n".join(lines) + "\n")


def write_csv(table: Table, path: Path) -> None:
    """Means; with several seeds also the std over seeds and n for every score."""
    cols = [("is_mean", "IS"), ("is_std", "IS std"), ("fid_train", "FID (train)"), ("fid_test", "FID (test)")]
    cols += [(k, "KID (test)" if k == "kid_test" else n) for k, n in columns(table)[len(SCORES):]]
    seeded = any(len(rs) > 1 for rs in table.cells.values())
    head, getters = ["setting"], []
    for d in table.datasets:
        for key, name in cols:
            head.append(f"{dataset_title(d)} {name}")
            getters.append((d, key, 0))
        if seeded:
            for key, name in cols:
                if key not in ("is_std", RATIO[0]):
                    head.append(f"{dataset_title(d)} {name} std over seeds")
                    getters.append((d, key, 1))
            head.append(f"{dataset_title(d)} seeds")
            getters.append((d, "fid_test", 2))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for label in table.labels:
            values = [table.stats(label, d, key)[i] if i < 2 else len(table.runs_of(label, d)) or None
                      for d, key, i in getters]
            w.writerow([label] + ["" if v is None else repr(v) for v in values])


def png_panels(table: Table) -> list[tuple[str, str]]:
    """The scores drawn: the paper's, and class accuracy when some run has it."""
    return list(SCORES) + [(k, n) for k, n in columns(table) if k == "class_acc"]


def write_png(table: Table, path: Path, panel_w: int = 240, panel_h: int = 170) -> None:
    """One row of panels per data set, one panel per score, one coloured bar per setting: the
    mean, with a whisker of +- the std over seeds when the row has several."""
    font = ImageFont.load_default()
    colours = class_colours(len(table.labels))
    panels = png_panels(table)
    legend_h = 18 * len(table.labels) + 10
    pad_l, pad_t, pad_b = 10, 28, 14
    width = len(panels) * panel_w + 2 * pad_l
    height = legend_h + len(table.datasets) * (panel_h + pad_t + pad_b)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, label in enumerate(table.labels):
        y = 6 + 18 * i
        draw.rectangle([pad_l, y, pad_l + 11, y + 11], fill=colours[i])
        n = max((len(table.runs_of(label, d)) for d in table.datasets), default=1)
        draw.text((pad_l + 18, y), label + (f"  (n={n})" if n > 1 else ""), fill="black", font=font)
    for row, dataset in enumerate(table.datasets):
        top = legend_h + row * (panel_h + pad_t + pad_b)
        for col, (key, name) in enumerate(panels):
            x0 = pad_l + col * panel_w
            draw.text((x0 + panel_w // 2, top + 6), f"{dataset_title(dataset)}: {name}", fill="black",
                      font=font, anchor="mt")
            stats = [table.stats(label, dataset, key) for label in table.labels]
            peak = max([m + (s or 0.0) for m, s, _ in stats if m is not None] + [1e-9])
            base = top + pad_t + panel_h
            slot = (panel_w - 20) / max(1, len(stats))
            scale = (panel_h - 24) / peak
            draw.line([x0 + 8, base, x0 + panel_w - 8, base], fill="black")
            for i, (v, std, _) in enumerate(stats):
                bx = x0 + 10 + i * slot
                if v is None:
                    draw.text((bx + slot / 2, base - 4), "n/a", fill="gray", font=font, anchor="mb")
                    continue
                h = max(0.0, v) * scale
                draw.rectangle([round(bx + slot * 0.15), round(base - h), round(bx + slot * 0.85), base - 1],
                               fill=colours[i])
                top_y = base - h
                if std:  # whisker: mean +- std, clipped at the axis
                    cx = round(bx + slot / 2)
                    hi, lo = base - (v + std) * scale, min(base, base - (v - std) * scale)
                    draw.line([cx, round(hi), cx, round(lo)], fill="black", width=1)
                    for y in (hi, lo):
                        draw.line([cx - 3, round(y), cx + 3, round(y)], fill="black")
                    top_y = min(top_y, hi)
                text = f"{v:.2f}" if key == "class_acc" else f"{v:.1f}"
                draw.text((bx + slot / 2, top_y - 2), text, fill="black", font=font, anchor="mb")
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
        lines += ["", f"## {run.title} / {dataset_title(run.dataset)}: per client and per class", ""]
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
                w.writerow([str(run.path), run.title, dataset_title(run.dataset), last or "", r["client"],
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
            panels.append((f"{run.title} / {dataset_title(run.dataset)}: per-class FID (test), "
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
    cols = columns(table)
    setting_w = max(len(label) for label in table.labels) + 4
    wide = setting_w + 16 * len(cols) * len(table.datasets) <= console.width
    groups = [table.datasets] if wide else [[d] for d in table.datasets]
    for datasets in groups:
        t = RichTable(title="fedrun report" if wide else dataset_title(datasets[0]))
        t.add_column("setting", no_wrap=True)
        for d in datasets:
            for _, name in cols:
                t.add_column(f"{dataset_title(d)}\n{name}" if wide else name, justify="right", no_wrap=True)
        for label in table.labels:
            t.add_row(label, *[_cell(table, label, d, k) for d in datasets for k, _ in cols])
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
    ordered = [r for label in table.labels for d in table.datasets for r in table.runs_of(label, d)]
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
