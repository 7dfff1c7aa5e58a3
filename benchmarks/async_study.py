#!/usr/bin/env python
"""Asynchronous against synchronous rounds on the straggler federation (issue 26's study). One command:

    python benchmarks/async_study.py                     # every row, 3 seeds, two runs at a time
    python benchmarks/async_study.py --rows sync,k10_c100 --dry-run
    python benchmarks/async_study.py --seeds 0               # one seed first; the others later
    python benchmarks/async_study.py --report-only       # the tables and plots from what finished

The federation is docs/systems.md's "Availability and stragglers": the digits over 1,000 clients
of 1-2 images (configs/digits_cross_device_scale.toml), 30 % of the clients offline, speeds
lognormal(0.5), 2 simulated seconds of download and upload per client:

* ``sync``: synchronous FedAvg as measured there (today's best): 20 clients a round, 1.6x
  over-selection, a 6 s deadline, 1,500 rounds (30,000 client updates selected);
* ``k{K}_c{C}``: FedBuff (configs/digits_cross_device_fedbuff.toml) with buffer K in {10, 20} and
  concurrency C in {50, 100}, polynomial staleness weights (1 + tau)^-0.5, 30,000 / K server
  steps (30,000 client updates used).

Every run scores FID (test) and class accuracy (fedrun's classifier) every 2,000 client updates
(sync: every 100 rounds; FedBuff: every 2,000 / K steps) and at its end, with its simulated clock
(``sim_clock_s``) and the updates summed so far (``clients_trained``) beside each score. Results:
``benchmarks/results/async_study.{md,json,png}``: FID (test) and class accuracy against simulated
hours and against client updates (mean over the seeds), each row's final scores, and per seed the
simulated time (and client updates) each FedBuff row takes to reach synchronous FedAvg's final FID
of the same seed, against sync's own time. Issue 26's goals: <= 1/2 of sync's simulated time on
every seed; within 1.1x of sync's FID at equal client updates.

Runs already finished are skipped when started again, and a stopped run resumes from its last
checkpoint (fedrun's resume; benchmarks/study_runner.py). ``--dry-run`` prints the plan and trains
nothing; ``-- --section.key VALUE ...`` after the options overrides every run.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' own modules
import study_runner as sr  # noqa: E402

ROOT = sr.ROOT
SYNC_CONFIG = ROOT / "configs" / "digits_cross_device_scale.toml"
FEDBUFF_CONFIG = ROOT / "configs" / "digits_cross_device_fedbuff.toml"
SEEDS = (0, 1, 2)
UPDATES = 30_000  # client updates of each run (sync: selected; FedBuff: used)
EVAL_UPDATES = 2_000  # client updates between two scores
STRAGGLERS = {"fed.availability": "0.7", "fed.speed_sigma": "0.5", "fed.sim_client_s": "2"}
SYNC = {**STRAGGLERS, "fed.over_select": "1.6", "fed.deadline_s": "6", "fed.rounds": str(UPDATES // 20),
        "eval.every": str(EVAL_UPDATES // 20), "checkpoint.every": "100"}
GRID = [(k, c) for k in (10, 20) for c in (50, 100)]
ROWS: list[tuple[str, str]] = [
    ("sync", "synchronous FedAvg, 20 a round, 1.6x over-selection, 6 s deadline"),
    *[(f"k{k}_c{c}", f"FedBuff K = {k}, C = {c}") for k, c in GRID],
]


def plan(out: Path, extra: dict[str, str], seeds: tuple[int, ...] = SEEDS) -> list[sr.Job]:
    jobs = []
    for s in seeds:
        jobs.append(sr.Job("sync", s, SYNC_CONFIG, dict(SYNC)))
        for k, c in GRID:
            jobs.append(sr.Job(f"k{k}_c{c}", s, FEDBUFF_CONFIG, {
                "fed.buffer_size": str(k), "fed.concurrency": str(c), "fed.rounds": str(UPDATES // k),
                "eval.every": str(EVAL_UPDATES // k), "checkpoint.every": str(2000 // k)}))
    for j in jobs:
        j.overrides = {**sr.COMMON, **j.overrides, "run.seed": str(j.seed), "run.out_dir": str(out),
                       "run.name": j.name, **extra}
    return jobs


def run_job(job: sr.Job, out: Path) -> None:
    """Train it, or resume it from its last checkpoint, unless it finished."""
    if not (out / job.name / "summary.json").exists():
        sr.run_fedrun(["--config", str(job.config), *sr.cli_args(job.overrides)], out / f"{job.name}.log")
    print(f"async_study: {job.name} done", flush=True)


# --------------------------------------------------------------------------------------------
# Reading the runs


def curve(run_dir: Path) -> list[dict[str, Any]]:
    """The scored points of one run: (round, simulated hours, client updates summed so far, FID
    (test), class accuracy), from its metrics.jsonl."""
    points, updates = [], 0
    for rec in sr.metrics(run_dir):
        updates += int(rec.get("clients_trained", 0))
        scores = rec.get("scores") or {}
        if "fid_test" in scores:
            points.append({"round": rec["round"], "sim_h": rec.get("sim_clock_s", 0.0) / 3600,
                           "updates": updates, "fid_test": scores["fid_test"],
                           "class_acc": scores.get("class_acc")})
    return points


def first_reaching(points: list[dict[str, Any]], fid: float) -> dict[str, Any] | None:
    """The first scored point at or below ``fid``; None if the run never got there."""
    return next((p for p in points if p["fid_test"] <= fid), None)


def at_updates(points: list[dict[str, Any]], updates: int) -> dict[str, Any] | None:
    """The first scored point with at least ``updates`` client updates (else the last one)."""
    return next((p for p in points if p["updates"] >= updates), points[-1] if points else None)


def compare(curves: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per FedBuff row and seed: the time (and updates) to synchronous FedAvg's final FID of the
    same seed as a fraction of sync's, and its FID at sync's final client updates over sync's."""
    out: dict[str, Any] = {}
    for row, _ in ROWS[1:]:
        per_seed = []
        for seed, pts in sorted(curves.get(row, {}).items()):
            sync = curves.get("sync", {}).get(seed)
            if not sync or not pts:
                continue
            target, final = sync[-1]["fid_test"], sync[-1]
            hit = first_reaching(pts, target)
            equal = at_updates(pts, final["updates"])
            per_seed.append({
                "seed": seed, "sync_final_fid": target, "sync_sim_h": final["sim_h"],
                "sync_updates": final["updates"],
                "reached": hit is not None, "sim_h": hit["sim_h"] if hit else None,
                "updates": hit["updates"] if hit else None,
                "time_fraction": hit["sim_h"] / final["sim_h"] if hit and final["sim_h"] > 0 else None,
                "fid_at_equal_updates": equal["fid_test"] if equal else None,
                "fid_ratio_at_equal_updates": equal["fid_test"] / target if equal and target > 0 else None})
        fractions = [p["time_fraction"] for p in per_seed]
        ratios = [p["fid_ratio_at_equal_updates"] for p in per_seed]
        out[row] = {"per_seed": per_seed,
                    "half_the_time_on_every_seed": bool(per_seed) and all(f is not None and f <= 0.5
                                                                          for f in fractions),
                    "within_1.1x_fid_at_equal_updates": bool(per_seed) and all(r is not None and r <= 1.1
                                                                               for r in ratios)}
    return out


# --------------------------------------------------------------------------------------------
# The results


def _mean_curve(seeds: dict[int, list[dict[str, Any]]], x: str, y: str) -> list[tuple[float, float]]:
    """The seeds' points averaged index by index (the same scored rounds on every seed)."""
    n = min((len(p) for p in seeds.values()), default=0)
    out = []
    for i in range(n):
        xs = [p[i][x] for p in seeds.values()]
        ys = [p[i][y] for p in seeds.values() if p[i][y] is not None]
        if ys:
            out.append((sum(xs) / len(xs), sum(ys) / len(ys)))
    return out


def write_png(curves: dict[str, dict[int, list[dict[str, Any]]]], path: Path) -> None:
    """FID (test) and class accuracy against simulated hours and against client updates."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 7.5), constrained_layout=True)
    axes = fig.subplots(2, 2)
    for (i, y, ylabel), (j, x, xlabel) in ((a, b) for a in ((0, "fid_test", "FID (test), lower is better"),
                                                            (1, "class_acc", "class accuracy"))
                                           for b in ((0, "sim_h", "simulated hours"),
                                                     (1, "updates", "client updates summed"))):
        ax = axes[i][j]
        for row, what in ROWS:
            pts = _mean_curve(curves.get(row, {}), x, y)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                        linestyle="--" if row == "sync" else "-", label=what)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if y == "fid_test":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Synchronous FedAvg against FedBuff, 1,000 digits clients with stragglers "
                 "(mean of the seeds)")
    fig.savefig(path, dpi=110)


def write_results(jobs: list[sr.Job], out: Path, results: Path, command: str) -> dict[str, Path]:
    curves: dict[str, dict[int, list[dict[str, Any]]]] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    for j in jobs:
        run_dir = out / j.name
        pts = curve(run_dir)
        if (run_dir / "summary.json").exists() and pts:
            curves.setdefault(j.row, {})[j.seed] = pts
            finals.setdefault(j.row, []).append({"seed": j.seed, **pts[-1]})
    verdicts = compare(curves)
    past, wall = sr.sessions(out)
    lines = ["# Asynchronous (FedBuff) against synchronous FedAvg: 1,000 digits clients with stragglers", "",
             f"Written by `{command}`. 30 % of the clients offline, speeds lognormal(0.5), 2 simulated s "
             f"of transfer per client; FID (test) and class accuracy from fedrun's classifier. Mean ± std "
             f"over the seeds (n). Wall time of the study: {wall:.0f} s over {len(past)} session(s).", "",
             "| setting | n | client updates | simulated hours | FID (test) | class acc |",
             "|---|---:|---:|---:|---:|---:|"]
    for row, what in ROWS:
        rs = finals.get(row, [])
        if rs:
            lines.append(f"| {what} | {len(rs)} | {sr.cell([r['updates'] for r in rs], '.0f')} | "
                         f"{sr.cell([r['sim_h'] for r in rs])} | {sr.cell([r['fid_test'] for r in rs])} | "
                         f"{sr.cell([r['class_acc'] for r in rs], '.3f')} |")
    lines += ["", "Time to reach synchronous FedAvg's final FID (test) of the same seed, as a fraction of "
              "sync's simulated time (goal <= 0.5 on every seed), and FID at sync's final client updates "
              "over sync's (goal <= 1.1):", ""]
    for row, what in ROWS[1:]:
        v = verdicts.get(row)
        if not v or not v["per_seed"]:
            continue
        cells = "; ".join(
            f"seed {p['seed']}: " + (f"{p['time_fraction']:.2f} ({p['sim_h']:.2f} h, {p['updates']} updates)"
                                     if p["reached"] else "not reached")
            + (f", FID ratio {p['fid_ratio_at_equal_updates']:.2f}" if p["fid_ratio_at_equal_updates"]
               is not None else "") for p in v["per_seed"])
        lines.append(f"- {what}: {cells}. Half the time on every seed: "
                     f"{'yes' if v['half_the_time_on_every_seed'] else 'no'}; within 1.1x at equal updates: "
                     f"{'yes' if v['within_1.1x_fid_at_equal_updates'] else 'no'}.")
    missing = [j.name for j in jobs if j.seed not in curves.get(j.row, {})]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)}."]
    payload = {"command": command, "wall_s": wall, "sessions": past, "curves": curves, "final": finals,
               "verdicts": verdicts}
    return sr.write_report(results, "async_study", lines, payload, lambda path: write_png(curves, path))


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    argv_, extra_args = sr.split_extra(given)  # after --: overrides of every run
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "async_study")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--rows", default="", help="comma-separated rows (default all; sync is always added)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                   help="comma-separated seeds (default 0,1,2); the report covers the ones planned")
    p.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    p.add_argument("--report-only", action="store_true", help="write the results from the finished runs")
    args = p.parse_args(argv_)
    extra = sr.parse_overrides(p, extra_args)
    out = args.out.resolve()
    jobs = plan(out, extra, tuple(int(x) for x in args.seeds.split(",")))
    if args.rows:  # every comparison is against sync
        jobs = sr.select_rows(p, jobs, f"{args.rows},sync", ROWS)
    todo = [j for j in jobs if not (out / j.name / "summary.json").exists()]
    print(f"async_study: {len(jobs)} runs, {len(todo)} to do, in {out}", flush=True)
    if args.dry_run:  # every run's config validated as fedrun would (one line per refusal)
        sys.path.insert(0, str(ROOT))
        from fedrun.config import load_config
        for j in jobs:
            load_config(j.config, j.overrides)
            print(f"  {j.name}: {j.config.relative_to(ROOT)} {j.overrides}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    code = 0
    if todo and not args.report_only:
        code = sr.run_pool("async_study", [functools.partial(run_job, j, out) for j in todo], args.jobs, out)
    command = " ".join(["python", "benchmarks/async_study.py", *given])
    paths = write_results(jobs, out, args.results, command)
    print(paths["md"].read_text())
    return code


if __name__ == "__main__":
    sys.exit(main())
