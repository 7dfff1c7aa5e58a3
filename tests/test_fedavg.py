import torch

from conftest import tiny_overrides
from fedrun import checkpoint
from fedrun.config import load_config
from fedrun.dist import assign_clients
from fedrun.federated import (N_SLOT, TAIL, ServerOptimizer, accumulate_, flatten, load_flat_, num_flat,
                              sample_clients, weighted_average)
from fedrun.models import build_model
from fedrun.train import build, train


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = load_config(None, {"model.base_channels": "4", "model.channel_mults": "1,2",
                             "model.blocks_per_level": "1", "model.mid_blocks": "2"}).model
    return build_model(cfg, 1, 10)


def test_flat_buffer_weighted_average_is_exact():
    a, b = small_model(1), small_model(2)
    n1, n2 = 3.0, 17.0
    buffer = torch.zeros(num_flat(a) + TAIL)
    for model, n in ((a, n1), (b, n2)):
        accumulate_(buffer, model, n)
        buffer[-TAIL + N_SLOT] += n
    average, n = weighted_average(buffer)
    expected = (n1 * flatten(a).double() + n2 * flatten(b).double()) / (n1 + n2)
    assert n == n1 + n2
    assert torch.allclose(average.double(), expected, rtol=0, atol=1e-6)
    load_flat_(a, average)
    assert torch.equal(flatten(a), average)


def test_fedavg_server_step_is_the_average_and_fedavgm_has_memory():
    g, avg = torch.zeros(5), torch.ones(5)
    assert torch.equal(ServerOptimizer("fedavg", 1.0, 0.9).step(g, avg), avg)
    opt = ServerOptimizer("fedavgm", 1.0, 0.5)
    first = opt.step(g, avg)
    second = opt.step(first, first + 1)  # same pseudo-gradient again: momentum adds half the last
    assert torch.allclose(first, avg) and torch.allclose(second - first, torch.full((5,), 1.5))


def test_zero_learning_rate_leaves_the_global_model_in_place(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path))
    cfg.optim.lr = 0.0  # not allowed from the CLI; here it isolates the averaging arithmetic
    train(cfg)
    state = checkpoint.load_verified(checkpoint.checkpoint_path(cfg.run_dir, 2))["model"]
    initial, _ = build(cfg, type("S", (), {"num_classes": 10})(), torch.device("cpu"))
    for k, v in initial.state_dict().items():
        assert torch.allclose(state[k], v, rtol=1e-6, atol=1e-7), k


def test_client_sampling_is_seeded_by_round():
    a = sample_clients(50, 10, seed=0, round_=3)
    assert a == sample_clients(50, 10, seed=0, round_=3)
    assert len(set(a)) == 10 and all(0 <= c < 50 for c in a)
    assert a != sample_clients(50, 10, seed=0, round_=4)
    assert sample_clients(10, 10, seed=0, round_=1) == list(range(10))


def test_assignment_is_balanced_deterministic_and_complete():
    sizes = {k: s for k, s in enumerate([500, 20, 300, 300, 10, 0, 250, 120])}
    per_rank = assign_clients(list(sizes), sizes, 3)
    assert per_rank == assign_clients(list(sizes), sizes, 3)
    assert sorted(c for r in per_rank for c in r) == sorted(sizes)
    loads = [sum(sizes[c] for c in r) for r in per_rank]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert assign_clients([0, 1], {0: 5, 1: 5}, 4)[2:] == [[], []]  # idle ranks get nothing
