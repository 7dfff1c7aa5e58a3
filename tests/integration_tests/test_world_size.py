"""The result is a function of the config, not of the launch layout: one process, torchrun with
2 ranks, 4 srun-style tasks (the SLURM path without SLURM; one rank idle every round) and
``accelerate launch`` with 2 processes all train the same global model, bit for bit, whichever
placement hands the clients to the ranks; the centralized baseline under DDP trains like one
process.

Why bit for bit: every process runs one thread, so each client's local training is
bit-identical wherever it runs, and the round's sum is exact (fixed point in int64,
fedrun/flat.py): the order and grouping in which ranks add their clients, and the all_reduce adds
the ranks, cannot change it. (Before that sum, an fp32 sum bounded the difference by a few
roundings, which Adam then grew.)
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fedrun import checkpoint
from fedrun.config import load_config
from fedrun.train import train

from helpers import (
    as_args,
    clean_env,
    free_port,
    guarded_processes,
    model_at,
    network_attempts,
    offline_env,
    run_cli,
    run_cli_together,
    run_srun_style,
    same_bits,
    tiny_overrides,
)

# 5 clients, 3 per round: uneven client counts per rank and sampling that changes per round
LAYOUT = dict(fed__num_clients=5, fed__clients_per_round=3, fed__rounds=2)


def assert_same_model(reference: Path, other: Path, rounds: int = 2) -> None:
    for r in range(1, rounds + 1):
        a, b = model_at(reference, r), model_at(other, r)
        assert same_bits(a, b), f"round {r}: the models differ"
    assert not same_bits(model_at(reference, 1), model_at(reference, rounds))  # training moved them


def world_sizes(run_dir: Path) -> list[int]:
    return [json.loads(line)["world_size"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the same config in one plain process. (Not in the test process itself: its
    torch.set_num_threads(1) at run time is not OMP_NUM_THREADS=1 at start, and the two differ
    in the last bits of some kernels, which Adam grows to ~1e-3 within a round.)"""
    out = tmp_path_factory.mktemp("reference")
    res = run_cli(as_args(tiny_overrides(out, "one", **LAYOUT)))
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "one"


def test_torchrun_two_ranks_over_loopback_only(one_process, tmp_path):
    """The default placement (clients handed out on demand: who trains what depends on the ranks'
    speed) over loopback only: the same model as one process (which places by cost), bit for bit."""
    env = offline_env(tmp_path, allow_loopback=True)
    res = run_cli(as_args(tiny_overrides(tmp_path, "two", sample__per_class=1, fed__placement="on_demand",
                                         **LAYOUT)), nproc=2, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert guarded_processes(env) == 3 and network_attempts(env) == ""  # torchrun and both ranks
    # telemetry: each rank's times crossed the all_reduce: its time from the round's start to the
    # all_reduce (at least its local training) and how long it then waited for the slowest
    for rec in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()):
        ready, waits = rec["ready_s_per_rank"], rec["wait_s_per_rank"]
        assert len(ready) == len(waits) == 2 and min(ready) > 0
        assert ready[0] >= rec["local_train_s"] - 1e-3 and ready[0] <= rec["wall_s"]
        assert rec["wait_s"] == waits[0] and min(waits) == 0
        assert waits[0] <= rec["aggregate_s"] + 5e-3  # rank 0 waited inside its all_reduce
        assert sum(rec["clients_per_rank"]) == 3 and sum(rec["steps_per_rank"]) > 0
    assert world_sizes(tmp_path / "two") == [2, 2]  # a real 2-rank group; rank 0 alone logs
    assert (tmp_path / "two" / "samples" / "final.png").exists()
    assert_same_model(one_process, tmp_path / "two")


@pytest.mark.slow  # on demand: test_torchrun_two_ranks_over_loopback_only; by cost: the tests' default
@pytest.mark.parametrize("placement", ["on_demand", "size"])
def test_another_placement_trains_the_same_bits(one_process, tmp_path, placement):
    """Clients handed out on demand or split by image count instead of cost (the tests' fixed
    placement): the same model as one process, bit for bit."""
    res = run_cli(as_args(tiny_overrides(tmp_path, placement, fed__placement=placement, **LAYOUT)), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / placement / "metrics.jsonl").read_text().splitlines()]
    assert [sum(r["clients_per_rank"]) for r in records] == [3, 3]
    assert_same_model(one_process, tmp_path / placement)


@pytest.mark.slow  # ~8 s: four tasks
def test_four_srun_style_tasks_three_clients_per_round_idle_rank_adds_zeros(one_process, tmp_path):
    """The SLURM path without SLURM, with more tasks than clients per round: every round one rank
    has no client and must add zeros, or the model would differ."""
    results = run_srun_style(as_args(tiny_overrides(tmp_path, "srun", **LAYOUT)), ntasks=4)
    for code, err in results:
        assert code == 0, err[-3000:]
    assert "more ranks (4) than clients per round (3)" in results[0][1]
    assert world_sizes(tmp_path / "srun") == [4, 4]
    assert_same_model(one_process, tmp_path / "srun")


@pytest.mark.slow  # ~6 s: accelerate launch
def test_accelerate_launch_two_processes(one_process, tmp_path):
    """``accelerate launch`` sets the same variables as torchrun (it runs torchrun underneath).
    On a CPU it needs --multi_gpu to start more than one process (on a multi-GPU node it turns
    that on by itself)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "fedrun",
           *as_args(tiny_overrides(tmp_path, "accelerate", **LAYOUT))]
    res = subprocess.run(cmd, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert world_sizes(tmp_path / "accelerate") == [2, 2]
    assert_same_model(one_process, tmp_path / "accelerate")


@pytest.mark.slow  # ~7 s: one process and two ranks
def test_centralized_ddp_two_ranks_trains_like_one_process(tmp_path):
    """The centralized baseline under DistributedDataParallel: the same global batches in the same
    order on 1 or 2 ranks, but each rank draws its half-batch's noise and noise levels from its
    own (seed, epoch, rank) stream, so the 2-rank model is a different sample of the same
    training, not the same bits. What must hold: a real 2-rank group, every image seen once per
    epoch, and a loss that falls as far as on one process (within 10 %)."""
    layout = dict(run__mode="centralized", fed__rounds=2)
    with ThreadPoolExecutor(1) as pool:  # the 2 ranks start while the one process trains
        two_ranks = pool.submit(run_cli, as_args(tiny_overrides(tmp_path, "two", **layout)), nproc=2)
        train(load_config(None, tiny_overrides(tmp_path, "one", **layout)))  # statistics only: in-process
        two = two_ranks.result()
    assert two.returncode == 0, two.stderr[-3000:]
    rec = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
           for name in ("one", "two")}
    assert [r["world_size"] for r in rec["two"]] == [2, 2]
    assert [r["images"] for r in rec["two"]] == [1437, 1437]
    for r1, r2 in zip(rec["one"], rec["two"], strict=True):
        assert abs(r2["loss"] - r1["loss"]) <= 0.1 * r1["loss"], (r1["loss"], r2["loss"])
    assert rec["two"][1]["loss"] < rec["two"][0]["loss"]


@pytest.mark.slow  # ~9 s each: one process and two ranks
@pytest.mark.parametrize("drift,kind", [("scaffold", "control"), ("feddyn", "feddyn_grad")])
def test_client_state_follows_its_client_one_process_vs_two_ranks(tmp_path, drift, kind):
    """SCAFFOLD control variates (FedDyn's gradient states) and kept client Adam moments live on
    each client's home rank. After round 1 every client's state was computed from the same global
    model, so it must be bit-identical whether one process or two ranks trained it; so are the
    models (SCAFFOLD's sum of control variates goes through the exact sum too)."""
    state = dict(fed__drift=drift, fed__client_optimizer="keep", ema__sigma_rel="0.1", **LAYOUT)
    one, two = run_cli_together((as_args(tiny_overrides(tmp_path, "one", **state)), 1),
                                (as_args(tiny_overrides(tmp_path, "two", **state)), 2))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    a, b = (checkpoint.load_verified(checkpoint.checkpoint_path(tmp_path / n, 1)) for n in ("one", "two"))
    clients_a, clients_b = a["clients"]["clients"], b["clients"]["clients"]
    assert sorted(clients_a) == sorted(clients_b) and len(clients_a) == 3  # round 1 trained 3 of 5
    for k in clients_a:
        assert torch.equal(clients_a[k][kind], clients_b[k][kind])
        assert clients_a[k][kind].abs().max() > 0
        for t in ("exp_avg", "exp_avg_sq"):
            moments = [c[k]["optimizer"]["state"][0][t] for c in (clients_a, clients_b)]
            assert torch.equal(*moments)
    assert_same_model(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow  # ~9 s each quiet (17 s beside a study): one process and two ranks, three FedBuff steps
@pytest.mark.parametrize("placement,compress", [("on_demand", "none"), ("cost", "int8")])
def test_fedbuff_steps_one_process_vs_two_ranks_same_bits(tmp_path, placement, compress):
    """FedBuff (fedrun/federated/fedbuff.py): each step sums K changes trained from different model
    versions, taken from the versions kept for them; one process and two ranks (clients handed
    out on demand, or on their home ranks with int8 error feedback) train the same bits, and
    the steps really mixed versions (some update was stale)."""
    layout = dict(fed__participation="fedbuff", fed__num_clients=6, fed__concurrency=4, fed__buffer_size=2,
                  fed__speed_sigma="0.5", fed__rounds=3, fed__placement=placement, fed__compress=compress)
    one, two = run_cli_together((as_args(tiny_overrides(tmp_path, "one", **layout)), 1),
                                (as_args(tiny_overrides(tmp_path, "two", **layout)), 2))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_model(tmp_path / "one", tmp_path / "two", rounds=3)
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records] == [2, 2, 2] and any(max(r["staleness"]) > 0 for r in records)
