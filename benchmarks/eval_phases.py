#!/usr/bin/env python
"""The default's final evaluation, phase by phase, before and after, against its job's time.

    python benchmarks/eval_phases.py RUN_DIR [--out benchmarks/results/eval_phases.json]

RUN_DIR: a finished run of the digits default (configs/digits.toml, FedAvg). One process, one
thread, everything measured here in one go (so the machine's load weighs on every phase alike):

* training: the default job with ``--rounds-a`` and ``--rounds-b`` rounds (no evaluation, no
  grids) in a temporary folder; the slope gives a round, the rest the job's start; the default
  job's training = start + fed.rounds x round;
* the final round's evaluation, each phase on the run's final model: the client grids
  (``--client-grids`` of them drawn, scaled to fed.clients_per_round: each draws sample.per_class
  images of every class with the same sampler, whatever the weights), the scored samples
  (eval.num_samples, eval.steps), their features, every score, the bootstrap intervals, the PNG
  of the round and the features file, and ``samples/final.png``: drawn again before, taken from
  the scored images now (``Evaluator.final_grid``); the proxy classifier and the reference
  statistics with an empty cache (once per machine, at a job's start, not in the final round);
* options that would change what the figures are, measured for the trade: sampling in bfloat16
  (autocast) and the sampler at fewer steps.

Writes the seconds of every phase, the final evaluation's share of the job before and after,
and each option's share, to ``--out`` (paths relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrun import dist, seeding  # noqa: E402
from fedrun.config import load_config  # noqa: E402
from fedrun.evaluation import grids, intervals, scores  # noqa: E402
from fedrun.evaluation.classifier import load_or_train_classifier  # noqa: E402
from fedrun.evaluation.evaluator import Evaluator, grid_scale, save_features  # noqa: E402
from fedrun.evaluation.sampling import class_balanced_labels, sample_sharded  # noqa: E402
from fedrun.evaluation.scorer import Scorer  # noqa: E402
from fedrun.saved_run import open_run  # noqa: E402


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def training_seconds(config: Path, rounds_a: int, rounds_b: int) -> dict[str, float]:
    """The default job without evaluation at two round counts: its start and a round."""
    from fedrun.train import train
    walls = {}
    for rounds in (rounds_a, rounds_b):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(config, {"fed.rounds": str(rounds), "eval.enabled": "false",
                                       "sample.per_class": "0", "run.out_dir": tmp, "run.name": "t",
                                       "run.threads": "1", "checkpoint.resume": "never"})
            walls[rounds] = train(cfg)["wall_s"]
    per_round = (walls[rounds_b] - walls[rounds_a]) / (rounds_b - rounds_a)
    return {"start_s": walls[rounds_a] - rounds_a * per_round, "round_s": per_round,
            f"job_{rounds_a}_rounds_s": walls[rounds_a], f"job_{rounds_b}_rounds_s": walls[rounds_b]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_phases.json")
    p.add_argument("--rounds-a", type=int, default=2)
    p.add_argument("--rounds-b", type=int, default=6)
    p.add_argument("--client-grids", type=int, default=2, help="client grids drawn (scaled to all)")
    args = p.parse_args()
    torch.set_num_threads(1)
    train_s = training_seconds(ROOT / "configs" / "digits.toml", args.rounds_a, args.rounds_b)  # first
    run = open_run(args.run_dir, device="cpu", overrides={"eval.enabled": "true", "run.threads": "1"})
    cfg, model, diffusion = run.cfg, run.model, run.diffusion
    assert run.test is not None
    info = dist.init("cpu", 1)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    seed, R, e = cfg.run.seed, cfg.fed.rounds, cfg.eval
    out: dict[str, Any] = {"run": args.run_dir.name, "date": time.strftime("%Y-%m-%d"),
                           "machine": f"{platform.machine()}, 1 thread (the 2-core machine shared with other "
                                      f"work)",
                           "config": {"eval.num_samples": e.num_samples or len(run.test.labels),
                                      "eval.steps": e.steps,
                                      "sample.per_class": cfg.sample.per_class, "grid steps":
                                      cfg.sample.steps or cfg.diffusion.sample_steps,
                                      "clients_per_round": cfg.fed.clients_per_round,
                                      "eval.bootstrap": e.bootstrap,
                                      "guidance": cfg.diffusion.guidance}}

    # once per machine (empty cache): the proxy classifier and the reference statistics
    with tempfile.TemporaryDirectory() as cache:
        _, t_classifier = timed(load_or_train_classifier, "digits", run.train, run.test, cache, 0, "cpu")
        scorer = Scorer(e.feature_extractor, "digits", run.train, run.test, cache_dir=cache)
        _, t_refs = timed(scorer.prepare)
    out["once_per_machine_s"] = {"classifier_training": round(t_classifier, 2),
                                 "reference_stats": round(t_refs, 2)}

    evaluator = Evaluator(cfg, info, run.train, run.test)
    scorer = evaluator.scorer
    assert scorer is not None
    labels = evaluator.labels
    ph: dict[str, float] = {}

    def gen(name: str) -> Any:
        return lambda j: seeding.stream_generator("cpu", name, seed=seed, round=R, chunk=j)

    # client grids: sample.per_class images of every class from a local model (here the final
    # model: the same sampler and network, so the same cost), scaled to the clients of a round
    grid_labels = class_balanced_labels([cfg.sample.per_class] * run.train.num_classes)
    grid_steps = cfg.sample.steps or cfg.diffusion.sample_steps
    t = 0.0
    for k in range(args.client_grids):
        g = seeding.stream_generator("cpu", "client_grid", seed=seed, round=R, client=k)
        x, dt = timed(diffusion.sample, model, grid_labels, shape, grid_steps, cfg.diffusion.eta, generator=g)
        with tempfile.TemporaryDirectory() as tmp:
            _, dt2 = timed(grids.save_client_grid, x, Path(tmp) / "c.png", nrow=cfg.sample.per_class,
                           padding=1, scale=grid_scale(cfg.data.image_size))
        t += dt + dt2
    ph["client_grids"] = t / args.client_grids * cfg.fed.clients_per_round
    images, ph["scored_samples"] = timed(sample_sharded, model, diffusion, labels, shape, e.steps, e.eta,
                                         gen("eval_samples"), info, chunk=e.batch_size)
    (feats, logits), ph["features"] = timed(scorer.features, images)
    # every score alone (what score_features computes)
    test_feats = scorer.reference_feats("test")
    _, ph["score_is"] = timed(scores.inception_score, logits, splits=10, from_logits=True)
    mu_sigma, ph["score_fid_train_test"] = timed(lambda: [scores.frechet_distance_from_stats(
        *scores.feature_stats(feats), *scorer.reference_stats(s)) for s in ("train", "test")])
    _, ph["score_kid"] = timed(scorer.kernel_distance, feats, test_feats)
    _, ph["score_prdc"] = timed(scores.prdc, test_feats, feats, e.prdc_k)
    _, ph["score_per_class"] = timed(scorer.per_class_scores, feats, labels)
    scorer.bootstrap = intervals.Bootstrap(0)
    _, t_points = timed(scorer.score_features, feats, logits, labels)
    scorer.bootstrap = intervals.Bootstrap(e.bootstrap, e.confidence, seed)
    points = scorer.score_features(feats, logits, labels)
    ph["scores_all"] = t_points
    ph["bootstrap_intervals"] = points["bootstrap_s"]
    with tempfile.TemporaryDirectory() as tmp:
        keep = torch.cat([torch.nonzero(labels == c)[:cfg.sample.per_class, 0] for c in range(10)])
        _, ph["round_png_and_features_file"] = timed(lambda: (
            grids.save_class_grid(images[keep], labels[keep], Path(tmp) / "r.png", padding=1, scale=2),
            save_features(Path(tmp) / "f.npz", feats, logits, labels, scorer, cfg, R)))
        final_labels = class_balanced_labels([cfg.sample.per_class] * run.train.num_classes)
        _, ph["final_grid_drawn"] = timed(sample_sharded, model, diffusion, final_labels, shape, grid_steps,
                                          cfg.diffusion.eta, gen("final_grid"), info)
        _, ph["final_grid_png"] = timed(grids.save_class_grid, images[keep], labels[keep],
                                        Path(tmp) / "f.png", padding=1, scale=2)
    # options that change the figures (for the trade): bfloat16 sampling, fewer sampler steps
    options = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, options["scored_samples_bf16"] = timed(sample_sharded, model, diffusion, labels[:90], shape,
                                                  e.steps, e.eta, gen("eval_samples"), info,
                                                  chunk=e.batch_size)
    options["scored_samples_bf16"] *= len(labels) / 90
    _, t90 = timed(sample_sharded, model, diffusion, labels[:90], shape, e.steps, e.eta, gen("eval_samples"),
                   info, chunk=e.batch_size)
    options["scored_samples_fp32_same_90_scaled"] = t90 * len(labels) / 90
    out["phases_s"] = {k: round(v, 3) for k, v in ph.items()}
    out["options_s"] = {k: round(v, 3) for k, v in options.items()}

    job_train = train_s["start_s"] + R * train_s["round_s"]
    out["training"] = {**{k: round(v, 3) for k, v in train_s.items()},
                       "job_without_final_eval_s": round(job_train, 1)}
    common = ph["client_grids"] + ph["scored_samples"] + ph["features"] + ph["scores_all"] + \
        ph["round_png_and_features_file"]
    before = common + ph["final_grid_drawn"] + ph["final_grid_png"]
    after = common + ph["bootstrap_intervals"] + ph["final_grid_png"]
    bf16_ratio = options["scored_samples_bf16"] / options["scored_samples_fp32_same_90_scaled"]
    variants = {
        "before (HEAD: final grid drawn again, no intervals)": before,
        "after (final grid from the scored images, 200-resample intervals)": after,
        "after, without the client grids": after - ph["client_grids"],
        "after, sampling in bfloat16": after - (ph["client_grids"] + ph["scored_samples"]) * (1 - bf16_ratio),
        "after, client grids and scored samples at 25 steps":
            after - (ph["client_grids"] + ph["scored_samples"]) * 0.75,
        "after, client grids at 25 steps": after - ph["client_grids"] * 0.75,
    }
    out["final_eval"] = {name: {"seconds": round(s, 1), "share_of_job": round(s / (job_train + s), 4)}
                         for name, s in variants.items()}
    out["bootstrap_share_of_eval"] = round(ph["bootstrap_intervals"] / after, 4)
    out["bootstrap_share_of_eval_without_client_grids"] = round(
        ph["bootstrap_intervals"] / (after - ph["client_grids"]), 4)
    out["bf16_speed_factor"] = round(1 / bf16_ratio, 2)
    out["note"] = ("client grids: measured on the final model, cost independent of the weights; a "
                   "fewer-steps variant is estimated as proportional to the steps (the sampler's cost is "
                   "per step).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    shown = ("phases_s", "training", "final_eval", "bootstrap_share_of_eval")
    print(json.dumps({k: out[k] for k in shown}, indent=1))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
