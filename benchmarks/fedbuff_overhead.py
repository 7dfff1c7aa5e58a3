#!/usr/bin/env python
"""Framework overhead per server step: FedBuff against a synchronous FedAvg round, same workload.

    python benchmarks/fedbuff_overhead.py [--rounds 10] [--repeats 6] [--out FILE] [--section.key VALUE ...]

The workload is the cross-device straggler federation of the async study
(configs/digits_cross_device_scale.toml: 1,000 digits clients of 1-2 images, its 32-channel
U-Net, one local step per client) with lognormal(0.5) client speeds, and every step trains K = 20
clients either way:

* **sync**: synchronous FedAvg, ``fed.clients_per_round = 20`` uniformly (the simulated clock on,
  everybody reports);
* **fedbuff**: ``fed.participation = "fedbuff"``, C = 50 clients training at once, a server step
  after every K = 20 arrivals; the clients start from past model versions kept in host memory,
  the buffer sums changes (the models, then each start version subtracted once), the staleness
  weight scales them.

Overhead is what a round costs besides its local steps: this process's CPU seconds from the end
of the round before to the end of this one, minus the CPU seconds spent in ``train_step`` (every
local step, timed around it; benchmarks/round_throughput.py's ``ComputeClock``). It covers
loading each client's start model, the update chain, the exact sum, the all_reduce, the server
step, the record and FedBuff's version keeping. CPU seconds, not wall seconds, make the headline:
on a shared machine the wall clock of a round says as much about the other jobs as about the
round (the wall-clock figures are there too). The two runs alternate (sync, fedbuff, fedbuff,
sync, ...) in one process, R rounds each, ``--repeats`` times; rounds 2 .. R - 1 count (round 1
warms up, round R writes the checkpoint). Figures: the median overhead per step (and per client)
of each over all counted rounds, their ratio (goal: FedBuff <= 1.1 x sync, issue 26), and the
per-repeat ratios (their range and median show the noise). ``buffer_step_ms`` times FedBuff's
structural extra apart: a step's exact sum of K changes from 4 start versions (each version
subtracted once after the sum) against a synchronous round's K models, best of 5.
Output: JSON on stdout and in --out (default benchmarks/results/fedbuff_overhead.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fedrun.config import load_config, parse_overrides  # noqa: E402
from fedrun.federated import client as plain_client  # noqa: E402
from fedrun.flat import RoundBuffer, flatten, num_flat  # noqa: E402
from fedrun.models import build  # noqa: E402
from fedrun.parts import ClientUpdate  # noqa: E402
from fedrun.train import train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' own modules
from portable import portable  # noqa: E402

CONFIG = ROOT / "configs" / "digits_cross_device_scale.toml"
K, C = 20, 50
COMMON = {"eval.enabled": "false", "sample.per_class": "0", "sample.client_per_class": "0",
          "checkpoint.every": "100000", "checkpoint.keep": "1", "run.threads": "1", "run.device": "cpu",
          "fed.speed_sigma": "0.5", "fed.sim_client_s": "2"}
MODES = {
    "sync": {"fed.participation": "uniform", "fed.clients_per_round": str(K)},
    "fedbuff": {"fed.participation": "fedbuff", "fed.concurrency": str(C), "fed.buffer_size": str(K)},
}


class ComputeClock:
    """Seconds in local steps per round (``train_step`` wrapped in place), wall and this process's
    CPU, and the process's CPU seconds at each round's end; a round-end hook."""

    def __init__(self) -> None:
        self.start()
        inner = plain_client.train_step

        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            t, c = time.perf_counter(), time.process_time()
            out = inner(*args, **kwargs)
            self.seconds += time.perf_counter() - t
            self.cpu += time.process_time() - c
            return out
        plain_client.train_step = timed

    def start(self) -> None:
        self.seconds, self.cpu = 0.0, 0.0
        self.rounds: dict[int, tuple[float, float, float]] = {}  # round -> (wall, cpu in steps, cpu at end)

    def __call__(self, record: dict[str, Any]) -> None:
        self.rounds[record["round"]] = (self.seconds, self.cpu, time.process_time())
        self.seconds = self.cpu = 0.0


def run_once(mode: str, rounds: int, folder: Path, clock: ComputeClock, extra: dict[str, str],
             index: int) -> list[dict[str, Any]]:
    """One run of ``rounds`` rounds; per steady round (2 .. R - 1: round 1 warms up, round R
    writes the checkpoint) its overhead, in wall and in CPU seconds, and what it is made of."""
    name = f"{mode}_{index}"
    overrides = {**COMMON, **MODES[mode], **extra, "fed.rounds": str(rounds), "run.out_dir": str(folder),
                 "run.name": name}
    cfg = load_config(CONFIG, overrides)
    clock.start()
    train(cfg, on_round_end=[clock])
    records = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
    out = []
    for rec in records[1:-1]:
        r = rec["round"]
        compute, compute_cpu, end_cpu = clock.rounds[r]
        round_cpu = end_cpu - clock.rounds[r - 1][2]  # from the hook of round r - 1 to its own
        rest = rec["wall_s"] - rec["eval_s"] - rec["checkpoint_s"]
        out.append({"round": r, "clients": rec["clients_trained"], "wall_s": rec["wall_s"],
                    "compute_s": round(compute, 4), "overhead_s": round(rest - compute, 4),
                    "cpu_s": round(round_cpu, 4), "compute_cpu_s": round(compute_cpu, 4),
                    "overhead_cpu_s": round(round_cpu - compute_cpu, 4),
                    "update_chain_s": rec["update_chain_s"], "aggregate_s": rec["aggregate_s"],
                    "staleness": rec.get("staleness"), "model_version": rec.get("model_version")})
    return out


def buffer_step_ms(extra: dict[str, str], versions: int = 4, repeats: int = 5) -> dict[str, Any]:
    """One step's exact sum on the workload's model, ms: K clients' ``RoundBuffer.add`` and the
    ``aggregate`` after it, synchronous (models) against FedBuff (changes: each client's model and
    its factor in its start version's slot, then ``versions`` start versions subtracted once
    each), alternating, best of ``repeats``: FedBuff's structural cost apart, without the
    rounds' noise."""
    cfg = load_config(CONFIG, {**COMMON, **extra})
    model, _ = build(cfg, 10, torch.device("cpu"))
    P = num_flat(model)
    flats = {v: flatten(model).clone() for v in range(versions)}
    times: dict[str, list[float]] = {"sync": [], "fedbuff": []}
    for _ in range(repeats):
        for mode in ("sync", "fedbuff"):
            slots = versions if mode == "fedbuff" else 0
            buf = RoundBuffer(P, 1, {}, torch.device("cpu"), max_clients=cfg.fed.num_clients, max_weight=2,
                              changes=slots)
            buf.bases = flats.__getitem__
            buf.begin_round(versions, list(range(K)))
            t = time.perf_counter()
            for k in range(K):
                v = k % versions
                update = ClientUpdate(k, model, flats[v], 2, 2.0, {}, round=versions,
                                      scale=0.5 if slots else 1.0, version=v if slots else -1)
                buf.add(model, 2.0, 0.1, 2, 1, client=k, update=update)
            buf.aggregate(versions, list(range(K)))
            times[mode].append(1e3 * (time.perf_counter() - t))
    best = {k: round(min(v), 3) for k, v in times.items()}
    return {"parameters": P, "clients": K, "start_versions": versions, **best,
            "ratio": round(best["fedbuff"] / best["sync"], 4)}


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def ms(key: str) -> float:
        return round(1e3 * statistics.median(r[key] for r in rounds), 2)
    per_client = statistics.median(r["overhead_cpu_s"] / r["clients"] for r in rounds)
    share = sum(r["overhead_cpu_s"] for r in rounds) / sum(r["cpu_s"] for r in rounds)
    return {"steps": len(rounds), "overhead_cpu_ms_per_step": ms("overhead_cpu_s"),
            "overhead_cpu_ms_per_client": round(1e3 * per_client, 3),
            "compute_cpu_ms_per_step": ms("compute_cpu_s"),
            "overhead_cpu_share_of_step": round(share, 4), "overhead_wall_ms_per_step": ms("overhead_s"),
            "compute_wall_ms_per_step": ms("compute_s"), "wall_ms_per_step": ms("wall_s"),
            "update_chain_ms_per_step": ms("update_chain_s"), "aggregate_ms_per_step": ms("aggregate_s")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="rounds (server steps) per run (default 10)")
    p.add_argument("--repeats", type=int, default=6, help="runs of each, alternating (default 6)")
    p.add_argument("--goal", type=float, default=1.1, help="FedBuff / sync overhead allowed (default 1.1)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fedbuff_overhead.json")
    args, rest = p.parse_known_args(argv)
    if args.rounds < 3 or args.repeats < 1:
        p.error("--rounds must be >= 3 (round 1 warms up, round R checkpoints) and --repeats >= 1")
    extra = parse_overrides(rest)  # fedrun's own --section.key VALUE syntax
    torch.set_num_threads(1)
    clock = ComputeClock()
    per_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    pairs: list[dict[str, float]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedrun-fedbuff-overhead-") as tmp:
        for i in range(args.repeats):
            order = list(MODES) if i % 2 == 0 else list(MODES)[::-1]  # ABBA: drifts in load cancel
            this: dict[str, list[dict[str, Any]]] = {}
            for mode in order:
                this[mode] = run_once(mode, args.rounds, Path(tmp), clock, extra, i)
                per_mode[mode] += this[mode]
            a, b = (statistics.median(r["overhead_cpu_s"] for r in this[m]) for m in ("sync", "fedbuff"))
            aw, bw = (statistics.median(r["overhead_s"] for r in this[m]) for m in ("sync", "fedbuff"))
            pairs.append({"repeat": i, "sync_cpu_ms": round(1e3 * a, 2), "fedbuff_cpu_ms": round(1e3 * b, 2),
                          "ratio": round(b / a, 4) if a > 0 else None,
                          "wall_ratio": round(bw / aw, 4) if aw > 0 else None})
    add = buffer_step_ms(extra)
    wall = time.perf_counter() - t0
    s = {m: summary(per_mode[m]) for m in MODES}
    ratio = s["fedbuff"]["overhead_cpu_ms_per_step"] / s["sync"]["overhead_cpu_ms_per_step"]
    wall_ratio = s["fedbuff"]["overhead_wall_ms_per_step"] / s["sync"]["overhead_wall_ms_per_step"]
    ratios = [q["ratio"] for q in pairs if q["ratio"] is not None]
    stale = [t for r in per_mode["fedbuff"] for t in (r["staleness"] or [])]
    result = {
        "benchmark": "fedbuff_overhead",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "torch": torch.__version__, "device": "cpu", "threads": 1},
        "command": " ".join(["python", "benchmarks/fedbuff_overhead.py", *(argv if argv is not None
                                                                            else sys.argv[1:])]),
        "setup": {"config": str(CONFIG), "rounds_per_run": args.rounds, "repeats": args.repeats,
                  "clients_per_step": K, "fedbuff_concurrency": C, "common": COMMON, "modes": MODES,
                  "extra": extra},
        "wall_s": round(wall, 1),
        "summary": s,
        "fedbuff_staleness": {"mean": round(statistics.fmean(stale), 3) if stale else None,
                              "max": max(stale, default=None)},
        "overhead_ratio_fedbuff_over_sync": round(ratio, 4),  # CPU seconds of the process
        "overhead_wall_ratio_fedbuff_over_sync": round(wall_ratio, 4),
        "overhead_ratio_per_repeat": pairs,
        "overhead_ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "overhead_ratio_median_of_repeats": round(statistics.median(ratios), 4) if ratios else None,
        "buffer_step_ms": add,
        "goal": args.goal,
        "within_goal": ratio <= args.goal,
        "rounds": per_mode,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(portable(json.dumps(result, indent=2)) + "\n")
    shown = ("summary", "overhead_ratio_fedbuff_over_sync", "overhead_wall_ratio_fedbuff_over_sync",
             "overhead_ratio_range",
             "overhead_ratio_median_of_repeats", "buffer_step_ms", "within_goal", "wall_s")
    print(json.dumps({k: result[k] for k in shown}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
