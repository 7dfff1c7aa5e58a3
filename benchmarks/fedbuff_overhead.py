#!/usr/bin/env python
"""Framework overhead per server step: FedBuff against a synchronous FedAvg round, same workload.

    python benchmarks/fedbuff_overhead.py [--rounds 8] [--repeats 3] [--out FILE] [--section.key VALUE ...]

The workload is the cross-device straggler federation of the async study
(configs/digits_cross_device_scale.toml: 1,000 digits clients of 1-2 images, its 32-channel
U-Net, one local step per client) with lognormal(0.5) client speeds, and every step trains K = 20
clients either way:

* **sync**: synchronous FedAvg, ``fed.clients_per_round = 20`` uniformly (the simulated clock on,
  everybody reports);
* **fedbuff**: ``fed.participation = "fedbuff"``, C = 50 clients training at once, a server step
  after every K = 20 arrivals; the clients start from past model versions kept in host memory,
  the buffer sums changes (a float64 difference per number), the staleness weight scales them.

Overhead is what a round costs besides its local steps: the round's wall time without evaluation
and checkpoint, minus the seconds spent in ``train_step`` (every local step, timed around it with a
device sync; benchmarks/round_throughput.py's ``ComputeClock``). It covers loading each client's
start model, the update chain, the exact sum, the all_reduce, the server step and FedBuff's
version keeping. The two runs alternate (sync, fedbuff, fedbuff, sync, ...) in one process, R
rounds each, ``--repeats`` times, so that both see the same machine load; round 1 of every run is
warm-up. Figures: the median overhead per step (and per client) of each, over all steady rounds,
their ratio (goal: FedBuff <= 1.1 x sync, issue 26), and the per-repeat ratios (their range and
median show the machine's noise). ``buffer_add_ms_per_client`` times FedBuff's one structural
extra per client apart, without the rounds' noise: its entry into the exact sum as a change
(a float64 difference from the start version) against a synchronous client's model. Checkpoints
are left out (FedBuff's carry the kept versions).
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
    """Seconds in local steps per round (``train_step`` wrapped in place); a round-end hook."""

    def __init__(self) -> None:
        self.seconds, self.rounds = 0.0, {}
        inner = plain_client.train_step

        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds += time.perf_counter() - t
            return out
        plain_client.train_step = timed

    def start(self) -> None:
        self.seconds, self.rounds = 0.0, {}

    def __call__(self, record: dict[str, Any]) -> None:
        self.rounds[record["round"]] = self.seconds
        self.seconds = 0.0


def run_once(mode: str, rounds: int, folder: Path, clock: ComputeClock, extra: dict[str, str],
             index: int) -> list[dict[str, Any]]:
    """One run of ``rounds`` rounds; per steady round its overhead and what it is made of."""
    name = f"{mode}_{index}"
    overrides = {**COMMON, **MODES[mode], **extra, "fed.rounds": str(rounds), "run.out_dir": str(folder),
                 "run.name": name}
    cfg = load_config(CONFIG, overrides)
    clock.start()
    train(cfg, on_round_end=[clock])
    records = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
    out = []
    for rec in records[1:]:  # round 1: warm-up
        compute = clock.rounds[rec["round"]]
        rest = rec["wall_s"] - rec["eval_s"] - rec["checkpoint_s"]
        out.append({"round": rec["round"], "clients": rec["clients_trained"], "wall_s": rec["wall_s"],
                    "compute_s": round(compute, 4), "overhead_s": round(rest - compute, 4),
                    "update_chain_s": rec["update_chain_s"], "aggregate_s": rec["aggregate_s"],
                    "checkpoint_s": rec["checkpoint_s"],
                    "staleness": rec.get("staleness"), "model_version": rec.get("model_version")})
    return out


def buffer_add_ms(extra: dict[str, str], clients: int = 60) -> dict[str, float]:
    """One client's entry into the exact sum (``RoundBuffer.add``) on the workload's model, ms:
    a model (synchronous FedAvg) against a change from its start version (FedBuff: the float64
    difference and the staleness weight), alternating, best of 3: the per-client part of the
    difference between the two, without the rounds' noise."""
    cfg = load_config(CONFIG, {**COMMON, **extra})
    model, _ = build(cfg, 10, torch.device("cpu"))
    P = num_flat(model)
    start = flatten(model).clone()
    times: dict[str, list[float]] = {"models": [], "changes": []}
    for _ in range(3):
        for changes in (False, True):
            buf = RoundBuffer(P, 1, {}, torch.device("cpu"), max_clients=cfg.fed.num_clients, max_weight=2,
                              changes=changes)
            buf.begin_round(1, list(range(clients)))
            t = time.perf_counter()
            for k in range(clients):
                update = ClientUpdate(k, model, start, 2, 2.0, {}, scale=0.5 if changes else 1.0)
                buf.add(model, 2.0, 0.1, 2, 1, client=k, update=update)
            times["changes" if changes else "models"].append(1e3 * (time.perf_counter() - t) / clients)
    return {"parameters": P, **{k: round(min(v), 3) for k, v in times.items()}}


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def ms(key: str) -> float:
        return round(1e3 * statistics.median(r[key] for r in rounds), 2)
    per_client = statistics.median(r["overhead_s"] / r["clients"] for r in rounds)
    share = sum(r["overhead_s"] for r in rounds) / sum(r["wall_s"] for r in rounds)
    return {"steps": len(rounds), "overhead_ms_per_step": ms("overhead_s"),
            "overhead_ms_per_client": round(1e3 * per_client, 3), "compute_ms_per_step": ms("compute_s"),
            "wall_ms_per_step": ms("wall_s"), "update_chain_ms_per_step": ms("update_chain_s"),
            "aggregate_ms_per_step": ms("aggregate_s"), "overhead_share_of_step": round(share, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8, help="rounds (server steps) per run; round 1 is warm-up")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating (default 3)")
    p.add_argument("--goal", type=float, default=1.1, help="FedBuff / sync overhead allowed (default 1.1)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fedbuff_overhead.json")
    args, rest = p.parse_known_args(argv)
    if args.rounds < 2 or args.repeats < 1:
        p.error("--rounds must be >= 2 (round 1 is warm-up) and --repeats >= 1")
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
            a, b = (statistics.median(r["overhead_s"] for r in this[m]) for m in ("sync", "fedbuff"))
            pairs.append({"repeat": i, "sync_ms": round(1e3 * a, 2), "fedbuff_ms": round(1e3 * b, 2),
                          "ratio": round(b / a, 4) if a > 0 else None})
    add = buffer_add_ms(extra)
    wall = time.perf_counter() - t0
    s = {m: summary(per_mode[m]) for m in MODES}
    ratio = s["fedbuff"]["overhead_ms_per_step"] / s["sync"]["overhead_ms_per_step"]
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
        "overhead_ratio_fedbuff_over_sync": round(ratio, 4),
        "overhead_ratio_per_repeat": pairs,
        "overhead_ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "overhead_ratio_median_of_repeats": round(statistics.median(ratios), 4) if ratios else None,
        "buffer_add_ms_per_client": add,
        "goal": args.goal,
        "within_goal": ratio <= args.goal,
        "rounds": per_mode,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(portable(json.dumps(result, indent=2)) + "\n")
    shown = ("summary", "overhead_ratio_fedbuff_over_sync", "overhead_ratio_range",
             "overhead_ratio_median_of_repeats", "buffer_add_ms_per_client", "within_goal", "wall_s")
    print(json.dumps({k: result[k] for k in shown}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
