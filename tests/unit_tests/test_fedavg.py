"""The FedAvg arithmetic: the flat buffer's weighted average, client sampling, rank assignment."""

import torch

from fedrun import checkpoint
from fedrun.config import load_config
from fedrun.federated.participation import sample_clients
from fedrun.federated.placement import assign_clients
from fedrun.flat import RoundBuffer, flatten, load_flat_, num_flat
from fedrun.models import build, build_model
from fedrun.train import train

from helpers import tiny_overrides


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = load_config(None, {"model.base_channels": "4", "model.channel_mults": "1,2",
                             "model.blocks_per_level": "1", "model.mid_blocks": "2"}).model
    return build_model(cfg, 1, 10)


def test_flat_buffer_weighted_average_is_exact():
    a, b = small_model(1), small_model(2)
    n1, n2 = 3.0, 17.0
    P = num_flat(a)
    buffer = RoundBuffer(P, 2, {}, torch.device("cpu"), max_clients=2, max_weight=n2)
    for model, n in ((a, n1), (b, n2)):
        assert buffer.add(model, n, loss=0.0, images=int(n))
    agg = buffer.aggregate(1, [0, 1])
    average, n = agg.average, agg.weight
    expected = (n1 * flatten(a).double() + n2 * flatten(b).double()) / (n1 + n2)
    assert n == n1 + n2
    # each weighted model enters the int64 sum on a grid of 2^-F (an error <= 2^-(F+1) per client,
    # in units of the largest weight), the sums are exact, and their ratio is rounded once to fp32
    # (half an ulp of the result)
    grid = 2 * 2.0 ** -(buffer.bits + 1) * n2 / (n1 + n2)
    assert ((average.double() - expected).abs() <= grid + expected.abs() * 2.0**-24).all()
    load_flat_(a, average)
    assert torch.equal(flatten(a), average)


def test_zero_learning_rate_leaves_the_global_model_in_place(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path))
    cfg.optim.lr = 0.0  # not allowed from the CLI; here it isolates the averaging arithmetic
    train(cfg)
    state = checkpoint.load_verified(checkpoint.checkpoint_path(cfg.run_dir, 2))["model"]
    initial, _ = build(cfg, 10, torch.device("cpu"))
    for k, v in initial.state_dict().items():
        # the average of 4 identical models: sum of n_k * theta over n, a few roundings
        assert torch.allclose(state[k], v, rtol=8 * torch.finfo(torch.float32).eps, atol=0), k


def test_client_sampling_is_seeded_by_round():
    a = sample_clients(50, 10, seed=0, round_=3)
    assert a == sample_clients(50, 10, seed=0, round_=3)
    assert len(set(a)) == 10 and all(0 <= c < 50 for c in a)
    assert a != sample_clients(50, 10, seed=0, round_=4)
    assert a != sample_clients(50, 10, seed=1, round_=3)
    assert sample_clients(10, 10, seed=0, round_=1) == list(range(10))


def test_assignment_is_balanced_deterministic_and_complete():
    sizes = {k: s for k, s in enumerate([500, 20, 300, 300, 10, 0, 250, 120])}
    per_rank = assign_clients(list(sizes), sizes, 3)
    assert per_rank == assign_clients(list(sizes), sizes, 3)
    assert sorted(c for r in per_rank for c in r) == sorted(sizes)
    loads = [sum(sizes[c] for c in r) for r in per_rank]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert assign_clients([0, 1], {0: 5, 1: 5}, 4)[2:] == [[], []]  # idle ranks get nothing
