"""Shared test helpers: a tiny config that trains in seconds on a 2-core CPU, and a way to
run the real CLI (single process or torchrun) in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Classifiers and reference statistics are cached once per test session, never in ~/.cache;
# subprocesses inherit this.
os.environ.setdefault("FEDRUN_CACHE_DIR", tempfile.mkdtemp(prefix="fedrun-test-cache-"))

# digits at 16x16 with a ~10k-parameter U-Net: a round of 4 clients takes well under a second.
TINY = {
    "data.name": "digits", "data.image_size": "16", "data.channels": "1", "data.hflip": "false",
    "model.base_channels": "8", "model.channel_mults": "1,2", "model.blocks_per_level": "1",
    "model.mid_blocks": "2",
    "fed.rounds": "2", "fed.local_epochs": "1", "fed.num_clients": "4", "fed.clients_per_round": "4",
    "optim.lr": "1e-3", "optim.batch_size": "64",
    "sample.per_class": "0", "diffusion.sample_steps": "5", "eval.steps": "5",
}


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


def run_cli(args: list[str], nproc: int = 1, env: dict[str, str] | None = None,
            timeout: float = 300, extra_torchrun: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m fedrun ARGS`` (nproc=1) or ``torchrun --nproc_per_node=nproc -m fedrun ARGS``."""
    if nproc == 1 and not extra_torchrun:
        cmd = [sys.executable, "-m", "fedrun", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *(extra_torchrun or []), "-m", "fedrun", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """In-process training in tests uses one thread: stable timing, no oversubscription."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
