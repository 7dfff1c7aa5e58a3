"""Server rules against hand-computed values over three rounds (as Flower's strategy tests do).

Each rule gets x0 and three client averages; the expected models are worked out by hand below
(with the pseudo-gradient delta = x - average of fedrun/federated/server.py), in numbers that
fp64 represents exactly where possible. A resumed rule (state_dict -> new object) must continue
bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedrun.config import load_config
from fedrun.federated.server import (
    SERVER_RULES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    build_server_optimizer,
)


def run(opt: ServerOptimizer, x0: list[float], averages: list[list[float]]) -> list[list[float]]:
    x = torch.tensor(x0, dtype=torch.float64)
    out = []
    for avg in averages:
        x = opt.step(x, torch.tensor(avg, dtype=torch.float64))
        out.append(x.tolist())
    return out


def test_fedavg_returns_the_average_and_keeps_no_state():
    opt = FedAvg()
    assert run(opt, [1.0, -2.0], [[0.5, 3.0], [7.0, 7.0]]) == [[0.5, 3.0], [7.0, 7.0]]
    assert opt.state_dict() == {}


def test_fedavgm_by_hand():
    # lr 0.5, momentum 0.5, x0 = [1, -2]
    # r1: avg [0.5, -1]    delta [0.5, -1]   m = [0.5, -1]                 x1 = x0 - 0.5 m = [0.75, -1.5]
    # r2: avg [0.25, -0.5] delta [0.5, -1]   m = 0.5 m + delta = [0.75, -1.5]  x2 = [0.375, -0.75]
    # r3: avg = x2         delta 0           m = 0.5 m = [0.375, -0.75]    x3 = [0.1875, -0.375]
    got = run(FedAvgM(lr=0.5, momentum=0.5), [1.0, -2.0], [[0.5, -1.0], [0.25, -0.5], [0.375, -0.75]])
    assert got == [[0.75, -1.5], [0.375, -0.75], [0.1875, -0.375]]


def test_fedavgm_without_momentum_at_lr_1_is_fedavg():
    averages = [[0.3, -1.7], [2.5, 0.1]]
    got = run(FedAvgM(lr=1.0, momentum=0.0), [1.0, 1.0], averages)
    assert sum(got, []) == pytest.approx(sum(averages, []), abs=1e-15)  # x - (x - avg): one rounding


def test_fedadam_by_hand():
    # lr 1, beta1 0.5, beta2 0.75, tau 0.5, x0 = 1; m = 0.5 m + 0.5 d; v = 0.75 v + 0.25 d^2
    # r1: avg 0    d = 1     m = 0.5   v = 0.25  x1 = 1 - 0.5 / (0.5 + 0.5) = 0.5
    # r2: avg 0    d = 0.5   m = 0.5   v = 0.25  x2 = 0.5 - 0.5 / 1 = 0
    # r3: avg 0.5  d = -0.5  m = 0     v = 0.25  x3 = 0
    opt = FedAdam(lr=1.0, beta1=0.5, beta2=0.75, tau=0.5)
    assert run(opt, [1.0], [[0.0], [0.0], [0.5]]) == [[0.5], [0.0], [0.0]]
    assert opt.state_dict()["m"].item() == 0.0 and opt.state_dict()["v"].item() == 0.25


def test_fedyogi_by_hand():
    # lr 1, beta1 0.5, beta2 0.75, tau 0.5, x0 = 1; v = v - 0.25 d^2 sign(v - d^2)
    # r1: avg 0     d = 1     m = 0.5    v = 0 - 0.25 * 1 * (-1) = 0.25          x1 = 0.5
    # r2: avg 0.25  d = 0.25  m = 0.375  v = 0.25 - 0.25 * 0.0625 = 0.234375
    #     x2 = 0.5 - 0.375 / (sqrt(0.234375) + 0.5)
    # (Adam would have v = 0.75 * 0.25 + 0.25 * 0.0625 = 0.203125: Yogi shrinks v more slowly)
    opt = FedYogi(lr=1.0, beta1=0.5, beta2=0.75, tau=0.5)
    got = run(opt, [1.0], [[0.0], [0.25]])
    assert got[0] == [0.5]
    assert got[1][0] == pytest.approx(0.5 - 0.375 / (math.sqrt(0.234375) + 0.5), rel=1e-15)
    assert opt.state_dict()["v"].item() == 0.234375


def test_fedadagrad_by_hand():
    # lr 1, beta1 0.5, tau 1, x0 = 1; v = v + d^2
    # r1: avg 0  d = 1     m = 0.5    v = 1       x1 = 1 - 0.5 / (1 + 1) = 0.75
    # r2: avg 0  d = 0.75  m = 0.625  v = 1.5625  x2 = 0.75 - 0.625 / (1.25 + 1) = 0.75 - 5/18
    opt = FedAdagrad(lr=1.0, beta1=0.5, beta2=0.99, tau=1.0)
    got = run(opt, [1.0], [[0.0], [0.0]])
    assert got[0] == [0.75]
    assert got[1][0] == pytest.approx(0.75 - 5 / 18, rel=1e-15)
    assert opt.state_dict()["v"].item() == 1.5625


@pytest.mark.parametrize("name", sorted(SERVER_RULES))
def test_a_resumed_rule_continues_bit_for_bit(name):
    cfg = load_config(None, {"fed.server_opt": name, "fed.server_lr": "0.3",
                             "fed.server_momentum": "0.7"}).fed
    g = torch.Generator().manual_seed(0)
    x0, averages = torch.randn(50, generator=g), [torch.randn(50, generator=g) for _ in range(3)]

    straight = build_server_optimizer(cfg)
    x = x0
    for avg in averages:
        x = straight.step(x, avg)

    first = build_server_optimizer(cfg)
    y = first.step(first.step(x0, averages[0]), averages[1])
    resumed = build_server_optimizer(cfg)  # as after a restart: state from the checkpoint
    resumed.load_state_dict(first.state_dict(), torch.device("cpu"))
    y = resumed.step(y, averages[2])
    assert torch.equal(x, y)
    assert not torch.equal(x, x0)


def test_config_keys_reach_the_rule():
    cfg = load_config(None, {"fed.server_opt": "fedyogi", "fed.server_lr": "0.01",
                             "fed.server_momentum": "0.8",
                             "fed.server_beta2": "0.95", "fed.server_tau": "1e-4"}).fed
    assert build_server_optimizer(cfg) == FedYogi(lr=0.01, beta1=0.8, beta2=0.95, tau=1e-4)
    cfg = load_config(None, {"fed.server_opt": "fedavgm", "fed.server_lr": "0.5",
                             "fed.server_momentum": "0.3"}).fed
    assert build_server_optimizer(cfg) == FedAvgM(lr=0.5, momentum=0.3)
