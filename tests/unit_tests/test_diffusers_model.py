"""model.arch = "diffusers" (fedrun/diffusers_model.py), peft LoRA (model.trainable = "peft_lora"),
a diffusers folder as model.init_from, and fedrun export (fedrun/export.py), in process.

Checked: the log-SNR -> timestep mapping and the exported scheduler are fedrun's schedule; every
bad key is one line naming it; Opacus' per-sample gradients of the UNet2DModel (GroupNorm,
attention, time and class embeddings) and of its peft adapters match autograd on single images;
a diffusers run trains with the round's methods, resumes bit-exactly; peft LoRA trains the same
bits as fedrun's LoRA on the native U-Net and merges for sampling; a save_pretrained folder starts
a run (shape and config mismatches refused, naming the layer or key), its checksum in the
checkpoint; the exported pipeline samples what fedrun's sampler samples.
"""

from __future__ import annotations

import ast
import json

import pytest
import torch
from torch import nn

# the diffusers extra (in the test extra: CI runs these); peft is imported by the tests that use it
pytest.importorskip("diffusers", reason="the diffusers extra: pip install -e '.[diffusers]'")

from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel  # noqa: E402

from fedrun import checkpoint  # noqa: E402
from fedrun.adapters import make_trainable, merged  # noqa: E402
from fedrun.config import load_config  # noqa: E402
from fedrun.diffusers_model import DiffusersUNet, continuous_timestep, discrete_timestep  # noqa: E402
from fedrun.diffusion import Diffusion, ddpm_log_snr  # noqa: E402
from fedrun.errors import CheckpointError, ConfigError  # noqa: E402
from fedrun.export import diffusers_scheduler, export_diffusers  # noqa: E402
from fedrun.flat import num_flat  # noqa: E402
from fedrun.init_from import read_init, state_sha256  # noqa: E402
from fedrun.models import build  # noqa: E402
from fedrun.privacy.dp_sgd import attach, detach  # noqa: E402
from fedrun.saved_run import open_run  # noqa: E402
from fedrun.train import train  # noqa: E402

from helpers import model_at, same_bits, tiny_overrides  # noqa: E402

CPU = torch.device("cpu")
# a ~12k-parameter UNet2DModel with attention at 8x8 and in the middle block; one client a round
TINY_D = dict(model__arch="diffusers", model__block_out_channels="4,8", model__layers_per_block=1,
              model__down_block_types="DownBlock2D,AttnDownBlock2D",
              model__up_block_types="AttnUpBlock2D,UpBlock2D", model__norm_num_groups=4,
              model__attention_head_dim=4, fed__clients_per_round=1)


def tiny_d(tmp_path, name="d", **extra):
    return load_config(None, tiny_overrides(tmp_path, name, **{**TINY_D, **extra}))


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory):
    """Two rounds of a tiny diffusers run with label dropout (the null class), guidance and an EMA."""
    cfg = tiny_d(tmp_path_factory.mktemp("guided"), "guided", model__label_dropout=0.2,
                 diffusion__guidance=1.0, ema__sigma_rel=0.1)
    train(cfg)
    return cfg


def test_the_timestep_is_fedruns_noise_level_in_diffusers_steps():
    t = torch.tensor([1.0, 0.9, 0.5, 0.01, 0.0])
    got = continuous_timestep(ddpm_log_snr(t), 1000)
    # float32 log-SNR: t is recovered to ~1e-6 (at t = 0, where the sqrt steepens, to ~3e-6)
    torch.testing.assert_close(got, 1000 * t - 1, rtol=0, atol=5e-3)
    cfg = load_config(None, {"diffusion.objective": "eps"})
    table = Diffusion(cfg.diffusion).discrete_log_snr
    k = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.equal(discrete_timestep(table[k], table), k.float())  # exact on the table
    middle = (table[17] + table[18]) / 2
    assert 17 < discrete_timestep(middle.reshape(1), table).item() < 18


def test_the_exported_scheduler_is_fedruns_schedule_and_levels():
    cfg = load_config(None, {})
    diffusion = Diffusion(cfg.diffusion)
    sched = diffusers_scheduler(diffusion)
    assert isinstance(sched, DDIMScheduler) and sched.config.prediction_type == "v_prediction"
    k = torch.arange(1000)
    exact = torch.sigmoid(ddpm_log_snr((k + 1).double() / 1000)).float()
    torch.testing.assert_close(sched.alphas_cumprod, exact, rtol=2e-5, atol=0)
    # 10 steps divide T: DDIM's timesteps are fedrun's sampler's levels, t = 1 - i / 10
    sched.set_timesteps(10)
    levels = diffusion.sample_levels(10, CPU)
    torch.testing.assert_close(continuous_timestep(levels, 1000), sched.timesteps.float(), rtol=0, atol=2e-3)


@pytest.mark.parametrize("extra, message", [
    (dict(model__down_block_types="DownBlock2D"), r"^model\.down_block_types: 1 block\(s\) for the 2 levels"),
    (dict(model__up_block_types="UpBlock2D,CrossAttnUpBlock2D"),
     r"^model\.up_block_types\[1\]: 'CrossAttnUpBlock2D' is no block .*choose one of UpBlock2D"),
    (dict(model__norm_num_groups=3), r"^model\.norm_num_groups: 3 groups do not divide the width 4"),
    (dict(model__attention_head_dim=3), r"^model\.attention_head_dim: 3 does not divide the width 8"),
    (dict(data__image_size=15), r"^data\.image_size: 15 cannot be halved 1 times by the UNet2DModel"),
    (dict(model__norm_eps=0.0), r"^model\.norm_eps: must be > 0"),
    (dict(train__clients_at_once=2), r"^train\.clients_at_once: the experimental grouped trainer .*set "
                                     r"train\.clients_at_once = 1 with model\.arch = \"diffusers\""),
    (dict(model__trainable="peft_lora", model__lora_target_modules="to_q,nope"),
     r"^model\.lora_target_modules: 'nope' names no layer of this model"),
    (dict(model__trainable="peft_lora", model__lora_target_modules="conv_out"),
     r"^model\.lora_target_modules: 'conv_out' matches unet\.conv_out, an output layer"),
    (dict(model__trainable="peft_lora", model__lora_target_modules="conv_norm_out"),
     r"^model\.lora_target_modules: 'conv_norm_out' matches unet\.conv_norm_out, a GroupNorm"),
])
def test_every_bad_key_is_one_line_naming_it(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        cfg = tiny_d(tmp_path, **extra)
        make_trainable(build(cfg, 10, CPU)[0], cfg, 0)  # target modules are checked against the model
    assert "\n" not in str(err.value)


def test_a_missing_package_is_named_with_its_install_line(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("diffusers", "peft")
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"^model\.arch: \"diffusers\" needs the diffusers package.*"
                                          r"pip install 'fedrun\[diffusers\]'"):
        tiny_d(tmp_path)
    with pytest.raises(ConfigError, match=r"^model\.trainable: \"peft_lora\" needs the peft package"):
        load_config(None, tiny_overrides(tmp_path, model__trainable="peft_lora"))


def _per_sample_check(model: nn.Module, diffusion: Diffusion) -> dict[str, torch.Tensor]:
    """Opacus' per-sample gradients of every trainable parameter against autograd on each image."""
    model.train()  # dropout 0 in the callers: the same function per image
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    y = torch.tensor([0, 3, 10, 7])  # 10 = the null class
    log_snr, eps = torch.linspace(-6, 6, 4), torch.randn(x.shape, generator=g)
    gsm = attach(model)
    diffusion.per_image_loss(gsm, x, y, log_snr, eps).mean().backward()
    samples = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and hasattr(p, "grad_sample")]
    detach(gsm)
    assert not frozen
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        s = slice(i, i + 1)
        diffusion.per_image_loss(model, x[s], y[s], log_snr[s], eps[s]).sum().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                ref = p.grad if p.grad is not None else torch.zeros_like(p)
                torch.testing.assert_close(samples[n][i], ref, rtol=1e-4, atol=1e-6, msg=n)
    return samples


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("layout", ["true", "false"])
def test_opacus_per_sample_gradients_of_the_unet2dmodel_match_autograd(tmp_path, layout):
    cfg = tiny_d(tmp_path, model__dropout=0, model__label_dropout=0.2, train__channels_last=layout)
    model, diffusion = build(cfg, 10, CPU)
    samples = _per_sample_check(model, diffusion)
    for part in ("time_embedding.linear_1.weight", "class_embedding.weight", "attentions.0.to_q.weight",
                 "attentions.0.group_norm.weight", "resnets.0.norm1.weight", "time_emb_proj.weight"):
        assert any(part in n and s.abs().amax() > 0 for n, s in samples.items()), part


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_peft_adapters_of_the_unet2dmodel_get_exact_per_sample_gradients(tmp_path):
    cfg = tiny_d(tmp_path, model__dropout=0, model__label_dropout=0.2, model__trainable="peft_lora",
                 model__lora_rank=2,
                 model__lora_target_modules="to_q,to_k,to_v,to_out.0,conv1,conv2,linear_1")
    model, diffusion = build(cfg, 10, CPU)
    make_trainable(model, cfg, cfg.run.seed)
    with torch.no_grad():  # a trained adapter (at init up = 0 and its down's gradient is zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.3)
    samples = _per_sample_check(model, diffusion)
    assert {n.rsplit(".", 3)[-3] for n in samples if "lora_" in n} == {"lora_A", "lora_B"}
    in_full = {"unet.class_embedding.weight", "unet.conv_out.weight", "unet.conv_out.bias"}
    assert {n for n in samples if "lora_" not in n} == in_full


@pytest.mark.parametrize("methods", [
    dict(fed__server_opt="fedadam", fed__server_lr="0.01", fed__compress="int8", fed__drift="fedprox",
         fed__prox_mu="0.1"),
    dict(fed__drift="scaffold", fed__client_optimizer="keep"),
    # the DP rounds take ~4 s each; DP-SGD's exactness is the per-sample gradient tests' (fast)
    pytest.param(dict(privacy__level="sample", privacy__noise_multiplier="1.0", privacy__multiplicity="2",
                      privacy__accountant="rdp"), marks=pytest.mark.slow),
    pytest.param(dict(privacy__level="sample", privacy__noise_multiplier="1.0", model__trainable="peft_lora",
                      model__lora_rank="2"), marks=pytest.mark.slow),
    pytest.param(dict(privacy__level="client", privacy__noise_multiplier="0.5", privacy__clip="0.5",
                      secure_agg__protocol="secagg+", fed__clients_per_round=3),
                 marks=[pytest.mark.slow, pytest.mark.filterwarnings("ignore:privacy.level")]),
], ids=["fedadam_int8_fedprox", "scaffold_kept_adam", "dp_sgd_multiplicity", "dp_sgd_peft_lora",
        "dp_fedavg_secagg"])
def test_the_round_methods_train_the_diffusers_arch(tmp_path, methods):
    cfg = tiny_d(tmp_path, fed__rounds=1, **methods)
    summary = train(cfg)
    assert summary["final_loss"] is not None and 0 < summary["final_loss"] < 1
    state = model_at(cfg.run_dir, 1)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(k.startswith("unet.") for k in state)


def test_a_diffusers_run_resumes_bit_exactly(guided_run, tmp_path):
    cfg = tiny_d(tmp_path, "guided", model__label_dropout=0.2, diffusion__guidance=1.0, ema__sigma_rel=0.1,
                 fed__rounds=1)
    train(cfg)
    cfg.fed.rounds = 2  # not hashed: the same run, continued from its round-1 checkpoint
    train(cfg)
    for r in (1, 2):
        assert same_bits(model_at(cfg.run_dir, r), model_at(guided_run.run_dir, r)), r
    ema = [checkpoint.load_verified(checkpoint.checkpoint_path(d, 2))["ema"]["flat"]
           for d in (cfg.run_dir, guided_run.run_dir)]
    assert torch.equal(*ema)


def test_peft_lora_trains_the_bits_of_fedruns_lora_and_merges_the_same(tmp_path):
    runs = {}
    for trainable in ("lora", "peft_lora"):
        cfg = load_config(None, tiny_overrides(tmp_path, trainable, model__trainable=trainable,
                                               model__lora_rank=2, model__attention_levels="1",
                                               fed__rounds=1, fed__clients_per_round=1))
        train(cfg)
        runs[trainable] = open_run(cfg.run_dir, device="cpu", test_split=False)
    ours, peft = (runs[k].model.state_dict() for k in ("lora", "peft_lora"))
    names = {k: k.replace(".base_layer.", ".").replace(".lora_A.default.", ".lora_down.")
             .replace(".lora_B.default.", ".lora_up.") for k in peft}
    assert set(names.values()) == set(ours) and any(".base_layer." in k for k in peft)
    assert all(torch.equal(v, ours[names[k]]) for k, v in peft.items())
    a, b = (merged(runs[k].model).state_dict() for k in ("lora", "peft_lora"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # merged: the same weights


def test_peft_lora_on_the_unet2dmodel_trains_adapters_and_merges_for_sampling(tmp_path):
    cfg = tiny_d(tmp_path, model__trainable="peft_lora", model__lora_rank=2,
                 model__lora_target_modules="to_q,to_k,to_v,conv1,conv2")
    model, diffusion = build(cfg, 10, CPU)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x, log_snr, y = torch.randn(3, 1, 16, 16), torch.tensor([-3.0, 0.0, 4.0]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        before = model.eval()(x, log_snr, y)
    make_trainable(model, cfg, cfg.run.seed)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained - {"unet.class_embedding.weight", "unet.conv_out.weight", "unet.conv_out.bias"} == \
        {n for n in trained if ".lora_A." in n or ".lora_B." in n}
    assert num_flat(model) == sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.5 * sum(
        v.numel() for v in base.values())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    plain = merged(model)
    assert plain.state_dict().keys() == base.keys()  # the base's names: what export writes
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x, log_snr, y), model(x, log_snr, y), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain(x, log_snr, y), before, atol=1e-3)  # the adapters count


def _save_pretrained(folder, **config):
    torch.manual_seed(5)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(4, 8),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                       norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, **config)
    unet.save_pretrained(folder)
    return unet


def test_a_save_pretrained_folder_starts_a_run_and_its_checksum_is_checkpointed(tmp_path):
    public = _save_pretrained(tmp_path / "public")  # unconditional, as a public DDPM
    assert (tmp_path / "public" / "diffusion_pytorch_model.safetensors").is_file()
    cfg = tiny_d(tmp_path, "tuned", model__init_from=str(tmp_path / "public"), fed__rounds=1,
                 optim__lr="1e-20")
    init = read_init(cfg, 10)
    assert init.weights == "diffusers" and init.sha256 == state_sha256(init.state)
    for k, v in public.state_dict().items():
        assert torch.equal(init.state[f"unet.{k}"], v), k
    assert torch.equal(init.state["unet.class_embedding.weight"], torch.zeros(10, 16))  # new: starts at zero
    train(cfg)
    tuned = model_at(cfg.run_dir, 1)
    assert all(torch.allclose(tuned[k], v, atol=1e-6) for k, v in init.state.items())  # lr 1e-20
    state = checkpoint.load_verified(checkpoint.checkpoint_path(cfg.run_dir, 1))
    assert state["identity"] == {"model.init_from": f"an init of SHA-256 {init.sha256[:16]}"}


@pytest.mark.parametrize("saved, extra, message", [
    (dict(num_class_embeds=3), {}, r"layer unet\.class_embedding\.weight is \[3, 16\] in the checkpoint and "
                                   r"\[10, 16\] in this model"),
    ({}, dict(model__block_out_channels="4,12"),
     r"does not fit this model: layer unet\.down_blocks\.1\.\S+ is \[\d.*\(its config\.json differs in "
     r"block_out_channels = \[4, 8\] there, \[4, 12\] here\)"),
    ({}, dict(model__flip_sin_to_cos="true"),
     r"config\.json has flip_sin_to_cos = false, this config builds true \(same shapes, another function\); "
     r"set model\.flip_sin_to_cos = false"),
    ({}, dict(model__arch="unet"), r"is a diffusers model folder; set model\.arch = \"diffusers\""),
])
def test_a_folder_that_does_not_fit_is_one_line_naming_the_layer_or_key(tmp_path, saved, extra, message):
    _save_pretrained(tmp_path / "public", **saved)
    cfg = tiny_d(tmp_path, model__init_from=str(tmp_path / "public"), **extra)
    with pytest.raises(CheckpointError, match=r"^model\.init_from: .*" + message) as err:
        read_init(cfg, 10)
    assert "\n" not in str(err.value)


def test_the_exported_pipeline_samples_what_fedruns_sampler_samples(guided_run, tmp_path):
    info = export_diffusers(guided_run.run_dir, tmp_path / "out")
    assert info["weights"] == "ema" and info["null_class"] == 10 and info["guidance"] == 1.0
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "FedrunClassConditionalPipeline"]
    tree = ast.parse((tmp_path / "out" / "pipeline.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "inspect", "torch", "diffusers", "diffusers.utils.torch_utils"}
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10)
    got = pipe(class_labels=labels.tolist(), num_inference_steps=10, eta=1.0,
               generator=torch.Generator().manual_seed(3), output_type="pt").images
    run = open_run(guided_run.run_dir, device="cpu", test_split=False)
    ours = run.diffusion.sample(run.model, labels, (1, 16, 16), 10, 1.0,
                                generator=torch.Generator().manual_seed(3))
    # the same noise, levels and update; what differs is float rounding of the schedule (alphas_cumprod
    # from float32 betas) and of the timestep fed to the embedding: measured ~1e-6
    diff = (got - (ours / 2 + 0.5)).abs().max().item()
    assert diff < 1e-4, diff  # 1/40 of an 8-bit grey level (tests/integration_tests/test_export.py)
    # the export is a diffusers folder fedrun starts from (its unet/), and refuses to overwrite
    again = read_init(tiny_d(tmp_path, model__init_from=str(tmp_path / "out"), model__label_dropout=0.2), 10)
    assert again.sha256 == state_sha256({f"unet.{k}": v for k, v in pipe.unet.state_dict().items()})
    with pytest.raises(ConfigError, match=r"^export: .*out exists and is not an empty folder.*--force"):
        export_diffusers(guided_run.run_dir, tmp_path / "out")


def test_the_native_unet_does_not_export_and_says_why(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "native", fed__rounds=1, fed__clients_per_round=1))
    train(cfg)
    with pytest.raises(ConfigError, match=r"^export: .* trains fedrun's native U-Net \(model\.arch = "
                                          r"\"unet\"\), whose layers have no diffusers counterpart.*"
                                          r"model\.arch = \"diffusers\""):
        export_diffusers(cfg.run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_wrapper_is_an_adaptable_denoiser(tmp_path):
    model, _ = build(tiny_d(tmp_path, model__label_dropout=0.1), 10, CPU)
    assert isinstance(model, DiffusersUNet) and model.null_class == 10
    assert model.unet.class_embedding.num_embeddings == 11 and model.output_layers() == [model.unet.conv_out]
    unconditional, _ = build(tiny_d(tmp_path, model__class_embed_dim=0), 10, CPU)
    assert unconditional.unet.class_embedding is None and unconditional.embeddings() == []
    eps, diffusion = build(tiny_d(tmp_path, diffusion__objective="eps"), 10, CPU)  # build gives the schedule
    u = torch.tensor([0.0, 0.25, 0.5, 0.9999])
    assert torch.equal(eps.timestep_of(diffusion.log_snr(u)), torch.tensor([0.0, 250.0, 500.0, 999.0]))
