#!/usr/bin/env python
"""Does a diffusers UNet2DModel of similar size train as well as fedrun's U-Net? (issue 28's goal)

    python benchmarks/diffusers_study.py --out /tmp/diffusers_runs            # 2 seeds, 4 runs
    python benchmarks/diffusers_study.py --out /tmp/diffusers_runs --seeds 0  # 1 seed

The embedded digits default (configs/digits.toml: 0.34M-parameter native U-Net) against the same
job with ``model.arch = "diffusers"`` (configs/digits_diffusers.toml: a 0.28M-parameter
UNet2DModel), the same federation, budget (100 rounds of E = 1), optimizer, classifier-free
guidance and evaluation (FID/IS from fedrun's digits classifier on 360 samples of 100 steps,
with bootstrap intervals). One run at a time, one thread, in ``--out`` (outside the checkout);
per-client grids are off in both arms (``sample.client_per_class = 0``: they cost minutes and
do not enter any score). A run whose summary.json exists is not trained again, so the same
command resumes a study. Then the first seed's diffusers run is exported (``fedrun export``) and
sampled in a fresh ``python -I`` process in which fedrun cannot be imported, against fedrun's own
sampler on the same seed. Writes ``<results>/diffusers_study.json`` and ``.md`` (FID per run, the
ratio diffusers / native per seed and of the means, wall times, the export's difference), with
paths relative to the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"native": "configs/digits.toml", "diffusers": "configs/digits_diffusers.toml"}
GOAL = 1.2  # issue 28: the diffusers arch's FID within 1.2x of the native model's

# A fresh interpreter in which fedrun cannot be imported samples the exported run (issue 28's
# second goal: "loads in a clean environment with only diffusers and torch").
SAMPLE_WITHOUT_FEDRUN = """
import sys
sys.modules["fedrun"] = None
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
labels = [c for c in range(10) for _ in range(10)]
images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
torch.save(images, sys.argv[2])
"""


def exported_digits(out: Path, seed: int) -> dict[str, Any]:
    """Export the diffusers run of ``seed``, sample 10 images per class in a fresh process without
    fedrun (the run's 100 steps, eta 1, guidance 1), and compare with fedrun's sampler, same seed."""
    import torch

    from fedrun.export import export_diffusers
    from fedrun.saved_run import open_run
    run_dir, folder = out / f"diffusers_s{seed}", out / f"diffusers_s{seed}_exported"
    info = export_diffusers(run_dir, folder, force=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-c", SAMPLE_WITHOUT_FEDRUN, str(folder), str(out / "exported.pt")],
                   cwd=out, env=env, check=True)
    wall = time.perf_counter() - t0
    theirs = torch.load(out / "exported.pt")
    torch.set_num_threads(1)
    run = open_run(run_dir, device="cpu", test_split=False)
    labels = torch.arange(10).repeat_interleave(10)
    ours = run.diffusion.sample(run.model, labels, (1, 16, 16), run.cfg.diffusion.sample_steps,
                                run.cfg.diffusion.eta, generator=torch.Generator().manual_seed(0)) / 2 + 0.5
    levels = ((theirs * 255).round() - (ours * 255).round()).abs()
    return {"run": f"diffusers_s{seed}", "weights": info["weights"], "steps": info["steps"],
            "eta": info["eta"], "guidance": info["guidance"], "images": len(labels),
            "max_abs_diff": (theirs - ours).abs().max().item(),
            "pixels_off_by_one_level": int((levels > 0).sum()), "pixels": levels.numel(),
            "max_levels_off": int(levels.max()), "fresh_process_s": round(wall, 1)}


def run_one(out: Path, arm: str, seed: int) -> dict[str, Any]:
    """Train (unless done) and return the run's summary.json."""
    name = f"{arm}_s{seed}"
    summary = out / name / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-m", "fedrun", "--config", str(ROOT / ARMS[arm]), "--run.out_dir", str(out),
               "--run.name", name, "--run.seed", str(seed), "--run.threads", "1",
               "--sample.client_per_class", "0", "--checkpoint.keep", "1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(out / f"{name}.log", "w") as log:
            print(f"diffusers_study: training {name} (log {out / f'{name}.log'})", flush=True)
            subprocess.run(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads(summary.read_text())


def row(arm: str, seed: int, s: dict[str, Any]) -> dict[str, Any]:
    sc = s.get("scores", {})
    return {"arm": arm, "seed": seed, "config": ARMS[arm], "parameters": s.get("parameters"),
            "fid_test": sc.get("fid_test"), "fid_test_ci": sc.get("fid_test_ci"),
            "fid_train": sc.get("fid_train"),
            "is": sc.get("is_mean"), "precision": sc.get("precision"), "recall": sc.get("recall"),
            "final_loss": s.get("final_loss"), "wall_s": s.get("wall_s")}


def markdown(rows: list[dict[str, Any]], ratios: dict[str, Any], when: str,
             export: dict[str, Any] | None = None) -> str:
    def ci(r: dict[str, Any]) -> str:
        lo_hi = r.get("fid_test_ci")
        return f"[{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else "-"
    lines = ["# diffusers UNet2DModel vs fedrun's U-Net on the digits default", "",
             f"Written by `python benchmarks/diffusers_study.py` on {when} ({platform.machine()}, "
             f"{os.cpu_count()} cores, one thread per run, one run at a time, the machine shared with "
             f"another study: wall times are not comparable with quiet-machine numbers).", "",
             f"Arms: `{ARMS['native']}` and `{ARMS['diffusers']}`: the same federation (10 clients, "
             "Dirichlet 0.5), budget (100 rounds of E = 1, batch 32, Adam 2e-3), label dropout 0.1 and "
             "guidance w = 1; FID from fedrun's digits classifier, 360 samples of 100 steps against the "
             "test split (95 % bootstrap interval). Per-client grids off in both.", "",
             "| arm | seed | parameters | FID (test) | 95 % interval | FID (train) | IS | precision | recall "
             "| final loss | wall s |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['parameters']:,} | {r['fid_test']:.2f} | {ci(r)} | "
                     f"{r['fid_train']:.2f} | {r['is']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['final_loss']:.4f} | {r['wall_s']:.0f} |")
    lines += ["", f"FID ratio diffusers / native per seed: "
              f"{', '.join(f'seed {k}: {v:.2f}' for k, v in ratios['per_seed'].items())}; "
              f"of the means: {ratios['of_means']:.2f} (goal: <= {GOAL})." if ratios["of_means"] else ""]
    if export:
        lines += ["", f"Exported `{export['run']}` ({export['weights']} weights) with `fedrun export`, "
                  f"sampled {export['images']} images (10 per class, {export['steps']} steps, eta "
                  f"{export['eta']}, guidance {export['guidance']}, seed 0) in a fresh `python -I` process "
                  f"in which fedrun cannot be imported, against fedrun's own sampler on the same seed: "
                  f"largest difference "
                  f"{export['max_abs_diff']:.2e} on [0, 1] pixels; "
                  + (f"all {export['pixels']:,} 8-bit pixels equal" if not export["pixels_off_by_one_level"]
                     else f"{export['pixels_off_by_one_level']} of {export['pixels']:,} 8-bit pixels "
                          f"differ, by at most {export['max_levels_off']} level")
                  + f" (loading and sampling took {export['fresh_process_s']} s)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/diffusers_runs"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:  # seed by seed, so that a study cut short still holds pairs
        for arm in ARMS:
            rows.append(row(arm, seed, run_one(args.out, arm, seed)))
    fid = {(r["arm"], r["seed"]): r["fid_test"] for r in rows}
    per_seed = {s: fid[("diffusers", s)] / fid[("native", s)] for s in args.seeds
                if fid.get(("native", s)) and fid.get(("diffusers", s)) is not None}
    means = {a: statistics.mean(fid[(a, s)] for s in args.seeds) for a in ARMS}
    of_means = means["diffusers"] / means["native"] if means["native"] else None
    ratios = {"per_seed": per_seed, "of_means": of_means, "goal": GOAL, "mean_fid": means}
    export = exported_digits(args.out, args.seeds[0])
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "diffusers_study.json").write_text(json.dumps(
        {"date": when, "seeds": args.seeds, "runs": rows, "ratios": ratios, "export": export,
         "runs_wall_s": round(sum(r["wall_s"] for r in rows), 1)}, indent=2) + "\n")
    text = markdown(rows, ratios, when, export)
    (args.results / "diffusers_study.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
