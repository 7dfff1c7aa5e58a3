"""model.trainable (fedrun/adapters.py): LoRA and norms/biases fine-tuning on fedrun's U-Net.

Checked: "all" changes nothing; LoRA starts as the base model, freezes the base, keeps its
parameter names and adds only the adapters; the flat layout (what travels, is clipped and gets
noise) holds exactly what trains; Opacus's per-sample gradients of the adapters match autograd
and frozen parameters get none; the merged copy the sampler uses is the same function, within a
bound computed from the float arithmetic, and the sampler uses it.
"""

from __future__ import annotations

import copy

import opacus  # noqa: F401  (required: without it these tests fail, never skip)
import pytest
import torch
from torch import nn

import fedrun.diffusion
from fedrun import adapters
from fedrun.adapters import LoRAConv2d, make_trainable, merged
from fedrun.config import load_config
from fedrun.errors import ConfigError
from fedrun.flat import flatten, float_tensors, num_flat
from fedrun.models import build
from fedrun.privacy.dp_sgd import attach, detach

from helpers import tiny_overrides

CPU = torch.device("cpu")


def tiny(tmp_path, **extra):
    cfg = load_config(None, tiny_overrides(tmp_path, model__dropout=0, **extra))
    model, diffusion = build(cfg, 10, CPU)
    return cfg, model, diffusion


def batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g) * 2 - 1
    return x, torch.arange(n) % 10, torch.linspace(-5, 5, n), torch.randn(x.shape, generator=g)


@torch.no_grad()
def randomise_up(model: nn.Module, seed: int = 1) -> None:
    """Non-zero up-projections: a trained adapter (at init they are zero and merging is trivial)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRAConv2d):
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.3)


def test_all_is_todays_model_and_layout(tmp_path):
    cfg, model, _ = tiny(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert make_trainable(model, cfg.model, cfg.run.seed) is model
    assert all(p.requires_grad for p in model.parameters())
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the flat layout is every parameter, in model.parameters() order (the U-Net has no buffers)
    assert [id(t) for t in float_tensors(model)] == [id(p) for p in model.parameters()]
    assert num_flat(model) == sum(p.numel() for p in model.parameters())


def test_lora_starts_as_the_base_and_only_adapters_embeddings_and_output_train(tmp_path):
    cfg, model, diffusion = tiny(tmp_path, model__trainable="lora", model__lora_rank=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, log_snr, eps = batch()
    model.eval()
    with torch.no_grad():
        ref = model(x, log_snr, y)
    make_trainable(model, cfg.model, cfg.run.seed)
    with torch.no_grad():
        assert torch.equal(model(x, log_snr, y), ref)  # up = 0: step 0 is the base model, bit for bit
    state = model.state_dict()
    lora_keys = {k for k in state if ".lora_" in k}
    assert set(state) - lora_keys == set(base) and all(torch.equal(state[k], base[k]) for k in base)
    adapted = [m for m in model.modules() if isinstance(m, LoRAConv2d)]
    assert len(lora_keys) == 2 * len(adapted) and all(m.scale == 4.0 / 2 for m in adapted)
    out = model.output_layers()
    assert out and all(type(m) is nn.Conv2d and m.out_channels == 1 for m in out)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = lora_keys | {n for n in base if n.startswith(("noise_embed.", "class_embed.", "up.0.0.main.3.",
                                                               "up.0.0.skip."))}
    assert trained == expected
    # the flat layout: exactly what trains, nothing of the frozen base
    assert num_flat(model) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert num_flat(model) < 0.5 * sum(v.numel() for v in base.values())
    # the adapters' init is a function of the seed alone (the same on every rank and device)
    _, again, _ = tiny(tmp_path)
    torch.manual_seed(123)  # the global RNG does not matter
    make_trainable(again, cfg.model, cfg.run.seed)
    assert torch.equal(flatten(again), flatten(model))


def test_norms_biases_trains_biases_norms_and_embeddings(tmp_path):
    cfg, model, _ = tiny(tmp_path, model__trainable="norms_biases", model__attention_levels="1")
    make_trainable(model, cfg.model, cfg.run.seed)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".norm." in n for n in trained)  # the attention's GroupNorm
    embeddings = ("noise_embed.", "class_embed.")
    assert trained == {n for n, _ in model.named_parameters()
                       if n.endswith(".bias") or ".norm." in n or n.startswith(embeddings)}
    assert not any(isinstance(m, LoRAConv2d) for m in model.modules())


def test_a_subset_that_leaves_nothing_to_train_is_refused():
    cfg = load_config(None, {"model.trainable": "norms_biases"})
    bias_free = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 1, 1, bias=False))
    with pytest.raises(ConfigError, match="model.trainable: 'norms_biases' leaves no parameter"):
        make_trainable(bias_free, cfg.model, 0)


def test_a_rank_a_layer_cannot_hold_is_refused_with_the_layer(tmp_path):
    cfg, model, _ = tiny(tmp_path, model__trainable="lora", model__lora_rank=9)
    with pytest.raises(ConfigError, match=r"lora_rank: 9 is larger than the layer down.0.0.main.0 .*<= 8"):
        make_trainable(model, cfg.model, cfg.run.seed)
    assert adapters.max_rank(nn.Conv2d(21, 8, 3)) == 8 and adapters.max_rank(nn.Conv2d(3, 64, 1)) == 3
    assert adapters.max_rank(nn.Linear(5, 7)) == 5


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_of_adapters_match_autograd(tmp_path):
    cfg, model, diffusion = tiny(tmp_path, model__trainable="lora", model__lora_rank=2,
                                 model__attention_levels="1")
    make_trainable(model, cfg.model, cfg.run.seed)
    randomise_up(model)
    model.train()
    x, y, log_snr, eps = batch(5)
    gsm = attach(model)
    diffusion.per_image_loss(gsm, x, y, log_snr, eps).mean().backward()
    samples = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and hasattr(p, "grad_sample")]
    detach(gsm)
    assert not frozen  # Opacus computes nothing for the frozen base
    assert any(".lora_down." in n for n in samples) and any(".qkv.lora_up." in n for n in samples)
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        s = slice(i, i + 1)
        diffusion.per_image_loss(model, x[s], y[s], log_snr[s], eps[s]).sum().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(samples[n][i], p.grad, rtol=1e-4, atol=1e-6, msg=n)
            else:
                assert p.grad is None, n
    assert samples["down.0.0.main.0.lora_down.weight"].abs().amax() > 0


def _bound_conv(layer: LoRAConv2d, x: torch.Tensor, u: float) -> torch.Tensor:
    """|unmerged - merged| <= 2 gamma_N ((|W| + s |U| |D|) * |x| + |b|), elementwise, with
    gamma_N = N u / (1 - N u), N = fan-in + r + 4: each of the two computations is within
    gamma_N of the exact value (a dot product of n terms is within gamma_n of its sum of
    |terms|; the low-rank path adds r terms, the merge and the scale a few roundings)."""
    n = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] + layer.rank + 4
    gamma = n * u / (1 - n * u)
    up = layer.lora_up.weight.double().abs().reshape(layer.out_channels, layer.rank)
    down = layer.lora_down.weight.double().abs().reshape(layer.rank, -1)
    w = layer.weight.double().abs() + layer.scale * (up @ down).reshape(layer.weight.shape)
    b = layer.bias.double().abs() if layer.bias is not None else None
    mag = nn.functional.conv2d(x.double().abs(), w, b, layer.stride, layer.padding, layer.dilation)
    return 2 * gamma * mag


def test_merged_layers_equal_the_adapted_ones_within_rounding(tmp_path):
    """Every adapted layer of a LoRA U-Net (attention's 1x1 convolutions included), on the inputs
    it gets in a forward pass, against the merged layer: within the bound of the fp32 arithmetic,
    which a merge without the scale, or with up and down swapped, exceeds by far."""
    cfg, model, _ = tiny(tmp_path, model__trainable="lora", model__lora_rank=3, model__attention_levels="1")
    make_trainable(model, cfg.model, cfg.run.seed)
    randomise_up(model)
    model.eval()
    plain = merged(model)
    assert plain is not model and merged(plain) is plain
    assert not any(isinstance(m, LoRAConv2d) for m in plain.modules())
    assert plain.state_dict().keys() == {k for k in model.state_dict() if ".lora_" not in k}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0]))
             for name, m in model.named_modules() if isinstance(m, LoRAConv2d)]
    x, y, log_snr, _ = batch(3)
    with torch.no_grad():
        model(x, log_snr, y)
        for h in hooks:
            h.remove()
        assert len(inputs) >= 8
        worst = 0.0
        for name, inp in inputs.items():
            layer, flat = model.get_submodule(name), plain.get_submodule(name)
            diff = (layer(inp).double() - flat(inp).double()).abs()
            bound = _bound_conv(layer, inp, 2.0 ** -24)
            assert (diff <= bound).all(), (name, float((diff - bound).max()))
            worst = max(worst, float((diff / bound.clamp(min=1e-30)).max()))
            # a merge without the scale alpha / r moves far outside the bound
            wrong = nn.functional.conv2d(inp, layer.weight + layer.delta() / layer.scale, layer.bias,
                                         layer.stride, layer.padding)
            assert ((wrong.double() - layer(inp).double()).abs() > bound).any(), name
    assert worst < 1.0


def _abs_network(model: nn.Module) -> nn.Module:
    """The merged model with |weights|, ReLU as identity and |input| at every convolution: its
    output bounds, elementwise, the sum of |terms| behind every output (a first-order bound of
    how far rounding anywhere inside can move it)."""
    net = copy.deepcopy(merged(model))
    for name, m in list(net.named_modules()):
        if isinstance(m, nn.ReLU):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, nn.Identity())
        elif isinstance(m, nn.Conv2d):
            m.weight.data.abs_()
            if m.bias is not None:
                m.bias.data.abs_()
            m.register_forward_pre_hook(lambda _, a: (a[0].abs(),))
    return net


def test_merged_model_equals_the_adapted_model_within_rounding(tmp_path):
    """The whole network in float64: |merged - unmerged| <= 2 L gamma_N * (the |.| network's
    output), L = the layers on the longest path (every conv, pool and upsample counted)."""
    cfg, model, _ = tiny(tmp_path, model__trainable="lora", model__lora_rank=3)
    make_trainable(model, cfg.model, cfg.run.seed)
    randomise_up(model)
    model = model.double().eval()
    model.noise_embed.float()  # the U-Net feeds it float32 log-SNRs; its features are the same in both
    plain = merged(model)
    x, y, log_snr, _ = batch(3)
    x, log_snr = x.double(), log_snr.double()
    with torch.no_grad():
        a, b = model(x, log_snr, y), plain(x, log_snr, y)
        magnitude = _abs_network(model)(x, log_snr, y)
    convs = [m for m in model.modules() if type(m) in (nn.Conv2d, LoRAConv2d)]
    n = max(m.in_channels * m.kernel_size[0] * m.kernel_size[1] for m in convs) + 3 + 4
    u = 2.0 ** -53
    L = len(convs) + 4  # + pooling and upsampling
    bound = 2 * L * n * u / (1 - n * u) * magnitude
    diff = (a - b).abs()
    assert (diff <= bound).all(), float((diff - bound).max())
    assert diff.max() > 0 or torch.equal(a, b)
    # the adapters matter: the base model alone is far outside the bound
    base = model.up[0][0].main[0]
    assert isinstance(base, LoRAConv2d) and base.delta().abs().max() > 1e-3
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAConv2d):
                m.lora_up.weight.zero_()
        assert ((model(x, log_snr, y) - b).abs() > bound).any()


def test_the_sampler_uses_the_merged_weights(tmp_path, monkeypatch):
    cfg, model, diffusion = tiny(tmp_path, model__trainable="lora", model__lora_rank=2)
    make_trainable(model, cfg.model, cfg.run.seed)
    randomise_up(model)
    model.eval()
    labels = torch.arange(4)

    def draw(m: nn.Module) -> torch.Tensor:
        return diffusion.sample(m, labels, (1, 16, 16), 3, 1.0, generator=torch.Generator().manual_seed(5))
    # what it draws from the adapted model is what the merged copy draws, bit for bit ...
    from_merged = draw(merged(model))
    assert torch.equal(draw(model), from_merged)
    # ... which the unmerged forward, rounding otherwise, would not
    monkeypatch.setattr(fedrun.diffusion, "merged", lambda m: m)
    unmerged = draw(model)
    assert not torch.equal(unmerged, from_merged) and (unmerged - from_merged).abs().max() < 1e-3
