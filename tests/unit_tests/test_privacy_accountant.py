"""Privacy accounting: published values, exact checkpoint round trips, the budget refusal."""

from __future__ import annotations

import io

import opacus  # noqa: F401  (required: without it these tests fail, never skip)
import pytest
import torch

from fedrun.config import load_config
from fedrun.errors import ConfigError
from fedrun.privacy.accountant import (
    FEDERATION,
    PrivacyLedger,
    check_budget,
    epsilon_of,
    planned_epsilon,
    planned_ledger,
)


def test_rdp_epsilon_matches_opacus_published_value():
    """Opacus's own test, opacus/tests/accountants_test.py::AccountingTest.test_rdp_accountant:
    noise multiplier 1.5, sample rate 0.04, int(90 / 0.04) = 2250 steps, delta 1e-5 gives
    epsilon = 7.32911117143 (assertAlmostEqual, 7 places)."""
    ledger = PrivacyLedger("rdp")
    for _ in range(9):  # 9 records of 250 steps compose to the same 2250 steps
        ledger.record(7, noise_multiplier=1.5, sample_rate=0.04, steps=250)
    assert ledger.epsilon(7, delta=1e-5) == pytest.approx(7.32911117143, abs=1e-7)
    assert ledger.history["7"] == [(1.5, 0.04, 2250)]
    # PRV (Gopi et al. 2021) is tighter than RDP's bound on the same mechanism
    assert 6.0 < epsilon_of([(1.5, 0.04, 2250)], 1e-5, "prv") < 7.32911117143


def test_ledger_state_round_trips_exactly_through_a_weights_only_checkpoint():
    ledger = PrivacyLedger("rdp")
    ledger.record(0, 1.1, 32 / 144, 25)
    ledger.record(3, 1.1, 32 / 97, 20)
    ledger.record(0, 1.1, 32 / 144, 25)
    ledger.record(0, 2.0, 32 / 144, 5)
    buf = io.BytesIO()
    torch.save({"privacy": ledger.state_dict()}, buf)
    buf.seek(0)
    restored = PrivacyLedger("rdp")
    restored.load_state_dict(torch.load(buf, weights_only=True)["privacy"])
    assert restored.history == ledger.history
    assert restored.epsilons(1e-5) == ledger.epsilons(1e-5)  # bit-identical floats
    assert restored.max_epsilon(1e-5) == max(ledger.epsilon(0, 1e-5), ledger.epsilon(3, 1e-5)) > 0
    assert restored.epsilon(9, 1e-5) == 0.0  # a client that never trained spent nothing
    with pytest.raises(ConfigError, match="privacy.accountant"):
        PrivacyLedger("prv").load_state_dict(ledger.state_dict())


def _cfg(tmp_path, **privacy):
    # RDP: the refusal's logic is the accountant's business only through epsilon_of, and PRV (the
    # default, tested in test_privacy_practice.py) makes its bisections 4x slower
    over = {"fed.rounds": "20", "fed.local_epochs": "5", "optim.batch_size": "32",
            "fed.num_clients": "4", "fed.clients_per_round": "4", "privacy.accountant": "rdp"}
    over.update({f"privacy.{k}": str(v) for k, v in privacy.items()})
    return load_config(None, over)


def test_planned_epsilon_counts_what_each_client_trains(tmp_path):
    cfg = _cfg(tmp_path, level="sample")
    sizes = [144, 97, 0, 300]
    ledger = planned_ledger(cfg, sizes, participation=[[0, 1, 3], [0, 3]], rounds=2)
    # q = B / n, E * ceil(n / B) steps per round taken part in
    assert ledger.history == {"0": [(1.0, 32 / 144, 2 * 25)], "1": [(1.0, 32 / 97, 20)],
                              "3": [(1.0, 32 / 300, 2 * 50)]}
    client = planned_ledger(_cfg(tmp_path, level="client"), sizes)
    assert client.history == {FEDERATION: [(1.0, 1.0, 20)]}


def test_budget_refusal_names_the_fix_and_the_fix_fits(tmp_path):
    sizes = [300, 250, 400, 350]
    cfg = _cfg(tmp_path, level="sample", target_epsilon=8, noise_multiplier=1.0)
    with pytest.raises(ConfigError) as info:
        check_budget(cfg, sizes)
    msg = str(info.value)
    assert msg.startswith("privacy.target_epsilon:") and "\n" not in msg
    rounds = int(msg.split("fed.rounds <= ")[1].split()[0])
    sigma = float(msg.split("privacy.noise_multiplier >= ")[1].split(",")[0])
    assert 0 < rounds < 20 and sigma > 1.0
    # the suggestions really fit, and one more round does not
    assert planned_epsilon(cfg, sizes, rounds=rounds) <= 8 < planned_epsilon(cfg, sizes, rounds=rounds + 1)
    assert planned_epsilon(cfg, sizes, noise_multiplier=sigma) <= 8
    assert planned_epsilon(cfg, sizes, noise_multiplier=sigma - 0.05) > 8  # and is not wasteful
    cfg.privacy.noise_multiplier = sigma
    assert check_budget(cfg, sizes) <= 8


def test_budget_refusal_when_the_first_round_alone_exceeds_it(tmp_path):
    cfg = _cfg(tmp_path, level="client", target_epsilon=0.5, noise_multiplier=0.8)
    with pytest.raises(ConfigError, match=r"even 1 round exceeds it: set privacy.noise_multiplier >= "):
        check_budget(cfg, [100] * 4)
