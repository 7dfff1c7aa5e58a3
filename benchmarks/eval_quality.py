#!/usr/bin/env python
"""How good is a trained run? Its FD/IS next to two anchors scored the same way.

    python benchmarks/eval_quality.py runs/digits [--out benchmarks/results/eval_quality.json]

Scores, with the run's own feature extractor (the digits default: a classifier trained on
the digits' train split) and as many samples as the test split:
  * ``trained``:   the run's newest valid checkpoint, its EMA when it holds one (what
                   ``fedrun eval`` scores, opened the same way: ``fedrun.saved_run.open_run``),
  * ``real_test``: the real held-out test images themselves (the best a model could do
                   against the train split; its FID vs test is 0 by construction),
  * ``untrained``: the same U-Net at its initialisation (the worst case).
Single process; sampling uses the run's eval settings (steps, eta, chunk size); FD (test) is
printed with its 95 % interval (eval.bootstrap).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrun import dist  # noqa: E402
from fedrun.errors import FedrunError  # noqa: E402
from fedrun.evaluation.evaluator import Evaluator  # noqa: E402
from fedrun.models import build  # noqa: E402
from fedrun.saved_run import open_run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_quality.json"))
    args = p.parse_args()
    try:
        run = open_run(args.run_dir, device="cpu", overrides={"eval.enabled": "true"})
    except FedrunError as exc:
        print(f"eval_quality: {exc}", file=sys.stderr)
        return 2
    cfg, test_set = run.cfg, run.test
    assert test_set is not None
    info = dist.init("cpu", cfg.run.threads, cfg.run.keep_freed_memory)
    evaluator = Evaluator(cfg, info, run.train, test_set)
    assert evaluator.scorer is not None

    results: dict[str, dict] = {}
    results["real_test"] = evaluator.scorer.score(test_set.images, test_set.labels)
    untrained, diffusion = build(cfg, run.train.num_classes, info.device)
    results["untrained"] = evaluator.evaluate(untrained, diffusion, 0) or {}
    results["trained"] = evaluator.evaluate(run.model, run.diffusion, run.round) or {}
    results["trained"].update(checkpoint=str(run.checkpoint), weights=run.weights)
    out = {"run_dir": args.run_dir.name, "date": time.strftime("%Y-%m-%d"),
           "threads": torch.get_num_threads(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    for name, r in results.items():
        ci = r.get("fid_test_ci")
        shown = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        print(f"{name:>10}: FD train {r['fid_train']:8.2f}  FD test {r['fid_test']:8.2f}{shown}  "
              f"IS {r['is_mean']:.2f} ± {r['is_std']:.2f}  class acc {r.get('class_acc')}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
