"""Shared test helpers: a tiny config that trains in seconds on a 2-core CPU, ways to run the
real CLI (one process, torchrun, srun-style tasks) in subprocesses, and model comparisons.

Every process a test starts runs with OMP_NUM_THREADS=1, and every in-process test with one
torch thread (conftest.py), so results compared across processes were computed with the same
thread count, hence the same reduction order inside each kernel.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fedrun import checkpoint

ROOT = Path(__file__).resolve().parents[1]

# digits at 16x16 with a ~10k-parameter U-Net: a round of 4 clients takes well under a second.
TINY = {
    "data.name": "digits", "data.image_size": "16", "data.channels": "1", "data.hflip": "false",
    "model.base_channels": "8", "model.channel_mults": "1,2", "model.blocks_per_level": "1",
    "model.mid_blocks": "2",
    "fed.rounds": "2", "fed.local_epochs": "1", "fed.num_clients": "4", "fed.clients_per_round": "4",
    "optim.lr": "1e-3", "optim.batch_size": "64",
    "sample.per_class": "0", "sample.client_per_class": "-1",  # client grids as sample.per_class
    "diffusion.sample_steps": "5", "eval.steps": "5", "eval.enabled": "false",
    # the authors' method, whatever the digits default uses (guidance doubles every sampling step)
    "model.label_dropout": "0", "diffusion.guidance": "0",
    # a fixed placement, so that tests know which rank trains which client (the default hands
    # clients out on demand; test_world_size.py checks that every placement trains the same bits)
    "fed.placement": "cost",
}

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


def tiny_overrides(out_dir: Path, name: str = "tiny", **extra: object) -> dict[str, str]:
    """TINY plus run.out_dir/run.name plus extra overrides given as section__key=value."""
    o = dict(TINY)
    o["run.out_dir"] = str(out_dir)
    o["run.name"] = name
    for k, v in extra.items():
        o[k.replace("__", ".")] = str(v)
    return o


def as_args(overrides: dict[str, str]) -> list[str]:
    return [f"--{k}={v}" for k, v in overrides.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_in(lo: int, hi: int) -> int:
    """A free TCP port in [lo, hi): the SLURM path derives its port as 20000 + job_id % 20000."""
    for port in random.sample(range(lo, hi), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def clean_env() -> dict[str, str]:
    """This process's environment without launcher or SLURM variables (CI may run inside SLURM)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}


def run_cli(args: list[str], nproc: int = 1, env: dict[str, str] | None = None,
            timeout: float = 300, extra_torchrun: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m fedrun ARGS`` (nproc=1) or ``torchrun --nproc_per_node=nproc -m fedrun ARGS``."""
    if nproc == 1 and not extra_torchrun:
        cmd = [sys.executable, "-m", "fedrun", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *(extra_torchrun or []), "-m", "fedrun", *args]
    full_env = {**clean_env(), "OMP_NUM_THREADS": "1", **(env or {})}
    # cwd: the test's own working directory (conftest.py), never the checkout
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_cli_together(*jobs: tuple[list[str], int]) -> list[subprocess.CompletedProcess]:
    """Several ``run_cli(args, nproc)`` at once (a reference run beside the run it is compared with:
    their process starts overlap on a 2-core machine). Results in the order given."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: run_cli(job[0], nproc=job[1]), jobs))


def run_srun_style(args: list[str], ntasks: int, timeout: float = 240) -> list[tuple[int, str]]:
    """``ntasks`` plain ``python -m fedrun`` processes with only the variables ``srun`` gives its
    tasks (no MASTER_*: fedrun derives the address from the node list and the port from the job
    id). Returns (exit code, stderr) per task."""
    port = free_port_in(20000, 40000)
    base = {**clean_env(), "OMP_NUM_THREADS": "1", "SLURM_NTASKS": str(ntasks), "SLURM_NNODES": "1",
            "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": str(ntasks), "SLURM_JOB_NODELIST": "127.0.0.1",
            "SLURM_JOB_ID": str(port - 20000)}
    cmd = [sys.executable, "-m", "fedrun", *args]
    procs = [subprocess.Popen(cmd, env={**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(ntasks)]
    out = []
    try:
        for p in procs:
            out.append((p.wait(timeout=timeout), p.stderr.read()))
    finally:
        for p in procs:
            p.kill()
    return out


def model_at(run_dir: Path, round_: int) -> dict[str, torch.Tensor]:
    """The global model a run checkpointed after ``round_``."""
    return checkpoint.load_verified(checkpoint.checkpoint_path(run_dir, round_))["model"]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fp32_sum_bound(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """How far a FedAvg average may be from what it averages for reasons of float rounding alone:
    the round's sum is exact (fedrun/flat.py: fixed point, so two layouts give the same bits), but
    each model enters it on a grid of 2^-F and the average is rounded once to fp32; a few fp32 ulps
    of the largest weight, 8 * eps * max|theta|, bound that with room."""
    scale = max(max(t.abs().max().item() for t in a.values()), max(t.abs().max().item() for t in b.values()))
    return 8 * torch.finfo(torch.float32).eps * scale


# --------------------------------------------------------------------------------------------
# No network: a sitecustomize.py put first on a child's PYTHONPATH makes every connect (and name
# lookup) fail and logs each attempt to a file, so an attempt that the code caught and ignored
# is still seen. Under torchrun the ranks must talk over loopback: FEDRUN_NET_ALLOW_LOOPBACK=1.

SITECUSTOMIZE = '''
"""Test-only: block network access in this process and log every attempt."""
import ipaddress, os, socket

_LOG = os.environ["FEDRUN_NET_LOG"]
_LOOPBACK_OK = os.environ.get("FEDRUN_NET_ALLOW_LOOPBACK") == "1"
with open(os.environ["FEDRUN_NET_ACTIVE"], "a") as _f:  # proves the blocker ran in this process
    _f.write(f"{os.getpid()}\\n")


def _loopback(host):
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard(what, host):
    if _LOOPBACK_OK and _loopback(str(host)):
        return
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {what} {host}\\n")
    raise OSError(f"network access blocked by the fedrun test: {what} {host}")


def _checked(method):
    original = getattr(socket.socket, method)

    def wrapper(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _guard(method, address[0])
        return original(self, address, *args, **kwargs)
    return wrapper


for _m in ("connect", "connect_ex", "sendto"):
    setattr(socket.socket, _m, _checked(_m))
_getaddrinfo = socket.getaddrinfo


def _lookup(host, *args, **kwargs):
    if host is not None:
        _guard("getaddrinfo", host)
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _lookup
'''


def offline_env(folder: Path, allow_loopback: bool = False) -> dict[str, str]:
    """Environment for a child process whose network is blocked; see ``network_attempts``."""
    site = folder / "offline_site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"PYTHONPATH": f"{site}:{ROOT}", "FEDRUN_NET_LOG": str(folder / "network_attempts.log"),
           "FEDRUN_NET_ACTIVE": str(folder / "blocker_active.log")}
    if allow_loopback:
        env["FEDRUN_NET_ALLOW_LOOPBACK"] = "1"
    return env


def network_attempts(env: dict[str, str]) -> str:
    """Every blocked attempt the children made ('' if none)."""
    log = Path(env["FEDRUN_NET_LOG"])
    return log.read_text() if log.exists() else ""


def guarded_processes(env: dict[str, str]) -> int:
    """How many processes ran with the blocker installed."""
    return len(Path(env["FEDRUN_NET_ACTIVE"]).read_text().split())


def clients_of_rank(world: int, stateful: bool = False, **extra: object) -> list[list[int]]:
    """Which clients each rank trains under the tiny config when every client takes part (the
    run's fed.placement; ``stateful``: home ranks, as with kept state)."""
    from fedrun.config import load_config
    from fedrun.data import load_split
    from fedrun.federated import placement
    from fedrun.partition import client_shards

    cfg = load_config(None, tiny_overrides(Path("/unused"), "x", **extra))
    shards = client_shards(cfg, load_split(cfg.data, "train").labels.numpy())
    sizes = {k: len(s) for k, s in enumerate(shards)}
    return placement.build_placement(cfg, sizes, world, stateful).assign(list(range(cfg.fed.num_clients)))
