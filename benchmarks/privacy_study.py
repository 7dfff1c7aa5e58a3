#!/usr/bin/env python
"""Privacy in practice on the digits: what DP costs from scratch and from a public model.

    python benchmarks/privacy_study.py --dry-run    # the plan: runs, their settings, dependencies
    python benchmarks/privacy_study.py              # the study (start it again to resume)
    python benchmarks/privacy_study.py --seeds 0 --out /tmp/p -- --fed.rounds 2   # a smoke run

Every private run is the digits default (configs/digits.toml: 100 rounds of E = 1, classifier-free
guidance, 10 clients of about 144 images), one rank and one thread each, ``--jobs`` at a time.
Per seed (default 0 and 1; the seed also draws the partition and the public set's model init):

* ``public``: the public model alone: centralized and non-private on fedrun's printed digits
  (configs/digits_public.toml, 100 epochs), never touching the handwritten ones; scored
  against the handwritten test split (``fedrun eval RUN --data.name digits``) and audited against
  the handwritten train split (``fedrun audit RUN --data.name digits``), like the private runs.
* non-private FedAvg from scratch (the default), fine-tuned from the public model with all
  weights, and with LoRA (``model.trainable = "lora"``, rank 4);
* sample-level DP (DP-SGD in every client) at epsilon 1 / 4 / 8 (delta 1e-5, the noise
  multiplier solved from the target by fedrun: ``privacy.noise_multiplier = 0``): from
  scratch, fine-tuned with all weights, with LoRA, and with LoRA and noise multiplicity
  K = 4 (epsilon 1 and 8: K = 4 costs ~3.5x the compute), and at epsilon 8 a short LoRA
  fine-tune of 10 rounds (fewer noisy steps, each with less noise; also with K = 4) and a
  fine-tune of only the biases and embeddings (``model.trainable = "norms_biases"``: 629 numbers
  get the noise);
* client-level DP (DP-FedAvg) at epsilon 8 on the cross-device config
  (configs/digits_cross_device.toml: 300 clients of 4-5 images, q = 0.1), fine-tuned from the
  public model with only biases and embeddings trained (``model.trainable = "norms_biases"``:
  629 numbers, the only subset whose noise-to-signal figure is below 1 there).

Every finished run is audited (``fedrun audit``: membership-inference AUC and TPR at 1 % FPR,
near-copies). Results: ``benchmarks/results/privacy_study.{md,json,png}``: mean and std over the
seeds per row, with epsilon, FID (test), class accuracy (fedrun's classifier), the audit, the
bytes all participants upload per round (``bytes_up``) and the runs' wall time. Finished runs,
evaluations and audits are skipped when the script is started again; the sessions' wall time is
summed in ``<out>/sessions.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' own modules
import study_runner as sr  # noqa: E402

ROOT = sr.ROOT
PRIVATE, PUBLIC, CROSS = (ROOT / "configs" / f"{name}.toml"
                          for name in ("digits", "digits_public", "digits_cross_device"))
LORA = {"model.trainable": "lora", "model.lora_rank": "4"}


def plan(out: Path, seeds: list[int], extra: dict[str, str]) -> list[sr.Job]:
    jobs: list[sr.Job] = []
    for s in seeds:
        public = sr.Job("public", s, PUBLIC, {}, score_as={"data.name": "digits"})
        init = {"model.init_from": str(out / public.name)}
        jobs += [public, sr.Job("scratch", s, PRIVATE, {}),
                 sr.Job("finetune_all", s, PRIVATE, dict(init), after=public.name),
                 sr.Job("finetune_lora", s, PRIVATE, {**init, **LORA}, after=public.name)]
        for eps in (1, 4, 8):
            # the noise multiplier is fedrun's to solve: the smallest that keeps the run within eps
            dp = {"privacy.level": "sample", "privacy.target_epsilon": str(eps),
                  "privacy.noise_multiplier": "0"}
            jobs += [sr.Job(f"dp{eps}_scratch", s, PRIVATE, dict(dp)),
                     sr.Job(f"dp{eps}_finetune_all", s, PRIVATE, {**dp, **init}, after=public.name),
                     sr.Job(f"dp{eps}_finetune_lora", s, PRIVATE, {**dp, **init, **LORA}, after=public.name)]
            if eps in (1, 8):
                jobs.append(sr.Job(f"dp{eps}_finetune_lora_k4", s, PRIVATE,
                                {**dp, **init, **LORA, "privacy.multiplicity": "4"}, after=public.name))
            if eps == 8:  # a short fine-tune: 10 rounds (10x fewer noisy steps, less noise each)
                jobs.append(sr.Job(f"dp{eps}_finetune_lora_r10", s, PRIVATE,
                                {**dp, **init, **LORA, "fed.rounds": "10"}, after=public.name))
                jobs.append(sr.Job(f"dp{eps}_finetune_lora_r10_k4", s, PRIVATE,
                                {**dp, **init, **LORA, "fed.rounds": "10", "privacy.multiplicity": "4"},
                                after=public.name))
                # only biases and embeddings (629 numbers): the least noise per trained number
                jobs.append(sr.Job(f"dp{eps}_finetune_nb", s, PRIVATE,
                                {**dp, **init, "model.trainable": "norms_biases"}, after=public.name))
        jobs.append(sr.Job("client_dp8_cross_device", s, CROSS, {**init, "model.trainable": "norms_biases"},
                        after=public.name))
    for j in jobs:
        j.overrides = {**sr.COMMON, **j.overrides, "run.seed": str(j.seed), "run.out_dir": str(out),
                       "run.name": j.name, **extra}
    return jobs


def run_job(job: sr.Job, out: Path, done: dict[str, threading.Event], audit_options: list[str]) -> None:
    """Train (or resume), score against the handwritten digits if asked, audit."""
    if job.after is not None:
        done[job.after].wait()
        if not (out / job.after / "summary.json").exists():
            raise RuntimeError(f"{job.name}: its public model {job.after} did not finish")
    run_dir = out / job.name
    log = out / f"{job.name}.log"
    try:
        if not (run_dir / "summary.json").exists():
            sr.run_fedrun(["--config", str(job.config), *sr.cli_args(job.overrides)], log)
        score = sr.cli_args(job.score_as)
        if job.score_as and not list((run_dir / "eval").glob("*.json")):
            sr.run_fedrun(["eval", str(run_dir), *score, "--run.threads", "1"], log)
        if not (run_dir / "audit.json").exists():
            sr.run_fedrun(["audit", str(run_dir), *score, *audit_options], log)
        print(f"privacy_study: {job.name} done", flush=True)
    finally:
        done[job.name].set()


def result(job: sr.Job, out: Path) -> dict[str, Any] | None:
    run_dir = out / job.name
    if not (run_dir / "summary.json").exists() or not (run_dir / "audit.json").exists():
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    scores = summary.get("scores") or {}
    if job.score_as:  # the public model, scored against the handwritten digits by fedrun eval
        scores = json.loads(sorted((run_dir / "eval").glob("*.json"))[-1].read_text())
    audit = json.loads((run_dir / "audit.json").read_text())
    privacy = summary.get("privacy") or {}
    records = sr.metrics(run_dir)
    return {"run": str(run_dir), "epsilon": privacy.get("epsilon_max"), "delta": privacy.get("delta"),
            "noise_multiplier": privacy.get("noise_multiplier"), "fid_test": scores.get("fid_test"),
            "class_acc": scores.get("class_acc"), "auc": audit["auc"], "tpr": audit["tpr_at_1pct_fpr"],
            "near_copies": audit["near_copies"], "audit_samples": audit["num_samples"],
            # what a real round uploads (all participants' messages), not what the simulation's
            # all_reduce moves (its int64 fixed-point buffer is twice the fp32 model)
            "bytes_per_round": sr.stat([r.get("bytes_up") for r in records])[0],  # None: centralized
            "wall_s": summary.get("wall_s")}


ROWS = [  # (row, what it is)
    ("public", "public model only (printed digits, centralized, no DP)"),
    ("scratch", "FedAvg from scratch, no DP (the default)"),
    ("finetune_all", "fine-tuned from public, all weights, no DP"),
    ("finetune_lora", "fine-tuned from public, LoRA r4, no DP"),
    *[(f"dp{e}_{kind}", f"sample-level eps {e}, {what}") for e in (1, 4, 8)
      for kind, what in (("scratch", "from scratch"), ("finetune_all", "fine-tuned, all weights"),
                         ("finetune_lora", "fine-tuned, LoRA r4"),
                         ("finetune_lora_k4", "fine-tuned, LoRA r4, multiplicity 4"))],
    ("dp8_finetune_lora_r10", "sample-level eps 8, fine-tuned, LoRA r4, 10 rounds (10 epochs)"),
    ("dp8_finetune_lora_r10_k4", "sample-level eps 8, fine-tuned, LoRA r4, 10 rounds, multiplicity 4"),
    ("dp8_finetune_nb", "sample-level eps 8, fine-tuned, biases + embeddings"),
    ("client_dp8_cross_device", "client-level eps 8, cross-device (300 clients, q 0.1), biases + embeddings"),
]


def write_results(jobs: list[sr.Job], out: Path, results: Path, command: str) -> dict[str, Path]:
    by_row: dict[str, list[dict[str, Any]]] = {}
    for j in jobs:
        r = result(j, out)
        if r is not None:
            by_row.setdefault(j.row, []).append({"seed": j.seed, **r})
    past, wall = sr.sessions(out)
    lines = ["# Privacy in practice on the digits", "",
             f"Written by `{command}`. Every run: the digits default's budget (100 epochs), one rank, "
             f"one thread; mean ± std over the seeds (n = runs per row); epsilon at delta 1e-5 (sample "
             f"level: the worst client; PRV accountant); FID (test) and class accuracy from fedrun's "
             f"classifier against the handwritten test split; membership inference (loss threshold, "
             f"best noise level) and near-copies from `fedrun audit`. Wall time of the study: "
             f"{wall:.0f} s over {len(past)} session(s).", "",
             "| setting | n | epsilon | noise mult. | FID (test) | class acc | MIA AUC | TPR @ 1% FPR | "
             "near-copies | MB up / round | run wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row, what in ROWS:
        rs = by_row.get(row, [])
        if not rs:
            continue
        eps = sr.cell([r["epsilon"] for r in rs]) if rs[0]["epsilon"] is not None else "inf"
        lines.append(f"| {what} | {len(rs)} | {eps} | {sr.cell([r['noise_multiplier'] for r in rs])} | "
                     f"{sr.cell([r['fid_test'] for r in rs])} | "
                     f"{sr.cell([r['class_acc'] for r in rs], '.3f')} | "
                     f"{sr.cell([r['auc'] for r in rs], '.3f')} | {sr.cell([r['tpr'] for r in rs], '.3f')} | "
                     f"{sr.cell([r['near_copies'] for r in rs], '.1f')} / {rs[0]['audit_samples']} | "
                     f"{sr.cell([sr.mb(r['bytes_per_round']) for r in rs], '.3f')} | "
                     f"{sr.cell([r['wall_s'] for r in rs], '.0f')} |")
    missing = [j.name for j in jobs if result(j, out) is None]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)}."]
    not_run = [row for row, _ in ROWS if row not in {j.row for j in jobs}]
    if not_run:
        lines += ["", f"Not in this study (`--rows`): {', '.join(not_run)}."]
    payload = {"command": command, "wall_s": wall, "sessions": past, "rows": by_row}
    return sr.write_report(results, "privacy_study", lines, payload, lambda path: write_png(by_row, path))


def write_png(by_row: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """FID (test), class accuracy and MIA AUC against epsilon, one line per recipe."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 4), constrained_layout=True)
    axes = fig.subplots(1, 3)
    xs = {1: 0, 4: 1, 8: 2, None: 3}
    recipes = [("scratch", "from scratch"), ("finetune_all", "fine-tuned, all"),
               ("finetune_lora", "fine-tuned, LoRA"), ("finetune_lora_k4", "fine-tuned, LoRA, K = 4"),
               ("finetune_lora_r10", "fine-tuned, LoRA, 10 rounds"),
               ("finetune_lora_r10_k4", "fine-tuned, LoRA, 10 rounds, K = 4"),
               ("finetune_nb", "fine-tuned, biases + embeddings")]
    for ax, (key, title) in zip(axes, (("fid_test", "FID (test), lower is better"),
                                       ("class_acc", "class accuracy"),
                                       ("auc", "membership AUC (0.5 = no signal)")), strict=True):
        for kind, label in recipes:
            pts = []
            for eps in (1, 4, 8, None):
                row = kind if eps is None else f"dp{eps}_{kind}"
                if row.endswith("_k4") and eps is None:
                    continue
                mean, std, _ = sr.stat([r[key] for r in by_row.get(row, [])])
                if mean is not None:
                    pts.append((xs[eps], mean, std or 0.0))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=label)
        public, _, _ = sr.stat([r[key] for r in by_row.get("public", [])])
        if public is not None:
            ax.axhline(public, color="grey", linestyle="--", label="public model only")
        ax.set_xticks(range(4), ["eps 1", "eps 4", "eps 8", "no DP"])
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def run_jobs(label: str, jobs: list[sr.Job], order: list[sr.Job], out: Path, workers: int,
             audit_options: list[str]) -> int:
    """Run ``order`` (the jobs still to do) on ``workers`` workers, each waiting for the run it
    starts from (finished ones count as done); 1 if any failed."""
    done = {j.name: threading.Event() for j in jobs}
    for j in jobs:
        if j not in order:
            done[j.name].set()
    tasks = [functools.partial(run_job, j, out, done, audit_options) for j in order]
    return sr.run_pool(label, tasks, workers, out)


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    argv_, extra_args = sr.split_extra(given)  # after --: overrides of every run
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "privacy_study")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--seeds", default="0,1", help="comma-separated (default 0,1)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--rows", default="", help="comma-separated rows to run (default all; the public "
                   "model is added where a row starts from it); --dry-run lists them")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--audit-options", default="", help="e.g. '--samples 20 --draws 1' for a smoke run")
    args = p.parse_args(argv_)
    extra = sr.parse_overrides(p, extra_args)
    out = args.out.resolve()
    jobs = sr.select_rows(p, plan(out, [int(s) for s in args.seeds.split(",")], extra), args.rows, ROWS)
    todo = [j for j in jobs if result(j, out) is None]
    print(f"privacy_study: {len(jobs)} runs, {len(jobs) - len(todo)} finished, {len(todo)} to do, in {out}")
    if args.dry_run:
        for j in jobs:
            print(f"  {j.name}: {j.config.name} {j.overrides}" + (f" after {j.after}" if j.after else ""))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    code = 0
    if todo and not args.report_only:
        # public models first, so that the runs starting from them do not hold a worker waiting;
        # then row by row in the order asked, both seeds of a row together
        priority = args.rows.split(",") if args.rows else [row for row, _ in ROWS]
        order = sorted(todo, key=lambda j: (j.after is not None, j.row != "public",
                                            priority.index(j.row) if j.row in priority else 0, j.seed))
        code = run_jobs("privacy_study", jobs, order, out, args.jobs, args.audit_options.split())
    command = " ".join(["python", "benchmarks/privacy_study.py", *given])
    paths = write_results(jobs, out, args.results, command)
    print(paths["md"].read_text())
    return code


if __name__ == "__main__":
    sys.exit(main())
