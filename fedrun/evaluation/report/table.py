"""The report's table: row labels from the config facts, seeds averaged, the FID ratio to the
centralized row, and the table as markdown, CSV and a terminal table; per-client rows too.

How runs are labelled: a config key becomes part of the label when its value differs between
two runs of the same data set, unless its config field says it never labels a row (``label``
in fedrun/config.py: run.name, run.seed, paths, checkpoint and sampling settings...). Keys that
do not apply to a run (the field's ``applies``: federated settings of a centralized run except
fed.rounds / fed.local_epochs, fed.alpha of an IID partition, fed.prox_mu unless fed.drift =
"fedprox", ...) are left out of its label. When more than one key labels the table, a method
that is off (the field's ``off`` value: ema.sigma_rel = 0, fed.drift = "none", ...) is not
named, and rows with a method off sort first. "run.mode=fedavg" is dropped when the label names
anything else (centralized rows keep their mode). Runs of different data sets with the same
label share a row.

Seeds: runs that differ only in run.seed form one row; every score is then the mean over the
seeds ± the sample std (n - 1), "(n=3)" saying how many runs had that score. Runs with the
same label and the same seed are told apart by their folder instead.

"FID / centralized": present when the table holds a centralized run (run.mode = centralized) of
the same data set and budget (fed.rounds x fed.local_epochs epochs): the row's FID (test) mean
divided by that centralized row's. With several such centralized rows, the one that agrees
with the row on most other label keys (e.g. ema.sigma_rel) is the reference.

Intervals (runs scored with ``eval.bootstrap``): a cell shows its 95 % interval, "[lo, hi]",
from the seeds' spread and the runs' own sampling intervals (``seeds_interval``); the FID ratio
its interval on the log scale (``ratio_interval``), with "not resolved" where it holds 1, and
under the table one line per compared row says "resolved" or "not resolved" (``interval_notes``).
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import NO_OFF, key_facts
from ...logs import log_console
from .runs import DATASET_TITLES, Run, dataset_title

SCORES = (("is_mean", "IS"), ("fid_train", "FID (train)"), ("fid_test", "FID (test)"))
# In report.md and report.csv when some run has them (older runs do not).
EXTRA_SCORES = (("kid_test", "KID x1e3 (test)"), ("precision", "precision"), ("recall", "recall"),
                ("density", "density"), ("coverage", "coverage"), ("class_acc", "class acc"),
                ("epsilon", "epsilon"), ("audit_auc", "audit AUC"), ("near_copies", "near copies"),
                ("bytes_up_per_round", "MB up / round"), ("bytes_down_per_round", "MB down / round"),
                ("uplink_reduction", "x fewer bytes up"))
RATIO = ("fid_ratio", "FID / centralized")  # derived: a row's FID (test) / the centralized row's
KID_SCALE = 1e3  # KID is printed x1e3, as in the KID literature; the CSV keeps raw values
MB = ("bytes_up_per_round", "bytes_down_per_round")  # printed in MB (10^6 bytes); the CSV keeps bytes
THREE_DIGITS = {"precision", "recall", "density", "coverage", "class_acc", "audit_auc"}


# --------------------------------------------------------------------------------------------
# Labels


def is_label(key: str) -> bool:
    """May ``key`` tell runs apart? The data set never does: it is the column group."""
    return key_facts(key).label


def applies(key: str, flat: dict[str, Any]) -> bool:
    """Does ``key`` mean anything for the run whose flattened config is ``flat``?"""
    return key_facts(key).applies.holds(flat)


def is_off(key: str, value: Any) -> bool:
    """Is ``value`` the setting of ``key`` that switches its method off?"""
    off = key_facts(key).off
    return off is not NO_OFF and value == off


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
    usable = [k for k in order if is_label(k)]

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
        r.parts = [(k, r.flat.get(k)) for k in label_keys if applies(k, r.flat)]
        if len(label_keys) > 1:
            r.parts = [(k, v) for k, v in r.parts if not is_off(k, v)]
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

    def interval(self, label: str, dataset: str, key: str) -> Interval | None:
        """The cell's mean with an interval holding both noises: the seeds' spread and each run's
        sampling interval (``seeds_interval``); None when a run of the cell has no interval."""
        runs = [r for r in self.cells.get((label, dataset), []) if r.value(key) is not None]
        if not runs or any(r.interval(key) is None for r in runs):
            return None
        return seeds_interval([r.value(key) for r in runs], [r.interval(key) for r in runs],  # type: ignore[misc]
                              runs[0].confidence)

    def ratio_interval(self, label: str, dataset: str) -> Interval | None:
        """FID (test) over the centralized row's, with its interval (``ratio_interval``)."""
        ref = self.reference.get((label, dataset))
        if ref is None:
            return None
        mine, central = self.interval(label, dataset, "fid_test"), self.interval(ref, dataset, "fid_test")
        return ratio_interval(mine, central) if mine is not None and central is not None else None


# --------------------------------------------------------------------------------------------
# Intervals over seeds: the seeds' spread and each run's sampling interval


@dataclass(frozen=True)
class Interval:
    """A mean over runs with its interval at ``confidence``; ``sd`` the standard deviation of
    the mean and ``df`` its degrees of freedom (None: a normal quantile)."""

    mean: float
    lo: float
    hi: float
    sd: float
    df: float | None
    confidence: float

    def excludes(self, value: float) -> bool:
        return not self.lo <= value <= self.hi


def _quantile(confidence: float, df: float | None) -> float:
    from scipy import stats
    p = 1 - (1 - confidence) / 2
    return float(stats.norm.ppf(p) if df is None else stats.t.ppf(p, df))


def seeds_interval(values: list[float], cis: list[tuple[float, float]], confidence: float = 0.95) -> Interval:
    """The mean over k runs (seeds) with an interval for what the setting gives on average.

    Each run's score is its setting's value plus the seed's deviation plus the sampling error of
    its evaluation, so the seeds' sample variance S^2 already holds both noises; with 2 or 3
    seeds it is a rough estimate, and it can come out smaller than the runs' own sampling
    variances say (v_i: from each run's interval, its half-width over the normal quantile).
    Var(mean) = max(S^2, mean v_i) / k, with a t quantile of k - 1 degrees of freedom where
    the seeds' spread is the larger, else a normal one. One run: its own interval."""
    k = len(values)
    z = _quantile(confidence, None)
    v = [((hi - lo) / (2 * z)) ** 2 for lo, hi in cis]
    mean = statistics.fmean(values)
    if k == 1:
        return Interval(mean, cis[0][0], cis[0][1], v[0] ** 0.5, None, confidence)
    spread, sampling = statistics.variance(values), statistics.fmean(v)
    df = float(k - 1) if spread >= sampling else None
    sd = (max(spread, sampling) / k) ** 0.5
    half = _quantile(confidence, df) * sd
    return Interval(mean, mean - half, mean + half, sd, df, confidence)


def ratio_interval(a: Interval, b: Interval) -> Interval | None:
    """a / b with an interval from the log scale: Var(log a/b) = (sd_a / a)^2 + (sd_b / b)^2,
    Welch-Satterthwaite degrees of freedom where either side has some (a side without is
    counted with infinitely many); None unless both means are > 0."""
    if a.mean <= 0 or b.mean <= 0:
        return None
    ua, ub = (a.sd / a.mean) ** 2, (b.sd / b.mean) ** 2
    var = ua + ub
    if a.df is None and b.df is None:
        df = None
    else:
        den = sum(u * u / d for u, d in ((ua, a.df), (ub, b.df)) if d)
        df = var * var / den if den > 0 else None
    log_r = math.log(a.mean / b.mean)
    half = _quantile(a.confidence, df) * var ** 0.5
    return Interval(a.mean / b.mean, math.exp(log_r - half), math.exp(log_r + half), var ** 0.5, df,
                    a.confidence)


def resolution(ratio: Interval) -> str:
    """"resolved" when the ratio's interval leaves 1 out, else "not resolved"."""
    return "resolved" if ratio.excludes(1.0) else "not resolved"


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
            if not applies(key, r.flat):
                return (-2, "")
            if is_off(key, v):  # the method off (plain FedAvg) before its variants
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
    if key in MB:
        return f"{value / 1e6:.3g}"
    if key == "uplink_reduction":
        return f"{value:.3g}"
    if key in THREE_DIGITS:
        return f"{value:.3f}"
    if key == "near_copies" and value == int(value):
        return str(int(value))
    return f"{value:.2f}"


def _cell(table: Table, label: str, dataset: str, key: str) -> str:
    mean, std, n = table.stats(label, dataset, key)
    if mean is None:
        return "–"
    if key == RATIO[0]:
        own = table.reference.get((label, dataset)) == label  # the centralized row itself: 1
        ratio = table.ratio_interval(label, dataset) if not own else None
        if ratio is None:
            return _one(key, mean)
        verdict = "" if ratio.excludes(1.0) else " not resolved"
        return f"{mean:.2f} [{ratio.lo:.2f}, {ratio.hi:.2f}]{verdict}"
    ci = table.interval(label, dataset, key)
    bracket = f" [{_one(key, ci.lo)}, {_one(key, ci.hi)}]" if ci is not None else ""
    if len(table.runs_of(label, dataset)) > 1:  # several seeds
        spread = f" ± {_one(key, std)}" if std is not None else ""
        return f"{_one(key, mean)}{spread}{bracket} (n={n})"
    if key == "is_mean" and not bracket:
        is_std = table.score(label, dataset, "is_std")
        return f"{mean:.2f} ± {is_std:.2f}" if is_std is not None else f"{mean:.2f}"
    return _one(key, mean) + bracket


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
    lines += interval_notes(table)
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


def interval_notes(table: Table) -> list[str]:
    """How the intervals were made, then one line per row compared with its centralized row:
    the FID (test) ratio with its interval, "resolved" or "not resolved" (none without intervals)."""
    runs = [r for rs in table.cells.values() for r in rs]
    if not any(r.interval("fid_test") for r in runs):
        return []
    conf = f"{runs[0].confidence:.0%}"
    lines = [f"[lo, hi]: {conf} intervals. One run: its bootstrap interval (generated and reference "
             f"features resampled). Several seeds: the mean's interval, from the seeds' spread and the "
             f"runs' own sampling intervals (variance of the mean max(S^2, mean v_i) / k; a t quantile "
             f"of k - 1 degrees of freedom where the seeds' spread is the larger). FID / centralized: "
             f"the ratio's interval on the log scale; \"not resolved\" where it holds 1."]
    for (label, dataset), ref in table.reference.items():
        ratio = table.ratio_interval(label, dataset) if ref != label else None
        if ratio is None:
            continue
        lines.append(f"{label} vs {ref} ({dataset_title(dataset)}): FID (test) ratio {ratio.mean:.2f} "
                     f"[{ratio.lo:.2f}, {ratio.hi:.2f}]: {resolution(ratio)} at {conf}.")
    return lines


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


def print_table(table: Table) -> None:
    """The paper layout if the terminal is wide enough, else one table per data set."""
    from rich.table import Table as RichTable

    console = log_console(stderr=False)
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
