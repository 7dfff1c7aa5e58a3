"""The privacy audit's measurements, in-process: the membership attack and the memorisation
test must see leakage where there is some and none where there is none. ``fedrun audit`` as a
command (a real process on a trained run): tests/integration_tests/test_audit.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrun.config import load_config
from fedrun.data import load_split
from fedrun.federated.client import train_local
from fedrun.models import build
from fedrun.privacy.audit import AuditSettings, membership_inference, memorization

from helpers import tiny_overrides


@pytest.fixture(scope="module")
def digits():
    cfg = load_config(None, tiny_overrides("/tmp"))
    return load_split(cfg.data, "train"), load_split(cfg.data, "test")


@pytest.mark.slow  # ~6 s: trains a client to overfit
def test_overfit_client_is_detected_and_copied(tmp_path, digits):
    """A client with three images (one per class), trained for 300 epochs: the attack separates
    its images from the test split, and the sampler re-emits near-copies of them."""
    train, test = digits
    torch.set_num_threads(1)
    few = np.array([np.flatnonzero(train.labels.numpy() == c)[0] for c in range(3)])
    cfg = load_config(None, tiny_overrides(tmp_path, model__base_channels=16, model__dropout=0,
                                           fed__local_epochs=300, optim__batch_size=36, optim__lr=5e-3))
    model, diffusion = build(cfg, 10, torch.device("cpu"))
    # each epoch is one batch holding every image 12 times (12 noise levels per image per step)
    train_local(model, diffusion, train, torch.as_tensor(few).repeat(12), cfg, round_=1, client=0)
    s = AuditSettings(levels=(0.1, 0.3, 0.5), draws=2, samples=12, steps=50)
    mia = membership_inference(model, diffusion, train, test, [few], s, seed=0)
    assert mia["auc"] > 0.95 and mia["tpr_at_1pct_fpr"] > 0.5, mia
    assert mia["per_client"][0]["members"] == 3
    # reference: the whole train split (1,437 images), so "near-copy" means closer to one
    # training image than to the 50th nearest of all of them; DDIM (eta 0) sampling
    mem = memorization(model, diffusion, train, s, steps=50, eta=0.0, seed=0,
                       pairs_png=tmp_path / "pairs.png", labels=torch.arange(12) % 3)
    assert mem["near_copies"] >= 2, mem
    assert all(c["train_index"] in few for c in mem["closest"][:mem["near_copies"]])
    assert (tmp_path / "pairs.png").stat().st_size > 0


def test_untrained_model_gives_chance_auc(tmp_path, digits):
    """No training, no membership signal: every level's AUC is within 4 standard errors of 0.5
    (the null distribution's SE of the Mann-Whitney AUC, sqrt((n1 + n2 + 1) / (12 n1 n2)))."""
    train, test = digits
    cfg = load_config(None, tiny_overrides(tmp_path))
    model, diffusion = build(cfg, 10, torch.device("cpu"))
    shards = [np.arange(0, len(train), 2), np.arange(1, len(train), 2)]
    s = AuditSettings(levels=(0.1, 0.3, 0.6), draws=1)
    mia = membership_inference(model, diffusion, train, test, shards, s, seed=0)
    n1, n2 = len(train), len(test)
    se = ((n1 + n2 + 1) / (12 * n1 * n2)) ** 0.5
    assert all(abs(level["auc"] - 0.5) < 4 * se for level in mia["per_level"]), (mia["per_level"], se)
    assert [c["members"] for c in mia["per_client"]] == [len(shards[0]), len(shards[1])]
