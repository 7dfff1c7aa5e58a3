"""Placement does not change the model: the round's sum is exact (fixed point, fedrun/flat.py), so
any grouping and order of the clients over ranks gives the same bits, where an fp32 sum does not;
and the placements themselves: by cost (local steps and a set-up), by size, on demand."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fedrun import dist
from fedrun.federated.placement import (
    ByCost,
    BySize,
    HomeRanks,
    OnDemand,
    assign_clients,
    client_costs,
    lpt,
)
from fedrun.flat import RoundBuffer, float_tensors, num_flat


def client_models(k: int) -> list[nn.Module]:
    """K small models whose weights span several orders of magnitude (as trained ones do), so
    that fp32 sums in different orders round differently."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(k):
        m = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
        with torch.no_grad():
            for t in m.parameters():
                scale = 10.0 ** torch.randint(-4, 2, t.shape, generator=g)
                t.copy_(torch.randn(t.shape, generator=g) * scale)
        out.append(m)
    return out


WEIGHTS = [144.0, 37.0, 3.0, 512.0, 90.0, 1.0]


def exact_round(placement: list[list[int]], models: list[nn.Module]) -> tuple[torch.Tensor, float]:
    """One round on len(placement) ranks, each adding its clients in the given order into its own
    buffer; the all_reduce is the sum of the ranks' int64 buffers."""
    P = num_flat(models[0])
    buffers = [RoundBuffer(P, len(placement), {}, torch.device("cpu"), rank=r, max_clients=len(models),
                           max_weight=max(WEIGHTS)) for r in range(len(placement))]
    for buf, clients in zip(buffers, placement, strict=True):
        for k in clients:
            assert buf.add(models[k], WEIGHTS[k], loss=0.1 * k, images=int(WEIGHTS[k]), steps=1)
    summed = torch.stack([b.data for b in buffers]).sum(0)
    buffers[0].data.copy_(summed)
    agg = buffers[0].aggregate(1, list(range(len(models))))
    return agg.average.clone(), agg.weight


def fp32_round(placement: list[list[int]], models: list[nn.Module]) -> torch.Tensor:
    """The same with the fp32 sum fedrun used before: n_k theta_k added tensor by tensor."""
    P = num_flat(models[0])
    parts = []
    for clients in placement:
        buf = torch.zeros(P)
        for k in clients:
            flat = torch.cat([t.detach().reshape(-1) for t in float_tensors(models[k])])
            buf.add_(flat, alpha=WEIGHTS[k])
        parts.append(buf)
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total / sum(WEIGHTS)


PLACEMENTS = [
    [[0, 1, 2, 3, 4, 5]],  # one process
    [[5, 4, 3, 2, 1, 0]],  # one process, the other order
    [[3, 0, 2], [4, 1, 5]],  # two ranks
    [[1, 5, 0], [2, 3, 4]],
    [[4], [0, 5, 3], [1, 2]],  # three ranks
    [[], [5, 4, 3, 2, 1, 0]],  # an idle rank
]


def test_any_placement_gives_the_same_bits_where_an_fp32_sum_does_not():
    models = client_models(len(WEIGHTS))
    reference, weight = exact_round(PLACEMENTS[0], models)
    assert weight == sum(WEIGHTS)
    for placement in PLACEMENTS[1:]:
        average, _ = exact_round(placement, models)
        assert torch.equal(average, reference), placement
    # what the exact sum fixes: the fp32 sums of these placements differ in their last bits
    fp32 = [fp32_round(p, models) for p in PLACEMENTS]
    assert any(not torch.equal(a, b) for a, b in itertools.combinations(fp32, 2))
    # ... and the exact sum's average is at least as close to the float64 truth as fp32's (the
    # ratio of exact sums, rounded once: half an ulp; fp32 sums add several roundings)
    flats = [torch.cat([t.detach().reshape(-1).double() for t in float_tensors(m)]) for m in models]
    truth = sum(w * f for w, f in zip(WEIGHTS, flats, strict=True)) / sum(WEIGHTS)
    err = (reference.double() - truth).abs()
    assert (err <= truth.abs() * 2.0**-24 + 2.0**-40).all()
    assert err.max() <= max((f.double() - truth).abs().max() for f in fp32)


def test_costs_are_local_steps_plus_the_set_up():
    costs = client_costs({0: 33, 1: 32, 2: 0, 3: 1}, batch_size=32, epochs=2, overhead_steps=0.5)
    assert costs == {0: 4.5, 1: 2.5, 2: 0.0, 3: 2.5}  # a short last batch costs a step; no data, nothing


def test_by_cost_balances_steps_where_by_size_does_not():
    """Images balance, steps do not: one large client against many small ones whose short
    batches and set-ups cost as much as the large one's full batches."""
    sizes = {0: 4, 1: 3, 2: 4, 3: 84, 4: 70, 5: 2}
    cost = client_costs(sizes, batch_size=32, epochs=1, overhead_steps=1.0)
    by_size = BySize(sizes, 2).assign(list(sizes))
    by_cost = ByCost(cost, 2).assign(list(sizes))
    load = [[sum(cost[k] for k in r) for r in split] for split in (by_size, by_cost)]
    assert load == [[4.0, 12.0], [8.0, 8.0]]
    assert by_size == assign_clients(list(sizes), sizes, 2) and by_cost == lpt(list(sizes), cost, 2)
    assert all(r == sorted(r, key=lambda k: (-cost[k], k)) for r in by_cost)  # largest first


def test_home_ranks_by_cost_hold_every_client_once():
    cost = client_costs({0: 4, 1: 3, 2: 4, 3: 84, 4: 70, 5: 2}, 32, 1, 1.0)
    home = HomeRanks(cost, 2)
    assert home.ranks_of(0) | home.ranks_of(1) == set(cost) and not home.ranks_of(0) & home.ranks_of(1)
    assert home.assign(list(cost)) == ByCost(cost, 2).assign(list(cost))  # every client in the round


def test_on_demand_hands_each_client_out_once_largest_first(monkeypatch):
    """Two ranks drawing tickets from one counter (one process: the local counter), one of them
    three times as fast: every client is trained once, in order of cost, the fast rank more."""
    monkeypatch.setattr(dist, "_LOCAL_COUNTERS", {})
    cost = client_costs({k: 32 * (k + 1) for k in range(8)}, 32, 1, 0.0)
    placement = OnDemand(cost, 2)
    clients = [1, 2, 3, 5, 6, 7]
    fast, slow = placement.take(4, clients, 0), placement.take(4, clients, 1)
    taken: list[tuple[int, int]] = []
    for rank in itertools.cycle([0, 0, 0, 1]):
        k = next(fast if rank == 0 else slow, None)
        if k is None:
            break
        taken.append((rank, k))
    assert [k for _, k in taken] == [7, 6, 5, 3, 2, 1]  # tickets in order of cost
    assert [k for r, k in taken if r == 1] == [3]
    assert list(placement.take(5, clients, 1))[0] == 7  # a new round, a new counter


@pytest.mark.parametrize("n", [1, 2, 10, 1000])
def test_the_range_leaves_room_for_every_client(n):
    """N clients of the largest in-range value each cannot overflow int64."""
    buf = RoundBuffer(1, 1, {}, torch.device("cpu"), max_clients=n, max_weight=1.0)
    assert n * (2.0**16 * buf.scale + 0.5) < 2**63


def test_a_step_costs_its_fixed_share_and_its_images():
    """s = 0.25: a step costs a quarter of a full one whatever its size, the rest by its images."""
    costs = client_costs({0: 40, 1: 8}, batch_size=32, epochs=1, overhead_steps=0.5, step_share=0.25)
    assert costs == {0: 0.25 * 2 + 0.75 * 40 / 32 + 0.5, 1: 0.25 * 1 + 0.75 * 8 / 32 + 0.5}


def test_on_demand_at_one_rank_takes_every_client_in_every_run_of_a_process():
    """One rank has nobody to share tickets with: a second run in the same process (a benchmark
    or sweep running fedrun.train twice) trains its rounds' clients again, although the first run
    used the same round numbers (the local counters would say they were all handed out)."""
    cost = client_costs({k: 32 * (k + 1) for k in range(4)}, 32, 1, 0.0)
    clients = [0, 1, 2, 3]
    first, second = (list(OnDemand(cost, 1).take(1, clients, 0)) for _ in range(2))
    assert first == second == [3, 2, 1, 0]
