"""The round's parts (fedrun.parts) against hand-computed values: FedDyn (the method added only
through the extension point), the update chain's order, the server wrappers of privacy,
placement, the client-state store, the round buffer and the round timer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedrun import checkpoint, telemetry
from fedrun.config import load_config
from fedrun.federated.client_state import ClientStates
from fedrun.federated.drift import FedDynRule, drift_rules
from fedrun.federated.placement import BySize, HomeRanks, assign_clients
from fedrun.federated.server import FedAvg, RuleServer
from fedrun.flat import RoundBuffer, flatten, load_flat_
from fedrun.parts import Aggregate, ClientUpdate, ServerHalf, UpdateRule, compose_terms
from fedrun.privacy import client_dp
from fedrun.privacy.accountant import PrivacyLedger, sample_level_step
from fedrun.privacy.mechanisms import ClientLevelServer, SampleLevelServer
from fedrun.train import train

from helpers import TINY, model_at, same_bits, tiny_overrides


class TwoWeights(nn.Module):
    """A 'model' of two parameters, [a, b], so that every number below can be worked by hand."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([float(a), float(b)]))


def _aggregate(total: list[float], weight: float, clients: list[int], round_: int = 1) -> Aggregate:
    t = torch.tensor(total)
    return Aggregate(round_, clients, t, weight, t / weight, {}, usable=weight > 0)


# --------------------------------------------------------------------------------------------
# FedDyn (Acar et al. 2021)


def test_feddyn_client_term_and_state_by_hand():
    rule = FedDynRule(alpha=0.5, num_params=2, total_images=8, device=torch.device("cpu"))
    model = TwoWeights(1.0, 2.0)
    global_flat = torch.tensor([0.5, 0.5])
    state = {"feddyn_grad": torch.tensor([0.1, -0.2])}
    term = rule.begin_client(model, global_flat, state)
    model.w.grad = torch.tensor([1.0, 1.0])
    term()  # grad + alpha (theta - theta_g) - g_k
    assert torch.allclose(model.w.grad, torch.tensor([1.0 + 0.25 - 0.1, 1.0 + 0.75 + 0.2]))
    update = ClientUpdate(3, model, global_flat, size=2, weight=2.0, state=state)
    rule.end_client(update, term, torch.empty(0))  # g_k - alpha (theta_k - theta_g)
    assert torch.allclose(update.new_state["feddyn_grad"], torch.tensor([0.1 - 0.25, -0.2 - 0.75]))
    assert update.weight == 2.0  # FedDyn leaves the update itself as it is
    assert torch.equal(model.w.detach(), torch.tensor([1.0, 2.0]))


def test_feddyn_first_client_state_is_zero_and_unused_parameters_get_the_term():
    rule = FedDynRule(alpha=2.0, num_params=2, total_images=4, device=torch.device("cpu"))
    model = TwoWeights(1.0, 0.0)
    term = rule.begin_client(model, torch.zeros(2), {})
    assert model.w.grad is None
    term()  # no loss gradient at all: the term alone, alpha * (theta - theta_g)
    assert torch.equal(model.w.grad, torch.tensor([2.0, 0.0]))


def test_feddyn_server_correction_by_hand_over_two_rounds():
    """theta_g = 0; clients of 1 and 3 images (of 8 in the federation) end at [1, 0] and [0, 2]:
    sum n_k theta_k = [1, 6], weight 4, average [0.25, 1.5];
    h = -alpha * [1, 6] / 8 = [-0.0625, -0.375];  theta = average - h / alpha = [0.375, 2.25]."""
    rule = FedDynRule(alpha=0.5, num_params=2, total_images=8, device=torch.device("cpu"))
    server = RuleServer(FedAvg(), [rule])
    theta = server.step(torch.zeros(2), _aggregate([1.0, 6.0], 4.0, [0, 1]))
    assert torch.allclose(rule.h, torch.tensor([-0.0625, -0.375]))
    assert torch.allclose(theta, torch.tensor([0.375, 2.25]))
    # round 2 from theta: one client of 4 images ends at theta + [0.4, 0]: sum 4 theta + [1.6, 0]
    total = (4 * theta + torch.tensor([1.6, 0.0])).tolist()
    theta2 = server.step(theta, _aggregate(total, 4.0, [2], round_=2))
    h2 = torch.tensor([-0.0625, -0.375]) - 0.5 * torch.tensor([1.6, 0.0]) / 8
    assert torch.allclose(rule.h, h2)
    assert torch.allclose(theta2, theta + torch.tensor([0.4, 0.0]) - h2 / 0.5)
    # a round without a usable update changes nothing, h included
    assert server.step(theta2, _aggregate([0.0, 0.0], 0.0, [])) is None
    assert torch.allclose(rule.h, h2)


def test_feddyn_state_travels_through_the_store_and_checkpoint_layout():
    rule = FedDynRule(alpha=0.5, num_params=2, total_images=8, device=torch.device("cpu"))
    rule.h += torch.tensor([1.0, 2.0])
    states = ClientStates(("feddyn_grad",), torch.device("cpu"), [rule])
    # "control" is not a kind of this run: not kept
    states.commit(1, {"feddyn_grad": torch.tensor([3.0, 4.0]), "control": torch.ones(2)})
    saved = states.gather()
    assert set(saved) == {"clients", "feddyn_h"} and set(saved["clients"]["1"]) == {"feddyn_grad"}
    other_rule = FedDynRule(alpha=0.5, num_params=2, total_images=8, device=torch.device("cpu"))
    other = ClientStates(("feddyn_grad",), torch.device("cpu"), [other_rule])
    other.load_state_dict(saved, home={1})
    assert torch.equal(other.get(1)["feddyn_grad"], torch.tensor([3.0, 4.0]))
    assert torch.equal(other_rule.h, torch.tensor([1.0, 2.0]))
    elsewhere = ClientStates(("feddyn_grad",), torch.device("cpu"), [other_rule])
    elsewhere.load_state_dict(saved, home={0})  # another rank: not its client
    assert elsewhere.get(1) == {}


def test_client_states_read_the_layout_of_earlier_checkpoints():
    """Earlier releases wrote every kind for every client, unused ones as None."""
    states = ClientStates(("control",), torch.device("cpu"))
    states.load_state_dict({"clients": {"2": {"optimizer": None, "control": torch.ones(3)}},
                            "server_control": None}, home={2})
    assert set(states.get(2)) == {"control"}


@pytest.mark.slow  # two whole runs; FedDyn's resume mix stays in the quick suite
def test_feddyn_trains_end_to_end_and_differs_from_fedavg(tmp_path):
    dyn = load_config(None, tiny_overrides(tmp_path, "dyn", fed__drift="feddyn", fed__feddyn_alpha="0.1"))
    train(dyn)
    avg = load_config(None, tiny_overrides(tmp_path, "avg"))
    train(avg)
    assert not same_bits(model_at(dyn.run_dir, 2), model_at(avg.run_dir, 2))
    clients = checkpoint.load_verified(checkpoint.checkpoint_path(dyn.run_dir, 2))["clients"]
    assert sorted(clients["clients"]) == ["0", "1", "2", "3"] and clients["feddyn_h"].abs().max() > 0
    assert all(torch.isfinite(e["feddyn_grad"]).all() for e in clients["clients"].values())


# --------------------------------------------------------------------------------------------
# The chain, the server step and its privacy wrappers


class Recorder(UpdateRule, ServerHalf):
    """A rule that records the order it is called in and scales the weight."""

    def __init__(self, name: str, log: list[str], factor: float = 1.0):
        self.name_, self.log, self.factor = name, log, factor

    def end_client(self, update: ClientUpdate, term, extra: torch.Tensor) -> None:
        self.log.append(self.name_)
        update.weight *= self.factor

    def on_server(self, global_flat, average, agg):
        self.log.append(f"server:{self.name_}")
        return average + 1


def test_rules_run_in_order_and_the_server_halves_feed_the_rule():
    log: list[str] = []
    rules = [Recorder("a", log, 2.0), Recorder("b", log, 3.0)]
    update = ClientUpdate(0, TwoWeights(0, 0), torch.zeros(2), 5, 5.0, {})
    for r in rules:
        r.end_client(update, None, torch.empty(0))
    assert log == ["a", "b"] and update.weight == 30.0
    theta = RuleServer(FedAvg(), rules).step(torch.zeros(2), _aggregate([2.0, 4.0], 2.0, [0]))
    assert log[2:] == ["server:a", "server:b"] and torch.equal(theta, torch.tensor([3.0, 4.0]))


def test_compose_terms_applies_each_in_order():
    seen: list[int] = []
    assert compose_terms([]) is None
    one = compose_terms([lambda: seen.append(1)])
    one()
    both = compose_terms([lambda: seen.append(2), lambda: seen.append(3)])
    both()
    assert seen == [1, 2, 3]


def test_dp_fedavg_server_steps_with_noise_even_without_clients():
    cfg = load_config(None, {**TINY, "privacy.level": "client", "privacy.noise_multiplier": "2.0",
                             "privacy.clip": "0.5", "fed.clients_per_round": "2"})
    ledger = PrivacyLedger()
    server = ClientLevelServer(RuleServer(FedAvg()), cfg, ledger, q=0.5)
    theta = torch.tensor([1.0, -1.0])
    new = server.step(theta, _aggregate([0.0, 0.0], 0.0, []))  # nobody took part
    noise = client_dp.gaussian_noise(2, client_dp.noise_std(2.0, 0.5, 4, 0.5), cfg.run.seed, 1)
    assert torch.equal(new, theta + (torch.zeros(2) / 2 + noise))
    assert ledger.history == {"federation": [(2.0, 0.5, 1)]}
    assert "epsilon" not in server.metrics()  # every EPSILON_EVERY rounds and in the last one (2)
    # with clients: theta + sum of (clipped) updates / (q N) + noise; weights are 1 each
    new = server.step(theta, _aggregate((2 * theta + torch.tensor([0.2, 0.4])).tolist(), 2.0, [0, 3], 2))
    noise = client_dp.gaussian_noise(2, client_dp.noise_std(2.0, 0.5, 4, 0.5), cfg.run.seed, 2)
    assert torch.allclose(new, theta + torch.tensor([0.2, 0.4]) / 2 + noise)
    assert server.metrics()["epsilon"] > 0 and "privacy" in server.extra_state()


def test_sample_level_server_records_every_participant_with_data():
    cfg = load_config(None, {**TINY, "privacy.level": "sample", "privacy.noise_multiplier": "1.5"})
    ledger = PrivacyLedger()
    server = SampleLevelServer(RuleServer(FedAvg()), cfg, ledger, sizes=[100, 0, 300, 50])
    assert server.step(torch.zeros(2), _aggregate([0.0, 0.0], 0.0, [0, 1, 2])) is None  # all failed
    q0, s0 = sample_level_step(100, 64, 1)
    q2, s2 = sample_level_step(300, 64, 1)
    assert ledger.history == {"0": [(1.5, q0, s0)], "2": [(1.5, q2, s2)]}  # the empty client 1: none


# --------------------------------------------------------------------------------------------
# Placement, the buffer, the timer


def test_home_ranks_place_every_client_on_its_home_in_size_order():
    sizes = {0: 10, 1: 40, 2: 30, 3: 20, 4: 25}
    home = HomeRanks({k: float(n) for k, n in sizes.items()}, 2)  # cost = size
    per_rank = home.assign([0, 2, 3, 4])
    assert sorted(k for ks in per_rank for k in ks) == [0, 2, 3, 4]
    for rank, ks in enumerate(per_rank):
        assert all(home.home[k] == rank for k in ks)
        assert ks == sorted(ks, key=lambda k: (-sizes[k], k))
    everyone = list(sizes)
    assert home.assign(everyone) == BySize(sizes, 2).assign(everyone) == assign_clients(everyone, sizes, 2)
    assert home.ranks_of(0) | home.ranks_of(1) == set(sizes)


def test_round_buffer_layout_sum_tail_and_regions():
    model = TwoWeights(1.0, 2.0)
    buf = RoundBuffer(2, world_size=3, regions={"none": 0, "scaffold": 2}, device=torch.device("cpu"),
                      rank=2, max_clients=4, max_weight=4.0)
    # [model 2 | tail 5 | scaffold 2 | 6 slots x 3 ranks]: what the clients contribute comes first
    assert buf.data.numel() == 2 + 5 + 2 + 6 * 3 and buf.summed == 9 and buf.region("none").numel() == 0
    assert buf.data.dtype == torch.int64 and buf.bits == 62 - 16 - 2  # 4 clients: 2 bits of headroom
    buf.region("scaffold").add_(torch.tensor([7.0, 8.0]))  # a rule's sum for the first client
    assert buf.add(model, 3.0, loss=0.5, images=30, steps=2)
    load_flat_(model, torch.tensor([-1.0, 0.0]))
    assert buf.add(model, 1.0, loss=1.5, images=10, steps=1)
    buf.skip(steps=4, images=12)
    buf.set_times(10**18, 10**18 + 2_500_000_000)
    buf.all_reduce()  # one process: the sum is its own
    agg = buf.aggregate(5, [0, 1, 2])
    assert torch.equal(agg.total, torch.tensor([2.0, 6.0])) and agg.weight == 4.0 and agg.usable
    assert torch.equal(agg.average, torch.tensor([0.5, 1.5]))
    assert torch.equal(agg.extra["scaffold"], torch.tensor([7.0, 8.0]))
    stats, ranks = buf.stats()
    assert stats == {"n": 4.0, "loss": 3.0, "images": 40, "skipped": 1, "trained": 2}
    idle = {"start_ns": 0, "ready_ns": 0, "steps": 0, "clients": 0, "skipped": 0, "images": 0}
    assert ranks[:2] == [idle] * 2
    assert ranks[2] == {"start_ns": 10**18, "ready_ns": 10**18 + 2_500_000_000, "steps": 7, "clients": 3,
                        "skipped": 1, "images": 52}
    assert buf.nbytes == buf.data.numel() * 8
    assert torch.equal(flatten(model), torch.tensor([-1.0, 0.0]))


def test_round_buffer_leaves_out_a_client_beyond_its_range():
    """|w' theta| <= 2^16 (w' = weight / largest weight) or the client is not added at all."""
    buf = RoundBuffer(2, world_size=1, regions={"scaffold": 1}, device=torch.device("cpu"), max_weight=2.0)
    assert buf.add(TwoWeights(2.0**16, -(2.0**16)), 2.0, loss=0.0, images=1)  # the edge: w' = 1
    before = buf.data.clone()
    for model, weight in ((TwoWeights(2.0**17, 0.0), 2.0), (TwoWeights(float("nan"), 0.0), 1.0),
                          (TwoWeights(1.0, 0.0), 2.0**18)):  # a weight 2^17 x the largest one
        assert not buf.add(model, weight, loss=0.0, images=1)
    buf.region("scaffold").fill_(float("inf"))  # a rule's sum out of range refuses the client too
    assert not buf.add(TwoWeights(1.0, 1.0), 1.0, loss=0.0, images=1)
    assert torch.equal(buf.data, before) and buf.region("scaffold").abs().max() == 0


def test_round_timer_phases_are_exclusive(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 7.0, 8.0, 20.0, 21.0, 30.0, 30.0])
    monkeypatch.setattr(telemetry.time, "perf_counter", lambda: next(clock))
    timer = telemetry.RoundTimer(torch.device("cpu"))  # t = 0
    with timer.phase("train"):  # 1 .. 8, with 3 .. 7 spent in a grid
        with timer.phase("grid", evaluation=True):
            pass
    with timer.phase("eval", evaluation=True):  # 20 .. 21
        pass
    assert timer["train"] == 3.0 and timer["grid"] == 4.0 and timer["eval"] == 1.0
    assert timer["nothing"] == 0.0
    assert timer.wall() == 30.0 and timer.evaluation() == 5.0 and timer.training() == 25.0


@pytest.mark.parametrize("drift", ["none", "fedprox", "scaffold", "feddyn"])
def test_state_kinds_follow_the_config(drift):
    cfg = load_config(None, {**TINY, "fed.drift": drift})
    rules = drift_rules(cfg, 10, 100, torch.device("cpu"))
    kinds = {kind for r in rules for kind in r.state_kinds}
    expected = {"none": set(), "fedprox": set(), "scaffold": {"control"}, "feddyn": {"feddyn_grad"}}
    assert kinds == expected[drift]
