"""GPU-only checks of the fast path, in-process (skipped without CUDA; benchmarks/gpu_check.sh runs
them): bf16 autocast by default, no host sync inside a local epoch, fp16 with a GradScaler, K
clients at once equal to one at a time on the GPU's random streams, torch.compile sharing the
parameters, a rank pinned to its GPU with cuDNN autotuning on. The checks that start processes
(NCCL between two ranks, torchrun on one GPU) are in tests/integration_tests/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from fedrun.config import load_config
from fedrun.data import load_split
from fedrun.experimental.multiclient import train_group
from fedrun.federated.client import train_local
from fedrun.flat import flatten, load_flat_
from fedrun.models import build
from fedrun.precision import autocast_dtype

from helpers import tiny_overrides

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda", 0)


def setup(tmp_path, **extra):
    extra = {"data__hflip": "true", "optim__batch_size": 32, **extra}
    cfg = load_config(None, tiny_overrides(tmp_path, **extra))
    data = load_split(cfg.data, "train").to(CUDA)
    model, diffusion = build(cfg, data.num_classes, CUDA)
    return cfg, data, model, diffusion


def test_pick_device_pins_the_local_gpu_and_autotunes():
    from fedrun.dist import pick_device
    dev = pick_device("auto", local_rank=torch.cuda.device_count())  # wraps round to GPU 0
    assert dev == torch.device("cuda", 0) and torch.cuda.current_device() == 0
    assert torch.backends.cudnn.benchmark
    assert autocast_dtype("auto", dev) is torch.bfloat16


def test_bf16_local_training_keeps_fp32_weights_and_learns(tmp_path):
    cfg, data, model, diffusion = setup(tmp_path)
    start = flatten(model)
    res = train_local(model, diffusion, data, torch.arange(200, device=CUDA), cfg, 1, 0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(res.loss_sum) and res.steps == 7
    assert (flatten(model) - start).abs().max() > 1e-4


def test_no_host_sync_inside_a_local_epoch(tmp_path):
    cfg, data, model, diffusion = setup(tmp_path)
    idx = torch.arange(300, device=CUDA)
    train_local(model, diffusion, data, idx, cfg, 1, 0)  # warm-up: cuDNN autotuning, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call below raises
    try:  # fails by raising on the first synchronizing call
        res = train_local(model, diffusion, data, idx, cfg, 1, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.steps > 0 and res.loss_sum.device.type == "cuda"  # the loss stayed on the device


def test_fp16_with_grad_scaler_trains(tmp_path):
    cfg, data, model, diffusion = setup(tmp_path, train__precision="fp16")
    res = train_local(model, diffusion, data, torch.arange(200, device=CUDA), cfg, 1, 0)
    assert torch.isfinite(res.loss_sum) and torch.isfinite(flatten(model)).all()


def test_k_clients_at_once_equal_one_at_a_time_on_the_gpu(tmp_path):
    # fp32 without TF32: then only summation order differs (grouped vs single convolutions)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cfg, data, model, diffusion = setup(tmp_path, train__precision="fp32", fed__local_epochs=2)
        shards = {3: torch.arange(0, 70, device=CUDA), 5: torch.arange(100, 150, device=CUDA)}
        start = flatten(model)
        sequential = {}
        for k, idx in shards.items():
            load_flat_(model, start)
            train_local(model, diffusion, data, idx, cfg, 2, k)
            sequential[k] = flatten(model)
        load_flat_(model, start)
        params, _, _ = train_group(model, diffusion, data, shards, cfg, 2)
        names = [n for n, _ in model.named_parameters()]
        for i, k in enumerate(shards):
            mine = torch.cat([params[n][i].reshape(-1) for n in names])
            assert (mine - sequential[k]).abs().max().item() < 1e-5
            assert (sequential[k] - start).abs().max().item() > 1e-3  # and the client did move
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def test_compiled_training_shares_the_parameters(tmp_path):
    cfg, data, model, diffusion = setup(tmp_path)
    net = torch.compile(model)
    assert {id(p) for p in net.parameters()} == {id(p) for p in model.parameters()}
    start = flatten(model)
    res = train_local(net, diffusion, data, torch.arange(128, device=CUDA), cfg, 1, 0)
    assert torch.isfinite(res.loss_sum)
    assert (flatten(model) - start).abs().max() > 1e-4  # the flat-buffer view sees the update
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())
