"""``fedrun report RUN_DIR... [--out DIR]``: one results table over finished runs.

Reads ``<run>/summary.json`` (and ``<run>/audit.json``, ``<run>/metrics.jsonl`` when present) of
every run, labels each run by the config settings that differ between runs of the same data set,
and writes, in the paper's layout (rows = settings, columns = IS / FID(train) / FID(test) grouped
per data set)::

    <out>/report.md           markdown table, "mean ± std [95 % interval]", "not resolved" where
                              the FID ratio's interval holds 1, which runs fed each row, and a
                              per-client / per-class section for runs that have those scores
    <out>/report.csv          the same table, raw numbers, one column per (data set, score)
    <out>/report.png          bar charts: one row of panels per data set, one panel per score;
                              bars are means, whiskers the std over seeds
    <out>/report_clients.csv  one row per (run, client): local and global model scores
    <out>/report_clients.png  client x class heat map of per-class FID, global model last, with
                              a colour bar
    <out>/<run>_curves.png    per run with a metrics.jsonl: loss, FID / class accuracy of the
                              evaluated rounds, epsilon, bytes and wait per round (the panels
                              whose numbers the records have)

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
        "num_samples": int, "class_acc": float | null,  # optional
        "<score>_ci": [lo, hi]             # optional: its interval (fedrun.evaluation.intervals)
      },
      "privacy": {"epsilon_max": float}    # optional: the largest epsilon spent (DP runs)
      "communication": {                   # optional: bytes a real client sends (federated runs)
        "bytes_up_per_round": float, "bytes_down_per_round": float, "uplink_reduction": float}
    }

i.e. ``fedrun.evaluation.scorer``'s dict goes under "scores" unchanged. ``audit.json``
(optional): ``{"auc": float, "near_copies": int | float | list}`` (a list counts its items).
How rows are labelled, averaged over seeds and compared with the centralized run: see
``table``; which keys may label a row and when a key applies are facts of the config fields
(``fedrun.config.key_facts``).

Modules, one job each: ``runs`` (loading run dirs), ``table`` (labels, seeds, the FID ratio,
markdown / CSV / terminal), ``plots`` (the PNGs, matplotlib), ``cli`` (``make_report``, ``main``).
"""

from ...errors import ReportError
from .cli import main, make_report
from .plots import (
    bar_figure,
    curves_figure,
    heatmap_figure,
    staleness_figure,
    write_curves,
    write_heatmap,
    write_png,
    write_staleness,
)
from .runs import Run, dataset_title, flatten, load_metrics, load_run
from .table import (
    EXTRA_SCORES,
    RATIO,
    SCORES,
    Table,
    build_table,
    client_rows,
    columns,
    label_runs,
    write_csv,
    write_markdown,
)

__all__ = [
    "EXTRA_SCORES", "RATIO", "SCORES", "ReportError", "Run", "Table", "bar_figure", "build_table",
    "client_rows", "columns", "curves_figure", "dataset_title", "flatten", "heatmap_figure",
    "label_runs", "load_metrics", "load_run", "main", "make_report", "staleness_figure", "write_csv",
    "write_curves", "write_heatmap", "write_markdown", "write_png", "write_staleness",
]
