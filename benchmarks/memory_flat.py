#!/usr/bin/env python
"""Host memory stays flat over many rounds: RSS at round R <= RSS at round 5 + 5 %.

    python benchmarks/memory_flat.py [--rounds 50] [--nproc 1] [--out FILE] [--section.key VALUE ...]

Runs the real CLI (``python -m fedrun``, or torchrun with --nproc > 1) on the digits set with a
tiny U-Net, and watches the training processes from outside: every 20 ms it reads their resident
set size (psutil), and each time metrics.jsonl gains a line it closes that round's window. For
each round it reports
  * ``rss_mb``: the highest RSS seen during the round (the largest rank, if several), and
  * ``peak_rss_mb``: the run's own telemetry (metrics.jsonl, rank 0's peak RSS since start).
A leak (tensors kept per round, a growing history, an optimizer never freed) shows as a rising
``rss_mb``. Checkpoints are written every round, so their path is exercised too.
Output: JSON on stdout and in --out (default benchmarks/results/memory_flat.json);
exit status 1 if memory grew by more than --tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fedrun.config import parse_overrides  # noqa: E402  (no torch: the benchmark only watches)

TINY = {
    "data.name": "digits", "data.image_size": "16", "data.channels": "1", "data.hflip": "false",
    "model.base_channels": "8", "model.channel_mults": "1,2", "model.blocks_per_level": "1",
    "model.mid_blocks": "2", "fed.local_epochs": "1", "fed.num_clients": "4", "fed.clients_per_round": "4",
    "optim.lr": "1e-3", "optim.batch_size": "64", "sample.per_class": "0", "sample.client_per_class": "0",
    "eval.enabled": "false",  # no grids, no scores: every round, the last one too, only trains
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(nproc: int, overrides: dict[str, str]) -> list[str]:
    args = [f"--{k}={v}" for k, v in overrides.items()]
    if nproc == 1:
        return [sys.executable, "-m", "fedrun", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "fedrun", *args]


def training_rss_mb(launcher: psutil.Process, nproc: int) -> float:
    """RSS of the largest training process: the child itself, or torchrun's workers."""
    try:
        procs = [launcher] if nproc == 1 else launcher.children(recursive=True)
        return max((p.memory_info().rss for p in procs), default=0) / 2**20
    except psutil.Error:  # a process ended between listing and reading
        return 0.0


def read_rounds(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    lines = metrics.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def watch(cmd: list[str], metrics: Path, nproc: int, poll_s: float,
          timeout_s: float) -> tuple[dict[int, float], int, str]:
    """Run ``cmd``; per round, the highest training-process RSS seen while it ran."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        launcher = psutil.Process(proc.pid)
        per_round: dict[int, float] = {}
        done, window_peak = 0, 0.0
        t_end = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < t_end:
            window_peak = max(window_peak, training_rss_mb(launcher, nproc))
            rounds = read_rounds(metrics)
            if len(rounds) > done:  # the window of round(s) done+1 .. len(rounds) closed
                for r in rounds[done:]:
                    per_round[int(r["round"])] = round(window_peak, 1)
                done, window_peak = len(rounds), 0.0
            time.sleep(poll_s)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        err.seek(0)
        return per_round, proc.returncode, err.read()[-3000:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--early", type=int, default=5, help="the round to compare against (default 5)")
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) (default 1)")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed growth (default 0.05 = 5 %%)")
    p.add_argument("--poll", type=float, default=0.02, help="seconds between RSS reads")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory_flat.json")
    args, rest = p.parse_known_args(argv)
    if not 1 <= args.early < args.rounds:
        p.error("--early must be between 1 and --rounds - 1")
    extra = parse_overrides(rest)  # fedrun's own --section.key VALUE syntax

    with tempfile.TemporaryDirectory(prefix="fedrun-memory-") as tmp:
        overrides = {**TINY, **extra, "fed.rounds": str(args.rounds), "run.out_dir": tmp, "run.name": "mem"}
        metrics = Path(tmp) / "mem" / "metrics.jsonl"
        t0 = time.perf_counter()
        rss, returncode, stderr = watch(command(args.nproc, overrides), metrics, args.nproc, args.poll,
                                        args.timeout)
        wall = time.perf_counter() - t0
        telemetry = {int(r["round"]): r.get("peak_rss_mb") for r in read_rounds(metrics)}

    early, late = args.early, args.rounds
    result = {
        "benchmark": "memory_flat",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {"rounds": args.rounds, "nproc": args.nproc,
                  "overrides": overrides | {"run.out_dir": "<tmp>"}},
        "returncode": returncode,
        "wall_s": round(wall, 1),
        "rss_mb": rss,  # per round: highest RSS of the largest training process during the round
        "peak_rss_mb": telemetry,  # per round: rank 0's own peak RSS since start (metrics.jsonl)
        "compare": {"early_round": early, "late_round": late, "tolerance": args.tolerance},
    }
    ok = returncode == 0 and early in rss and late in rss
    if ok:
        result["compare"] |= {"rss_early_mb": rss[early], "rss_late_mb": rss[late],
                              "rss_ratio": round(rss[late] / rss[early], 4)}
        ok = rss[late] <= rss[early] * (1 + args.tolerance)
        if telemetry.get(early) and telemetry.get(late):
            result["compare"] |= {"peak_early_mb": telemetry[early], "peak_late_mb": telemetry[late],
                                  "peak_ratio": round(telemetry[late] / telemetry[early], 4)}
            ok = ok and telemetry[late] <= telemetry[early] * (1 + args.tolerance)
    else:
        result["stderr_tail"] = stderr
    result["ok"] = ok

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["compare"] | {"ok": ok, "wall_s": result["wall_s"]}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
