"""The proxy classifier: a small CNN trained (seeded, cached) on a data set's own train split.

Its penultimate features give a Frechet distance and its softmax an IS for sets that Inception
knows nothing about (16x16 digits, CT scans), fully offline. Cached per (data set, size,
channels, seed) under ``<cache>/classifiers/``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache import atomic_save, resolve_cache_dir
from ..data import ImageSet

log = logging.getLogger(__name__)

CLASSIFIER_VERSION = 1  # bump when the classifier recipe changes: old cache files are then ignored


class SmallCNN(nn.Module):
    """Three conv stages and global average pooling: any square size >= 8 works, and a 16x16
    digits model trains in seconds on two CPU cores. ``features`` is the 4*width-d penultimate
    layer used for the Frechet distance; ``head`` gives the class logits used for IS."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)
        self.feature_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classifier_path(cache_dir: Path, key: str, image_size: int, channels: int, seed: int) -> Path:
    name = f"{key}_{image_size}px_{channels}ch_seed{seed}_v{CLASSIFIER_VERSION}.pt"
    return cache_dir / "classifiers" / name


def train_classifier(train_set: ImageSet, seed: int = 0, device: str | torch.device = "cpu",
                     batch_size: int = 128, target_steps: int = 2000, lr: float = 2e-3,
                     max_epochs: int = 8) -> SmallCNN:
    """Seeded training of the proxy classifier on images in [-1, 1].

    About ``target_steps`` updates, in 3 to ``max_epochs`` epochs: CIFAR-10 gets 6 epochs, the
    1,437 digits 8 epochs (96 steps, ~99% test accuracy, ~15 s on one CPU core). The global RNG
    state is left untouched, so scoring in the middle of a run does not change the run's own
    random stream.
    """
    device = torch.device(device)
    x_all, y_all = train_set.images.float().to(device), train_set.labels.long().to(device)
    n = len(y_all)
    steps_per_epoch = max(1, -(-n // batch_size))
    epochs = int(np.clip(-(-target_steps // steps_per_epoch), 3, max_epochs))
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = SmallCNN(x_all.shape[1], int(train_set.num_classes)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size].to(device)
                x, y = x_all[idx], y_all[idx]
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: nn.Module, data: ImageSet, batch_size: int = 500) -> float:
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(data.labels), batch_size):
        x = data.images[start:start + batch_size].float().to(device)
        correct += int((model(x).argmax(1).cpu() == data.labels[start:start + batch_size].cpu()).sum())
    return correct / max(1, len(data.labels))


def load_or_train_classifier(key: str, train_set: ImageSet, test_set: ImageSet | None,
                             cache_dir: str | os.PathLike = "", seed: int = 0,
                             device: str | torch.device = "cpu") -> tuple[SmallCNN, dict[str, Any]]:
    """The cached classifier of (data set, size, channels, seed), training it on first use."""
    _, channels, size, _ = train_set.images.shape
    path = classifier_path(resolve_cache_dir(cache_dir), key, size, channels, seed)
    model = SmallCNN(channels, int(train_set.num_classes))
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        log.info("classifier: loaded %s (test accuracy %.3f)", path, blob["test_acc"])
        return model.to(device).eval(), {"path": str(path), "test_acc": blob["test_acc"]}
    log.info("classifier: training on %d %s images (seed %d)", len(train_set.labels), key, seed)
    model = train_classifier(train_set, seed=seed, device=device)
    test_acc = classifier_accuracy(model, test_set) if test_set is not None else float("nan")
    log.info("classifier: test accuracy %.3f, saved to %s", test_acc, path)
    blob = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "test_acc": float(test_acc), "num_classes": int(train_set.num_classes),
            "version": CLASSIFIER_VERSION}
    atomic_save(lambda tmp: torch.save(blob, tmp), path)
    return model, {"path": str(path), "test_acc": float(test_acc)}
