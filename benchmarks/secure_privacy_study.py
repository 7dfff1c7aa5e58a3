#!/usr/bin/env python
"""The noise paid once: local DP-SGD against noise once under secure aggregation against
centralized DP-SGD on the union, on the digits (issue 25's study). One command:

    python benchmarks/secure_privacy_study.py                  # every row, its seeds, two at a time
    python benchmarks/secure_privacy_study.py --rows once8,local8 --dry-run

Every private row fine-tunes the public model (configs/digits_public.toml, pretrained on printed
digits, one per seed) in its biases and embeddings (``model.trainable = "norms_biases"``: the best
recipe of the privacy study) for the default's budget, 100 epochs, at sample level (the image is
the unit; epsilon of the worst client at delta 1e-5), the noise solved from the target:

* ``local``: today's DP-SGD in every client (privacy.level = "sample"): each client's steps of ~32
  images carry their own noise;
* ``once``: privacy.level = "sample_once" under SecAgg+ with 16-bit distributed Skellam noise: a
  round is one step over the federation's Poisson batch (every image at rate 320 / 1,437), the
  noise added once, in shares, to the secure sum; FedAdam on the server; 500 rounds;
* ``central``: one client holding all 1,437 images, DP-SGD at batch 320 (the same rate) for 100
  epochs of 5 steps: the same 500 steps, the upper bound of any sample-level federated mechanism
  at this epsilon.

Plus: the public model alone and fine-tuned without DP; the frontier at epsilon 16 and 32 (two
seeds), local DP-SGD also at 64 (its FID barely moves from 8 to 32), and the far end: noise once's
recipe at next to no noise (``once_clip``: z = 0.05, no budget, not private: what clipping and
FedAdam alone reach); secure_agg.bits 12 / 20 against 16 and against no grid (0: the server's
Gaussian once on the exact sum); client level on the cross-device config (300 clients, q = 0.1)
with the server's noise against distributed noise at 16 bits (shares sized for t survivors, the
default; for all 30; for 20; for 90 % of each round).

Results: ``benchmarks/results/secure_privacy_study.{md,json,png}`` (class accuracy, FID (test), MIA
AUC, bytes, wall time; noise once's FID over centralized DP-SGD's per seed; the epsilon at which
each mechanism first beats the public model on every seed, by 0.05 in class accuracy and by 5 % in
FID). Runs, evaluations and audits already finished are skipped when started again
(privacy_study.py's run_job on benchmarks/study_runner.py's pool).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' own modules
import privacy_study as ps  # noqa: E402
import study_runner as sr  # noqa: E402

ROOT = sr.ROOT
PRIVATE, PUBLIC, CROSS = ps.PRIVATE, ps.PUBLIC, ps.CROSS
NB = {"model.trainable": "norms_biases"}
ONCE = {"privacy.level": "sample_once", "secure_agg.protocol": "secagg+", "secure_agg.bits": "16",
        "fed.server_opt": "fedadam", "fed.server_lr": "2e-3", "fed.rounds": "500", "checkpoint.every": "50"}
CENTRAL = {"privacy.level": "sample", "fed.num_clients": "1", "fed.clients_per_round": "1",
           "optim.batch_size": "320", "fed.client_optimizer": "keep", "fed.placement": "cost"}
LOCAL = {"privacy.level": "sample"}
MECHANISMS = {"local": LOCAL, "once": ONCE, "central": CENTRAL}
FULL_SEEDS, FRONTIER_SEEDS = (0, 1, 2), (0, 1)

ROWS: list[tuple[str, str]] = [
    ("public", "public model only (printed digits, no DP)"),
    ("nodp", "fine-tuned, biases + embeddings, no DP"),
    *[(f"{m}{e}", f"eps {e}, {what}") for e in (1, 8, 16, 32) for m, what in (
        ("local", "local DP-SGD in every client (today)"),
        ("once", "noise once under SecAgg+, 16-bit Skellam"),
        ("central", "centralized DP-SGD on the union (upper bound)"))],
    ("local64", "eps 64, local DP-SGD in every client (where it would first beat the public model)"),
    *[(f"{m}8_lora", f"eps 8, {what}, LoRA r4 instead of biases + embeddings") for m, what in (
        ("local", "local DP-SGD"), ("once", "noise once"), ("central", "centralized DP-SGD"))],
    ("once_clip", "noise once's recipe at next to no noise (z = 0.05, not private): clipping, FedAdam"),
    ("once8_bits12", "eps 8, noise once, 12-bit Skellam"),
    ("once8_bits20", "eps 8, noise once, 20-bit Skellam"),
    ("once8_bits0", "eps 8, noise once, the server's Gaussian on the exact secure sum"),
    ("client8", "client level eps 8, cross-device, the server's noise"),
    ("client8_bits16", "client level eps 8, cross-device, 16-bit distributed Skellam under SecAgg+"),
    ("client8_bits16_all", "as above, shares sized for 30 survivors (rounds with fewer abandoned)"),
    ("client8_bits16_m20", "as above, shares sized for 20 survivors (2 % of Poisson(30) cohorts fewer)"),
    ("client8_bits16_f09", "as above, each round's shares sized for 90 % of its own clients"),
]


# the headline comparison first, then client level and the grid's bits, then the other epsilons
PRIORITY = ["public", "nodp", "local8", "once8", "central8", "client8", "client8_bits16",
            "client8_bits16_all", "client8_bits16_m20", "client8_bits16_f09", "once8_bits0", "once8_bits12",
            "once8_bits20", "once_clip", "local64",
            "local1", "once1", "central1", "local8_lora", "once8_lora", "central8_lora",
            "local16", "once16", "central16", "local32", "once32", "central32"]


def plan(out: Path, extra: dict[str, str]) -> list[sr.Job]:
    jobs: list[sr.Job] = []
    for s in FULL_SEEDS:
        public = sr.Job("public", s, PUBLIC, {}, score_as={"data.name": "digits"})
        init = {"model.init_from": str(out / public.name), **NB}
        jobs += [public, sr.Job("nodp", s, PRIVATE, dict(init), after=public.name)]
        for eps in (1, 8, 16, 32):
            if eps > 8 and s not in FRONTIER_SEEDS:
                continue
            dp = {"privacy.target_epsilon": str(eps), "privacy.noise_multiplier": "0"}
            for name, mech in MECHANISMS.items():
                jobs.append(sr.Job(f"{name}{eps}", s, PRIVATE, {**init, **dp, **mech}, after=public.name))
                if eps == 8:  # the same mechanisms fine-tuning LoRA adapters (privacy_study.py's rank 4)
                    jobs.append(sr.Job(f"{name}8_lora", s, PRIVATE, {**init, **ps.LORA, **dp, **mech},
                                       after=public.name))
        if s in FRONTIER_SEEDS:
            # local DP-SGD's FID barely moves from 8 to 32: where it would cross
            jobs.append(sr.Job("local64", s, PRIVATE, {**init, "privacy.target_epsilon": "64",
                                                       "privacy.noise_multiplier": "0", **LOCAL},
                               after=public.name))
            # the frontier's far end: the recipe without the noise (not private)
            jobs.append(sr.Job("once_clip", s, PRIVATE, {**init, **ONCE, "secure_agg.bits": "0",
                                                         "privacy.noise_multiplier": "0.05",
                                                         "privacy.target_epsilon": "0"}, after=public.name))
        # the grid's bits and client level: every seed, like the headline rows
        dp8 = {"privacy.target_epsilon": "8", "privacy.noise_multiplier": "0"}
        for bits in (12, 20, 0):
            jobs.append(sr.Job(f"once8_bits{bits}", s, PRIVATE,
                               {**init, **dp8, **ONCE, "secure_agg.bits": str(bits)}, after=public.name))
        jobs.append(sr.Job("client8", s, CROSS, dict(init), after=public.name))
        secure16 = {**init, "secure_agg.protocol": "secagg+", "secure_agg.bits": "16"}
        jobs.append(sr.Job("client8_bits16", s, CROSS, dict(secure16), after=public.name))
        # by default the shares carry the whole noise once min_survivors = t of the 30 survive (the
        # dropout margin: more noise when all do); here sized for 30, the server's noise's level
        jobs.append(sr.Job("client8_bits16_all", s, CROSS, {**secure16, "secure_agg.min_survivors": "30"},
                           after=public.name))
        # the middle: P(Poisson(30) < 20) = 2 %, so few rounds are abandoned, at 30/20 the variance
        jobs.append(sr.Job("client8_bits16_m20", s, CROSS, {**secure16, "secure_agg.min_survivors": "20"},
                           after=public.name))
        # per round: a cohort of n sizes its shares for ceil(0.9 n), so at most 1 / 0.9 the variance
        per_round = {**secure16, "secure_agg.survivor_fraction": "0.9"}
        jobs.append(sr.Job("client8_bits16_f09", s, CROSS, per_round, after=public.name))
    for j in jobs:
        j.overrides = {**sr.COMMON, **j.overrides, "run.seed": str(j.seed), "run.out_dir": str(out),
                       "run.name": j.name, **extra}
    return jobs


def relative_to_public(by_row: dict[str, list[dict[str, Any]]], row: str, key: str) -> list[float]:
    """``row``'s ``key`` against the public model of the same seed, one value per seed: FID as a
    multiple of the public model's, class accuracy as the difference (paired, so that rows run on
    different seeds compare)."""
    public = {r["seed"]: r[key] for r in by_row.get("public", []) if r[key] is not None}
    return [r[key] / public[r["seed"]] if key == "fid_test" else r[key] - public[r["seed"]]
            for r in by_row.get(row, []) if r[key] is not None and r["seed"] in public]


def first_beating(by_row: dict[str, list[dict[str, Any]]], mech: str, key: str = "class_acc",
                  margin: float = 0.05) -> int | None:
    """The smallest epsilon at which ``mech`` beats the public model of the same seed on every seed
    it was run with: class accuracy higher by ``margin`` (absolute), or FID (test) lower by
    ``margin`` (relative: at most (1 - margin) x the public model's)."""
    for eps in (1, 8, 16, 32, 64):
        rel = relative_to_public(by_row, f"{mech}{eps}", key)
        if rel and all(x >= margin if key == "class_acc" else x <= 1 - margin for x in rel):
            return eps
    return None


def once_over_central(by_row: dict[str, list[dict[str, Any]]], eps: int) -> list[tuple[int, float]]:
    """(seed, noise once's FID (test) / centralized DP-SGD's) at ``eps``, for the seeds both ran."""
    central = {r["seed"]: r["fid_test"] for r in by_row.get(f"central{eps}", [])}
    return [(r["seed"], r["fid_test"] / central[r["seed"]])
            for r in sorted(by_row.get(f"once{eps}", []), key=lambda r: r["seed"]) if r["seed"] in central]


def write_results(jobs: list[sr.Job], out: Path, results: Path, command: str) -> dict[str, Path]:
    by_row: dict[str, list[dict[str, Any]]] = {}
    for j in jobs:
        r = ps.result(j, out)
        if r is not None:
            by_row.setdefault(j.row, []).append({"seed": j.seed, **r})
    past, wall = sr.sessions(out)
    lines = ["# Noise once under secure aggregation: the digits", "",
             f"Written by `{command}`. Every private run fine-tunes its seed's public model in biases and "
             f"embeddings for 100 epochs, one rank, one thread; sample level, epsilon of the worst client at "
             f"delta 1e-5 (PRV for local and central DP-SGD, the Skellam RDP accountant for noise once); FID "
             f"(test) and class accuracy from fedrun's classifier against the handwritten test split; "
             f"membership inference from `fedrun audit`. Mean ± std over the seeds (n). Wall time of the "
             f"study: {wall:.0f} s over {len(past)} session(s).", "",
             "| setting | n | epsilon | noise mult. | class acc | FID (test) | MIA AUC | MB up / round | "
             "run wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row, what in ROWS:
        rs = by_row.get(row, [])
        if not rs:
            continue
        eps = sr.cell([r["epsilon"] for r in rs]) if rs[0]["epsilon"] is not None else "inf"
        lines.append(f"| {what} | {len(rs)} | {eps} | {sr.cell([r['noise_multiplier'] for r in rs])} | "
                     f"{sr.cell([r['class_acc'] for r in rs], '.3f')} | "
                     f"{sr.cell([r['fid_test'] for r in rs])} | "
                     f"{sr.cell([r['auc'] for r in rs], '.3f')} | "
                     f"{sr.cell([sr.mb(r['bytes_per_round']) for r in rs], '.3f')} | "
                     f"{sr.cell([r['wall_s'] for r in rs], '.0f')} |")
    lines += ["", "Per seed, class accuracy (the public model of the same seed in brackets):", ""]
    public = {r["seed"]: r["class_acc"] for r in by_row.get("public", [])}
    for row, what in ROWS[1:]:
        rs = sorted(by_row.get(row, []), key=lambda r: r["seed"])
        if rs:
            cells = ", ".join(f"seed {r['seed']}: {r['class_acc']:.3f} "
                              f"({public.get(r['seed'], float('nan')):.3f})" for r in rs)
            lines.append(f"- {what}: {cells}")
    server = {r["seed"]: r["fid_test"] for r in by_row.get("client8", [])}
    lines += ["", "Client level, per seed: FID (test) as a multiple of the server's noise row of the same "
              "seed, and the rounds abandoned (fewer survivors than the shares were sized for):", ""]
    for row, what in ROWS:
        if not row.startswith("client8_"):
            continue
        cells = []
        for r in sorted(by_row.get(row, []), key=lambda r: r["seed"]):
            abandoned = sum(1 for m in sr.metrics(Path(r["run"])) if m.get("abandoned"))
            ratio = f"{r['fid_test'] / server[r['seed']]:.2f}x" if r["seed"] in server else "-"
            cells.append(f"seed {r['seed']}: {ratio}, {abandoned} abandoned")
        if cells:
            lines.append(f"- {what}: {'; '.join(cells)}")
    lines += ["", "Noise once's FID (test) over centralized DP-SGD's of the same seed (goal: <= 1.1x on "
              "every seed):", ""]
    for eps in (1, 8, 16, 32):
        ratios = once_over_central(by_row, eps)
        if ratios:
            lines.append(f"- eps {eps}: " + ", ".join(f"seed {s}: {x:.2f}x" for s, x in ratios))
    lines += ["", "First epsilon at which a mechanism beats the public model of the same seed on every seed "
              "(none: not at any epsilon run), by 0.05 in class accuracy / by 5 % in FID (test):", ""]
    for mech in MECHANISMS:
        lines.append(f"- {mech}: class accuracy {first_beating(by_row, mech) or 'none'}, "
                     f"FID (test) {first_beating(by_row, mech, 'fid_test') or 'none'}")
    missing = [j.name for j in jobs if ps.result(j, out) is None]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)}."]
    payload = {"command": command, "wall_s": wall, "sessions": past, "rows": by_row}
    return sr.write_report(results, "secure_privacy_study", lines, payload,
                           lambda path: write_png(by_row, path))


def write_png(by_row: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """The privacy-utility frontier: class accuracy and FID (test) against epsilon per mechanism,
    each against the public model of the same seed (mean and std over the seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4), constrained_layout=True)
    axes = fig.subplots(1, 2)
    xs = {1: 0, 8: 1, 16: 2, 32: 3, 64: 4}
    for ax, (key, title, public) in zip(axes, (
            ("class_acc", "class accuracy minus the public model's (higher is better)", 0.0),
            ("fid_test", "FID (test) / the public model's (lower is better)", 1.0)), strict=True):
        for mech, label in (("local", "local DP-SGD"), ("once", "noise once (SecAgg+, 16 bits)"),
                            ("central", "centralized DP-SGD (upper bound)")):
            pts = []
            for eps, x in xs.items():
                mean, std, _ = sr.stat(relative_to_public(by_row, f"{mech}{eps}", key))
                if mean is not None:
                    pts.append((x, mean, std or 0.0))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=label)
        ax.axhline(public, color="grey", linestyle="--", label="public model")
        for row, style, label in (("nodp", ":", "fine-tuned, no DP"),
                                  ("once_clip", "-.", "noise once's recipe, next to no noise")):
            mean, _, _ = sr.stat(relative_to_public(by_row, row, key))
            if mean is not None:
                ax.axhline(mean, color="grey", linestyle=style, label=label)
        ax.set_xticks(range(5), ["eps 1", "eps 8", "eps 16", "eps 32", "eps 64"])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    argv_, extra_args = sr.split_extra(given)  # after --: overrides of every run
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "secure_privacy_study")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--rows", default="", help="comma-separated rows (default all; public models are added)")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: every seed a row has)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--audit-options", default="")
    args = p.parse_args(argv_)
    out = args.out.resolve()
    jobs = sr.select_rows(p, plan(out, sr.parse_overrides(p, extra_args)), args.rows, ROWS)
    if args.seeds:  # a subset of the seeds first (every row of seed 0 before any of seed 1)
        seeds = {int(x) for x in args.seeds.split(",")}
        jobs = [j for j in jobs if j.seed in seeds]
    todo = [j for j in jobs if ps.result(j, out) is None]
    print(f"secure_privacy_study: {len(jobs)} runs, {len(todo)} to do, in {out}", flush=True)
    if args.dry_run:
        for j in jobs:
            print(f"  {j.name}: {j.config.name} {j.overrides}" + (f" after {j.after}" if j.after else ""))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    code = 0
    if todo and not args.report_only:
        order = sorted(todo, key=lambda j: (j.after is not None, PRIORITY.index(j.row), j.seed))
        code = ps.run_jobs("secure_privacy_study", jobs, order, out, args.jobs, args.audit_options.split())
    command = " ".join(["python", "benchmarks/secure_privacy_study.py", *given])
    paths = write_results(jobs, out, args.results, command)
    print(paths["md"].read_text())
    return code


if __name__ == "__main__":
    sys.exit(main())
