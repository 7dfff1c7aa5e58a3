"""Evaluation during training: when it is due, sharded sampling, FID/IS on rank 0, grids.

* ``Evaluator.evaluate``: every rank samples its share of N images (N = eval.num_samples, or the
  size of the test split; per-class counts follow the test split), rank 0 scores them with
  ``scorer.Scorer`` (FID vs train and vs test, IS) and writes ``samples/round_XXXX.png``.
* ``Evaluator.client_grid``: a client's local model, right after its local training, draws a
  class-ordered grid with a colour-cluster strip: ``clients/round_XXXX/client_YY.png``.
* ``Evaluator.final_grid``: ``samples/final.png`` of the global model at the end of a run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from .. import dist, seeding
from ..config import Config
from ..data import ImageSet, dataset_key
from ..diffusion import Diffusion
from ..precision import autocast_dtype
from . import grids
from .extractors import inception_weights_path
from .sampling import class_balanced_labels, sample_sharded
from .scorer import Scorer

GRID, EVAL, CLIENT = 0, 1, 2  # seed tags: the grid, the scored samples and client grids differ


def check_inception_weights(cfg: Config) -> None:
    """Fail before any process group starts if FID/IS will need a file that is not there."""
    if cfg.eval.enabled and cfg.eval.feature_extractor == "inception":
        inception_weights_path(cfg.eval.inception_weights)


def eval_labels(test_labels: torch.Tensor, num_classes: int, n: int) -> torch.Tensor:
    """n labels in class order whose class mix follows the test split (largest remainder)."""
    counts = torch.bincount(test_labels.cpu(), minlength=num_classes).double()
    exact = counts / counts.sum() * n
    out = exact.floor().long()
    order = torch.argsort(exact - out, descending=True, stable=True)
    out[order[: n - int(out.sum())]] += 1
    return class_balanced_labels(out)


def grid_scale(image_size: int) -> int:
    return max(1, 32 // image_size)  # small images are enlarged so a grid is legible


class Evaluator:
    def __init__(self, cfg: Config, info: dist.DistInfo, train_set: ImageSet, test_set: ImageSet | None):
        self.cfg, self.info = cfg, info
        self.shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        self.amp = autocast_dtype(cfg.train.precision, info.device)
        self.num_classes = train_set.num_classes
        self.scorer: Scorer | None = None
        self.labels = torch.empty(0, dtype=torch.long)
        if cfg.eval.enabled:
            assert test_set is not None
            n = cfg.eval.num_samples or len(test_set)
            self.labels = eval_labels(test_set.labels, self.num_classes, n)
            if info.is_main:  # reference statistics now, not at the end of a long run
                self.scorer = Scorer(
                    cfg.eval.feature_extractor, dataset_key(cfg.data), train_set.to(torch.device("cpu")),
                    test_set, cache_dir=cfg.eval.cache_dir, device=info.device,
                    inception_weights=cfg.eval.inception_weights, batch_size=cfg.eval.batch_size)
                self.scorer.reference_stats("train")
                self.scorer.reference_stats("test")
            dist.barrier()

    def due(self, round_: int) -> bool:
        e = self.cfg.eval
        return e.enabled and (round_ == self.cfg.fed.rounds or (e.every > 0 and round_ % e.every == 0))

    def evaluate(self, model: torch.nn.Module, diffusion: Diffusion, round_: int) -> dict[str, Any] | None:
        """All ranks call this. Rank 0 returns the scores (plus timings); the others None."""
        e = self.cfg.eval
        t0 = time.perf_counter()
        images = sample_sharded(model, diffusion, self.labels, self.shape, e.steps, e.eta,
                                (self.cfg.run.seed, round_, EVAL), self.info, chunk=e.batch_size,
                                autocast_dtype=self.amp)
        t_sample = time.perf_counter() - t0
        if images is None:
            return None
        assert self.scorer is not None
        scores = self.scorer.score(images, self.labels)
        per_class = self.cfg.sample.per_class or 10
        keep = torch.cat([torch.nonzero(self.labels == c)[:per_class, 0] for c in range(self.num_classes)])
        path = self.cfg.run_dir / "samples" / f"round_{round_:04d}.png"
        grids.save_class_grid(images[keep], self.labels[keep], path,
                              padding=1, scale=grid_scale(self.cfg.data.image_size))
        return {**scores, "sample_s": round(t_sample, 3), "eval_s": round(time.perf_counter() - t0, 3)}

    def final_grid(self, model: torch.nn.Module, diffusion: Diffusion) -> Path | None:
        """``samples/final.png``: sample.per_class images of every class from the global model.
        All ranks call this; rank 0 writes the file and returns its path (None if disabled)."""
        cfg = self.cfg
        if cfg.sample.per_class == 0:
            return None
        labels = class_balanced_labels([cfg.sample.per_class] * self.num_classes)
        images = sample_sharded(model, diffusion, labels, self.shape,
                                cfg.sample.steps or cfg.diffusion.sample_steps, cfg.diffusion.eta,
                                (cfg.run.seed, cfg.fed.rounds, GRID), self.info, autocast_dtype=self.amp)
        if images is None:
            return None
        path = cfg.run_dir / "samples" / "final.png"
        grids.save_class_grid(images, labels, path, padding=1, scale=grid_scale(cfg.data.image_size))
        return path

    def client_rounds(self) -> set[int]:
        """Rounds whose clients draw a grid: eval.local_models_at, else the last (none if
        sample.per_class = 0)."""
        if self.cfg.sample.per_class == 0:
            return set()
        return set(self.cfg.eval.local_models_at) or {self.cfg.fed.rounds}

    def client_grid(self, model: torch.nn.Module, diffusion: Diffusion, round_: int, client: int) -> Path:
        """Called by the rank that trained ``client``, with the client's local model."""
        s = self.cfg.sample
        labels = class_balanced_labels([s.per_class] * self.num_classes).to(self.info.device)
        g = seeding.generator(self.info.device, self.cfg.run.seed, round_, CLIENT, client)
        was_training = model.training
        model.eval()
        x = diffusion.sample(model, labels, self.shape, s.steps or self.cfg.diffusion.sample_steps,
                             self.cfg.diffusion.eta, generator=g, autocast_dtype=self.amp)
        model.train(was_training)
        path = self.cfg.run_dir / "clients" / f"round_{round_:04d}" / f"client_{client:02d}.png"
        grids.save_client_grid(x.cpu(), path, nrow=s.per_class, padding=1,
                               scale=grid_scale(self.cfg.data.image_size))
        return path


def scores_table(rows: list[dict[str, Any]], title: str = "FID / IS") -> Table:
    table = Table(title=title)
    for col in ("round", "IS", "FID (train)", "FID (test)", "samples", "extractor"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["round"]), f"{r['is_mean']:.2f} ± {r['is_std']:.2f}", f"{r['fid_train']:.2f}",
                      f"{r['fid_test']:.2f}", str(r["num_samples"]), r["extractor"])
    return table

