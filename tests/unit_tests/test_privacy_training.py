"""Differential privacy inside real training runs: the Gaussian noise DP-FedAvg adds to the global
model has the specified standard deviation, every rank keeps the same ledger, and the epsilon a
run reports is what the accountant gives for the steps it took (resume: tests/unit_tests/test_resume.py)."""

from __future__ import annotations

import json
import math

import torch

from fedrun import checkpoint
from fedrun.config import load_config
from fedrun.privacy.accountant import epsilon_of, sample_level_step
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


def test_sample_level_epsilon_is_the_accountants_for_the_steps_taken(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "dpsgd", privacy__level="sample",
                                           privacy__noise_multiplier="1.3", fed__clients_per_round="3"))
    train(cfg)
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    sizes = json.loads((cfg.run_dir / "partition.json").read_text())["sizes"]
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    taken = {k: 0 for k in range(len(sizes))}
    for rec in records:
        for k in rec["clients"]:
            taken[k] += 1
    for k, rounds in taken.items():
        if rounds == 0:
            assert str(k) not in summary["privacy"]["epsilon_per_client"]
            continue
        q, steps = sample_level_step(sizes[k], cfg.optim.batch_size, cfg.fed.local_epochs)
        expected = epsilon_of([(1.3, q, steps * rounds)], 1e-5)
        assert summary["privacy"]["epsilon_per_client"][str(k)] == expected
    assert summary["privacy"]["epsilon_max"] == max(summary["privacy"]["epsilon_per_client"].values())
    assert records[-1]["epsilon"] == summary["privacy"]["epsilon_max"] > records[0]["epsilon"] > 0
