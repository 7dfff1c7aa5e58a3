#!/usr/bin/env python
"""The paper's study on the embedded digits (issue 9, item 4): every sweep of
configs/digits_study/ (Tables I-IV and the fidelity methods, 3 seeds each), then one report.

    python benchmarks/fidelity_study.py --dry-run          # the plan: runs, epochs, a time estimate
    python benchmarks/fidelity_study.py                    # the study (start it again to resume)
    python benchmarks/fidelity_study.py --out /tmp/s --results /tmp/s/results -- --fed.rounds 1

Every run goes through launch/run_table.py (its plan, validation and runner): one rank per run,
``--jobs`` runs at a time (default 2 = one per core of a 2-core machine, each with one thread),
all runs under one folder (``--out``, default runs/digits_study/). A run that appears in
several tables with the same resolved config (e.g. FedAvg at alpha 0.5 with N = 10 is in
Tables I, II, III and the methods) is trained once and reported in each. Finished runs are
skipped and interrupted ones resume, so after a stop the same command continues; a failed run
does not stop the others, and the report covers the runs that finished (naming the missing).

Then ``fedrun report`` per sweep (``<out>/reports/<table>/report.md|csv|png``) and one combined
report: ``<results>/fidelity_study.md`` (every table, mean ± std over seeds, FID / centralized),
``fidelity_study.png`` (every table's bar charts, stacked) and ``fidelity_study.json`` (the
numbers), with the wall time of the study summed over the sessions that ran it
(``<out>/fidelity_study_sessions.json``). The budget of every run is configs/digits_study/base.toml.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

import run_table  # noqa: E402

from fedrun.errors import ConfigError  # noqa: E402
from fedrun.evaluation import report  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' own modules
from portable import portable  # noqa: E402

SWEEPS = ROOT / "configs" / "digits_study"
# A rough cost model for --dry-run, measured on the 2-core CPU this study is sized for, one
# thread per run, two runs at a time: seconds per epoch of the digits' 1,437 training images,
# and seconds per run for start-up, evaluation (360 samples x eval.steps) and the final grid.
SEC_PER_EPOCH = 3.0
SEC_PER_RUN = 60.0


def sweep_files(folder: Path) -> list[Path]:
    """The sweeps of ``folder`` (files with [[runs]]): table* first in order, then the others."""
    files = [p for p in sorted(folder.glob("*.toml")) if "runs" in run_table.tomllib.loads(p.read_text())]
    return sorted(files, key=lambda p: (not p.stem.startswith("table"), p.stem))


def config_key(job: run_table.Job) -> str:
    """Everything that makes a run, without its name: equal keys = the same run."""
    d = job.config.to_dict()
    d["run"].pop("name")
    d["run"].pop("threads")
    return json.dumps(d, sort_keys=True)


def plan_study(folder: Path, extra: list[str], seeds: list[int] | None
               ) -> tuple[list[tuple[Path, dict[str, Any], list[run_table.Job]]], dict[str, run_table.Job]]:
    """[(sweep, spec, jobs)] and, for every job name, the job that trains it (the first one with
    the same config)."""
    sweeps, trains, first = [], {}, {}
    for path in sweep_files(folder):
        jobs = run_table.plan(path, extra, seeds)
        sweeps.append((path, run_table.read_sweep(path), jobs))
        for job in jobs:
            trains[job.name] = first.setdefault(config_key(job), job)
    return sweeps, trains


def epochs(job: run_table.Job) -> float:
    """Data epochs of training: R x E, times the share of clients per round for FedAvg."""
    f = job.config.fed
    share = 1.0 if job.config.run.mode == "centralized" else f.clients_per_round / max(1, f.num_clients)
    return f.rounds * f.local_epochs * share


def sessions_file(out: Path) -> Path:
    return out / "fidelity_study_sessions.json"


def read_sessions(out: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(sessions_file(out).read_text())
    except (OSError, json.JSONDecodeError):
        return []


def _table_lines(md: str) -> tuple[list[str], list[str]]:
    """(the markdown table, the notes under it) of a report.md."""
    lines = md.splitlines()
    end = lines.index("") if "" in lines else len(lines)
    notes = []
    for line in lines[end + 1:]:
        if not line or line == "Runs:":
            break
        notes.append(line)
    return lines[:end], notes


def _numbers(table: report.Table) -> list[dict[str, Any]]:
    rows = []
    for label in table.labels:
        for d in table.datasets:
            runs = table.runs_of(label, d)
            if not runs:
                continue
            scores = {}
            for key, _ in report.columns(table):
                mean, std, n = table.stats(label, d, key)
                if mean is not None:
                    scores[key] = mean if key == report.RATIO[0] else {"mean": mean, "std": std, "n": n}
            rows.append({"setting": label, "data set": d, "runs": [str(r.path) for r in runs],
                         "wall_s": [r.wall_s for r in runs], "scores": scores})
    return rows


def _stack_png(parts: list[tuple[str, Path]], path: Path) -> None:
    """Every table's report.png under a title line, one below the other."""
    font = ImageFont.load_default()
    images = [(title, Image.open(p).convert("RGB")) for title, p in parts]
    width = max([im.size[0] for _, im in images] + [400])
    height = sum(im.size[1] + 26 for _, im in images) or 26
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    y = 0
    for title, im in images:
        draw.rectangle([0, y, width, y + 20], fill=(230, 230, 240))
        draw.text((8, y + 4), title, fill="black", font=font)
        out.paste(im, (0, y + 24))
        y += im.size[1] + 26
        im.close()
    out.save(path)


def write_results(sweeps: list[tuple[Path, dict[str, Any], list[run_table.Job]]],
                  trains: dict[str, run_table.Job], out: Path, results: Path,
                  command: str, name: str = "fidelity_study",
                  title: str = "The paper's study on the embedded digits") -> dict[str, Path]:
    """Per-sweep ``fedrun report`` and the combined md / png / json; returns their paths."""
    results.mkdir(parents=True, exist_ok=True)
    sessions = read_sessions(out)
    unique = {id(j): j for j in trains.values()}.values()
    finished = [j for j in unique if j.finished()]
    run_wall = sum(json.loads((j.run_dir / "summary.json").read_text()).get("wall_s") or 0.0
                   for j in finished)
    base = next(iter(unique)).config if unique else None
    lines = [f"# {title}", "",
             f"Written by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
             f"({platform.machine()}, {run_table.cores()} cores).", ""]
    if base is not None:
        lines += [f"Budget of every run (the sweeps' base.toml): R = {base.fed.rounds} rounds x "
                  f"E = {base.fed.local_epochs} local epochs unless a table sets them; FID/IS/class "
                  f"accuracy from fedrun's classifier on {base.eval.num_samples or 360} samples of "
                  f"{base.eval.steps} sampler steps.", ""]
    lines += [f"{len(finished)} of {len(unique)} distinct runs finished ({sum(len(j) for _, _, j in sweeps)} "
              f"table entries: a run shared by several tables is trained once). Wall time of the study: "
              f"{sum(s['wall_s'] for s in sessions):.0f} s over {len(sessions)} session(s); "
              f"sum of the runs' own wall times: {run_wall:.0f} s.", ""]
    numbers: dict[str, Any] = {"command": command, "cores": run_table.cores(), "sessions": sessions,
                               "wall_s": sum(s["wall_s"] for s in sessions), "runs_wall_s": run_wall,
                               "distinct_runs": len(unique), "finished_runs": len(finished), "tables": {}}
    pngs = []
    for path, spec, jobs in sweeps:
        title = spec.get("title", spec["table"])
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        lines += [f"## {title}", "", f"Sweep: `{where}`", ""]
        dirs = [trains[j.name].run_dir for j in jobs if trains[j.name].finished()]
        missing = [j.name for j in jobs if not trains[j.name].finished()]
        if dirs:
            table, paths = report.make_report(list(dict.fromkeys(dirs)), out / "reports" / spec["table"])
            rows, notes = _table_lines(paths["md"].read_text())
            lines += rows + [""] + notes
            if spec.get("finding"):  # what the table shows, written with the sweep (its numbers above)
                lines += ["", f"**Finding.** {spec['finding']}"]
            walls = [f"{row['setting']}: {statistics.fmean(w):.0f}" for row in _numbers(table)
                     if (w := [x for x in row["wall_s"] if x])]
            lines.append(f"Wall time of a run (s, mean over its seeds; the machine's load varies): "
                         f"{'; '.join(walls)}.")
            pngs.append((title, paths["png"]))
            numbers["tables"][spec["table"]] = {"title": title, "rows": _numbers(table), "missing": missing}
        if missing:
            lines += ["", f"Not finished: {', '.join(missing)}."]
        lines.append("")
    md, png, js = (results / f"{name}.{ext}" for ext in ("md", "png", "json"))
    md.write_text(portable("\n".join(lines)))
    if pngs:
        _stack_png(pngs, png)
    js.write_text(portable(json.dumps(numbers, indent=2)))
    return {"md": md, "png": png, "json": js}


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    argv, extra = run_table.split_extra(given)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeps", type=Path, default=SWEEPS, help="folder of sweep files")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (default: base.toml's run.out_dir, runs/digits_study)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                   help="where <name>.md/.png/.json go")
    p.add_argument("--name", default="fidelity_study",
                   help="file stem of the results (default fidelity_study)")
    p.add_argument("--title", default="The paper's study on the embedded digits",
                   help="heading of <name>.md")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one rank each (default 2)")
    p.add_argument("--seeds", type=run_table.parse_seeds, default=None, help="e.g. 0,1: replaces the sweeps'")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--report-only", action="store_true", help="train nothing, report the finished runs")
    args = p.parse_args(argv)
    if args.out is not None:
        extra = ["--run.out_dir", str(args.out.resolve()), *extra]
    try:
        sweeps, trains = plan_study(args.sweeps, extra, args.seeds)
    except (ConfigError, KeyError, TypeError, OSError, run_table.tomllib.TOMLDecodeError) as exc:
        print(f"fidelity_study: error: {exc}", file=sys.stderr)
        return 2
    if not sweeps:
        print(f"fidelity_study: error: no sweep files in {args.sweeps}", file=sys.stderr)
        return 2
    unique = list({id(j): j for j in trains.values()}.values())
    out = unique[0].run_dir.parent
    todo = [j for j in unique if not j.finished()]
    for _, spec, jobs in sweeps:
        shared = sum(trains[j.name] is not j for j in jobs)
        done = sum(trains[j.name].finished() for j in jobs)
        settings = list(dict.fromkeys(j.setting for j in jobs))
        print(f"{spec['table']}: {len(jobs)} runs ({len(settings)} settings x "
              f"{len(jobs) // max(1, len(settings))} seeds: {', '.join(settings)}); {done} finished, "
              f"{shared} trained by an earlier table")
    total_epochs = sum(epochs(j) for j in todo)
    estimate = (SEC_PER_EPOCH * total_epochs + SEC_PER_RUN * len(todo)) / args.jobs
    print(f"fidelity_study: {sum(len(j) for _, _, j in sweeps)} table entries, {len(unique)} distinct runs, "
          f"{len(unique) - len(todo)} finished, {len(todo)} to train ({total_epochs:.0f} data epochs); "
          f"about {estimate / 60:.0f} min at {args.jobs} at a time on a 2-core CPU; runs in {out}")
    if args.dry_run:
        return 0
    code = 0
    if todo and not args.report_only:
        t0 = time.perf_counter()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            code, _ = run_table.run_jobs(unique, nproc=1, parallel=args.jobs, keep_going=True,
                                         log=lambda line: print(line, flush=True))
        finally:
            out.mkdir(parents=True, exist_ok=True)
            wall = round(time.perf_counter() - t0, 1)
            sessions = read_sessions(out) + [{"started": started, "wall_s": wall, "jobs": args.jobs,
                                              "runs": len(todo)}]
            sessions_file(out).write_text(json.dumps(sessions, indent=2))
    command = shlex.join(["python", "benchmarks/fidelity_study.py", *given])
    paths = write_results(sweeps, trains, out, args.results, command, args.name, args.title)
    print(f"fidelity_study: wrote {', '.join(str(p) for p in paths.values() if p.exists())}")
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
