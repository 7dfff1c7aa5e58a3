import torch

from fedrun.config import DiffusionConfig, ModelConfig
from fedrun.diffusion import Diffusion, alpha_sigma, ddpm_log_snr
from fedrun.models import build_model, count_parameters


def test_authors_unet_has_23_2M_parameters():
    model = build_model(ModelConfig(), image_channels=3, num_classes=10)
    assert round(count_parameters(model) / 1e5) == 232  # 23.2M, as the authors' model
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())  # no norm, no attention


def test_unet_shapes_for_small_and_attention_variants():
    cfg = ModelConfig(base_channels=8, channel_mults=[1, 2, 2], blocks_per_level=3, mid_blocks=3,
                      attention_levels=[2])
    model = build_model(cfg, image_channels=1, num_classes=4)
    out = model(torch.randn(3, 1, 16, 16), torch.randn(3), torch.tensor([0, 1, 3]))
    assert out.shape == (3, 1, 16, 16)


def test_schedule_matches_its_definition():
    t = torch.linspace(0, 1, 11)
    alpha, sigma = alpha_sigma(ddpm_log_snr(t))
    assert torch.allclose(alpha**2, torch.exp(-1e-4 - 10 * t**2), atol=1e-6)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t), atol=1e-6)


class Oracle(torch.nn.Module):
    """Predicts the exact target for a fixed x0, so the loss must be zero and sampling exact."""

    def __init__(self, x0: torch.Tensor, objective: str, diffusion: Diffusion):
        super().__init__()
        self.x0, self.objective = x0, objective

    def forward(self, z, log_snr, labels):
        alpha, sigma = (s.view(-1, 1, 1, 1) for s in alpha_sigma(log_snr))
        eps = (z - alpha * self.x0) / sigma
        return alpha * eps - sigma * self.x0 if self.objective == "v" else eps


def test_loss_is_zero_for_a_perfect_model_and_sampler_recovers_x0():
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    labels = torch.zeros(4, dtype=torch.long)
    for objective in ("v", "eps"):
        d = Diffusion(DiffusionConfig(objective=objective))
        model = Oracle(x0, objective, d)
        torch.manual_seed(0)
        assert d.loss(model, x0, labels, torch.rand(4) * 0.99).item() < 1e-8
        for eta in (0.0, 1.0):
            g = torch.Generator().manual_seed(0)
            out = d.sample(model, labels, (1, 8, 8), steps=10, eta=eta, generator=g)
            assert torch.allclose(out, x0, atol=1e-3), (objective, eta)


def test_sampler_noise_comes_only_from_the_generator():
    d = Diffusion(DiffusionConfig())
    small = ModelConfig(base_channels=4, channel_mults=[1, 2], blocks_per_level=1, mid_blocks=2)
    model = build_model(small, 1, 2).eval()
    labels = torch.tensor([0, 1])
    a = d.sample(model, labels, (1, 8, 8), 4, 1.0, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # the global RNG must not matter
    b = d.sample(model, labels, (1, 8, 8), 4, 1.0, generator=torch.Generator().manual_seed(1))
    c = d.sample(model, labels, (1, 8, 8), 4, 1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def _reference_loss(d: Diffusion, model, x0, labels, u):
    """Diffusion.loss as training computed it before per_image_loss existed, op for op."""
    log_snr = d.log_snr(u)
    alpha, sigma = (s.view(-1, 1, 1, 1) for s in alpha_sigma(log_snr))
    eps = torch.randn_like(x0)
    out = model(alpha * x0 + sigma * eps, log_snr, labels).float()
    if d.objective == "v":
        return ((out - (alpha * eps - sigma * x0)).pow(2).mean((1, 2, 3)) * alpha.view(-1) ** 2).mean()
    return (out - eps).pow(2).mean()


def test_loss_keeps_its_bits_and_per_image_loss_is_its_objective():
    """The training loss is bit-identical to its reference (dropout on: the same RNG draws), and
    the per-image losses at the same noise average to it: exactly for v (the same reduction),
    for eps up to the order of the sum (an all-element mean against a mean of image means)."""
    small = ModelConfig(base_channels=4, channel_mults=[1, 2], blocks_per_level=1, mid_blocks=2, dropout=0.1)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    u = torch.rand(6, generator=torch.Generator().manual_seed(1)) * 0.99
    for objective in ("v", "eps"):
        d = Diffusion(DiffusionConfig(objective=objective))
        model = build_model(small, 1, 2).train()
        torch.manual_seed(5)
        loss = d.loss(model, x0, labels, u)
        torch.manual_seed(5)
        assert torch.equal(loss, _reference_loss(d, model, x0, labels, u)), objective
        torch.manual_seed(5)
        eps = torch.randn_like(x0)
        per_image = d.per_image_loss(model, x0, labels, d.log_snr(u), eps)  # draws dropout after eps
        assert per_image.shape == (6,)
        if objective == "v":
            assert torch.equal(per_image.mean(), loss)
        else:
            assert torch.allclose(per_image.mean(), loss, rtol=1e-6) and per_image.mean() != 0
        # one noise level for the whole batch (what the audit asks): [1] broadcasts
        level = d.log_snr(torch.tensor([0.3]))
        one = d.per_image_loss(model.eval(), x0, labels, level, eps)
        each = d.per_image_loss(model, x0, labels, level.expand(6), eps)
        assert torch.allclose(one, each) and one.shape == (6,)
