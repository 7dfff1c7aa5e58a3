"""Secure aggregation and distributed DP in the round (fedrun/privacy/secure_sum.py, mechanisms.py).

The masked round is the plain round bit for bit, dropouts after masking included; a round
without enough survivors is abandoned and keeps the model; distributed DP's grid decodes the
sum of the updates within the bound its rounding gives; "sample_once" sends each image's
clipped gradient of the global model's loss; the Skellam ledger's solved noise meets its target.
The 2-rank version of the first test runs real processes: tests/integration_tests/test_secure_ranks.py.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from fedrun import seeding
from fedrun.config import load_config
from fedrun.data import load_split
from fedrun.flat import flatten, float_tensors, load_flat_
from fedrun.local_training import batch_loss
from fedrun.models import build
from fedrun.partition import client_shards
from fedrun.parts import ClientUpdate
from fedrun.privacy import accountant
from fedrun.privacy.dp_sgd import clipped_gradients
from fedrun.privacy.mechanisms import GridEncoder, build_mechanism
from fedrun.train import train

from helpers import model_at, same_bits, tiny_overrides

# 10 clients, every one selected, 30 % of them offline in a round (dropped after masking)
DROPOUTS = {"fed__num_clients": 10, "fed__clients_per_round": 10, "fed__availability": 0.7, "fed__rounds": 3}


def test_the_masked_sum_is_the_plain_sum_and_too_few_survivors_abandon_the_round(tmp_path):
    plain = load_config(None, tiny_overrides(tmp_path, "plain", **DROPOUTS))
    masked = load_config(None, tiny_overrides(tmp_path, "masked", secure_agg__protocol="secagg+",
                                              **DROPOUTS))
    train(plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(masked)
    records = [json.loads(line) for line in (masked.run_dir / "metrics.jsonl").read_text().splitlines()]
    # rounds 1 and 2 (seed 0): 8 and 7 of the 10 selected report, each survivor keeps >= t = 5 of
    # its k = 8 neighbours: recovered, the same bits as the plain sum
    assert [len(r["clients"]) for r in records[:2]] == [8, 7] and all(r["selected"] == 10 for r in records)
    assert same_bits(model_at(plain.run_dir, 2), model_at(masked.run_dir, 2))
    assert all(r["secagg_neighbours"] == 8 and r["secagg_recovery_s"] > 0 for r in records[:2])
    # round 3: 6 report and one survivor keeps 4 surviving neighbours: abandoned, model kept
    assert "fewer than secure_agg.threshold = 5" in records[2]["abandoned"]
    assert same_bits(model_at(masked.run_dir, 2), model_at(masked.run_dir, 3))
    assert not same_bits(model_at(plain.run_dir, 2), model_at(plain.run_dir, 3))
    said = [str(w.message) for w in caught if "abandoned" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("round 3: the round is abandoned")
    # what a real client sends: its masked vector (8 bytes a number of the summed part) and keys
    summary = json.loads((masked.run_dir / "summary.json").read_text())
    plain_summary = json.loads((plain.run_dir / "summary.json").read_text())
    assert summary["communication"]["bytes_up_per_client"] > 2 * plain_summary["communication"][
        "bytes_up_per_client"]
    assert summary["secure_aggregation"] == {"protocol": "secagg+", "neighbours": 8, "threshold": 5,
                                             "min_survivors": 5, "bits": 64, "keys": "urandom"}


def test_the_grid_decodes_the_sum_of_updates_within_its_rounding(tmp_path):
    """Two clients' updates through distributed DP's grid (16 bits, noise 1e-5): the decoded sum
    is within what the rounding can move it (||round(x) - x|| <= sqrt(d') per record, in grid
    units, divided by the scale) plus the noise (std z * clip per coordinate, at most the whole
    federation's shares: 8 sigma in norm is generous)."""
    cfg = load_config(None, tiny_overrides(tmp_path, "grid", secure_agg__protocol="secagg+",
                                           secure_agg__bits=16, privacy__level="client",
                                           privacy__noise_multiplier=1e-5, privacy__clip=1.0))
    stack = build_mechanism(cfg, [300] * 4, num_classes=10)
    model, _ = build(cfg, 10, torch.device("cpu"))
    theta = flatten(model)
    encoder = stack.encoder(theta.numel())
    assert isinstance(encoder, GridEncoder)
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(theta.numel(), generator=g) * 1e-3 for _ in range(2)]  # norms ~0.1 < clip
    summed = torch.zeros(encoder.size, dtype=torch.int64)
    for k, delta in enumerate(deltas):
        load_flat_(model, theta + delta)
        summed += encoder.encode(ClientUpdate(k, model, theta, 300, 1.0, {}, round=1))
    decoded = encoder.decode(summed, 1)
    grid = encoder.grid
    bound = (2 * math.sqrt(grid.padded_dim) / grid.scale
             + 8 * grid.noise_multiplier * grid.clip * math.sqrt(2 * grid.padded_dim))
    err = float((decoded - (deltas[0] + deltas[1])).norm())
    assert err <= bound and err < 0.1 * float((deltas[0] + deltas[1]).norm())


def test_noise_once_sends_each_images_clipped_gradient(tmp_path):
    """The rows of a client's message are per-image gradients at the global model: with a clip
    no gradient reaches, their sum is the batch's mean-loss gradient times the batch (the same
    draws: Poisson batch, noise levels, noise); with a small clip every row has norm <= clip."""
    over = dict(privacy__level="sample_once", fed__server_opt="fedadam", optim__batch_size=16)
    cfg = load_config(None, tiny_overrides(tmp_path, "once", privacy__clip=1e9, **over))
    data = load_split(cfg.data, "train")
    shard = torch.as_tensor(client_shards(cfg, data.labels.numpy())[0])
    model, diffusion = build(cfg, data.num_classes, torch.device("cpu"))
    res = clipped_gradients(model, diffusion, data, shard, cfg, 1, 0)
    rows = res.message
    assert rows is not None and rows.shape == (res.images, flatten(model).numel()) and res.images > 0
    # the same batch by plain autograd
    torch.manual_seed(seeding.derive_seed(seeding.CLIENT, cfg.run.seed, 1, 0))
    draws = seeding.generator("cpu", seeding.DP_SAMPLING, cfg.run.seed, 1, 0)
    q = accountant.sample_once_rate(cfg.optim.batch_size, cfg.fed.clients_per_round, len(data.labels))
    take = torch.rand(len(shard), generator=draws) < q  # the federation's rate, the same for every image
    idx = shard[take.nonzero()[:, 0]]
    model.train()
    loss = batch_loss(model, diffusion, data, idx, seeding.sobol_engine(cfg.run.seed, 1, 0), cfg, None,
                      torch.contiguous_format)
    loss.backward()
    grad = torch.cat([t.grad.reshape(-1) if t.grad is not None else torch.zeros(t.numel())
                      for t in float_tensors(model)])
    assert torch.allclose(rows.sum(dim=0), grad * len(idx), rtol=1e-4, atol=1e-6)
    small = load_config(None, tiny_overrides(tmp_path, "small", privacy__clip=0.05, **over))
    model.zero_grad(set_to_none=True)
    clipped = clipped_gradients(model, diffusion, data, shard, small, 1, 0).message
    assert clipped is not None and float(clipped.norm(dim=1).max()) <= 0.05 * (1 + 1e-5)


def test_the_skellam_ledger_solves_the_smallest_noise_for_a_target(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "solve", secure_agg__protocol="secagg+",
                                           secure_agg__bits=18, privacy__level="client",
                                           privacy__noise_multiplier=0, privacy__target_epsilon=8,
                                           fed__rounds=20))
    stack = build_mechanism(cfg, [300] * 4, num_classes=10)
    z = stack.cfg.privacy.noise_multiplier
    assert stack.privacy.ledger.accountant == "skellam" and z > 0
    assert accountant.planned_epsilon(stack.cfg, [300] * 4) <= 8
    assert accountant.planned_epsilon(stack.cfg, [300] * 4, noise_multiplier=z - 0.02) > 8


@pytest.mark.parametrize(("level", "fraction"), [("client", 0.0), ("client", 0.9), ("sample_once", 0.0)])
def test_distributed_noise_trains_and_accounts(tmp_path, level, fraction):
    over = {"fed__server_opt": "fedadam", "fed__server_lr": 1e-3} if level == "sample_once" else {}
    cfg = load_config(None, tiny_overrides(tmp_path, level, secure_agg__protocol="secagg+",
                                           secure_agg__bits=16, privacy__level=level,
                                           secure_agg__survivor_fraction=fraction,
                                           privacy__noise_multiplier=2.0, privacy__clip=0.5, **over))
    summary = train(cfg)
    assert summary["privacy"]["noise"] == "distributed Skellam shares, 16 bits"
    assert summary["secure_aggregation"].get("survivor_fraction", 0.0) == fraction
    assert summary["privacy"]["accountant"] == "skellam" and 0 < summary["privacy"]["epsilon_max"] < 100
    assert not same_bits(model_at(cfg.run_dir, 1), model_at(cfg.run_dir, 2))
