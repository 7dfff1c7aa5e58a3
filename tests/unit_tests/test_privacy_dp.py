"""DP-SGD through Opacus on fedrun's U-Net, and the pieces of client-level DP-FedAvg.

No mocks: per-sample gradients are compared with torch.autograd on single images, the noise
with the chi-square distribution its squared norm must follow.
"""

from __future__ import annotations

import opacus  # noqa: F401  (required: without it these tests fail, never skip)
import pytest
import torch
from scipy import stats

from fedrun.config import load_config
from fedrun.data import load_split
from fedrun.federated.client import train_local
from fedrun.flat import flatten, load_flat_, num_flat
from fedrun.models import FourierFeatures, build
from fedrun.privacy import client_dp
from fedrun.privacy.dp_sgd import attach, detach, train_local_dp

from helpers import tiny_overrides


def tiny_cfg(tmp_path, **extra):
    return load_config(None, tiny_overrides(tmp_path, privacy__level="sample", **extra))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_sample_gradients_match_autograd_on_single_images(tmp_path):
    # label dropout adds the null-class embedding row; attention adds GroupNorm and 1x1 convs
    cfg = tiny_cfg(tmp_path, model__label_dropout=0.2, model__attention_levels="1", model__dropout=0)
    model, diffusion = build(cfg, 10, torch.device("cpu"))
    model.train()  # Opacus records only in training mode; dropout 0: the same function per image
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 16, 16, generator=g) * 2 - 1
    y = torch.tensor([0, 3, 10, 7, 10])  # 10 = the null class
    log_snr = torch.linspace(-6, 6, 5)
    eps = torch.randn(x.shape, generator=g)

    gsm = attach(model)
    diffusion.per_image_loss(gsm, x, y, log_snr, eps).mean().backward()  # what diffusion.loss averages
    samples = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    detach(gsm)
    assert any(isinstance(m, FourierFeatures) for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())

    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        s = slice(i, i + 1)
        diffusion.per_image_loss(model, x[s], y[s], log_snr[s], eps[s]).sum().backward()
        for name, p in model.named_parameters():
            ref = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(samples[name][i], ref, rtol=1e-4, atol=1e-6, msg=name)
    # the Fourier weight's per-sample gradients are non-trivial (not all zero)
    assert samples["noise_embed.weight"].abs().amax() > 0


def _shard(n: int) -> tuple[object, torch.Tensor]:
    return load_split(load_config(None, tiny_overrides("/tmp")).data, "train"), torch.arange(n) * 7


def test_train_local_dp_is_a_function_of_seed_round_and_client(tmp_path):
    cfg = tiny_cfg(tmp_path, optim__batch_size=16, model__label_dropout=0.1)
    data, indices = _shard(48)
    model, diffusion = build(cfg, 10, torch.device("cpu"))
    start = flatten(model)
    ids = [id(p) for p in model.parameters()]

    results = []
    for junk in (1, 12345):
        load_flat_(model, start)
        torch.manual_seed(junk)  # prior global RNG state must not matter
        torch.rand(junk % 97 + 1)
        res = train_local_dp(model, diffusion, data, indices, cfg, round_=2, client=3)
        results.append(flatten(model))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], start)
    assert res.steps == 3 and res.sample_rate == pytest.approx(16 / 48) and res.noise_multiplier == 1.0
    assert 0 < res.images < 3 * 48 and torch.isfinite(res.loss_sum)
    # another client, the same data: other Poisson draws and other noise
    load_flat_(model, start)
    train_local_dp(model, diffusion, data, indices, cfg, round_=2, client=4)
    assert not torch.equal(flatten(model), results[0])
    # the model is a plain module again: same parameter objects, no hooks, normal training works
    assert [id(p) for p in model.parameters()] == ids
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    train_local(model, diffusion, data, indices, cfg, round_=2, client=3)
    assert torch.isfinite(flatten(model)).all()


def test_clip_update_bounds_the_norm_and_keeps_the_direction(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model, _ = build(cfg, 10, torch.device("cpu"))
    theta = flatten(model)
    direction = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1))
    load_flat_(model, theta + 0.5 * direction)
    before = client_dp.clip_update_(model, theta, clip=0.1)
    assert before == pytest.approx(0.5 * direction.norm().item(), rel=1e-4)
    delta = flatten(model) - theta
    assert delta.norm().item() == pytest.approx(0.1, rel=1e-4)
    assert torch.nn.functional.cosine_similarity(delta, direction, dim=0) > 0.9999
    # within the bound: nothing moves
    small = theta + 1e-3 * direction / direction.norm()
    load_flat_(model, small)
    assert client_dp.clip_update_(model, theta, clip=0.1) == pytest.approx(1e-3, rel=1e-3)
    assert torch.equal(flatten(model), small)


def test_client_level_noise_has_the_specified_std():
    """On a zero update the step is pure noise of std z * S / (q N): then
    sum(x^2) / std^2 ~ chi^2(P). Accept between its 1e-6 and 1 - 1e-6 quantiles (the band is
    +-0.8% of the std at P = 400k, so a wrong denominator, e.g. the realised participant count
    or sqrt(q N), fails)."""
    P, z, S, N, q = 400_000, 1.3, 0.7, 20, 0.25
    std = client_dp.noise_std(z, S, N, q)
    assert std == pytest.approx(z * S / (q * N))
    step = client_dp.noisy_update(torch.zeros(P), z, S, N, q, seed=5, round_=3)
    statistic = float((step.double() ** 2).sum()) / std**2
    lo, hi = stats.chi2.ppf([1e-6, 1 - 1e-6], df=P)
    assert lo < statistic < hi, (statistic, lo, hi)
    # mean zero: |sum| / (std sqrt(P)) is standard normal
    assert abs(float(step.double().sum()) / (std * P**0.5)) < stats.norm.ppf(1 - 1e-6)
    # the same draw on every rank, a different one in another round
    assert torch.equal(step, client_dp.noisy_update(torch.zeros(P), z, S, N, q, seed=5, round_=3))
    assert not torch.equal(step, client_dp.noisy_update(torch.zeros(P), z, S, N, q, seed=5, round_=4))


def test_poisson_clients_are_seeded_and_have_rate_q():
    picks = [client_dp.poisson_clients(50, 0.2, seed=0, round_=r) for r in range(1, 201)]
    assert picks[0] == client_dp.poisson_clients(50, 0.2, seed=0, round_=1)
    total = sum(len(p) for p in picks)  # Binomial(10000, 0.2): mean 2000, sd 40
    assert abs(total - 2000) < 5 * 40
    assert all(p == sorted(set(p)) and all(0 <= k < 50 for k in p) for p in picks)


def test_num_flat_matches_clip_norm_layout(tmp_path):
    model, _ = build(tiny_cfg(tmp_path), 10, torch.device("cpu"))
    assert client_dp.update_norm(model, torch.zeros(num_flat(model))) == pytest.approx(
        flatten(model).norm().item(), rel=1e-5)
