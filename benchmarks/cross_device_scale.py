"""Cross-device scale: per-client overhead and memory against the number of clients N and the
clients per round K, with kept per-client state and without.

    python benchmarks/cross_device_scale.py --out benchmarks/results/cross_device_scale_cpu.json
    python benchmarks/cross_device_scale.py --quick          # a smaller grid, a few minutes

Every point is one run of ``benchmarks/round_throughput.py`` in a process of its own (peak RSS is
a per-process figure), on one rank with one thread, with the model and method of
``configs/digits_cross_device_scale.toml`` on the ``synthetic`` set at 16x16x1 with 5 images per
client (so that N = 10,000 has data: the digits have 1,437 images), no checkpoints
(``--no-checkpoint``: the last one would gather every kept state on rank 0) and no plain-loop
baseline. Per point: ``overhead_ms_per_client`` (median over the steady rounds of the round's
wall time minus its local steps, per client), peak host RSS after the first and the last round
and at the end, peak device memory (None on a CPU: there is no device memory to measure; on a
GPU the kept state of clients not in the round stays in host memory, ``fed.client_state_memory_mb``),
and the kept state at the end (clients, MiB in host memory, clients in files).

The grid: N = 100 / 1,000 / 10,000 at K = 1 % of N (at least 10) with ``fed.client_optimizer =
"reset"`` (stateless: memory should not depend on N) and ``"keep"`` (2 P floats per client that
has trained, 2.7 MB for this model; host memory grows with the clients seen, not with N; a run
with ``--fed.client_state_memory_mb`` small shows the files take over); and K = 10 / 20 / 50 /
100 at N = 1,000 (the overhead's scaling in K). The JSON has every point's figures and the
command that made it; a table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' own modules
from portable import portable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_cross_device_scale.toml"


def points(quick: bool) -> list[dict[str, Any]]:
    ns = (100, 1000) if quick else (100, 1000, 10000)
    out = [{"N": n, "K": max(10, n // 100), "optimizer": opt, "state_mb": 4096}
           for opt in ("reset", "keep") for n in ns]
    if not quick:  # the files take over: kept state past 256 MiB of host memory
        out.append({"N": 10000, "K": 100, "optimizer": "keep", "state_mb": 256})
    out += [{"N": 1000, "K": k, "optimizer": "reset", "state_mb": 4096}
            for k in ((10, 50) if quick else (10, 20, 50, 100))]
    return out


def run_point(p: dict[str, Any], rounds: int, folder: Path) -> dict[str, Any]:
    out = folder / f"n{p['N']}_k{p['K']}_{p['optimizer']}_{p['state_mb']}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "round_throughput.py"), "--config", str(CONFIG),
           "--rounds", str(rounds), "--no-plain", "--no-checkpoint", "--out", str(out),
           "--data.name", "synthetic", "--data.synthetic_size", str(5 * p["N"]), "--data.num_classes", "10",
           "--fed.num_clients", str(p["N"]), "--fed.clients_per_round", str(p["K"]),
           "--fed.client_optimizer", p["optimizer"], "--fed.client_state_memory_mb", str(p["state_mb"]),
           "--eval.enabled", "false", "--run.threads", "1", "--run.device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"cross_device_scale: {p} failed:\n{res.stderr[-3000:]}")
    r = json.loads(out.read_text())
    s = r["summary"]
    return {**p, "rounds": rounds, "command": " ".join(cmd[1:]),
            "overhead_ms_per_client": s["overhead_ms_per_client"],
            "compute_share_of_round": s["compute_share_of_round"],
            "wall_s_per_round": round(sum(x["wall_s"] for x in r["rounds"][1:]) / max(rounds - 1, 1), 4),
            "peak_rss_mb_round1_vs_last": s["peak_rss_mb_round1_vs_last"][0],
            "peak_rss_mb_end": s["peak_rss_mb_end_per_rank"][0],
            "peak_device_mb": s["peak_gpu_mb_round1_vs_last"][0][1],  # None on a CPU
            "client_state": s["client_state_per_rank"][0],
            # the training set held in memory (5 images per client at 16x16x1, fp32): it grows with
            # N by construction; RSS minus it is what N alone costs
            "data_mb": round(5 * p["N"] * 16 * 16 * 4 / 2**20, 1),
            "parameters": r["setup"]["parameters"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds per point (round 1 is warm-up)")
    ap.add_argument("--quick", action="store_true", help="N up to 1,000 and fewer K")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default: print only)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedrun-scale-") as tmp:
        for p in points(args.quick):
            rows.append(run_point(p, args.rounds, Path(tmp)))
            row = rows[-1]
            first, last = row["peak_rss_mb_round1_vs_last"]
            print(f"N {row['N']:>6} K {row['K']:>4} {row['optimizer']:>5} state<= {row['state_mb']:>5} MiB: "
                  f"overhead {row['overhead_ms_per_client']:7.2f} ms/client, RSS round 1 / last "
                  f"{first:7.0f} / {last:7.0f} MB, device {row['peak_device_mb']}, kept state "
                  f"{row['client_state']}", flush=True)
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": {"cpu_cores": os.cpu_count()}, "config": str(CONFIG.relative_to(ROOT)),
              "rounds": args.rounds, "points": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(portable(json.dumps(result, indent=2) + "\n"))
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
