"""What evaluation samples: labels whose class mix follows the test split."""

import pytest
import torch

from fedrun.evaluation.sampling import eval_labels


def test_eval_labels_follow_the_test_split():
    test_labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    assert torch.bincount(eval_labels(test_labels, 3, 100)).tolist() == [50, 30, 20]
    assert torch.bincount(eval_labels(test_labels, 3, 10)).tolist() == [5, 3, 2]
    labels = eval_labels(test_labels, 3, 7)
    assert len(labels) == 7 and torch.all(labels[1:] >= labels[:-1])  # class order
    assert torch.bincount(labels).tolist() == [4, 2, 1]  # largest remainders: 3.5, 2.1, 1.4


def _tiny_evaluator(tmp_path, **extra):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedrun import dist
    from fedrun.config import load_config
    from fedrun.data import load_split
    from fedrun.evaluation.evaluator import Evaluator
    from fedrun.models import build

    from helpers import tiny_overrides
    o = tiny_overrides(tmp_path, "t", eval__enabled="true", eval__feature_extractor="classifier",
                       eval__num_samples=40, eval__batch_size=20, eval__bootstrap=40, sample__per_class=2,
                       **extra)
    cfg = load_config(None, o)
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    info = dist.init("cpu", 1)
    model, diffusion = build(cfg, train.num_classes, info.device)
    return cfg, Evaluator(cfg, info, train, test), model, diffusion


@pytest.mark.slow  # ~10 s: samples and scores a full final grid
def test_final_grid_shows_the_scored_images_and_the_features_are_saved(tmp_path, monkeypatch):
    """The last round's scored images, drawn with the grid's sampler, give samples/final.png:
    nothing is drawn again, and the PNG is the round's grid (the same first 2 of each class)."""
    import numpy as np

    from fedrun.evaluation import evaluator as ev
    from fedrun.evaluation import intervals
    cfg, evaluator, model, diffusion = _tiny_evaluator(tmp_path)
    scores = evaluator.evaluate(model, diffusion, cfg.fed.rounds)
    assert scores is not None and scores["fid_test_ci"][0] <= scores["fid_test"] <= scores["fid_test_ci"][1]
    calls = []
    monkeypatch.setattr(ev, "sample_sharded", lambda *a, **k: calls.append(a) or None)
    path = evaluator.final_grid(model, diffusion)
    assert calls == [] and path is not None
    samples = cfg.run_dir / "samples"
    assert path.read_bytes() == (samples / f"round_{cfg.fed.rounds:04d}.png").read_bytes()
    with np.load(cfg.run_dir / "eval" / f"round_{cfg.fed.rounds:04d}_features.npz") as z:
        assert z["feats"].shape == (40, 128) and z["labels"].tolist() == evaluator.labels.tolist()
    # another sampler for the grid (sample.steps): drawn from its own stream, as before
    monkeypatch.undo()
    cfg.sample.steps, evaluator.scorer.bootstrap = 3, intervals.Bootstrap(0)
    evaluator.evaluate(model, diffusion, cfg.fed.rounds)
    monkeypatch.setattr(ev, "sample_sharded", lambda *a, **k: calls.append(a) or None)
    evaluator.final_grid(model, diffusion)
    assert len(calls) == 1 and calls[0][4] == 3  # steps
