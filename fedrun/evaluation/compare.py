"""``fedrun compare RUN_A RUN_B [RUN ...]``: a paired verdict on every score, RUN_A the baseline.

Each run's generated features come from ``RUN/eval/round_XXXX_features.npz`` (written by the
run's last evaluation, or by ``fedrun eval RUN``; ``--features NAME`` picks another file of that
folder). The reference features are the data set's cached ones (``Scorer``), the same for every
run. Every score is computed again from the features, then the paired bootstrap: one resample of
the reference splits (stratified by class, as the scores' intervals) shared by all runs, and an
independent resample of each run's generated set (the runs drew their images independently).
For each later run and score: the difference to RUN_A, its interval (the resamples' deviations
from their mean, paired, added to the difference: ``intervals.interval(reflect=False)``), and the
verdict: "better" or "worse" where the interval leaves 0 out,
else "not resolved"; for FID also the ratio to RUN_A with its interval (``ratio_ci``, from the
same deviations: it leaves 1 out when the difference's leaves 0 out, up to a quantile's
rounding). Density has no better
side (it exceeds 1 where samples crowd the real manifold): "higher" or "lower". The verdicts go
to the terminal and, with ``--out``, to a JSON file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..argparsing import ArgParser
from ..errors import ConfigError, MetricsError, ReportError

USAGE = ("fedrun compare RUN_A RUN_B [RUN ...] [--resamples N] [--confidence C] [--seed S] "
         "[--features NAME] [--out FILE]")
# key, title, which side is better: -1 lower, +1 higher, 0 neither
SCORES = (("fid_test", "FID (test)", -1), ("fid_test_inf", "FID∞ (test)", -1),
          ("fid_train", "FID (train)", -1),
          ("kid_test", "KID x1e3 (test)", -1), ("is_mean", "IS", 1), ("precision", "precision", 1),
          ("recall", "recall", 1), ("density", "density", 0), ("coverage", "coverage", 1),
          ("class_acc", "class accuracy", 1))
RATIOS = ("fid_test", "fid_test_inf", "fid_train")  # FID: also the ratio to the baseline
NOT_RESOLVED = "not resolved"


@dataclass
class Generated:
    """One run's generated features, as its evaluation saved them."""

    run: Path
    path: Path
    feats: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any]


def features_file(run_dir: Path, name: str | None = None) -> Path:
    """The run's features file: ``name`` in RUN/eval/, else that of the last scored round
    (summary.json), else the newest ``*_features.npz`` there."""
    folder = run_dir / "eval"
    if name:
        path = folder / name
        if not path.is_file():
            raise ReportError(f"{path}: not found; --features names a file of {folder}")
        return path
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            last = (json.loads(summary.read_text()).get("scores") or {}).get("round")
        except json.JSONDecodeError:
            last = None
        if isinstance(last, int) and (folder / f"round_{last:04d}_features.npz").is_file():
            return folder / f"round_{last:04d}_features.npz"
    found = sorted(folder.glob("*_features.npz"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not found:
        raise ReportError(f"{run_dir}: no generated features in {folder}; run `fedrun eval {run_dir}` "
                          f"(it scores the newest checkpoint and saves them)")
    return found[-1]


def load_generated(run_dir: Path, name: str | None = None) -> Generated:
    path = features_file(run_dir, name)
    try:
        with np.load(path) as z:
            return Generated(run_dir, path, z["feats"].astype(np.float64), z["logits"].astype(np.float64),
                             z["labels"].astype(np.int64), json.loads(str(z["meta"])))
    except (OSError, KeyError, ValueError) as exc:
        raise ReportError(f"{path}: not a features file of fedrun ({exc}); run `fedrun eval {run_dir}` "
                          f"again") from None


def check_comparable(runs: list[Generated]) -> None:
    """Same features (extractor and its weights' tag) against the same data set, or a MetricsError."""
    base = runs[0].meta
    for g in runs[1:]:
        for key in ("dataset", "extractor", "tag", "test_images", "train_images"):
            if g.meta.get(key) != base.get(key):
                raise MetricsError(f"{g.path}: {key} = {g.meta.get(key)!r}, but {runs[0].path} has "
                                   f"{base.get(key)!r}; compare runs scored with the same features on the "
                                   f"same data set (`fedrun eval RUN --eval.feature_extractor ...`)")


def verdict(lo: float, hi: float, better: int) -> str:
    """"better"/"worse" (or "higher"/"lower" for a score without a better side) when the interval
    of the difference (later run - baseline) leaves 0 out, else "not resolved"."""
    if lo <= 0 <= hi:
        return NOT_RESOLVED
    higher = lo > 0
    if better == 0:
        return "higher" if higher else "lower"
    return "better" if higher == (better > 0) else "worse"


def compare(run_dirs: list[Path], resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
            features: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """The verdicts of every later run against the first (see the module docstring)."""
    from ..data import load_split
    from ..saved_run import load_run_config
    from . import intervals as iv
    from .scorer import Scorer

    runs = [load_generated(d, features) for d in run_dirs]
    check_comparable(runs)
    cfg = load_run_config(run_dirs[0])
    scorer = Scorer(runs[0].meta["extractor"], runs[0].meta["dataset"], load_split(cfg.data, "train"),
                    load_split(cfg.data, "test"), cache_dir=cfg.eval.cache_dir, device=device,
                    inception_weights=cfg.eval.inception_weights, batch_size=cfg.eval.batch_size,
                    kid=cfg.eval.kid, kid_subsets=cfg.eval.kid_subsets,
                    kid_subset_size=cfg.eval.kid_subset_size,
                    prdc_k=cfg.eval.prdc_k, per_class=False, seed=seed)  # points only: no intervals
    if scorer.extractor.tag != runs[0].meta["tag"]:
        raise MetricsError(f"{runs[0].path}: features of {runs[0].meta['tag']}, but the cached extractor is "
                           f"{scorer.extractor.tag} (retrained or another file); score the runs again with "
                           f"`fedrun eval RUN`")
    refs = scorer.reference_resamples(iv.Bootstrap(resamples, confidence, seed))  # shared: the pairing
    points, reps = [], []
    for k, g in enumerate(runs):
        p = scorer.score_features(g.feats, g.logits, _labels(g))
        w_f = iv.Bootstrap(resamples, confidence, seed + k).counts(iv.GENERATED, g.labels)
        r = scorer.replicates(g.feats, g.logits, g.labels, w_f, refs)
        p["fid_test_inf"] = r.pop("fid_test_inf_point")
        points.append(p)
        reps.append(r)
    out: dict[str, Any] = {"baseline": str(run_dirs[0]), "resamples": resamples, "confidence": confidence,
                           "features": [str(g.path) for g in runs],
                           "samplers": [{k: g.meta.get(k) for k in ("steps", "eta", "guidance", "round")}
                                        for g in runs],
                           "num_samples": [len(g.feats) for g in runs], "comparisons": []}
    for k in range(1, len(runs)):
        rows = []
        for key, title, better in SCORES:
            a, b = points[0].get(key), points[k].get(key)
            if a is None or b is None or key not in reps[0] or key not in reps[k]:
                continue
            diff = iv.interval(b - a, reps[k][key] - reps[0][key], confidence, reflect=False)
            assert diff is not None
            row = {"score": key, "title": title, "baseline": a, "run": b, "difference": b - a,
                   "difference_ci": diff, "verdict": verdict(*diff, better)}
            if key in RATIOS and a > 0 and b > 0:
                row.update(ratio=b / a, ratio_ci=ratio_ci(a, b, reps[0][key], reps[k][key], confidence))
            rows.append(row)
        out["comparisons"].append({"run": str(run_dirs[k]), "scores": rows})
    return out


def ratio_ci(a: float, b: float, reps_a: np.ndarray, reps_b: np.ndarray, confidence: float
             ) -> list[float] | None:
    """The interval of b / a: each score's resampled deviations from their mean (FID's bias at
    finite N is additive, and a resample's FID carries more of it, so only the deviations carry
    over) added to the score itself, the quantiles of their ratios (the difference's interval is
    made of the same deviations: the two leave 0 and 1 out together); None when more than a
    (1 - confidence) / 2 share of a's deviations put it at or below 0 (FID near 0: no ratio)."""
    ra, rb = a + (reps_a - reps_a.mean()), b + (reps_b - reps_b.mean())
    ok = ra > 0
    if ok.mean() < 1 - (1 - confidence) / 2:
        return None
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(rb[ok] / ra[ok], [alpha, 1 - alpha])
    return [float(lo), float(hi)]


def _labels(g: Generated) -> Any:
    import torch
    return torch.from_numpy(g.labels)


def _fmt(key: str, value: float) -> str:
    if key.startswith("kid"):
        return f"{value * 1e3:.2f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def print_comparison(result: dict[str, Any]) -> None:
    from rich.table import Table

    from ..logs import log_console
    console = log_console(stderr=False)
    conf = f"{result['confidence']:.0%}"
    for comp in result["comparisons"]:
        table = Table(title=f"{comp['run']} vs {result['baseline']} (paired bootstrap, "
                            f"{result['resamples']} resamples, {conf} intervals)")
        for col in ("score", "baseline", "run", "difference [interval]", "ratio [interval]", "verdict"):
            table.add_column(col, justify="right" if col != "score" else "left")
        for r in comp["scores"]:
            key, (lo, hi) = r["score"], r["difference_ci"]
            ratio = f"{r['ratio']:.2f} [{r['ratio_ci'][0]:.2f}, {r['ratio_ci'][1]:.2f}]" \
                if r.get("ratio_ci") else ""
            table.add_row(r["title"], _fmt(key, r["baseline"]), _fmt(key, r["run"]),
                          f"{_fmt(key, r['difference'])} [{_fmt(key, lo)}, {_fmt(key, hi)}]", ratio,
                          r["verdict"] + ("" if r["verdict"] != NOT_RESOLVED else f" at {conf}"))
        console.print(table)


def parse_args(argv: list[str]) -> dict[str, Any]:
    parser = ArgParser("compare", USAGE)
    parser.add_argument("runs", nargs="*", metavar="RUN")
    parser.add_argument("--resamples", type=int, default=1000, metavar="N")
    parser.add_argument("--confidence", type=float, default=0.95, metavar="C")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--features", default=None, metavar="NAME")
    parser.add_argument("--out", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        raise ConfigError(f"compare: needs two runs or more, got {len(args.runs)}; usage: {USAGE}")
    if not 0.5 <= args.confidence < 1:
        raise ConfigError(f"compare: --confidence must be in [0.5, 1), e.g. 0.95, got {args.confidence}")
    fewest = math.ceil(2 / (1 - args.confidence))
    if args.resamples < fewest:
        raise ConfigError(f"compare: --resamples {args.resamples} cannot place the ends of a "
                          f"{args.confidence:g} interval; use >= {fewest}")
    return {"run_dirs": [Path(r) for r in args.runs], "resamples": args.resamples,
            "confidence": args.confidence, "seed": args.seed, "features": args.features,
            "out": Path(args.out) if args.out else None}


def compare_main(argv: list[str]) -> int:
    """``fedrun compare``: 0 when done; user errors raise (one line through ``fedrun.__main__``)."""
    args = parse_args(argv)
    for d in args["run_dirs"]:
        if not d.is_dir():
            raise ReportError(f"{d}: not a run directory; give the folders of finished runs")
    out = args.pop("out")
    result = compare(**args)
    print_comparison(result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"written to {out}")
    return 0
