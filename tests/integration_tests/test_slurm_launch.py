"""The launch scripts: launch/slurm.sbatch builds both SLURM launch shapes (dry run, with a
stand-in scontrol), and launch/torchrun_multinode.sh joins two "nodes" on this machine (slow).
The srun-style task path itself is tested in test_world_size.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT, as_args, clean_env, free_port_in, tiny_overrides


def test_sbatch_builds_both_launch_shapes(tmp_path):
    # a stand-in scontrol that expands the node list as SLURM's does
    (tmp_path / "scontrol").write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    (tmp_path / "scontrol").chmod(0o755)
    env = {**clean_env(), "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "6",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "42", "FEDRUN_DRY_RUN": "1",
           "PATH": f"{tmp_path}:/usr/bin:/bin", "FEDRUN_PYTHON": sys.executable}

    def dry(shape: str) -> str:
        out = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--fed.rounds", "3"], text=True,
                             env={**env, "FEDRUN_LAUNCH": shape}, capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    a = dry("torchrun")
    assert "--ntasks=2 --ntasks-per-node=1 --cpus-per-task=24" in a
    assert "--nnodes=2 --nproc_per_node=4" in a and "--rdzv_endpoint=gpu07:29500" in a
    assert a.rstrip().endswith("-m fedrun --fed.rounds 3")
    b = dry("srun")
    assert "--ntasks=8 --ntasks-per-node=4 --cpus-per-task=6" in b and "torch.distributed.run" not in b
    assert b.rstrip().endswith("-m fedrun --fed.rounds 3")
    bad = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch")], text=True, capture_output=True,
                         env={**env, "FEDRUN_LAUNCH": "mpirun"}, timeout=60)
    assert bad.returncode == 2 and "FEDRUN_LAUNCH" in bad.stderr


@pytest.mark.slow
def test_two_nodes_meet_through_the_c10d_rendezvous(tmp_path):
    """launch/torchrun_multinode.sh started twice on this machine, as two 1-GPU "nodes" (~30 s)."""
    port = free_port_in(30000, 60000)
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "NNODES": "2", "NPROC": "1", "HEAD": "127.0.0.1",
           "HEAD_PORT": str(port), "JOB_ID": f"test{port}", "PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "launch" / "torchrun_multinode.sh"),
           *as_args(tiny_overrides(tmp_path, "nodes", fed__num_clients=2, fed__clients_per_round=2))]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs[0][-2000:] + errs[1][-2000:]
    lines = (tmp_path / "nodes" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"world_size": 2' in lines[-1]
