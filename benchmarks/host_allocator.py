#!/usr/bin/env python
"""glibc's default allocator against fedrun's (``run.keep_freed_memory``), on the default job.

    python benchmarks/host_allocator.py [--rounds 20] [--nproc 2] [--repeats 2] [--out FILE]

Runs the digits default (configs/digits.toml: training, then the final evaluation with its client
grids and scores) through torchrun ``--repeats`` times in each mode, the modes alternating so
the machine's load weighs on both alike. Per run: wall seconds, the ranks' user and system CPU
seconds and minor page faults (this process's reaped children), the final evaluation's seconds
(metrics.jsonl ``eval_s``) and the largest rank's peak RSS (``peak_rss_mb``). Checks that both
modes end with the same model bits and scores. Output: JSON on stdout and in ``--out`` (default
benchmarks/results/host_allocator_cpu.json), medians per mode and their ratios (kept / system).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # fedrun from this checkout
sys.path.insert(1, str(Path(__file__).resolve().parent))
from portable import portable  # noqa: E402

MODES = {"system": "false", "kept": "true"}  # run.keep_freed_memory


def model_digest(run_dir: Path) -> str:
    """SHA-256 of the last checkpoint's model tensors (not its timings)."""
    import torch

    from fedrun.init_from import state_sha256
    last = sorted((run_dir / "checkpoints").glob("round_*.pt"))[-1]
    return state_sha256(torch.load(last, map_location="cpu", weights_only=False)["model"])


def run_once(mode: str, rounds: int, nproc: int, tmp: Path, i: int) -> dict[str, Any]:
    name = f"{mode}_{i}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fedrun", "--fed.rounds", str(rounds), "--run.out_dir", str(tmp), "--run.name", name,
           "--run.keep_freed_memory", MODES[mode]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"host_allocator: {mode} run failed:\n{proc.stderr[-3000:]}")
    run_dir = tmp / name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_s": round(wall, 2), "user_s": round(after.ru_utime - before.ru_utime, 2),
            "system_s": round(after.ru_stime - before.ru_stime, 2),
            "minor_faults": after.ru_minflt - before.ru_minflt,
            "final_eval_s": rows[-1].get("eval_s"),
            "peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in rows),
            "fid_test": summary["scores"].get("fid_test"), "model_sha256": model_digest(run_dir)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "host_allocator_cpu.json")
    args = p.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="fedrun-allocator-") as tmp:
        for i in range(args.repeats):
            for mode in MODES:
                runs[mode].append(run_once(mode, args.rounds, args.nproc, Path(tmp), i))
                print(f"{mode} {i}: {runs[mode][-1]}", flush=True)
    keys = ("wall_s", "user_s", "system_s", "minor_faults", "final_eval_s", "peak_rss_mb")
    median = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    same = len({r["model_sha256"] for rs in runs.values() for r in rs}) == 1 and \
        len({r["fid_test"] for rs in runs.values() for r in rs}) == 1
    result = {
        "benchmark": "host_allocator",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()[0]},
        "setup": {"config": "configs/digits.toml", "rounds": args.rounds, "nproc": args.nproc,
                  "repeats": args.repeats},
        "median": median,
        "ratio_kept_over_system": {k: round(median["kept"][k] / median["system"][k], 3)
                                   for k in keys if median["system"][k]},
        "same_model_and_scores": same,
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.write_text(portable(text) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
