"""GPU-only checks that start processes (skipped without CUDA; benchmarks/gpu_check.sh runs them):
the flat-buffer all_reduce through NCCL between two ranks (needs two GPUs: one GPU cannot hold two
NCCL ranks) and a torchrun job on one GPU end to end. The in-process checks of the fast path
(bf16, no host sync, fp16, K-at-once, compile) are in tests/unit_tests/test_gpu_fast_path.py.
"""

from __future__ import annotations

import pytest
import torch

from fedrun import checkpoint
from fedrun.flat import RoundBuffer, flatten, num_flat

from helpers import as_args, free_port, run_cli, tiny_overrides

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _nccl_rank(rank: int, port: int, out: str) -> None:
    """One of two NCCL ranks: adds theta with weight rank + 1 into the round's int64 buffer (the
    exact fixed-point sum), then all_reduce through NCCL and the average."""
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    try:
        torch.manual_seed(0)  # the same model on both ranks
        model = torch.nn.Linear(64, 32).cuda()
        buffer = RoundBuffer(num_flat(model), 2, {}, torch.device("cuda", rank), rank=rank, max_clients=2,
                             max_weight=2.0)
        assert buffer.add(model, float(rank + 1), loss=0.0, images=1)
        buffer.all_reduce()
        agg = buffer.aggregate(1, [0, 1])
        if rank == 0:
            theta = flatten(model).cpu()
            torch.save({"average": agg.average.cpu(), "weight": agg.weight, "theta": theta}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: 2 GPUs")
def test_flat_buffer_all_reduce_sums_two_ranks_through_nccl(tmp_path):
    out = str(tmp_path / "sum.pt")
    torch.multiprocessing.spawn(_nccl_rank, args=(free_port(), out), nprocs=2)
    got = torch.load(out, weights_only=True)
    # (1 theta + 2 theta) / 3 = theta: each weighted theta on the grid of 2^-F, the sum exact in
    # int64 through NCCL, the ratio rounded once to fp32
    assert got["weight"] == 3.0
    assert torch.allclose(got["average"], got["theta"], rtol=torch.finfo(torch.float32).eps, atol=2.0**-40)


def test_torchrun_one_gpu_end_to_end(tmp_path):
    out = run_cli(as_args(tiny_overrides(tmp_path, "gpu", run__device="cuda")), nproc=1,
                  extra_torchrun=["--nnodes=1"])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()
    assert '"peak_gpu_mb": null' not in lines[-1]
    state = checkpoint.load_verified(checkpoint.checkpoint_path(tmp_path / "gpu", 2))["model"]
    assert all(torch.isfinite(v).all() for v in state.values())
