"""Differential privacy inside real training runs: the Gaussian noise DP-FedAvg adds to the global
model has the specified standard deviation, every rank keeps the same ledger, and the epsilon a
run reports is what the accountant gives for the steps it took (DP-SGD: with the resume test in
tests/unit_tests/test_resume.py)."""

from __future__ import annotations

import json
import math

import torch

from fedrun import checkpoint
from fedrun.config import load_config
from fedrun.privacy.accountant import epsilon_of
from fedrun.train import train

from helpers import tiny_overrides


def _model(run_dir, round_):
    state = checkpoint.load_verified(checkpoint.checkpoint_path(run_dir, round_))["model"]
    return torch.cat([t.reshape(-1).double() for t in state.values()])


def test_client_level_noise_on_a_zero_update_has_the_specified_std(tmp_path):
    """optim.lr = 1e-20: every client returns theta (its update is ~1e-20), so theta_1 - theta_0
    is the noise alone: N(0, (z S / (q N))^2) per coordinate. With P coordinates the sample std
    has relative standard error 1 / sqrt(2 P) (~0.6 % here); 6 of those is the tolerance."""
    z, clip = 0.7, 0.05
    cfg = load_config(None, tiny_overrides(tmp_path, "noise", fed__rounds="1", optim__lr="1e-20",
                                           privacy__level="client", privacy__noise_multiplier=str(z),
                                           privacy__clip=str(clip), fed__clients_per_round="2"))
    train(cfg)
    cfg0 = load_config(None, tiny_overrides(tmp_path, "init", fed__rounds="1", optim__lr="1e-20"))
    train(cfg0)  # the same seed: the same initial weights; its round-1 model is theta_0 to 1e-20
    noise = _model(cfg.run_dir, 1) - _model(cfg0.run_dir, 1)
    expected = z * clip / (2 / 4 * 4)  # q = clients_per_round / num_clients = 2 / 4, N = 4
    rel_se = 1 / math.sqrt(2 * noise.numel())
    assert abs(noise.std().item() / expected - 1) < 6 * rel_se, (noise.std().item(), expected)
    assert abs(noise.mean().item()) < 6 * expected / math.sqrt(noise.numel())
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["privacy"]["epsilon_max"] == epsilon_of([(z, 0.5, 1)], 1e-5)


def test_missing_opacus_is_one_clear_error_before_training(tmp_path, monkeypatch, capsys):
    import sys

    from fedrun.__main__ import main

    from helpers import as_args

    monkeypatch.setitem(sys.modules, "opacus", None)  # `import opacus` now raises ImportError
    code = main(as_args(tiny_overrides(tmp_path, "no_opacus", privacy__level="sample")))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedrun: error:")]
    assert code == 2 and len(err) == 1
    assert "privacy.level" in err[0] and "pip install 'fedrun[privacy]'" in err[0]
    assert not checkpoint.list_checkpoints(tmp_path / "no_opacus")  # nothing trained


def test_audit_of_a_diverged_model_ranks_non_finite_losses_last():
    """Heavy client-level noise can blow a model up: the audit must still give an AUC."""
    import numpy as np

    from fedrun.privacy.audit import attack_metrics

    diverged = attack_metrics(np.array([np.inf, np.nan]), np.array([np.inf, np.inf]))
    assert diverged["auc"] == 0.5
    assert attack_metrics(np.array([1.0, np.nan]), np.array([2.0, 3.0]))["auc"] == 0.5  # 1 beats both
