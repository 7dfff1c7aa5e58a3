"""``fedrun report RUN_DIR... [--out DIR]``: ``make_report`` (the Python entry point, used by the
benchmarks) and ``main`` (the command line). A ``ReportError`` goes up to ``fedrun.__main__``,
which prints it as one ``fedrun: error:`` line with exit code 4.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from ...errors import ReportError
from .plots import write_curves, write_heatmap, write_png, write_staleness
from .runs import Run, load_metrics, load_run
from .table import (
    Table,
    build_table,
    client_markdown,
    print_table,
    write_clients_csv,
    write_csv,
    write_markdown,
)


def curve_names(runs: list[Run]) -> list[str]:
    """File stems for the runs' curves: the folder name, with its parent's when two runs share it."""
    names = [r.path.name for r in runs]
    return [f"{r.path.resolve().parent.name}_{n}" if names.count(n) > 1 else n
            for r, n in zip(runs, names, strict=True)]


def make_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
                curves: bool = True) -> tuple[Table, dict[str, Path]]:
    """Write report.md/.csv/.png (and, when some run has them, report_clients.csv/.png and, with
    ``curves``, ``<run>_curves.png`` per run with a metrics.jsonl, and ``<run>_staleness.png`` per
    FedBuff run) for ``run_dirs``; returns the table and the paths written ("md", "csv", "png",
    "clients_csv", "clients_png", "curves:<run>", "staleness:<run>")."""
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
    if curves:
        for run, name in zip(ordered, curve_names(ordered), strict=True):
            path = out / f"{name}_curves.png"
            records = load_metrics(run.path)
            if write_curves(run, records, path):
                paths[f"curves:{name}"] = path
            if write_staleness(run, records, out / f"{name}_staleness.png"):  # FedBuff runs
                paths[f"staleness:{name}"] = out / f"{name}_staleness.png"
    return table, paths


def main(argv: Sequence[str] | None = None) -> int:
    """``fedrun report`` subcommand; returns 0. Bad run dirs raise ``ReportError`` (exit code 4
    through ``fedrun.__main__``); argparse exits with 2 on a bad command line."""
    parser = argparse.ArgumentParser(
        prog="fedrun report", description="One results table over finished runs (the paper's layout): "
        "report.md/.csv/.png, per-client tables and heat map, and each run's curves.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding summary.json")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where the report files go (default: the run dirs' common parent)")
    parser.add_argument("--no-curves", action="store_true",
                        help="skip the per-run <run>_curves.png drawn from metrics.jsonl")
    args = parser.parse_args(argv)
    table, paths = make_report(args.run_dirs, args.out, curves=not args.no_curves)
    print_table(table)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
