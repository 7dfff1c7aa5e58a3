#!/usr/bin/env python
"""FedAvg against centralized training on the digits default, with 95 % intervals: per seed
(``fedrun compare``, paired) and over the seeds (``fedrun report``'s rule).

    python benchmarks/eval_fedavg_vs_central.py --central C0 C1 C2 --fedavg F0 F1 F2
                                               [--out benchmarks/results/eval_fedavg_vs_central]

Each run needs its final round's generated features (``eval/round_0100_features.npz``: runs of
this version write them; for older runs ``fedrun eval RUN`` scores the same checkpoint again,
which gives the numbers training logged, and writes them). A run whose summary.json has no
intervals (trained before they existed) is reported with the scores of that ``fedrun eval`` file
(``eval/round_0100.json``: the same points, with intervals); the runs' folders are not changed.
Writes ``<out>.md`` and ``<out>.json`` (run folders by name only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrun.evaluation import compare, report  # noqa: E402
from fedrun.evaluation.report.table import resolution  # noqa: E402


def scored_view(run: Path, into: Path, keys: set[str]) -> Path:
    """A copy of the run's summary.json (and config) whose scores carry intervals, its config cut
    to ``keys`` ("section.key": those every run has; runs of two versions of fedrun may differ in
    keys that one of them did not know, which would otherwise label the rows apart)."""
    view = into / run.name
    view.mkdir(parents=True)
    summary = json.loads((run / "summary.json").read_text())
    summary["config"] = {sec: {k: v for k, v in body.items() if f"{sec}.{k}" in keys}
                         for sec, body in summary["config"].items() if isinstance(body, dict)}
    scores = summary.get("scores") or {}
    evaluated = run / "eval" / f"round_{scores.get('round', 0):04d}.json"
    if "fid_test_ci" not in scores and evaluated.is_file():
        again = json.loads(evaluated.read_text())
        assert again["fid_test"] == scores["fid_test"], f"{evaluated}: not the logged scores"
        summary["scores"] = {**scores, **again}
    (view / "summary.json").write_text(json.dumps(summary))
    shutil.copy(run / "config.toml", view / "config.toml")
    return view


def _ratio(row: dict[str, Any]) -> str:
    ci = row.get("ratio_ci")
    return f"{row['ratio']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{row['ratio']:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--central", type=Path, nargs="+", required=True)
    p.add_argument("--fedavg", type=Path, nargs="+", required=True)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_fedavg_vs_central")
    args = p.parse_args()
    result: dict[str, Any] = {"central": [r.name for r in args.central],
                              "fedavg": [r.name for r in args.fedavg], "per_seed": []}
    lines = ["# FedAvg vs centralized on the digits default, with 95 % intervals", "",
             f"Written by `python benchmarks/eval_fedavg_vs_central.py` (runs: "
             f"{', '.join(result['central'])} "
             f"and {', '.join(result['fedavg'])}; the digits default, 1 rank, 1 thread). Scores from the "
             f"proxy classifier on 360 samples against the 360-image test split.", "",
             "## Per seed: `fedrun compare CENTRAL FEDAVG` (paired bootstrap, "
             f"{args.resamples} resamples)", "",
             "| seed | FID (test) central | FedAvg | ratio [95 %] | verdict | FID∞ ratio [95 %] | verdict | "
             "KID x1e3 central / FedAvg: verdict | IS: verdict | class acc: verdict |",
             "|---|---:|---:|---:|---|---:|---|---|---|---|"]
    for central, fedavg in zip(args.central, args.fedavg, strict=True):
        res = compare.compare([central, fedavg], resamples=args.resamples)
        rows = {r["score"]: r for r in res["comparisons"][0]["scores"]}
        seed = json.loads((central / "summary.json").read_text())["config"]["run"]["seed"]
        result["per_seed"].append({"seed": seed, "central": central.name, "fedavg": fedavg.name,
                                   "scores": list(rows.values())})

        f, k = rows["fid_test"], rows["kid_test"]
        lines.append(f"| {seed} | {f['baseline']:.2f} | {f['run']:.2f} | {_ratio(f)} | {f['verdict']} | "
                     f"{_ratio(rows['fid_test_inf'])} | {rows['fid_test_inf']['verdict']} | "
                     f"{k['baseline'] * 1e3:.2f} / {k['run'] * 1e3:.2f}: {k['verdict']} | "
                     f"{rows['is_mean']['verdict']} | {rows['class_acc']['verdict']} |")
    runs = (*args.central, *args.fedavg)
    keys = set.intersection(*(set(report.flatten(json.loads((r / "summary.json").read_text())["config"]))
                              for r in runs))
    with tempfile.TemporaryDirectory() as tmp:
        views = [scored_view(r, Path(tmp) / "runs", keys) for r in runs]
        table, paths = report.make_report(views, Path(tmp) / "report", curves=False)
        md = paths["md"].read_text()
        fed_label = next(r.label for rs in table.cells.values() for r in rs
                         if r.flat["run.mode"] == "fedavg")
        ratio_ci = table.ratio_interval(fed_label, "digits")
    body = md[:md.index("\nRuns:")].rstrip().splitlines()
    lines += ["", "## Over the seeds: `fedrun report` (mean, its interval from the seeds' spread and the "
              "runs' sampling intervals)", "", *body]
    if ratio_ci is not None:
        result["over_seeds"] = {"fid_test_ratio": ratio_ci.mean, "ci": [ratio_ci.lo, ratio_ci.hi],
                                "verdict": resolution(ratio_ci)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
