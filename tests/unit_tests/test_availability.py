"""Simulated availability and stragglers (fedrun/federated/participation.py) against hand-worked
rounds: who reports, the deadline, over-selection, the simulated clock; draws from (seed, round,
client); traces read and refused; off = the plain uniform draw; and a short real run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedrun.config import load_config
from fedrun.errors import ConfigError
from fedrun.federated.participation import (
    SimulatedParticipation,
    Simulation,
    UniformParticipation,
    read_trace,
    sample_clients,
    selected_per_round,
)
from fedrun.train import train

from helpers import TINY, model_at, same_bits, tiny_overrides


class Fixed:
    """A base draw that selects the given clients every round."""

    def __init__(self, clients: list[int]):
        self.selected = clients

    def clients(self, round_: int) -> list[int]:
        return list(self.selected)

    def record(self, round_: int) -> dict:
        return {}


def simulation(availability: list[list[float]], speeds: list[list[float]] | None, steps: list[int],
               deadline: float, step_s: float = 1.0, client_s: float = 0.0) -> Simulation:
    return Simulation(0, np.array(availability, dtype=float), None if speeds is None else np.array(speeds),
                      0.0, dict(enumerate(steps)), step_s, client_s, deadline)


def test_a_round_by_hand_deadline_over_selection_and_the_clock():
    # 5 clients selected, 2 needed; client 1 offline in odd rounds; speeds x steps = durations
    sim = simulation(availability=[[1, 1], [0, 1], [1, 1], [1, 1], [1, 1]], speeds=[[2], [1], [1], [4], [1]],
                     steps=[3, 2, 5, 1, 7], deadline=6.0, client_s=0.5)
    # durations: 2 * 3.5 = 7 (late), 2.5, 5.5, 4 * 1.5 = 6 (on time), 7.5 (late)
    assert [sim.duration(k, 1) for k in range(5)] == [7.0, 2.5, 5.5, 6.0, 7.5]
    part = SimulatedParticipation(Fixed([0, 1, 2, 3, 4]), sim, keep=2)
    # round 1: 1 is offline; in time: 2 (5.5), 3 (6.0); the round closes at the 2nd report
    assert part.clients(1) == [2, 3]
    assert part.record(1) == {"selected": 5, "offline": 1, "late": 2, "surplus": 0, "reported": 2,
                              "sim_round_s": 6.0, "sim_clock_s": 6.0}
    # round 2: 1 is back (2.5) and 2 (5.5) are the two fastest; 3 (6.0) is not needed
    assert part.clients(2) == [1, 2]
    assert part.record(2) == {"selected": 5, "offline": 0, "late": 2, "surplus": 1, "reported": 2,
                              "sim_round_s": 5.5, "sim_clock_s": 11.5}
    # without over-selection's cap (a Poisson sample keeps all): the server waits for the deadline
    everyone = SimulatedParticipation(Fixed([0, 1, 2, 3, 4]), sim, keep=None)
    assert everyone.clients(1) == [2, 3] and everyone.record(1)["sim_round_s"] == 6.0
    assert everyone.record(2)["reported"] == 3 and everyone.record(2)["sim_clock_s"] == 12.0


def test_no_deadline_waits_for_the_last_report_and_an_empty_round_lasts_nothing():
    sim = simulation(availability=[[1], [0]], speeds=None, steps=[3, 1], deadline=0.0, step_s=2.0)
    part = SimulatedParticipation(Fixed([0, 1]), sim, keep=2)
    assert part.clients(1) == [0] and part.record(1)["sim_round_s"] == 6.0
    nobody = SimulatedParticipation(Fixed([1]), sim, keep=1)
    assert nobody.clients(1) == [] and nobody.record(1)["sim_round_s"] == 0.0


def test_draws_follow_seed_round_and_client_only():
    """A client's availability draw and speed depend on (seed, round, client), not on who else is
    selected or on N; the share online is about the probability."""
    a = Simulation(0, np.full((2000, 1), 0.7), None, 0.5, dict.fromkeys(range(2000), 3), 1.0, 0.0, 0.0)
    b = Simulation(0, np.full((50, 1), 0.7), None, 0.5, dict.fromkeys(range(50), 3), 1.0, 0.0, 0.0)
    assert [a.online(k, 4) for k in range(50)] == [b.online(k, 4) for k in range(50)]
    assert [a.speed(k, 1) for k in range(50)] == [b.speed(k, 9) for k in range(50)]  # a device stays
    share = np.mean([a.online(k, 4) for k in range(2000)])
    assert abs(share - 0.7) <= 4 * math.sqrt(0.7 * 0.3 / 2000)  # 4 standard errors
    logs = np.log([a.speed(k, 1) for k in range(2000)])
    assert abs(logs.mean()) <= 4 * 0.5 / math.sqrt(2000) and abs(logs.std() - 0.5) <= 0.05
    other_round = [a.online(k, 5) for k in range(50)]
    assert other_round != [a.online(k, 4) for k in range(50)]


def test_off_is_the_plain_uniform_draw():
    cfg = load_config(None, dict(TINY))
    assert Simulation.from_config(cfg, {k: 100 for k in range(4)}) is None  # nothing wrapped
    cfg = load_config(None, {**TINY, "fed.num_clients": "10", "fed.clients_per_round": "4",
                             "fed.over_select": "1.3"})
    assert selected_per_round(cfg) == 6  # ceil(1.3 x 4)
    assert UniformParticipation(10, 6, 0).clients(3) == sample_clients(10, 6, 0, 3)


def test_traces_are_read_and_refused_in_one_line(tmp_path):
    good = tmp_path / "avail.txt"
    good.write_text("# client availability per slot\n1 0 0.5\n0 1 1\n1,1,1\n".replace(",", " "))
    table = read_trace(str(good), "fed.availability_trace", 2, positive=False)
    assert table.shape == (2, 3) and table[0, 2] == 0.5  # extra rows ignored
    cases = {"missing": (tmp_path / "nope.txt", "no file at"),
             "ragged": (tmp_path / "ragged.txt", "not a table of numbers"),
             "words": (tmp_path / "words.txt", "not a table of numbers"),
             "short": (good, "covers 3 clients, fed.num_clients is 5"),
             "range": (tmp_path / "range.txt", "probabilities in [0, 1]")}
    (tmp_path / "ragged.txt").write_text("1 0\n1\n")
    (tmp_path / "words.txt").write_text("on off\n")
    (tmp_path / "range.txt").write_text("1.5\n1\n1\n1\n1\n")
    for name, (path, text) in cases.items():
        with pytest.raises(ConfigError, match=r"^fed\.availability_trace: ") as err:
            read_trace(str(path), "fed.availability_trace", 5, positive=False)
        assert text in str(err.value) and "\n" not in str(err.value), name
    speeds = tmp_path / "speed.txt"
    speeds.write_text("1\n0\n")
    with pytest.raises(ConfigError, match="positive speed factors"):
        read_trace(str(speeds), "fed.speed_trace", 2, positive=True)


def test_a_deadline_nobody_meets_is_refused_before_training():
    cfg = load_config(None, {**TINY, "fed.deadline_s": "2", "fed.sim_step_s": "1"})
    sizes = {k: 200 for k in range(4)}  # 4 steps of batch 64: 4 simulated seconds at speed 1
    with pytest.raises(ConfigError, match=r"fed\.deadline_s: no client can report within 2 .* at least 4"):
        Simulation.from_config(cfg, sizes)
    cfg.fed.deadline_s = 4.0
    assert Simulation.from_config(cfg, sizes) is not None


def test_a_run_with_dropouts_and_stragglers_records_both_clocks(tmp_path):
    """The real loop: 30 % dropout, lognormal stragglers, over-selection and a deadline. Rounds
    carry the simulated figures; the trained clients are the kept ones; a round where nobody
    reported leaves the model as it was, with a warning, and is not a failure."""
    cfg = load_config(None, tiny_overrides(tmp_path, "sim", fed__rounds=2, fed__num_clients=6,
                                           fed__clients_per_round=2, fed__availability="0.7",
                                           fed__speed_sigma="0.5", fed__over_select="1.5",
                                           fed__deadline_s="6"))
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    clock = 0.0
    for rec in records:
        assert rec["selected"] == 3 and rec["reported"] == len(rec["clients"]) <= 2
        assert rec["offline"] + rec["late"] + rec["surplus"] + rec["reported"] == 3
        assert rec["clients_trained"] == len(rec["clients"]) and 0 < rec["sim_round_s"] <= 6
        clock += rec["sim_round_s"]
        assert rec["sim_clock_s"] == pytest.approx(clock) and rec["wall_s"] > 0


def test_the_simulation_keys_are_validated():
    for key, value, text in (("fed.availability", "1.5", "[0, 1]"), ("fed.over_select", "0.5", ">= 1"),
                             ("fed.deadline_s", "-1", ">= 0"), ("fed.sim_step_s", "0", "> 0"),
                             ("fed.speed_sigma", "-0.1", ">= 0")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            load_config(None, {**TINY, key: value})
        assert text in str(err.value)
    with pytest.raises(ConfigError, match="fed.over_select: over-selection keeps the fastest"):
        load_config(None, {**TINY, "fed.over_select": "2", "privacy.level": "client"})
    load_config(None, {**TINY, "fed.availability": "0.7", "privacy.level": "client"})  # thinning is fine


def test_a_round_without_reports_keeps_the_model_and_says_so(tmp_path):
    """An on/off trace with every client off in round 2: no update (not a zero one), a warning,
    ``clients: []`` in the record, and the run goes on (it is no failure of fed.max_bad_rounds)."""
    trace = tmp_path / "on_off.txt"
    trace.write_text("1 0\n" * 4)
    cfg = load_config(None, tiny_overrides(tmp_path, "gap", fed__rounds=3, fed__max_bad_rounds=1,
                                           fed__clients_per_round=2, fed__availability_trace=str(trace)))
    with pytest.warns(UserWarning, match="round 2: no client took part"):
        train(cfg)
    records = [json.loads(line) for line in (tmp_path / "gap" / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["clients"]) for r in records] == [2, 0, 2]
    assert records[1]["offline"] == 2 and records[1]["sim_round_s"] == 0.0
    assert same_bits(model_at(tmp_path / "gap", 1), model_at(tmp_path / "gap", 2))
    assert not same_bits(model_at(tmp_path / "gap", 2), model_at(tmp_path / "gap", 3))
