"""FedBuff (fedrun/federated/fedbuff.py) against hand-worked schedules and sums: who arrives when,
from which version, how stale; the staleness weights; the exact sum of changes; the versions
kept only while a client needs them; what combines with it; and short real runs (C = K = N with
equal speeds is synchronous FedAvg up to the rounding of theta + mean change; the metrics)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedrun.config import load_config
from fedrun.errors import ConfigError
from fedrun.federated.fedbuff import (
    FedBuff,
    FedBuffSchedule,
    FedBuffSettings,
    ModelVersions,
    staleness_weight,
)
from fedrun.federated.participation import Simulation
from fedrun.flat import RoundBuffer, flatten, fraction_bits, load_flat_
from fedrun.parts import ClientUpdate
from fedrun.train import train

from helpers import TINY, fp32_sum_bound, model_at, tiny_overrides

# cheap real runs: 96 synthetic 8x8 images over the clients, one local step each (batch 64)
SMALL = {"data__name": "synthetic", "data__synthetic_size": 96, "data__num_classes": 4, "data__image_size": 8}


def simulation(durations: list[float], availability: list[list[float]] | None = None,
               deadline: float = 0.0) -> Simulation:
    """Clients of one local step each, client k taking durations[k] simulated seconds."""
    n = len(durations)
    avail = np.ones((n, 1)) if availability is None else np.array(availability, dtype=float)
    return Simulation(0, avail, np.array([[d] for d in durations]), 0.0, dict.fromkeys(range(n), 1), 1.0, 0.0,
                      deadline)


def schedule(durations: list[float], steps: int, **settings: object) -> FedBuffSchedule:
    defaults: dict[str, object] = {"concurrency": len(durations), "buffer_size": 1}
    return FedBuffSchedule.simulate(simulation(durations, *settings.pop("sim", ())),
                                    FedBuffSettings(**{**defaults, **settings}), 0, steps)


def test_two_clients_by_hand_versions_staleness_and_the_clock():
    # C = 2 clients, K = 1: client 0 takes 3 s, client 1 5 s; each restarts as soon as its update is used
    # t=3: 0 (from v0) -> step 1;  t=5: 1 (v0, tau 1) -> step 2;  t=6: 0 (v1, tau 1) -> step 3;
    # t=9: 0 (v3, tau 0) -> step 4;  t=10: 1 (v2, tau 2) -> step 5;  t=12: 0 (v4, tau 1) -> step 6
    s = schedule([3.0, 5.0], 6)
    assert s.steps == [[(0, 0, 0)], [(1, 0, 1)], [(0, 1, 1)], [(0, 3, 0)], [(1, 2, 2)], [(0, 4, 1)]]
    assert [f["sim_clock_s"] for f in s.figures] == [3, 5, 6, 9, 10, 12]
    assert [f["sim_round_s"] for f in s.figures] == [3, 2, 1, 3, 1, 2]
    assert [f["staleness"] for f in s.figures] == [[0], [1], [1], [0], [2], [1]]
    assert s.figures[-1]["updates_total"] == 6 and s.figures[-1]["updates_per_sim_hour"] == 6 * 3600 / 12
    assert {v: s.last_use[v] for v in range(5)} == {0: 2, 1: 3, 2: 5, 3: 4, 4: 6}


def test_too_stale_late_and_offline_are_wasted_and_free_the_slot():
    # max staleness 1: at t=10 client 1's update (v2, tau 2) is discarded; it restarts from v4
    s = schedule([3.0, 5.0], 6, max_staleness=1)
    assert s.steps[4] == [(0, 4, 0)] and s.figures[4]["too_stale"] == 1 and s.figures[4]["wasted_total"] == 1
    assert s.steps[5] == [(1, 4, 1)]  # t=15: 1 (from v4 at t=10), 5 steps taken
    # a 4 s deadline: client 1 (5 s) is given up at start + 4, every time, and restarts at once
    s = schedule([3.0, 5.0], 3, sim=((None, 4.0)))
    assert s.steps == [[(0, 0, 0)], [(0, 1, 0)], [(0, 2, 0)]]
    assert [f["late"] for f in s.figures] == [0, 1, 1] and s.figures[-1]["wasted_total"] == 2
    # client 1 never online: it drops out when its report was due (t = 5, 10, ...)
    s = schedule([3.0, 5.0], 4, sim=([[1.0], [0.0]],))
    assert all(step == [(0, r, 0)] for r, step in enumerate(s.steps))
    assert [f["offline"] for f in s.figures] == [0, 1, 0, 1]  # t=5 (in step 2's window), t=10 (step 4's)


def test_a_slot_without_an_idle_client_waits_c_equals_k_equals_n_is_synchronous():
    s = schedule([2.0, 3.0, 7.0], 3, buffer_size=3)
    assert s.steps == [[(0, 0, 0), (1, 0, 0), (2, 0, 0)], [(0, 1, 0), (1, 1, 0), (2, 1, 0)],
                       [(0, 2, 0), (1, 2, 0), (2, 2, 0)]]
    assert [f["sim_clock_s"] for f in s.figures] == [7, 14, 21]  # each step waits for the slowest
    with pytest.raises(ConfigError, match=r"fed\.buffer_size: a server step needs 4 different clients"):
        schedule([2.0, 3.0, 7.0], 1, buffer_size=4)


def test_the_draw_depends_on_the_seed_only_and_every_busy_client_is_distinct():
    a, b = (schedule([1.0 + 0.1 * k for k in range(12)], 30, concurrency=6, buffer_size=3) for _ in range(2))
    assert a == b
    for step in a.steps:
        assert len({k for k, _, _ in step}) == 3
    other = FedBuffSchedule.simulate(simulation([1.0 + 0.1 * k for k in range(12)]),
                                     FedBuffSettings(concurrency=6, buffer_size=3), 1, 30)
    assert other.steps != a.steps


def test_nobody_ever_fills_a_buffer_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"fed\.availability: the simulated federation fills no buffer"):
        schedule([3.0, 5.0], 2, max_staleness=0, buffer_size=2, sim=([[1.0, 0.0], [1.0, 0.0]],))


def test_staleness_weights_by_hand():
    poly = FedBuffSettings(staleness="polynomial", staleness_exponent=0.5)
    assert [staleness_weight(poly, t) for t in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    hinge = FedBuffSettings(staleness="hinge", staleness_hinge=4, staleness_slope=10.0)
    assert [staleness_weight(hinge, t) for t in (0, 4, 5, 6)] == [1.0, 1.0, 1 / 11, 1 / 21]
    assert staleness_weight(FedBuffSettings(staleness="constant"), 50) == 1.0


def test_versions_are_kept_only_while_a_step_needs_them_and_checkpointed():
    fedbuff = FedBuff(schedule([3.0, 5.0], 8), FedBuffSettings(concurrency=2, buffer_size=1))
    versions = ModelVersions(fedbuff, torch.device("cpu"))
    kept = []
    for r in range(6):
        latest = torch.full((3,), float(r))
        versions.after_step(r, latest)
        kept.append(sorted(versions.kept))
    current_ptr = latest.data_ptr()
    # last use (hand-worked above): v0 step 2, v1 3, v2 5, v3 4, v4 6
    assert kept == [[0], [0, 1], [1, 2], [2, 3], [2, 4], [4, 5]]
    current = torch.full((3,), 5.0)
    assert torch.equal(versions.start(6, 0, current), torch.full((3,), 4.0))  # client 0 at step 6: from v4
    again = ModelVersions(fedbuff, torch.device("cpu"))
    again.load_extra_state({k: v.state_dict() for k, v in versions.extra_state().items()})
    assert sorted(again.kept) == [4, 5] and all(torch.equal(again.kept[v], versions.kept[v]) for v in (4, 5))
    # what the step's sum subtracts (RoundBuffer.bases): the current model, else a kept version
    assert versions.flat(5).data_ptr() == current_ptr and torch.equal(versions.flat(4), torch.full((3,), 4.0))
    assert torch.equal(again.flat(5), torch.full((3,), 5.0))  # resumed: the checkpoint's copy


def _update(model: nn.Module, base: torch.Tensor, weight: float, scale: float, k: int,
            version: int) -> ClientUpdate:
    return ClientUpdate(k, model, base, int(weight), weight, {}, round=3, scale=scale, version=version)


def test_the_sum_of_changes_by_hand_and_the_same_bits_in_any_grouping():
    """Step 3 mixes versions 1, 2 (the current one) and 0: each client adds its model and its
    factor to its version's slot; after the sum, each version is subtracted once (fedrun.flat)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    P = flatten(model).numel()
    versions = {v: torch.randn(P) for v in range(3)}
    # (theta_k, its start version v_k, n_k, s_k): clients 0 and 2 share version 1
    clients = [(torch.randn(P), 1, 30.0, 1 / 2 ** 0.5), (torch.randn(P), 2, 50.0, 1.0),
               (torch.randn(P), 1, 20.0, 1 / 2 ** 0.5), (torch.randn(P), 0, 40.0, 1 / 3)]

    def summed(groups: list[list[int]]) -> torch.Tensor:
        buffers = []
        for group in groups:  # one buffer per "rank", then their sum: the all_reduce
            buf = RoundBuffer(P, 1, {}, torch.device("cpu"), max_clients=4, max_weight=50, changes=4)
            buf.bases = versions.__getitem__
            buf.begin_round(3, [0, 1, 2, 3])
            for k in group:
                theta, v, n, s = clients[k]
                load_flat_(model, theta)
                assert buf.add(model, n, 0.1, 1, 1, client=k, update=_update(model, versions[v], n, s, k, v))
            buffers.append(buf)
        for other in buffers[1:]:
            buffers[0].data += other.data
        agg = buffers[0].aggregate(3, [0, 1, 2, 3])
        assert agg.changes and agg.weight == 140.0
        return agg.average.clone()

    average = summed([[0, 1, 2, 3]])
    assert torch.equal(average, summed([[2], [0, 3, 1]]))
    assert torch.equal(average, summed([[1], [3], [2], [0]]))
    exact = sum(n * s * (t.double() - versions[v].double()) for t, v, n, s in clients) / 140.0
    # 4 client terms and 3 version terms, each rounded once on the grid of 2^-F (in units of
    # n / max n, which sum to 2.8); the weights on a grid of 2^-30; the ratio rounded once to fp32
    err = 7 * 0.5 * 2.0 ** -fraction_bits(4) / 2.8 \
        + (2.0 ** -30 + torch.finfo(torch.float32).eps) * exact.abs().max()
    assert (average.double() - exact).abs().max() <= err


def test_fedbuff_refuses_what_it_cannot_carry_in_one_line():
    base = {**TINY, "fed.participation": "fedbuff", "fed.concurrency": "2", "fed.buffer_size": "2"}
    for extra, key, text in (
            ({"privacy.level": "client"}, "privacy.level", "no Poisson sample"),
            ({"privacy.level": "sample"}, "privacy.level", "planned from the synchronous draw"),
            ({"secure_agg.protocol": "secagg+"}, "secure_agg.protocol", "per synchronous round"),
            ({"fed.drift": "scaffold"}, "fed.drift", "older versions"),
            ({"fed.drift": "feddyn"}, "fed.drift", "older versions"),
            ({"fed.over_select": "1.5"}, "fed.over_select", "raise fed.concurrency"),
            ({"fed.buffer_size": "5"}, "fed.buffer_size", "lower fed.buffer_size"),
            ({"fed.concurrency": "0"}, "fed.concurrency", ">= 1")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            load_config(None, {**base, **extra})
        assert text in str(err.value) and "\n" not in str(err.value)
    for extra in ({"fed.drift": "fedprox"}, {"fed.compress": "int8"}, {"fed.server_opt": "fedadam"},
                  {"fed.client_optimizer": "keep"}, {"fed.staleness": "hinge"}):
        load_config(None, {**base, **extra})  # these combine with it


def test_c_equals_k_equals_n_with_equal_speeds_is_synchronous_fedavg(tmp_path):
    """Every step is all 4 clients from the current model (staleness 0, weight 1), trained with the
    same seeds as FedAvg's round: the models agree up to the rounding of theta + mean change
    against the mean of the models (the sum itself is exact in both)."""
    sync = load_config(None, tiny_overrides(tmp_path, "sync", fed__rounds=1, **SMALL))
    fedbuff = load_config(None, tiny_overrides(tmp_path, "fedbuff", fed__rounds=1, **SMALL,
                                               fed__participation="fedbuff", fed__concurrency=4,
                                               fed__buffer_size=4))
    train(sync)
    train(fedbuff)
    a, b = model_at(tmp_path / "sync", 1), model_at(tmp_path / "fedbuff", 1)
    gap = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert gap <= 2 * fp32_sum_bound(a, b)
    rec = json.loads((tmp_path / "fedbuff" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["staleness"] == [0, 0, 0, 0] and rec["clients"] == [0, 1, 2, 3] and rec["model_version"] == 1


def test_a_run_records_the_clock_versions_staleness_and_wasted_work(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "fb", fed__rounds=3, fed__num_clients=6,
                                           fed__participation="fedbuff", fed__concurrency=4,
                                           fed__buffer_size=2, fed__speed_sigma="0.5",
                                           fed__availability="0.7", **SMALL))
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "fb" / "metrics.jsonl").read_text().splitlines()]
    fedbuff = FedBuff.build(FedBuffSettings(concurrency=4, buffer_size=2, speed_sigma=0.5, availability=0.7),
                            cfg, {k: n for k, n in enumerate(json.loads(
                                (tmp_path / "fb" / "partition.json").read_text())["sizes"])})
    for r, rec in enumerate(records, start=1):
        assert rec["model_version"] == r and rec["clients"] == fedbuff.clients(r)
        assert rec["clients_trained"] == 2 and len(rec["staleness"]) == 2
        assert rec["sim_clock_s"] > 0 and rec["updates_total"] == 2 * r
        assert math.isclose(rec["updates_per_sim_hour"], 2 * r * 3600 / rec["sim_clock_s"], rel_tol=1e-3)
    assert records[-1]["wasted_total"] == sum(r["offline"] + r["late"] + r["too_stale"] for r in records)
