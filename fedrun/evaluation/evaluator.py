"""Evaluation during training: when it is due, sharded sampling, FID/IS on rank 0, grids.

* ``Evaluator.evaluate``: every rank samples its share of N images (N = eval.num_samples, or the
  size of the test split; per-class counts follow the test split), rank 0 scores them with
  ``scorer.Scorer`` (FID vs train and vs test, IS, KID, precision/recall/density/coverage,
  per-class FID/KID, and with eval.client_samples the global model against each client's data)
  and writes ``samples/round_XXXX.png``.
* ``Evaluator.sample_client`` / ``score_clients``: at eval.local_models_at rounds, the rank that
  trained a client draws eval.client_samples images from its local model, seeded by (seed,
  round, client, chunk) so that no result depends on which rank trained it; once per such
  round one gather (``dist.gather_object_to_main``) brings them to rank 0, which scores them
  against the client's own data and against the test split (also per class).
* ``Evaluator.client_grid``: a client's local model, right after its local training, draws a
  class-ordered grid with a colour-cluster strip: ``clients/round_XXXX/client_YY.png``.
* ``Evaluator.final_grid``: ``samples/final.png`` of the global model at the end of a run: the
  first sample.per_class scored images of every class of the last round's evaluation when it
  drew them with the grid's sampler (same steps and eta, enough of every class), else drawn.
* The last round's generated features go to ``eval/round_XXXX_features.npz`` (``fedrun compare``).

Every draw comes from a stream registered in ``fedrun.seeding.STREAMS`` ("eval_samples",
"final_grid", "client_grid", "client_eval").
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from .. import dist, seeding
from ..config import Config
from ..data import ImageSet, dataset_key, to_uint8
from ..diffusion import Diffusion
from ..errors import MetricsError
from ..precision import autocast_dtype
from . import grids
from .extractors import inception_weights_path, load_inception
from .intervals import client_draw
from .sampling import class_balanced_labels, eval_labels, sample_sharded
from .scorer import Scorer


def check_inception_weights(cfg: Config) -> None:
    """Fail before any process group starts if FID/IS will need a file that is not there, or a
    file that is not the FID Inception (loaded once and probed: 299x299 RGB in, 2048 out). With
    ``data.download`` a missing file is fetched first (clean-fid's, checksummed)."""
    if cfg.eval.enabled and cfg.eval.feature_extractor == "inception":
        load_inception(inception_weights_path(cfg.eval.inception_weights, download=cfg.data.download))


def check_eval_sizes(cfg: Config, test_set: ImageSet | None) -> None:
    """Fail before any training if a configured score cannot be computed from the sample counts:
    FID needs 2 samples, KID subsets of at least 2, precision/recall more than eval.prdc_k
    vectors per set, per-class scores 2 samples and 2 test images of every class."""
    e = cfg.eval
    if not e.enabled or test_set is None:
        return
    n, n_test = e.num_samples or len(test_set), len(test_set)
    fix = f"raise eval.num_samples (now {n}; 0 = the size of the test split, {n_test})"
    if n < 2:
        raise MetricsError(f"eval.num_samples: FID needs at least 2 samples, got {n}; {fix}")
    if e.kid and min(n, n_test, e.kid_subset_size) < 2:
        raise MetricsError(f"eval.kid_subset_size: KID subsets of {min(n, n_test, e.kid_subset_size)} "
                           f"vector(s); they need at least 2: {fix}, raise eval.kid_subset_size "
                           f"or set eval.kid = false")
    if e.prdc_k and min(n, n_test) <= e.prdc_k:
        raise MetricsError(f"eval.prdc_k: {e.prdc_k} nearest neighbours need more than {e.prdc_k} "
                           f"samples and test images, got {n} and {n_test}; {fix}, lower eval.prdc_k "
                           f"or set it to 0 (off)")
    if e.per_class:
        num_classes = int(test_set.num_classes)
        fake = torch.bincount(eval_labels(test_set.labels, num_classes, n), minlength=num_classes)
        real = torch.bincount(test_set.labels.cpu(), minlength=num_classes)
        for c in range(num_classes):
            if min(int(fake[c]), int(real[c])) < 2:
                raise MetricsError(f"eval.per_class: class {c} gets {int(fake[c])} sample(s) and has "
                                   f"{int(real[c])} test image(s); per-class FID/KID need at least 2 "
                                   f"of each: {fix} or set eval.per_class = false")
    if e.client_samples == 1:
        raise MetricsError("eval.client_samples: FID/KID need at least 2 samples per client; "
                           "use 0 (off) or >= 2")


def grid_scale(image_size: int) -> int:
    return max(1, 32 // image_size)  # small images are enlarged so a grid is legible


class Evaluator:
    """``shards``: each client's train indices (FedAvg); per-client scores need them."""

    def __init__(self, cfg: Config, info: dist.DistInfo, train_set: ImageSet, test_set: ImageSet | None,
                 shards: list[np.ndarray] | None = None, local_models: bool = True):
        """``local_models``: may clients' local models be shown (their grids)? Not when a privacy
        mechanism protects only the global model (client-level DP, secure aggregation)."""
        self.cfg, self.info = cfg, info
        self.local_models = local_models
        self.shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        self.amp = autocast_dtype(cfg.train.precision, info.device)
        self.num_classes = train_set.num_classes
        self.scorer: Scorer | None = None
        self.labels = torch.empty(0, dtype=torch.long)
        self.client_labels = torch.empty(0, dtype=torch.long)
        e = cfg.eval
        self.shards = shards if e.enabled and e.client_samples > 0 else None
        self._pending: dict[int, torch.Tensor] = {}  # client -> its local model's samples (this rank)
        # the last round's scored images (rank 0; None elsewhere) when final.png can show them
        self._final: tuple[torch.Tensor | None, torch.Tensor] | None = None
        if e.enabled:
            assert test_set is not None
            n = e.num_samples or len(test_set)
            self.labels = eval_labels(test_set.labels, self.num_classes, n)
            if self.shards is not None:
                self.client_labels = eval_labels(test_set.labels, self.num_classes, e.client_samples)
            if info.is_main:  # reference statistics now, not at the end of a long run
                self.scorer = Scorer(
                    e.feature_extractor, dataset_key(cfg.data), train_set.to(torch.device("cpu")),
                    test_set, cache_dir=e.cache_dir, device=info.device,
                    inception_weights=e.inception_weights, batch_size=e.batch_size, kid=e.kid,
                    kid_subsets=e.kid_subsets, kid_subset_size=e.kid_subset_size, prdc_k=e.prdc_k,
                    per_class=e.per_class, seed=cfg.run.seed, bootstrap=e.bootstrap, confidence=e.confidence)
                self.scorer.prepare(client_scores=self.shards is not None)
            dist.barrier()

    def due(self, round_: int) -> bool:
        e = self.cfg.eval
        return e.enabled and (round_ == self.cfg.fed.rounds or (e.every > 0 and round_ % e.every == 0))

    def evaluate(self, model: torch.nn.Module, diffusion: Diffusion, round_: int,
                 features_to: Path | None = None) -> dict[str, Any] | None:
        """All ranks call this. Rank 0 returns the scores (plus timings); the others None. The
        generated features go to ``features_to`` (``save_features``), by default at the last
        round only, to ``eval/round_XXXX_features.npz``."""
        e = self.cfg.eval
        t0 = time.perf_counter()
        seed, device = self.cfg.run.seed, self.info.device
        images = sample_sharded(model, diffusion, self.labels, self.shape, e.steps, e.eta,
                                lambda j: seeding.stream_generator(device, "eval_samples", seed=seed,
                                                                   round=round_, chunk=j),
                                self.info, chunk=e.batch_size, autocast_dtype=self.amp)
        t_sample = time.perf_counter() - t0
        if self._grid_from_scored(round_):  # every rank: final.png then draws nothing
            self._final = (images, self.labels)
        if images is None:
            return None
        assert self.scorer is not None
        t1 = time.perf_counter()
        feats, logits = self.scorer.features(images)
        t_feats = time.perf_counter() - t1
        scores = self.scorer.score_features(feats, logits, self.labels)
        if self.shards is not None:  # the global model against each client's own data
            scores["clients"] = [{"client": k, "images": len(idx), **self.scorer.against_client(
                feats, self.labels, idx, draw=client_draw(k, 0))} for k, idx in enumerate(self.shards)]
        scores["features_s"] = round(t_feats, 3)
        scores["scores_s"] = round(time.perf_counter() - t1 - t_feats, 3)
        t2 = time.perf_counter()
        per_class = self.cfg.sample.per_class or 10
        keep = torch.cat([torch.nonzero(self.labels == c)[:per_class, 0] for c in range(self.num_classes)])
        path = self.cfg.run_dir / "samples" / f"round_{round_:04d}.png"
        grids.save_class_grid(images[keep], self.labels[keep], path,
                              padding=1, scale=grid_scale(self.cfg.data.image_size))
        if features_to is None and round_ == self.cfg.fed.rounds:
            features_to = self.cfg.run_dir / "eval" / f"round_{round_:04d}_features.npz"
        if features_to is not None:
            save_features(features_to, feats, logits, self.labels, self.scorer, self.cfg, round_)
        scores["grid_s"] = round(time.perf_counter() - t2, 3)
        return {**scores, "sample_s": round(t_sample, 3), "eval_s": round(time.perf_counter() - t0, 3)}

    def _grid_from_scored(self, round_: int) -> bool:
        """Can final.png show the first sample.per_class scored images of each class of round_'s
        evaluation? Yes when that evaluation drew them with the grid's sampler (steps, eta) and
        has enough of every class. The same answer on every rank (config only)."""
        cfg, e = self.cfg, self.cfg.eval
        if not (e.enabled and self.due(round_) and round_ == cfg.fed.rounds and cfg.sample.per_class):
            return False
        grid_steps = cfg.sample.steps or cfg.diffusion.sample_steps
        same_sampler = e.steps == grid_steps and e.eta == cfg.diffusion.eta
        fewest = int(torch.bincount(self.labels, minlength=self.num_classes).min()) if len(self.labels) else 0
        return same_sampler and fewest >= cfg.sample.per_class

    def final_grid(self, model: torch.nn.Module, diffusion: Diffusion) -> Path | None:
        """``samples/final.png``: sample.per_class images of every class from the global model
        (``model``: the one the last round scored). All ranks call this; rank 0 writes the file
        and returns its path (None if disabled). When the last round's evaluation drew its images
        with the grid's sampler, they are shown (the first of each class) and nothing is drawn
        again; else they come from the stream "final_grid"."""
        cfg = self.cfg
        if cfg.sample.per_class == 0:
            return None
        if self._final is not None:  # the last round's scored images, drawn with the same sampler
            images, scored = self._final
            self._final = None
            if images is None:  # not rank 0
                return None
            keep = torch.cat([torch.nonzero(scored == c)[:cfg.sample.per_class, 0]
                              for c in range(self.num_classes)])
            path = cfg.run_dir / "samples" / "final.png"
            grids.save_class_grid(images[keep], scored[keep], path, padding=1,
                                  scale=grid_scale(cfg.data.image_size))
            return path
        labels = class_balanced_labels([cfg.sample.per_class] * self.num_classes)
        seed, device = cfg.run.seed, self.info.device
        images = sample_sharded(model, diffusion, labels, self.shape,
                                cfg.sample.steps or cfg.diffusion.sample_steps, cfg.diffusion.eta,
                                lambda j: seeding.stream_generator(device, "final_grid", seed=seed,
                                                                   round=cfg.fed.rounds, chunk=j),
                                self.info, autocast_dtype=self.amp)
        if images is None:
            return None
        path = cfg.run_dir / "samples" / "final.png"
        grids.save_class_grid(images, labels, path, padding=1, scale=grid_scale(cfg.data.image_size))
        return path

    def _local_model_rounds(self) -> set[int]:
        """Rounds whose clients' local models are looked at: eval.local_models_at, else the last."""
        return set(self.cfg.eval.local_models_at) or {self.cfg.fed.rounds}

    def client_rounds(self) -> set[int]:
        """Rounds whose clients draw a grid (none without images per class for them)."""
        # a mechanism that protects only the global model: no local model is shown
        if self.client_per_class() == 0 or not self.local_models:
            return set()
        return self._local_model_rounds()

    def client_score_rounds(self) -> set[int]:
        """Rounds whose clients are scored (none without eval.client_samples). The same set on
        every rank."""
        return set() if self.shards is None else self._local_model_rounds()

    @torch.no_grad()
    def sample_client(self, model: torch.nn.Module, diffusion: Diffusion, round_: int, client: int) -> None:
        """Called by the rank that trained ``client``, with the client's local model: draws
        eval.client_samples images (class mix of the test split) in chunks of eval.batch_size,
        chunk j seeded by (seed, round, client, j), and keeps them for ``score_clients``."""
        e = self.cfg.eval
        was_training = model.training
        model.eval()
        out = []
        for j, start in enumerate(range(0, len(self.client_labels), e.batch_size)):
            lab = self.client_labels[start:start + e.batch_size].to(self.info.device)
            g = seeding.stream_generator(self.info.device, "client_eval", seed=self.cfg.run.seed,
                                         round=round_, client=client, chunk=j)
            x = diffusion.sample(model, lab, self.shape, e.steps, e.eta, generator=g, autocast_dtype=self.amp)
            out.append(to_uint8(x).cpu())
        model.train(was_training)
        self._pending[client] = torch.cat(out)

    def score_clients(self, round_: int) -> list[dict[str, Any]] | None:
        """All ranks call this in a round of ``client_score_rounds`` (one gather); rank 0
        returns one row per client sampled this round, the others None."""
        mine, self._pending = self._pending, {}
        if self.info.world_size > 1:
            gathered = dist.gather_object_to_main(mine)
            if gathered is None:  # not rank 0
                return None
            mine = {k: v for part in gathered for k, v in part.items()}  # type: ignore[attr-defined]
        assert self.scorer is not None and self.shards is not None
        rows = []
        test_labels = self.scorer.sets["test"].labels.cpu().numpy()
        for k in sorted(mine):
            feats, _ = self.scorer.features(mine[k])
            test = self.scorer.against(feats, self.scorer.reference_feats("test"), self.client_labels.numpy(),
                                       test_labels, draw=client_draw(k, 1))
            per_class = self.scorer.per_class_scores(feats, self.client_labels)
            rows.append({"client": k, "images": len(self.shards[k]), "round": round_,
                         **self.scorer.against_client(feats, self.client_labels, self.shards[k],
                                                      draw=client_draw(k, 0)),
                         "fid_test": test["fid"], "kid_test": test["kid"],
                         **({"fid_test_ci": test["fid_ci"], "kid_test_ci": test["kid_ci"]}
                            if "fid_ci" in test else {}),
                         "per_class_fid_test": per_class["fid_test"],
                         "per_class_kid_test": per_class["kid_test"],
                         "num_samples": int(len(feats))})
        return rows

    def client_per_class(self) -> int:
        """Images per class of a client's grid (sample.client_per_class; -1: sample.per_class)."""
        s = self.cfg.sample
        return s.per_class if s.client_per_class < 0 else s.client_per_class

    def client_grid(self, model: torch.nn.Module, diffusion: Diffusion, round_: int, client: int) -> Path:
        """Called by the rank that trained ``client``, with the client's local model."""
        s, per_class = self.cfg.sample, self.client_per_class()
        labels = class_balanced_labels([per_class] * self.num_classes).to(self.info.device)
        # its own stream: untagged, (seed, round, 2, client) was another client's training stream
        g = seeding.stream_generator(self.info.device, "client_grid", seed=self.cfg.run.seed, round=round_,
                                     client=client)
        was_training = model.training
        model.eval()
        x = diffusion.sample(model, labels, self.shape, s.steps or self.cfg.diffusion.sample_steps,
                             self.cfg.diffusion.eta, generator=g, autocast_dtype=self.amp)
        model.train(was_training)
        path = self.cfg.run_dir / "clients" / f"round_{round_:04d}" / f"client_{client:02d}.png"
        grids.save_client_grid(x.cpu(), path, nrow=per_class, padding=1,
                               scale=grid_scale(self.cfg.data.image_size))
        return path


def _num(value: Any, fmt: str = ".2f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, fmt)


def extractor_label(scores: dict[str, Any]) -> str:
    """"inception" or, when IS came from another network, "inception (IS: classifier)"."""
    fid, is_ = scores.get("extractor"), scores.get("is_extractor", scores.get("extractor"))
    return str(fid) if is_ == fid else f"{fid} (IS: {is_})"


def with_interval(row: dict[str, Any], key: str, fmt: str = ".2f", scale: float = 1.0) -> str:
    """"1.80 [1.52, 2.10]": the score and its interval (``<key>_ci``) when it has one."""
    ci = row.get(f"{key}_ci")
    text = _num(row.get(key), fmt, scale)
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" [{_num(ci[0], fmt, scale)}, {_num(ci[1], fmt, scale)}]"
    return text


def scores_table(rows: list[dict[str, Any]], title: str = "FID / IS") -> Table:
    """The scores of evaluated rounds; each with its interval where the bootstrap gave one."""
    cols = ["round", "IS", "FID (train)", "FID (test)"]
    inf = any(r.get("fid_test_inf") is not None for r in rows)
    cols += ["FID∞ (test)"] if inf else []
    cols += ["KID x1e3", "precision", "recall", "density", "coverage", "samples", "extractor"]
    table = Table(title=title)
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        is_ = with_interval(r, "is_mean") if r.get("is_mean_ci") else \
            f"{r['is_mean']:.2f} ± {r['is_std']:.2f}"
        table.add_row(str(r["round"]), is_, with_interval(r, "fid_train"), with_interval(r, "fid_test"),
                      *([with_interval(r, "fid_test_inf")] if inf else []),
                      with_interval(r, "kid_test", scale=1e3),
                      *[with_interval(r, k, ".3f") for k in ("precision", "recall", "density", "coverage")],
                      str(r["num_samples"]), extractor_label(r))
    if any(r.get("bootstrap") for r in rows):
        b = next(r["bootstrap"] for r in rows if r.get("bootstrap"))
        table.caption = (f"\\[lo, hi]: {b['confidence']:.0%} intervals, {b['resamples']} bootstrap resamples "
                         f"of the "
                         f"generated and reference features; FID∞: FID extrapolated to infinite N")
    return table


def clients_table(local: list[dict[str, Any]], global_rows: list[dict[str, Any]] | None,
                  title: str = "per client") -> Table:
    """One row per client: its local model (right after local training) and the global model,
    each against the client's own data; the local model also against the test split."""
    by_client = {r["client"]: r for r in global_rows or []}
    clients = sorted({r["client"] for r in local} | set(by_client))
    local_by = {r["client"]: r for r in local}
    table = Table(title=title)
    for col in ("client", "images", "local FID (own)", "local FID (test)", "global FID (own)",
                "local KID x1e3 (own)", "global KID x1e3 (own)"):
        table.add_column(col, justify="right")
    for k in clients:
        lo, gl = local_by.get(k, {}), by_client.get(k, {})
        table.add_row(str(k), str(lo.get("images", gl.get("images", ""))), _num(lo.get("fid_own")),
                      _num(lo.get("fid_test")), _num(gl.get("fid_own")), _num(lo.get("kid_own"), scale=1e3),
                      _num(gl.get("kid_own"), scale=1e3))
    return table


def save_features(path: Path, feats: np.ndarray, logits: np.ndarray, labels: torch.Tensor, scorer: Scorer,
                  cfg: Config, round_: int) -> None:
    """The generated images' features (float32), logits and labels, with what makes them
    comparable (extractor and its tag, data set, sampler): what ``fedrun compare`` reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"extractor": scorer.extractor.name, "tag": scorer.extractor.tag, "is_extractor": scorer.is_name,
            "dataset": scorer.key, "test_images": len(scorer.sets["test"].labels),
            "train_images": len(scorer.sets["train"].labels), "round": round_, "steps": cfg.eval.steps,
            "eta": cfg.eval.eta, "guidance": cfg.diffusion.guidance, "seed": cfg.run.seed}
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, feats=np.asarray(feats, np.float32), logits=np.asarray(logits, np.float32),
                 labels=labels.cpu().numpy(), meta=json.dumps(meta))
    tmp.replace(path)
