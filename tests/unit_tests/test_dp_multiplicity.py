"""Noise multiplicity in DP-SGD (privacy.multiplicity K, Dockhorn et al. 2023): each image's K
noise levels and K noise draws are averaged inside its per-sample gradient, before clipping.

Checked: the per-sample gradient with K draws is the mean of the K single-draw per-sample
gradients (against Opacus with K = 1 on the same rows, and against autograd on one image);
its variance over the draws falls as 1 / K for independent draws (a statistical test whose
tolerance comes from the number of repetitions); the accountant's epsilon does not change.
"""

from __future__ import annotations

import math

import opacus  # noqa: F401  (required: without it these tests fail, never skip)
import pytest
import torch

from fedrun.config import load_config
from fedrun.data import load_split
from fedrun.federated.server import FedAvg, RuleServer
from fedrun.models import build
from fedrun.parts import Aggregate
from fedrun.privacy.dp_sgd import attach, detach, per_sample_gradients, train_local_dp
from fedrun.privacy.mechanisms import build_mechanism

from helpers import tiny_overrides

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


class FixedLevels:
    """Stands in for the client's Sobol engine: the noise levels u it is given, in order."""

    def __init__(self, u: torch.Tensor):
        self.u, self.next = u, 0

    def draw(self, n: int) -> torch.Tensor:
        out = self.u[self.next:self.next + n, None]
        self.next += n
        return out


class IndependentLevels:
    """Independent uniform noise levels u in [lo, hi] (the Sobol engine stratifies them, which
    only lowers the variance further): what "1 / K for independent draws" is about."""

    def __init__(self, seed: int, lo: float = 0.0, hi: float = 1.0):
        self.g, self.lo, self.hi = torch.Generator().manual_seed(seed), lo, hi

    def draw(self, n: int) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.rand(n, 1, generator=self.g)


def setup(tmp_path, k: int):
    cfg = load_config(None, tiny_overrides(tmp_path, privacy__level="sample", privacy__multiplicity=k,
                                           model__dropout=0))
    data = load_split(cfg.data, "train")
    model, diffusion = build(cfg, 10, CPU)
    model.train()
    return cfg, data, model, diffusion


def grad_samples(cfg, data, model, diffusion, idx, levels, seed: int) -> dict[str, torch.Tensor]:
    """The per-sample gradients DP-SGD's step computes for data[idx] (noise from ``seed``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = attach(model)
    torch.manual_seed(seed)
    per_sample_gradients(gsm, params, diffusion, data, idx, levels, cfg, None, torch.channels_last)
    out = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}
    detach(gsm)
    model.zero_grad(set_to_none=True)
    return out


def test_k_draws_give_the_mean_of_the_k_single_draw_per_sample_gradients(tmp_path):
    k, idx = 3, torch.tensor([5, 17, 40, 41])
    u = torch.rand(len(idx) * k, generator=torch.Generator().manual_seed(0))
    cfg, data, model, diffusion = setup(tmp_path, k)
    with_k = grad_samples(cfg, data, model, diffusion, idx, FixedLevels(u), seed=7)
    # the same rows (each image k times, consecutive), one draw each, per-sample gradients of rows
    cfg1, *_ = setup(tmp_path, 1)
    rows = grad_samples(cfg1, data, model, diffusion, idx.repeat_interleave(k), FixedLevels(u), seed=7)
    for name, g in with_k.items():
        assert g.shape[0] == len(idx), name  # one per image, not per row
        mean = rows[name].reshape(len(idx), k, *g.shape[1:]).mean(1)
        torch.testing.assert_close(g, mean, rtol=1e-5, atol=1e-7, msg=name)
    # against autograd: image 2's gradient of the mean of its k losses, with the same draws
    torch.manual_seed(7)
    eps = torch.randn(len(idx) * k, 1, 16, 16)  # what the batch loss drew: its first draw
    s = slice(2 * k, 3 * k)
    x = data.images[idx.repeat_interleave(k)][s]
    y = data.labels[idx.repeat_interleave(k)][s]
    diffusion.per_image_loss(model, x, y, diffusion.log_snr(u[s]), eps[s]).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(with_k[name][2], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # and not the gradient of one of them alone
    assert not torch.allclose(with_k["down.0.0.main.0.weight"][2], rows["down.0.0.main.0.weight"][2 * k])


def _spread(g: torch.Tensor) -> tuple[float, float]:
    """(trace of the sample covariance of the R rows of g, the standard error of that estimate):
    T = mean_r ||g_r - mean||^2 (R / (R - 1)); its standard error is sd(||g_r - mean||^2) / sqrt(R)
    (the central limit theorem; the variance of a variance needs the fourth moment, estimated
    from the same rows)."""
    r = g.shape[0]
    d = (g.double() - g.double().mean(0)).pow(2).sum(1) * (r / (r - 1))
    return float(d.mean()), float(d.std() / math.sqrt(r))


def test_the_variance_over_noise_draws_falls_as_one_over_k(tmp_path):
    """One image, R = 300 repetitions of its per-sample gradient, with K = 1 and with K = 4
    independent draws (levels uniform in u = [0.4, 0.6], Gaussian noise from the training code):
    Var(mean of K) = Var(one) / K, so T1 / T4 = 4. Accepted when |log(T1 / T4) - log 4| is within
    5 standard errors (delta method: se(log T) = se(T) / T), a false alarm about once in 3.5
    million. The band of levels keeps the fourth moment, hence the standard error, small (over
    all of [0, 1] ||g||^2 has a coefficient of variation near 3 and R would have to be ~10x);
    the 1 / K law holds for any distribution of independent draws."""
    R, k = 300, 4
    cfg4, data, model, diffusion = setup(tmp_path, k)
    cfg1, *_ = setup(tmp_path, 1)
    image = torch.full((R,), 11)
    flat = {}
    for kk, cfg in ((1, cfg1), (k, cfg4)):
        levels = IndependentLevels(kk, 0.4, 0.6)
        gs = grad_samples(cfg, data, model, diffusion, image, levels, seed=100 + kk)
        flat[kk] = torch.cat([g.reshape(R, -1) for g in gs.values()], dim=1)
    (t1, se1), (tk, sek) = _spread(flat[1]), _spread(flat[k])
    se = math.hypot(se1 / t1, sek / tk)
    assert abs(math.log(t1 / tk) - math.log(k)) < 5 * se, (t1 / tk, 5 * se)
    # the power to tell K = 4 from K = 1 (draws repeated, not independent) or from K = 16
    assert 5 * se < math.log(k) / 2, 5 * se


def test_multiplicity_leaves_the_accountant_and_the_batches_untouched(tmp_path):
    """Each image is still one Poisson sample at rate q: the same steps, rate, images and epsilon
    for K = 1 and K = 4; only the model differs."""
    cfg1, data, model, diffusion = setup(tmp_path, 1)
    cfg4, *_ = setup(tmp_path, 4)
    idx = torch.arange(48) * 7
    start = {k: v.clone() for k, v in model.state_dict().items()}
    res1 = train_local_dp(model, diffusion, data, idx, cfg1, round_=1, client=2)
    after1 = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    res4 = train_local_dp(model, diffusion, data, idx, cfg4, round_=1, client=2)
    assert (res1.steps, res1.sample_rate, res1.noise_multiplier, res1.images) == \
        (res4.steps, res4.sample_rate, res4.noise_multiplier, res4.images)
    assert any(not torch.equal(after1[k], v) for k, v in model.state_dict().items())
    # and the ledger the server keeps (the planned budget check included): the same epsilon; the
    # whole-run check (epsilon = the accountant's for the steps taken) is test_resume's LoRA case
    eps = {}
    sizes, P = [120, 80, 200], 10
    for k in (1, 4):
        cfg = load_config(None, tiny_overrides(tmp_path, fed__num_clients=3, fed__clients_per_round=3,
                                               privacy__level="sample", privacy__multiplicity=k))
        server = build_mechanism(cfg, sizes, [[0, 1, 2]] * cfg.fed.rounds).wrap_server(RuleServer(FedAvg()))
        for r in (1, 2):
            zeros = torch.zeros(P)
            server.step(zeros, Aggregate(r, [0, 1, 2], zeros, 3.0, zeros, {}, usable=True))
        eps[k] = server.metrics()["epsilon_per_client"]
    assert eps[1] == eps[4] and len(eps[1]) == 3 and min(eps[1].values()) > 0
