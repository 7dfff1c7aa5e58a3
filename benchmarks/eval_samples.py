#!/usr/bin/env python
"""How many samples it takes to tell two runs apart: the width of the paired 95 % interval of
the FID ratio of two runs against the generated count N and the reference count M.

    python -m fedrun eval RUN_A --eval.num_samples 1440 --eval.bootstrap 0   # a pool per run
    python -m fedrun eval RUN_B --eval.num_samples 1440 --eval.bootstrap 0
    python benchmarks/eval_samples.py RUN_A RUN_B [--features round_0100_n1440_features.npz]
                                      [--out benchmarks/results/eval_samples.json]

For every N (a class-stratified subset of each run's pool, the test split's class mix) and M (a
class-stratified subset of the test split, the reference), ``--draws`` random subsets, each
with the paired bootstrap of ``fedrun compare`` (one reference resample shared by both runs):
the half-width of the centred 95 % interval of log(FID_B / FID_A) (from the resamples'
deviations around the scores, as ``compare.ratio_ci``), for FID (test) and FID at infinite N.
A least-squares fit of half-width^2 = a / N + b / M over the grid then gives the N
(at the test split's M, and with M unlimited) at which the interval of a 1.2x ratio leaves 1
out: half-width <= log 1.2 (resolved half the time when the true ratio is 1.2) and
<= log 1.2 x 1.96 / (1.96 + 0.84) (resolved 80 % of the time). Writes ``--out`` (JSON) and
the same beside it as .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrun.data import load_split  # noqa: E402
from fedrun.evaluation import intervals as iv  # noqa: E402
from fedrun.evaluation.compare import load_generated  # noqa: E402
from fedrun.evaluation.scorer import Scorer  # noqa: E402
from fedrun.saved_run import load_run_config  # noqa: E402

Z80, Z975 = 0.8416, 1.9600


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices whose class mix follows ``labels``' (largest remainder), drawn without replacement."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * n
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: n - take.sum()]] += 1
    return np.concatenate([rng.choice(np.nonzero(labels == c)[0], k, replace=False)
                           for c, k in zip(classes, take, strict=True)])


def half_widths(pools: list[Any], test: np.ndarray, test_labels: np.ndarray, n: int, m: int,
                resamples: int, rng: np.random.Generator) -> dict[str, float]:
    """One draw: subsets of N generated (each run) and M reference vectors, the paired bootstrap,
    the half-widths of log(FID_B / FID_A) and log(FID∞_B / FID∞_A) and the points."""
    ref = stratified_subset(test_labels, m, rng)
    w_r = iv.resample_counts(test_labels[ref], resamples, rng)
    ones_r = np.ones((8, m), np.int64)
    w_r = np.vstack([w_r, ones_r])
    real = iv.Weighted(test[ref], w_r, iv.split_halves(w_r, test_labels[ref], rng))
    fids, infs = [], []
    for g in pools:
        sub = stratified_subset(g.labels, n, rng)
        w_f = np.vstack([iv.resample_counts(g.labels[sub], resamples, rng), np.ones((8, n), np.int64)])
        (whole, halves), = iv.fid_replicates(iv.Weighted(g.feats[sub], w_f, iv.split_halves(
            w_f, g.labels[sub], rng)), [real])
        fids.append(whole)
        infs.append(iv.fid_infinity(whole, halves))
    out: dict[str, float] = {}
    for name, (a, b) in (("fid", fids), ("fid_inf", infs)):
        point_a, point_b = float(a[-1] if name == "fid" else a[resamples:].mean()), \
            float(b[-1] if name == "fid" else b[resamples:].mean())
        # the resamples' deviations around the points (compare.ratio_ci): the ratio on the log scale
        ra = point_a + (a[:resamples] - a[:resamples].mean())
        rb = point_b + (b[:resamples] - b[:resamples].mean())
        ok = (ra > 0) & (rb > 0)
        logs = np.log(rb[ok] / ra[ok])
        if point_a > 0 and point_b > 0 and ok.mean() > 0.975:
            lo, hi = iv.interval(math.log(point_b / point_a), logs)  # type: ignore[misc]
            out[f"{name}_half_width"] = (hi - lo) / 2
            out[f"{name}_ratio"] = point_b / point_a
            out[f"{name}_resolved"] = not lo <= 0 <= hi
        out[f"{name}_a"], out[f"{name}_b"] = point_a, point_b
    return out


def fit(cells: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """Least squares of half-width^2 = a / N + b / M (both >= 0), in relative terms (each cell's
    error over its own half-width^2: the large-N cells, which decide the answer, count as much
    as the small ones)."""
    rows = [(1 / c["n"], 1 / c["m"], c[key] ** 2) for c in cells if c.get(key) is not None]
    x, y = np.array([r[:2] for r in rows]), np.array([r[2] for r in rows])
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones(len(y)), rcond=None)
    return float(max(coef[0], 0.0)), float(max(coef[1], 0.0))


def needed(a: float, b: float, m: float, target: float) -> float | None:
    """The N at which sqrt(a / N + b / M) = target (None when M alone is too few)."""
    rest = target ** 2 - (b / m if m != math.inf else 0.0)
    return a / rest if rest > 0 else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path, help="the baseline (e.g. centralized)")
    p.add_argument("run_b", type=Path)
    p.add_argument("--features", default="round_0100_n1440_features.npz")
    p.add_argument("--n", default="90,180,360,720,1440")
    p.add_argument("--m", default="90,180,360")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_samples.json")
    p.add_argument("--cells-from", type=Path, default=None,
                   help="an earlier result: its measured cells, fitted again (nothing sampled or resampled)")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.cells_from is not None:
        earlier = json.loads(args.cells_from.read_text())
        write_result(args, earlier["cells"], earlier["pool_sizes"], earlier["test_split"], earlier["wall_s"])
        return 0
    pools = [load_generated(d, args.features) for d in (args.run_a, args.run_b)]
    cfg = load_run_config(args.run_a)
    scorer = Scorer(pools[0].meta["extractor"], pools[0].meta["dataset"], load_split(cfg.data, "train"),
                    load_split(cfg.data, "test"), cache_dir=cfg.eval.cache_dir)
    test, test_labels = scorer.reference_feats("test").astype(np.float64), scorer.sets["test"].labels.numpy()
    rng = np.random.default_rng(args.seed)
    cells = []
    for n in map(int, args.n.split(",")):
        for m in map(int, args.m.split(",")):
            draws = [half_widths(pools, test, test_labels, n, m, args.resamples, rng)
                     for _ in range(args.draws)]
            cell: dict[str, Any] = {"n": n, "m": m}
            for key in draws[0]:
                vals = [d[key] for d in draws if key in d]
                cell[key] = float(np.mean(vals)) if not isinstance(vals[0], bool) else sum(vals) / len(vals)
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    write_result(args, cells, [len(g.feats) for g in pools], len(test), round(time.perf_counter() - t0, 1))
    return 0


def write_result(args: argparse.Namespace, cells: list[dict[str, Any]], pool_sizes: list[int],
                 test_split: int, wall_s: float) -> None:
    """The fit and the N needed, with the cells, to ``args.out``."""
    log12 = math.log(1.2)
    result: dict[str, Any] = {
        "runs": [args.run_a.name, args.run_b.name], "features": args.features, "draws": args.draws,
        "resamples": args.resamples, "pool_sizes": pool_sizes, "test_split": test_split,
        "cells": cells, "targets": {
            "log(1.2), resolved half the time": log12,
            "log(1.2) x 1.96 / 2.80, resolved 80 % of the time": log12 * Z975 / (Z975 + Z80)},
        "wall_s": wall_s}
    for key in ("fid_half_width", "fid_inf_half_width"):
        a, b = fit(cells, key)
        need = {}
        for tname, target in result["targets"].items():
            for mname, m in (("test split", float(test_split)), ("unlimited reference", math.inf),
                             ("4x the test split", 4.0 * test_split)):
                nn = needed(a, b, m, target)
                need[f"{tname}; M = {mname}"] = None if nn is None else round(nn)
        result[key.replace("_half_width", "")] = {"fit": {"a": a, "b": b}, "needed_n": need}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("fid", "fid_inf")}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
