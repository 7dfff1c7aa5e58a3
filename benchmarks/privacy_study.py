#!/usr/bin/env python
"""Privacy against quality on the digits: epsilon in {1, 8, infinity} at both DP levels, audited.

    python benchmarks/privacy_study.py                 # runs, audits, writes the table
    python benchmarks/privacy_study.py --dry-run       # the plan: noise multipliers and commands

Every run is the digits default (configs/digits.toml: E = 1 rounds, classifier-free guidance)
at a reduced budget (BUDGET below: 30 rounds of E = 1 = 30 epochs, 50 sampler steps; DP-SGD
costs about 2.5x plain training on this CPU), one rank each, ``--jobs`` at a time. For each
target epsilon the noise multiplier is the smallest that fits (fedrun's budget check, i.e.
Opacus's accountant, at privacy.delta = 1e-5), and the run also sets privacy.target_epsilon,
so fedrun itself refuses it if the plan would spend more. epsilon = infinity is plain FedAvg.
Each finished run is audited with ``fedrun audit`` (membership inference AUC, near-copies).
Finished runs and audits are skipped when the script is started again.
Output: benchmarks/results/privacy_study.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrun.config import load_config, parse_overrides  # noqa: E402
from fedrun.data import load_split  # noqa: E402
from fedrun.federated.participation import sample_clients  # noqa: E402
from fedrun.partition import client_shards  # noqa: E402
from fedrun.privacy.accountant import planned_epsilon, smallest_noise  # noqa: E402

CONFIG = ROOT / "configs" / "digits.toml"
BUDGET = {"fed.rounds": 30, "fed.local_epochs": 1, "eval.steps": 50, "diffusion.sample_steps": 50,
          "eval.client_samples": 0, "checkpoint.keep": 1}
EPSILONS = (1.0, 8.0)
LEVELS = ("sample", "client")


def base_overrides(out_dir: Path) -> list[str]:
    """BUDGET and the output folder as --section.key value pairs."""
    return [a for k, v in {**BUDGET, "run.out_dir": out_dir}.items() for a in (f"--{k}", str(v))]


def plan(out_dir: Path, seed: int) -> list[dict]:
    base = base_overrides(out_dir) + ["--run.seed", str(seed), "--run.threads", "1"]
    jobs = [{"name": f"privacy_none_s{seed}", "level": "none", "target": None, "sigma": None,
             "args": base + ["--run.name", f"privacy_none_s{seed}"]}]
    for level in LEVELS:
        for eps in EPSILONS:
            name = f"privacy_{level}_eps{eps:g}_s{seed}"
            args = base + ["--run.name", name, "--privacy.level", level, "--privacy.target_epsilon", str(eps)]
            cfg = load_config(CONFIG, parse_overrides(args))
            train = load_split(cfg.data, "train")
            f = cfg.fed
            sizes = [len(s) for s in client_shards(cfg, train.labels.numpy())]
            rounds = [sample_clients(f.num_clients, f.clients_per_round, cfg.run.seed, r)
                      for r in range(1, f.rounds + 1)]
            participation = rounds if level == "sample" else None
            sigma = smallest_noise(cfg, sizes, participation)
            cfg.privacy.noise_multiplier = sigma
            spent = planned_epsilon(cfg, sizes, participation)
            jobs.append({"name": name, "level": level, "target": eps, "sigma": sigma,
                         "planned_epsilon": spent,
                         "args": args + ["--privacy.noise_multiplier", f"{sigma:g}"]})
    return jobs


def run(job: dict, out_dir: Path) -> dict:
    run_dir = out_dir / job["name"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    if not (run_dir / "summary.json").exists():
        res = subprocess.run([sys.executable, "-m", "fedrun", "--config", str(CONFIG), *job["args"]],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{job['name']} failed:\n{res.stderr[-3000:]}")
    if not (run_dir / "audit.json").exists():
        res = subprocess.run([sys.executable, "-m", "fedrun", "audit", str(run_dir)], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"audit of {job['name']} failed:\n{res.stderr[-3000:]}")
    print(f"{job['name']}: {time.perf_counter() - t0:.0f} s", flush=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    audit = json.loads((run_dir / "audit.json").read_text())
    scores = summary.get("scores", {})
    return {**{k: v for k, v in job.items() if k != "args"},
            "epsilon": summary.get("privacy", {}).get("epsilon_max", float("inf")),
            "fid_test": scores.get("fid_test"), "fid_train": scores.get("fid_train"),
            "is": scores.get("is_mean"), "class_acc": scores.get("class_acc"),
            "auc": audit["auc"], "tpr_at_1pct_fpr": audit["tpr_at_1pct_fpr"],
            "near_copies": audit["near_copies"], "audit_samples": audit["num_samples"],
            "wall_s": summary.get("wall_s")}


def _fmt(v: object, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def write_outputs(rows: list[dict], out: Path, wall: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy_study.json").write_text(json.dumps({"rows": rows, "wall_s": round(wall, 1)}, indent=2))
    lines = ["| level | target epsilon | noise multiplier | epsilon spent | FID (test) | IS | class acc | "
             "MIA AUC | TPR @ 1% FPR | near-copies | run wall s |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['level']} | {_fmt(r['target']) if r['target'] else 'inf'} | {_fmt(r['sigma'])} | "
                     f"{_fmt(r['epsilon'])} | {_fmt(r['fid_test'])} | {_fmt(r['is'])} | "
                     f"{_fmt(r['class_acc'])} | {_fmt(r['auc'])} | {_fmt(r['tpr_at_1pct_fpr'])} | "
                     f"{r['near_copies']}/{r['audit_samples']} | "
                     f"{_fmt(r['wall_s'], '.0f')} |")
    (out / "privacy_study.md").write_text("\n".join(lines) + f"\n\nTotal wall time: {wall:.0f} s.\n")
    write_png(rows, out / "privacy_study.png")


def write_png(rows: list[dict], path: Path) -> None:
    """Two panels: FID (test) and membership-inference AUC against epsilon, one line per level."""
    from PIL import Image, ImageDraw
    w, h, pad = 360, 240, 40
    img = Image.new("RGB", (2 * w, h), "white")
    d = ImageDraw.Draw(img)
    xs = {1.0: 0, 8.0: 1, None: 2}  # epsilon 1, 8, infinity
    colours = {"sample": (31, 119, 180), "client": (214, 39, 40)}
    for panel, (key, title) in enumerate((("fid_test", "FID (test), lower is better"),
                                          ("auc", "membership AUC (0.5 = no leak)"))):
        x0 = panel * w
        values = [r[key] for r in rows if r[key] is not None]
        lo, hi = (0.0, max(values) * 1.1) if key == "fid_test" else (0.4, 1.0)
        d.text((x0 + pad, 8), title, fill="black")
        d.rectangle([x0 + pad, pad, x0 + w - 10, h - pad], outline="black")
        for i, label in enumerate(("eps 1", "eps 8", "eps inf")):
            d.text((x0 + pad + 20 + i * (w - pad - 50) // 2, h - pad + 8), label, fill="black")
        d.text((x0 + 4, pad), f"{hi:.3g}", fill="black")
        d.text((x0 + 4, h - pad - 10), f"{lo:.3g}", fill="black")
        none = next((r for r in rows if r["level"] == "none"), None)
        for level, colour in colours.items():
            pts = []
            for r in [r for r in rows if r["level"] == level] + ([none] if none else []):
                if r[key] is None:
                    continue
                x = x0 + pad + 25 + xs[r["target"]] * (w - pad - 50) // 2
                y = h - pad - (min(r[key], hi) - lo) / (hi - lo) * (h - 2 * pad)
                pts.append((x, y))
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            d.text((x0 + w - 80, pad + 5 + 12 * list(colours).index(level)), level, fill=colour)
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "privacy_study_default")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    jobs = plan(args.out_dir, args.seed)
    for job in jobs:
        print(f"{job['name']}: sigma {job['sigma']}, planned epsilon {job.get('planned_epsilon', 'inf')}")
    if args.dry_run:
        return 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda j: run(j, args.out_dir), jobs))
    write_outputs(rows, args.results, time.perf_counter() - t0)
    print((args.results / "privacy_study.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
