"""Compressed client updates with error feedback (fedrun/federated/compression.py): each
compressor against hand-computed values and its message size, error feedback over rounds, the
guard against overflow, the chain's order with DP-FedAvg's clipping (every summed update's norm
<= clip, in the real round loop), and the bytes a round moves."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fedrun import flat
from fedrun.config import load_config
from fedrun.federated.compression import (
    BF16,
    CompressUpdate,
    Int8,
    Sign,
    TopK,
    Traffic,
    build_compressor,
    compression_rules,
)
from fedrun.federated.drift import ScaffoldRule
from fedrun.flat import flatten
from fedrun.parts import ClientUpdate, UpdateRule
from fedrun.privacy.client_dp import ClipUpdate, update_norm
from fedrun.train import train

from helpers import TINY, tiny_overrides

CPU = torch.device("cpu")


class Weights(nn.Module):
    """A 'model' of one parameter vector, so that every number below can be worked by hand."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values))


def _update(model: nn.Module, global_flat: torch.Tensor, state: dict | None = None, round_: int = 1,
            client: int = 0) -> ClientUpdate:
    return ClientUpdate(client, model, global_flat, 4, 4.0, state or {}, round=round_)


# --------------------------------------------------------------------------------------------
# The compressors


def test_bf16_rounds_to_nearest_bfloat16():
    x = torch.tensor([1.0, 1.0 + 2 ** -9, 1.0 + 3 * 2 ** -9, -3.0e-3])
    out = BF16().apply(x, [4], None)
    # 7 stored bits: the spacing at 1 is 2^-7; 1 + 2^-9 rounds down, 1 + 3 * 2^-9 up
    assert out.tolist()[:3] == [1.0, 1.0, 1.0 + 2 ** -7]
    assert 0 < abs(out[3] - x[3]) <= 2 ** -8 * abs(x[3])  # half a spacing, relative
    assert BF16().message_bytes([3, 5]) == 16


def test_int8_is_exact_on_its_grid_and_unbiased_between():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([127.0, -63.0, 0.0, 2.0])  # scale 1: every entry on the grid
    assert torch.equal(Int8().apply(x, [4], g), x)
    # 0.25 between two levels (scale 1 from the 127): q = floor(0.25 + u) is 1 with probability 0.25
    x = torch.tensor([127.0] + [0.25] * 4000)
    out = Int8().apply(x, [4001], g)[1:]
    assert set(out.tolist()) <= {0.0, 1.0}
    # the mean of 4000 Bernoulli(0.25): std sqrt(0.25 * 0.75 / 4000) = 0.0068; 5 std
    assert abs(out.mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 4000)


def test_int8_scales_per_tensor_and_per_block_and_counts_them():
    g = torch.Generator().manual_seed(1)
    x = torch.tensor([254.0, 2.0, 1.0, 0.5, 0.25])
    per_tensor = Int8().apply(x, [2, 3], g)  # scales 2 (254 / 127) and 1 / 127
    assert per_tensor[0] == 254.0 and per_tensor[1] == 2.0 and per_tensor[2] == 1.0
    assert Int8().message_bytes([2, 3]) == 5 + 4 * 2
    blocks = Int8(block=2)
    assert blocks.scales([2, 3]) == 1 + 2 and blocks.message_bytes([2, 3]) == 5 + 4 * 3
    out = blocks.apply(x, [2, 3], g)
    assert out[2] == 1.0 and out[4] == 0.25  # each block's max sits on its own grid
    assert min(abs(out[3].item() - q / 127) for q in (63, 64)) < 1e-7  # 0.5 = 63.5 levels of 1 / 127


def test_int8_zero_and_tiny_blocks_send_zeros_not_nan():
    g = torch.Generator().manual_seed(2)
    x = torch.tensor([0.0, 0.0, 1e-45, -1e-45, 3.0e38, -3.0e38])
    out = Int8().apply(x, [2, 2, 2], g)
    assert torch.isfinite(out).all()
    assert out[:4].abs().max() <= 1e-45 and out[4] == pytest.approx(3.0e38, rel=1e-6)


def test_topk_keeps_the_largest_magnitudes_and_counts_values_and_indices():
    x = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2, 0.0])
    top = TopK(density=0.3)  # k = ceil(1.8) = 2
    assert top.k(6) == 2 and top.message_bytes([6]) == 2 * 8
    assert TopK(1.0).apply(x, [6], None).tolist() == x.tolist()
    assert top.apply(x, [6], None).tolist() == [0.0, -5.0, 0.0, 4.0, 0.0, 0.0]
    assert TopK(1e-9).k(6) == 1  # at least one entry


def test_sign_keeps_each_tensors_mean_magnitude():
    x = torch.tensor([1.0, -3.0, 0.0, 2.0, -2.0])
    out = Sign().apply(x, [2, 3], None)
    third = torch.tensor(4 / 3).item()  # the fp32 mean of [0, 2, 2]
    assert out.tolist() == [2.0, -2.0, third, third, -third]  # an entry of 0 sends +scale
    assert Sign().message_bytes([2, 3]) == 1 + 4 * 2 and Sign().message_bytes([9]) == 2 + 4


def test_the_registry_builds_each_compressor_from_its_keys():
    assert build_compressor(load_config(None, {**TINY})) is None
    assert compression_rules(load_config(None, {**TINY}), Weights([0.0])) == []
    cfg = load_config(None, {**TINY, "fed.compress": "topk", "fed.compress_density": "0.1"})
    assert isinstance(build_compressor(cfg), TopK) and build_compressor(cfg).density == 0.1
    cfg = load_config(None, {**TINY, "fed.compress": "int8", "fed.compress_block": "64"})
    assert build_compressor(cfg).block == 64
    (rule,) = compression_rules(cfg, Weights([0.0, 1.0]))
    assert rule.state_kinds == ("ef_residual",) and rule.sizes == [2]
    cfg = load_config(None, {**TINY, "fed.compress": "sign", "fed.error_feedback": "false"})
    assert compression_rules(cfg, Weights([0.0]))[0].state_kinds == ()


# --------------------------------------------------------------------------------------------
# The link of the update chain: error feedback


def test_error_feedback_by_hand_over_two_rounds():
    rule = CompressUpdate(TopK(0.5), error_feedback=True, seed=0, sizes=[2])
    theta = torch.tensor([1.0, 1.0])
    # round 1: delta [3, 1]: sends [3, 0], keeps [0, 1]; the local model becomes theta + [3, 0]
    model = Weights([4.0, 2.0])
    u = _update(model, theta)
    rule.end_client(u, None, torch.empty(0))
    assert model.w.tolist() == [4.0, 1.0] and u.new_state["ef_residual"].tolist() == [0.0, 1.0]
    sent1 = flatten(model) - theta
    # round 2: delta [0.5, 0.5] + residual [0, 1] = [0.5, 1.5]: sends [0, 1.5], keeps [0.5, 0]
    model = Weights([1.5, 1.5])
    u2 = _update(model, theta, dict(u.new_state), round_=2)
    rule.end_client(u2, None, torch.empty(0))
    assert model.w.tolist() == [1.0, 2.5] and u2.new_state["ef_residual"].tolist() == [0.5, 0.0]
    # nothing lost: what was sent plus what is kept is what was trained, [3, 1] + [0.5, 0.5]
    kept = sent1 + (flatten(model) - theta) + u2.new_state["ef_residual"]
    assert kept.tolist() == [3.5, 1.5]
    # without error feedback the dropped 1 is gone and nothing is kept
    plain = CompressUpdate(TopK(0.5), error_feedback=False, seed=0, sizes=[2])
    model = Weights([1.5, 1.5])
    u3 = _update(model, theta, {"ef_residual": torch.tensor([0.0, 1.0])}, round_=2)
    plain.end_client(u3, None, torch.empty(0))
    assert u3.new_state == {} and plain.state_kinds == ()
    assert model.w.tolist() in ([1.5, 1.0], [1.0, 1.5])  # a tie: one of the two entries


def test_error_feedback_sums_to_the_true_updates_over_many_rounds():
    """sum of what was sent + the residual = sum of the updates, for every compressor."""
    torch.manual_seed(0)
    theta = torch.zeros(50)
    for compressor in (TopK(0.05), Int8(), Sign(), BF16()):
        rule = CompressUpdate(compressor, error_feedback=True, seed=3, sizes=[20, 30])
        state: dict = {}
        sent_sum, true_sum = torch.zeros(50), torch.zeros(50)
        for r in range(1, 8):
            delta = torch.randn(50)
            model = Weights(delta.tolist())
            u = _update(model, theta, state, round_=r)
            rule.end_client(u, None, torch.empty(0))
            state = dict(u.new_state)
            sent_sum += flatten(model)
            true_sum += delta
        assert torch.allclose(sent_sum + state["ef_residual"], true_sum, atol=1e-5), compressor.name


def test_stochastic_rounding_follows_seed_round_and_client():
    rule = CompressUpdate(Int8(), error_feedback=False, seed=5, sizes=[64])
    theta = torch.zeros(64)
    delta = torch.linspace(-1, 1, 64)

    def sent(round_: int, client: int) -> torch.Tensor:
        model = Weights(delta.tolist())
        rule.end_client(_update(model, theta, round_=round_, client=client), None, torch.empty(0))
        return flatten(model)

    assert torch.equal(sent(1, 2), sent(1, 2))
    assert not torch.equal(sent(1, 2), sent(1, 3)) and not torch.equal(sent(1, 2), sent(2, 2))


def test_an_overflowing_update_sends_zeros_and_keeps_the_residual():
    rule = CompressUpdate(BF16(), error_feedback=True, seed=0, sizes=[2])
    theta = torch.tensor([-3.0e38, 0.0])
    model = Weights([3.0e38, 1.0])  # finite weights, but theta_k - theta overflows to inf
    old = torch.tensor([0.25, -0.5])
    u = _update(model, theta, {"ef_residual": old})
    with pytest.warns(UserWarning, match="not finite"):
        rule.end_client(u, None, torch.empty(0))
    assert torch.equal(flatten(model), theta) and torch.equal(u.new_state["ef_residual"], old)
    first = _update(Weights([3.0e38, 1.0]), theta)  # no residual yet: it stays zero
    with pytest.warns(UserWarning):
        rule.end_client(first, None, torch.empty(0))
    assert torch.equal(first.new_state["ef_residual"], torch.zeros(2))


# --------------------------------------------------------------------------------------------
# With DP-FedAvg: compression first, clipping last


def test_clipping_after_compression_bounds_the_norm_and_before_would_not():
    """The residual makes delta + e_k larger than clip; int8's rounding can lift the norm too.
    Compress then clip: norm <= clip. Clip then compress (the wrong order): above it."""
    torch.manual_seed(1)
    clip, theta = 1.0, torch.zeros(200)
    state: dict = {"ef_residual": torch.randn(200)}  # a residual of norm ~14
    compress, clip_rule = CompressUpdate(Int8(), True, 0, [200]), ClipUpdate(clip)
    model = Weights((torch.randn(200) * 0.1).tolist())
    u = _update(model, theta, state)
    for rule in (compress, clip_rule):
        rule.end_client(u, None, torch.empty(0))
    assert update_norm(model, theta) <= clip * (1 + 1e-6) and u.weight == 1.0
    wrong = Weights((torch.randn(200) * 0.1).tolist())
    w = _update(wrong, theta, state)
    for rule in (clip_rule, compress):
        rule.end_client(w, None, torch.empty(0))
    assert update_norm(wrong, theta) > 2 * clip


def test_every_summed_update_is_within_clip_in_the_real_round_loop(tmp_path, monkeypatch):
    """DP-FedAvg with top-k and error feedback, 2 rounds: each update that enters the buffer has
    norm <= privacy.clip (fp32 rounding of the scaling aside), though compression hands the clip
    updates above it and round 2 adds the residuals of round 1's clients."""
    compressed: list[tuple[float, bool]] = []  # (norm after compression, had a residual)
    summed: list[tuple[float, float]] = []  # (norm, weight) of what enters the buffer
    globals_: list[torch.Tensor] = []
    end_client = CompressUpdate.end_client

    def observe(self, update, term, extra):
        globals_.append(update.global_flat.clone())
        end_client(self, update, term, extra)
        compressed.append((update_norm(update.model, update.global_flat), "ef_residual" in update.state))

    add = flat.RoundBuffer.add

    def check_add(self, model, weight, *args, **kwargs):
        summed.append((update_norm(model, globals_[-1]), weight))
        return add(self, model, weight, *args, **kwargs)

    monkeypatch.setattr(CompressUpdate, "end_client", observe)
    monkeypatch.setattr(flat.RoundBuffer, "add", check_add)
    clip = 0.01
    cfg = load_config(None, tiny_overrides(tmp_path, "dp", fed__rounds=2, fed__num_clients=8,
                                           fed__clients_per_round=4, fed__compress="topk",
                                           fed__compress_density="0.05", privacy__level="client",
                                           privacy__clip=str(clip), privacy__noise_multiplier="0.5",
                                           privacy__accountant="rdp"))  # the faster accountant
    summary = train(cfg)
    assert len(summed) == len(compressed) >= 3 and all(w == 1.0 for _, w in summed)
    assert all(norm <= clip * (1 + 1e-5) for norm, _ in summed), summed
    assert max(norm for norm, _ in compressed) > 2 * clip  # the clip had work to do
    assert any(residual for _, residual in compressed)  # a client of both rounds added its residual
    # bytes: the top-k message and the clip factor, per participant (P from the fp32 download)
    comm = summary["communication"]
    assert comm["bytes_up_per_client"] == 8 * math.ceil(0.05 * comm["bytes_down_per_client"] / 4) + 4


# --------------------------------------------------------------------------------------------
# Bytes


class Fixed:
    """A participation whose rounds are written out."""

    def __init__(self, rounds: dict[int, list[int]]):
        self.rounds = rounds

    def clients(self, round_: int) -> list[int]:
        return self.rounds[round_]


def test_traffic_per_round_in_total_and_after_a_resume():
    P = 1000
    rules: list[UpdateRule] = [CompressUpdate(TopK(0.01), True, 0, [P])]
    sizes = {0: 5, 1: 0, 2: 7}  # client 1 has no data: it neither downloads nor sends
    part = Fixed({1: [0, 1, 2], 2: [2], 3: [0, 2]})
    traffic = Traffic(rules, P, sizes, part)
    assert (traffic.up, traffic.down) == (8 * 10, 4 * P)
    r1 = traffic.record(1, part.clients(1))
    assert (r1["bytes_up"], r1["bytes_down"], r1["bytes_up_total"]) == (160, 8000, 160)
    r2 = traffic.record(2, part.clients(2))
    assert (r2["bytes_up"], r2["bytes_up_total"], r2["bytes_down_total"]) == (80, 240, 12000)
    resumed = Traffic(rules, P, sizes, part)  # a process that starts at round 3: rounds 1-2 recounted
    r3 = resumed.record(3, part.clients(3))
    assert r3["bytes_up_total"] == 240 + 160 and r3["bytes_down_total"] == 12000 + 8000
    assert r3 == {**traffic.record(3, part.clients(3))}


def test_wire_bytes_of_the_chain():
    P = 10
    plain = Traffic([], P, {0: 1}, Fixed({1: [0]}))
    assert (plain.up, plain.down) == (40, 40)  # the fp32 update and model
    scaffold = ScaffoldRule(P, 10, CPU)  # c_k+ - c_k up, c down
    assert Traffic([scaffold], P, {0: 1}, Fixed({})).up == 80
    chain = [CompressUpdate(BF16(), True, 0, [P]), ClipUpdate(1.0)]  # bf16 plus the clip factor
    assert (Traffic(chain, P, {0: 1}, Fixed({})).up, Traffic(chain, P, {0: 1}, Fixed({})).down) == (24, 40)


def test_the_report_shows_bytes_beside_the_scores(tmp_path):
    from fedrun.config import Config
    from fedrun.evaluation import report

    dirs = []
    for name, compress, up in (("none", "none", 4_000_000), ("topk", "topk", 80_000)):
        cfg = Config()
        cfg.run.name, cfg.data.name, cfg.data.image_size, cfg.data.channels = name, "digits", 16, 1
        cfg.fed.compress = compress
        run = tmp_path / name
        run.mkdir()
        traffic = {"bytes_up_per_round": 10 * up, "bytes_down_per_round": 40_000_000,
                   "uplink_reduction": 4_000_000 / up}
        (run / "summary.json").write_text(json.dumps({
            "config": cfg.to_dict(), "communication": traffic,
            "scores": {"is_mean": 5.0, "is_std": 0.1, "fid_train": 2.0, "fid_test": 3.0, "class_acc": 0.9}}))
        dirs.append(run)
    table, paths = report.make_report(dirs)
    md = paths["md"].read_text()
    assert "| digits MB up / round | digits MB down / round | digits x fewer bytes up |" in md
    assert "| fed.compress=topk | 5.00 ± 0.10 | 2.00 | 3.00 | 0.900 | 0.8 | 40 | 50 |" in md
    assert "| fed.compress=none | 5.00 ± 0.10 | 2.00 | 3.00 | 0.900 | 40 | 40 | 1 |" in md
