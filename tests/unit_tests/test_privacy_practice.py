"""Privacy in practice: the noise multiplier solved from the target epsilon and used everywhere,
resumed only with the same solution; the PRV default and its guard; DP-FedAvg's noise-to-signal
warning."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import opacus  # noqa: F401  (required: without it these tests fail, never skip)
import pytest
import torch

from fedrun import checkpoint
from fedrun.config import load_config
from fedrun.errors import ConfigError, RunDirError
from fedrun.flat import num_flat
from fedrun.models import build
from fedrun.privacy import accountant, client_dp
from fedrun.privacy.mechanisms import build_mechanism
from fedrun.train import train

from helpers import TINY, model_at, same_bits, tiny_overrides

# cheap rounds: 200 synthetic images over the tiny config's 4 clients, all in every round (q = 1,
# where the accountants are fast too)
CLIENT = {"data__name": "synthetic", "data__synthetic_size": 200, "privacy__level": "client",
          "privacy__clip": "0.01", "privacy__target_epsilon": 20}


def test_the_solved_noise_is_the_smallest_that_fits_the_target():
    cfg = load_config(None, {**TINY, "fed.rounds": "30", "privacy.level": "client",
                             "privacy.target_epsilon": "8", "privacy.noise_multiplier": "0"})
    sizes = [100] * 4
    sigma = accountant.solve_noise(cfg, sizes)
    assert accountant.planned_epsilon(cfg, sizes, noise_multiplier=sigma) <= 8
    assert accountant.planned_epsilon(cfg, sizes, noise_multiplier=sigma - 0.05) > 8
    cfg.privacy.noise_multiplier = 1.0  # a given noise: nothing to solve
    assert accountant.solve_noise(cfg, sizes) is None


@pytest.mark.parametrize("level", ["client", pytest.param("sample", marks=pytest.mark.slow)])
def test_a_solved_noise_trains_exactly_as_the_same_noise_given(tmp_path, level, capsys):
    over = {**CLIENT, "privacy__level": level, "fed__rounds": 2}
    solved = load_config(None, tiny_overrides(tmp_path, "solved", privacy__noise_multiplier=0, **over))
    summary = train(solved)
    sigma = summary["privacy"]["noise_multiplier"]
    line = [l for l in capsys.readouterr().out.splitlines() if "solved from privacy.target_epsilon" in l]
    assert len(line) == 1 and f"privacy.noise_multiplier = {sigma:g}" in line[0]
    assert summary["privacy"]["noise_multiplier_solved"] and sigma > 0
    given = load_config(None, tiny_overrides(tmp_path, "given", privacy__noise_multiplier=sigma, **over))
    other = train(given)
    # the DP-SGD optimizer / DP-FedAvg's server noise, the ledger and the epsilon: all the same
    assert same_bits(model_at(solved.run_dir, 2), model_at(given.run_dir, 2))
    a, b = (checkpoint.load_verified(checkpoint.checkpoint_path(c.run_dir, 2)) for c in (solved, given))
    assert a["extra"]["privacy"] == b["extra"]["privacy"]
    assert all(s == sigma for h in a["extra"]["privacy"]["history"].values() for s, _, _ in h)
    assert summary["privacy"]["epsilon_max"] == other["privacy"]["epsilon_max"] <= 20
    # the solved noise is the run's config from then on: config.toml, checkpoints, summary.json
    saved = json.loads((solved.run_dir / "summary.json").read_text())["config"]["privacy"]
    assert saved["noise_multiplier"] == sigma and a["config"]["privacy"]["noise_multiplier"] == sigma
    assert load_config(solved.run_dir / "config.toml").privacy.noise_multiplier == sigma


def test_resume_solves_the_same_noise_and_refuses_another(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "straight", privacy__noise_multiplier=0, fed__rounds=2,
                                           **CLIENT))
    train(cfg)
    # stopped after round 1 of the same plan: resume from its round-1 checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(cfg.run_dir, resumed)
    checkpoint.checkpoint_path(resumed, 2).unlink()
    again = load_config(None, tiny_overrides(tmp_path, "resumed", privacy__noise_multiplier=0, fed__rounds=2,
                                             **CLIENT))
    train(again)
    assert same_bits(model_at(cfg.run_dir, 2), model_at(resumed, 2))
    # more rounds solve a larger noise: the run would mix two noises under one target
    more = load_config(None, tiny_overrides(tmp_path, "resumed", privacy__noise_multiplier=0, fed__rounds=40,
                                            **CLIENT))
    refusal = (r"^run\.name: .* holds a run with a different config "
               r"\(privacy\.noise_multiplier [0-9.]+ there, [0-9.]+ here\)")
    with pytest.raises(RunDirError, match=refusal):
        train(more)


def test_an_unreachable_target_is_one_line_with_either_accountant():
    for kind, target in (("rdp", "0.01"), ("prv", "0.0001")):
        cfg = load_config(None, {**TINY, "privacy.level": "client", "privacy.target_epsilon": target,
                                 "privacy.accountant": kind, "privacy.noise_multiplier": "0"})
        with pytest.raises(ConfigError) as info:
            accountant.solve_noise(cfg, [100] * 4)
        msg = str(info.value)
        assert msg.startswith("privacy.target_epsilon: no noise multiplier up to 1e+06") and "\n" not in msg
        assert (kind == "rdp") == ("\"prv\" is tighter" in msg)


def test_prv_is_the_default_and_tighter_than_rdp_on_the_issues_cases():
    assert load_config(None, {}).privacy.accountant == "prv" == accountant.DEFAULT_ACCOUNTANT
    for history in ([(3.5, 1.0, 30)], [(3.16, 32 / 144, 150)]):
        prv, rdp = (accountant.epsilon_of(history, 1e-5, k) for k in ("prv", "rdp"))
        assert 0 < prv < rdp


def test_prv_beyond_its_grid_falls_back_to_rdps_bound_with_a_warning():
    history = [(0.3, 1.0, 1000)]  # epsilon in the thousands: PRV's grid would take > 1e8 points (GBs)
    assert accountant.prv_grid_points(history, 1e-5) > accountant.PRV_MAX_POINTS
    accountant._WARNED_PRV = False
    with pytest.warns(UserWarning, match="RDP's bound is reported"):
        eps = accountant.epsilon_of(history, 1e-5, "prv")
    assert eps == accountant.epsilon_of(history, 1e-5, "rdp")


def test_noise_to_signal_is_z_sqrt_p_over_expected_clients():
    assert client_dp.noise_to_signal(2.0, 10_000, 100, 0.1) == pytest.approx(2.0 * 100 / 10)


def test_client_level_warns_when_the_noise_outweighs_the_clients(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, privacy__level="client", privacy__noise_multiplier=1.0))
    model, _ = build(cfg, 10, torch.device("cpu"))
    p = num_flat(model)
    with pytest.warns(UserWarning, match=r"privacy.level: client-level DP expects q N = 4 clients per round.*"
                                         r"noise-to-signal") as seen:
        mechanism = build_mechanism(cfg, [300] * 4, num_classes=10)
    ratio = 1.0 * math.sqrt(p) / 4
    said = [str(w.message) for w in seen if "noise-to-signal" in str(w.message)]
    assert len(said) == 1 and f" {ratio:.3g}x " in said[0] and mechanism.privacy.noised == p
    assert mechanism.summaries()["privacy"]["noise_to_signal"] == pytest.approx(ratio)
    with warnings.catch_warnings():  # enough clients per round: no warning
        warnings.simplefilter("error")
        many = load_config(None, tiny_overrides(tmp_path, privacy__level="client",
                                                privacy__noise_multiplier=1.0, fed__num_clients=400,
                                                fed__clients_per_round=200))
        build_mechanism(many, [3] * 400, num_classes=10)
