"""The fidelity options against hand-computed values: the power-function EMA, the learning-rate
schedule, FedProx and SCAFFOLD gradient terms, kept client Adam state, label dropout and
classifier-free guidance; and the identities the issue asks for: FedProx with mu = 0 and
SCAFFOLD with zero control variates (its first round) are FedAvg bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedrun import checkpoint
from fedrun.config import DiffusionConfig, EMAConfig, OptimConfig, load_config
from fedrun.data import load_split
from fedrun.diffusion import Diffusion
from fedrun.ema import PowerEMA, gamma_from_sigma_rel, sigma_rel_of
from fedrun.federated.client import train_local
from fedrun.federated.drift import FedProx, ScaffoldClient
from fedrun.flat import flatten
from fedrun.local_training import lr_at_round
from fedrun.models import build
from fedrun.train import train

from helpers import same_bits, tiny_overrides

# --------------------------------------------------------------------------------------------
# EMA


@pytest.mark.parametrize("sigma_rel, gamma", [(0.10, 6.94), (0.05, 16.97)])
def test_power_ema_gamma_matches_karras_et_al(sigma_rel, gamma):
    """Karras et al. (2024), sec. 3.1: sigma_rel 0.10 <-> gamma 6.94, 0.05 <-> 16.97."""
    assert gamma_from_sigma_rel(sigma_rel) == pytest.approx(gamma, abs=0.01)
    assert sigma_rel_of(gamma_from_sigma_rel(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)


def test_power_ema_updates_by_hand():
    model = nn.Linear(2, 1)
    ema = PowerEMA(EMAConfig(sigma_rel=0.1), model)
    g = ema.gamma
    x1, x2, x3 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([4.0, 4.0])
    ema.update(x1, 1)
    assert torch.equal(ema.flat, x1)  # beta_1 = 0: starts at the first model
    ema.update(x2, 2)
    b2 = 0.5 ** (g + 1)
    ema.update(x3, 3)
    b3 = (2 / 3) ** (g + 1)
    expected = b3 * (b2 * x1 + (1 - b2) * x2) + (1 - b3) * x3
    assert torch.allclose(ema.flat, expected, atol=1e-6)
    assert PowerEMA(EMAConfig(sigma_rel=0.0), model).module() is model  # off: sample the model


def test_cosine_schedule_by_hand():
    o = OptimConfig(lr=1.0, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at_round(o, 1, 5) == 1.0 and lr_at_round(o, 5, 5) == pytest.approx(0.1)
    assert lr_at_round(o, 3, 5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at_round(o, 2, 5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at_round(OptimConfig(lr=0.3), 4, 5) == 0.3


# --------------------------------------------------------------------------------------------
# Drift terms on a two-parameter model whose gradients are known


def _model_with_grads() -> tuple[nn.Linear, torch.Tensor]:
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 2.0]]))
        m.bias.fill_(3.0)
    m.weight.grad = torch.tensor([[0.5, -0.5]])
    m.bias.grad = torch.tensor([1.0])
    return m, flatten(m)


def test_fedprox_adds_mu_times_distance_to_global():
    m, _ = _model_with_grads()
    global_flat = torch.tensor([0.0, 1.0, 5.0])  # weight [[0, 1]], bias [5]
    FedProx(0.1, m, global_flat)()
    assert torch.allclose(m.weight.grad, torch.tensor([[0.5 + 0.1 * 1.0, -0.5 + 0.1 * 1.0]]))
    assert torch.allclose(m.bias.grad, torch.tensor([1.0 + 0.1 * (3.0 - 5.0)]))


def test_scaffold_corrects_by_c_minus_ck_and_records_the_mean_raw_gradient():
    m, _ = _model_with_grads()
    c, ck = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 2.0, 0.5])
    term = ScaffoldClient(m, c, ck)
    term()
    assert torch.equal(m.weight.grad, torch.tensor([[0.5 + 1.0, -0.5 - 1.0]]))
    assert torch.equal(m.bias.grad, torch.tensor([1.0 + 0.5]))
    m.weight.grad, m.bias.grad = torch.tensor([[1.5, 0.5]]), torch.tensor([3.0])
    term()
    assert torch.equal(term.new_control(), torch.tensor([(0.5 + 1.5) / 2, (-0.5 + 0.5) / 2, (1.0 + 3.0) / 2]))


def test_scaffold_with_zero_control_variates_leaves_gradients_bit_identical():
    m, flat = _model_with_grads()
    before = [p.grad.clone() for p in m.parameters()]
    ScaffoldClient(m, torch.zeros_like(flat), None)()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, m.parameters(), strict=True))


# --------------------------------------------------------------------------------------------
# Whole runs: the identities with FedAvg


def _final_model(tmp_path, name, **extra):
    cfg = load_config(None, tiny_overrides(tmp_path, name, **extra))
    train(cfg)
    return checkpoint.load_verified(checkpoint.checkpoint_path(cfg.run_dir, cfg.fed.rounds))["model"]


@pytest.mark.slow  # three whole runs
def test_fedprox_mu_zero_is_fedavg_and_mu_positive_is_not(tmp_path):
    fedavg = _final_model(tmp_path, "fedavg")
    assert same_bits(fedavg, _final_model(tmp_path, "prox0", fed__drift="fedprox", fed__prox_mu="0"))
    assert not same_bits(fedavg, _final_model(tmp_path, "prox", fed__drift="fedprox", fed__prox_mu="1"))


def test_scaffold_first_round_is_fedavg_bit_for_bit_then_differs(tmp_path):
    runs = {}
    for name, extra in (("fedavg", {}), ("scaffold", {"fed__drift": "scaffold"})):
        cfg = load_config(None, tiny_overrides(tmp_path, name, **extra))
        train(cfg)
        runs[name] = [checkpoint.load_verified(checkpoint.checkpoint_path(cfg.run_dir, r))["model"]
                      for r in (1, 2)]
    assert same_bits(runs["fedavg"][0], runs["scaffold"][0])  # all control variates still zero
    assert not same_bits(runs["fedavg"][1], runs["scaffold"][1])


def test_kept_client_adam_continues_its_moments(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, fed__client_optimizer="keep"))
    data = load_split(cfg.data, "train")
    model, diffusion = build(cfg, data.num_classes, torch.device("cpu"))
    idx = torch.arange(100)
    start = flatten(model)
    first = train_local(model, diffusion, data, idx, cfg, 1, 0)
    steps = first.steps
    assert first.optimizer_state["state"][0]["step"] == steps
    after_first = flatten(model)
    second = train_local(model, diffusion, data, idx, cfg, 2, 0, optimizer_state=first.optimizer_state)
    assert second.optimizer_state["state"][0]["step"] == 2 * steps
    kept = flatten(model)
    from fedrun.flat import load_flat_
    load_flat_(model, after_first)
    train_local(model, diffusion, data, idx, cfg, 2, 0)  # the same round with a fresh Adam
    assert not torch.equal(kept, flatten(model)) and not torch.equal(start, after_first)


# --------------------------------------------------------------------------------------------
# Classifier-free guidance


def test_label_dropout_trains_the_null_class_row(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, model__label_dropout="0.5"))
    data = load_split(cfg.data, "train")
    model, _ = build(cfg, data.num_classes, torch.device("cpu"))
    plain, _ = build(load_config(None, tiny_overrides(tmp_path)), data.num_classes, torch.device("cpu"))
    assert model.class_embed.num_embeddings == 11 and plain.class_embed.num_embeddings == 10
    null_row = model.class_embed.weight[10].detach().clone()
    model2, diffusion = build(cfg, data.num_classes, torch.device("cpu"))
    train_local(model2, diffusion, data, torch.arange(64), cfg, 1, 0)
    assert not torch.equal(null_row, model2.class_embed.weight[10])  # the null class was trained


class _LabelShift(nn.Module):
    """out = 0.1 * z + label (the null class 10 gives 10): guidance is easy to follow by hand."""

    def forward(self, z, log_snr, labels):
        return 0.1 * z + labels.float().view(-1, 1, 1, 1)


class _Guided(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.inner, self.w = _LabelShift(), w

    def forward(self, z, log_snr, labels):
        cond = self.inner(z, log_snr, labels)
        uncond = self.inner(z, log_snr, torch.full_like(labels, 10))
        return (1 + self.w) * cond - self.w * uncond


def test_guidance_is_one_plus_w_cond_minus_w_uncond():
    labels = torch.tensor([0, 3, 7])
    guided = Diffusion(DiffusionConfig(guidance=2.0), null_class=10)
    by_hand = Diffusion(DiffusionConfig(guidance=0.0))
    def draw(diffusion, model):
        return diffusion.sample(model, labels, (1, 2, 2), steps=4, eta=1.0,
                                generator=torch.Generator().manual_seed(0))

    a = draw(guided, _LabelShift())
    assert torch.allclose(a, draw(by_hand, _Guided(2.0)), atol=1e-5)
    c = draw(by_hand, _LabelShift())
    assert not torch.allclose(a, c, atol=1e-3)
