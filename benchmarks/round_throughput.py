"""Throughput of FedAvg rounds, against two baselines measured in the same run.

    python benchmarks/round_throughput.py [--config FILE] [--rounds R] [--section.key VALUE ...]
    torchrun --nproc_per_node=8 benchmarks/round_throughput.py --rounds 5

What it measures (every rank takes part; rank 0 prints and writes the JSON):
* R rounds of the real round loop (federated.rounds.FederatedRounds), each split into local training,
  aggregation, checkpoint and evaluation (+ the rest: server step, bookkeeping);
* img/s per rank and in total, over the steady rounds (2..R; round 1 pays for warm-up: cuDNN
  autotuning, torch.compile, allocator growth);
* aggregation: its time on the rank that reached the all_reduce last (the shortest of the
  ranks' times; the others include waiting for that rank), in ms and GB/s, next to a raw
  all_reduce of the same number of bytes timed in this run (median of --raw-iters before and
  after the rounds, each after a barrier): ratio = aggregation / raw all_reduce;
* FL efficiency: the same model trained by a plain loop (one Adam, full batches, no clients, no
  aggregation) on as many images as the rank trained in the steady rounds, in chunks run right
  after each FL round on every rank at once, so that both see the same machine load:
  efficiency = FL img/s / plain img/s;
* peak host RSS and peak GPU memory per rank, round 1 against round R;
* the update chain (``update_chain_s``: what the rules do to each update before the sum, e.g.
  compression's encode + decode with ``--fed.compress int8``, DP-FedAvg's clipping) per round
  and as a share of the round, and the bytes a real client would send and receive
  (``bytes_up`` / ``bytes_down`` per round and per client; the simulation all-reduces fp32);
* waiting: each rank's time from the round's start to the all_reduce (``ready_s_per_rank``) and
  how long it then waited for the slowest (``wait_s_per_rank``), their share of the ranks' time;
* the per-client overhead: each round's wall time (without evaluation) minus its compute (the
  local steps, timed around every ``train_step`` with a device sync), per client the rank
  trained, on rank 0 (``overhead_ms_per_client``; cross-device runs: ``cross_device_scale.py``).

``--no-checkpoint`` leaves checkpoints out (the last round's would gather every client's kept
state on rank 0: not what a memory figure of the rounds should show).

Data: the "synthetic" set unless --data.name is given, so no download is needed; its size is
data.synthetic_size (default 5000 images of 32x32x3). Everything else is the config as fedrun
would run it (defaults: the 23.2M-parameter U-Net, batch 512, 10 clients, 5 local epochs).
Output: --out, default benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fedrun import dist, seeding  # noqa: E402
from fedrun.adapters import make_trainable  # noqa: E402
from fedrun.checkpoint import Checkpointer  # noqa: E402
from fedrun.config import Config, load_config, parse_overrides  # noqa: E402
from fedrun.data import ImageSet, load_split, random_hflip  # noqa: E402
from fedrun.diffusion import Diffusion  # noqa: E402
from fedrun.ema import PowerEMA  # noqa: E402
from fedrun.evaluation.evaluator import Evaluator  # noqa: E402
from fedrun.federated import client as plain_client  # noqa: E402
from fedrun.federated.participation import build_participation  # noqa: E402
from fedrun.federated.rounds import FederatedRounds, RoundHook  # noqa: E402
from fedrun.flat import buffer_size, num_flat  # noqa: E402
from fedrun.logs import RunLogger  # noqa: E402
from fedrun.models import build, count_parameters  # noqa: E402
from fedrun.partition import client_shards  # noqa: E402
from fedrun.precision import autocast_dtype  # noqa: E402
from fedrun.privacy.mechanisms import build_mechanism  # noqa: E402
from fedrun.telemetry import host_peak_rss_mb  # noqa: E402
from fedrun.train import build_round_parts  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' own modules
from portable import portable  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="fedrun TOML file (default: fedrun's defaults)")
    p.add_argument("--rounds", type=int, default=3, help="rounds to run (default 3; round 1 is warm-up)")
    p.add_argument("--name", default=None, help="result name (default: from the config and layout)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/<name>.json)")
    p.add_argument("--raw-iters", type=int, default=20, help="timed raw all_reduce repetitions")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-loop baseline")
    p.add_argument("--keep-run", action="store_true", help="keep the run directory (checkpoints, metrics)")
    p.add_argument("--no-checkpoint", action="store_true", help="write no checkpoint (memory figures)")
    args, rest = p.parse_known_args(argv)
    overrides = parse_overrides(rest)
    overrides.setdefault("data.name", "synthetic")
    overrides.setdefault("sample.per_class", "0")  # no sample grids: they are not training
    overrides["fed.rounds"] = str(args.rounds)
    return args, overrides


# --------------------------------------------------------------------------------------------
# Baselines


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_allreduce_ms(numel: int, device: torch.device, iters: int) -> list[float]:
    """Times of all_reduce(SUM) of one int64 buffer of ``numel`` elements (the round's buffer),
    each after a barrier."""
    if not torch_dist.is_initialized():
        return [0.0] * iters
    buf = torch.ones(numel, dtype=torch.int64, device=device)
    for _ in range(3):  # warm-up: NCCL/gloo connections, allocator
        torch_dist.all_reduce(buf)
    sync(device)
    times = []
    for _ in range(iters):
        torch_dist.barrier()
        sync(device)
        t = time.perf_counter()
        torch_dist.all_reduce(buf)
        sync(device)
        times.append(1e3 * (time.perf_counter() - t))
    return times


class PlainLoop:
    """The textbook loop on the same model: one Adam, full batches, no clients, no aggregation."""

    def __init__(self, cfg: Config, model: torch.nn.Module, diffusion: Diffusion, data: ImageSet,
                 device: torch.device):
        o = cfg.optim
        self.cfg, self.model, self.diffusion, self.data, self.device = cfg, model, diffusion, data, device
        self.net = torch.compile(model) if cfg.train.compile else model
        self.opt = torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), foreach=True)
        self.amp = autocast_dtype(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is torch.float16)
        self.fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.g = torch.Generator(device="cpu").manual_seed(0)
        self.sobol = seeding.sobol_engine(0, 0, 0)
        self.images, self.seconds = 0, 0.0
        self.chunks: list[tuple[int, float]] = []  # (images, seconds) per run() call
        model.train()
        for _ in range(3 if cfg.train.compile else 2):  # warm-up, untimed
            self.step()

    def step(self) -> None:
        bs, data, device = self.cfg.optim.batch_size, self.data, self.device
        idx = torch.randint(len(data), (bs,), generator=self.g).to(device, non_blocking=True)
        x, y = data.images[idx], data.labels[idx]
        if self.cfg.data.hflip:
            x = random_hflip(x)
        x = x.contiguous(memory_format=self.fmt)
        u = self.sobol.draw(bs)[:, 0].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = self.diffusion.loss(self.net, x, y, u)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def run(self, images: int) -> None:
        """Train on about ``images`` images (whole batches) and add them and the time to the totals."""
        steps = max(1, math.ceil(images / self.cfg.optim.batch_size))
        sync(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        took = time.perf_counter() - t
        self.seconds += took
        self.images += steps * self.cfg.optim.batch_size
        self.chunks.append((steps * self.cfg.optim.batch_size, took))


class InterleavedPlain:
    """Round-end hook: after each FL round, every rank runs the plain loop on as many images as
    it just trained.

    Interleaving makes both sides see the same machine: on a shared box the load changes from
    minute to minute, and an FL phase followed by a plain phase would compare two different
    machines. The round loop itself runs unmodified; FederatedRounds calls this hook (``on_round_end``)
    after the round is logged, outside its timings. Round 1 (warm-up) gets no plain chunk.
    """

    def __init__(self, plain: PlainLoop, rounds: set[int], rank: int):
        self.plain, self.rounds, self.rank = plain, rounds, rank

    def __call__(self, record: dict[str, Any]) -> None:
        if record["round"] in self.rounds:  # the images this rank trained in the round (its record)
            dist.barrier()  # all ranks train their plain chunk at the same time
            self.plain.run(record["images_per_rank"][self.rank])
            dist.barrier()


# --------------------------------------------------------------------------------------------
# The benchmark


class ComputeClock:
    """Seconds spent in local steps (``train_step`` of the plain trainer), per round: the rest of
    a round is overhead. Installed by wrapping the function the client trainer calls; a round-end
    hook files the round's seconds and starts the next count."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.rounds = device, 0.0, {}
        inner = plain_client.train_step

        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            sync(self.device)
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - t
            return out
        plain_client.train_step = timed

    def __call__(self, record: dict[str, Any]) -> None:
        self.rounds[record["round"]] = self.seconds
        self.seconds = 0.0


class NoCheckpoints(Checkpointer):
    """--no-checkpoint: the round loop's checkpointer, writing nothing."""

    def save(self, *args: Any, **kwargs: Any) -> None:
        return None


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"host": platform.node(), "cpu": cpu, "cpu_cores": os.cpu_count(),
           "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpus_visible"] = torch.cuda.device_count()
    return out


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, overrides)
    info = dist.init(cfg.run.device, cfg.run.threads, cfg.run.keep_freed_memory)
    if "WORLD_SIZE" in os.environ and not torch_dist.is_initialized():
        # torchrun with one process: fedrun skips the process group, the benchmark makes a 1-rank
        # one so that aggregation and the raw all_reduce go through the real backend (NCCL on GPU)
        torch_dist.init_process_group("nccl" if info.device.type == "cuda" else "gloo", rank=0, world_size=1,
                                      device_id=info.device if info.device.type == "cuda" else None)
    try:
        return run(args, cfg, info)
    finally:
        dist.shutdown()


def run(args: argparse.Namespace, cfg: Config, info: dist.DistInfo) -> int:
    device, world = info.device, info.world_size
    name = args.name or (f"{cfg.data.name}_b{cfg.model.base_channels}_bs{cfg.optim.batch_size}_"
                         f"{device.type}x{world}" + (f"_k{cfg.train.clients_at_once}"
                                                     if cfg.train.clients_at_once > 1 else "")
                         + ("_compile" if cfg.train.compile else ""))
    # a private run dir per launch (same on every rank of a node)
    tag = os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get("MASTER_PORT", str(os.getpid()))
    cfg.run.out_dir = str(Path(tempfile.gettempdir()) / f"fedrun-bench-{tag}")
    cfg.run.name = name
    cfg.checkpoint.resume = "never"
    if info.is_main:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    dist.barrier()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)

    train_set = load_split(cfg.data, "train")
    test_set = load_split(cfg.data, "test") if cfg.eval.enabled else None
    f = cfg.fed
    shards = client_shards(cfg, train_set.labels.numpy())
    sizes = {k: len(s) for k, s in enumerate(shards)}
    evaluator = Evaluator(cfg, info, train_set, test_set)
    train_set = train_set.to(device)
    model, diffusion = build(cfg, train_set.num_classes, device)
    make_trainable(model, cfg.model, cfg.run.seed)  # model.trainable: only what trains is all-reduced
    log = RunLogger(cfg.run_dir, info.is_main, f.rounds)
    # the parts fedrun.train builds, from the same builder: the benchmark runs the real round
    mechanism = build_mechanism(cfg, list(sizes.values()), num_classes=train_set.num_classes)
    parts = build_round_parts(cfg, info, model, diffusion, train_set, shards, mechanism,
                              build_participation(cfg, sizes, mechanism.wrap_participation), log.step)
    numel = buffer_size(num_flat(model), world)  # (plus the rules' regions, if any)
    nbytes = numel * 8  # the round's buffer is int64 (fedrun/flat.py: the exact sum)

    raw_before = raw_allreduce_ms(numel, device, args.raw_iters)

    steady = list(range(2, f.rounds + 1)) or [1]
    clock = ComputeClock(device)
    plain = None
    hooks: list[RoundHook] = [clock]
    if not args.no_plain:
        base, _ = build(cfg, train_set.num_classes, device)  # a second model from the same init
        make_trainable(base, cfg.model, cfg.run.seed)
        plain = PlainLoop(cfg, base, diffusion, train_set, device)
        hooks.append(InterleavedPlain(plain, set(steady), info.rank))
    checkpointer = NoCheckpoints(cfg, info) if args.no_checkpoint else Checkpointer(cfg, info)
    history = FederatedRounds(cfg, info, model, diffusion, sizes, parts, log, evaluator,
                              checkpointer, PowerEMA(cfg.ema, model), hooks).run(0)
    log.close()
    for rec in history:
        rec["compute_s"] = round(clock.rounds.get(rec["round"], 0.0), 4)

    raw_after = raw_allreduce_ms(numel, device, args.raw_iters)
    grouped = torch_dist.is_initialized()
    raw = statistics.median(raw_before + raw_after) if grouped else 0.0

    plain_figures = None if plain is None else {
        "images": plain.images, "wall_s": plain.seconds, "img_per_s": plain.images / plain.seconds,
        "chunks": plain.chunks}
    states = parts.states  # kept per-client state at the end: in host memory, and in files
    mine = {"rank": info.rank, "history": history, "plain": plain_figures,
            "images_steady": sum(r["images_per_rank"][info.rank] for r in history if r["round"] in steady),
            "peak_rss_mb_end": round(host_peak_rss_mb(), 1),
            "client_state": {"clients": len(states.clients()), "host_mb": round(states.held / 2**20, 1),
                             "in_files": len(states.spilled)}}
    states.close()

    gathered: list[Any] = [None] * world
    if world > 1:
        torch_dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if info.is_main:
        result = summarize(args, cfg, info, gathered, steady, nbytes, raw,
                           raw_before + raw_after if grouped else [], count_parameters(model),
                           sum(sizes.values()))
        out = args.out or ROOT / "benchmarks" / "results" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(portable(json.dumps(result, indent=2)))
        print_summary(result, out)
        if not args.keep_run:
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return 0


def summarize(args: argparse.Namespace, cfg: Config, info: dist.DistInfo, ranks: list[dict[str, Any]],
              steady: list[int], nbytes: int, raw_ms: float, raw_all: list[float], params: int,
              train_images: int) -> dict[str, Any]:
    world = info.world_size
    rounds = []
    for i, rec in enumerate(ranks[0]["history"]):
        per_rank = [rk["history"][i] for rk in ranks]
        # every rank leaves the all_reduce at about the same moment, so the shortest aggregation
        # is the one of the rank that arrived last: the cost without waiting for stragglers
        last = min(per_rank, key=lambda h: h["aggregate_s"])
        agg_ms = 1e3 * last["aggregate_s"]
        train_s = rec["wall_s"] - rec.get("eval_s", 0.0)
        rounds.append({
            "round": rec["round"],
            "wall_s": rec["wall_s"],
            "local_train_s": rec["local_train_s"],
            "local_train_s_per_rank": [h["local_train_s"] for h in per_rank],
            "ready_s_per_rank": rec["ready_s_per_rank"],  # round start to the all_reduce, per rank
            "steps_per_rank": rec["steps_per_rank"],
            "clients_per_rank": rec["clients_per_rank"],
            "aggregate_s": rec["aggregate_s"],
            "wait_s_per_rank": rec["wait_s_per_rank"],  # each inside its rank's aggregate_s
            "compute_s": rec["compute_s"],  # rank 0's local steps
            # rank 0's round (without evaluation) minus its steps, per client it trained
            "overhead_ms_per_client": round(1e3 * (train_s - rec["compute_s"])
                                            / max(rec["clients_per_rank"][0], 1), 3),
            "checkpoint_s": rec["checkpoint_s"],
            "eval_s": rec.get("eval_s", 0.0),
            "update_chain_s": rec["update_chain_s"],  # rank 0's; the clients' encode + decode, ...
            "update_chain_s_per_rank": [h["update_chain_s"] for h in per_rank],
            "other_s": round(rec["wall_s"] - rec["local_train_s"] - rec["aggregate_s"] - rec["checkpoint_s"]
                             - rec.get("eval_s", 0.0) - rec["update_chain_s"], 4),
            "bytes_up": rec["bytes_up"],
            "bytes_down": rec["bytes_down"],
            "images": rec["images"],
            "img_per_s_total": rec["images"] / train_s,
            "aggregation_ms_last_rank": round(agg_ms, 3),
            "allreduce_ms_last_rank": last.get("allreduce_ms"),
            "peak_rss_mb_per_rank": [h.get("peak_rss_mb") for h in per_rank],
            "peak_gpu_mb_per_rank": [h.get("peak_gpu_mb") for h in per_rank],
        })
    st = [r for r in rounds if r["round"] in steady]
    images = sum(r["images"] for r in st)
    train_time = sum(r["wall_s"] - r["eval_s"] for r in st)
    fl_total = images / train_time
    per_rank_imgs = [rk["images_steady"] / train_time for rk in ranks]
    agg_ms = statistics.median(r["aggregation_ms_last_rank"] for r in st)
    summary: dict[str, Any] = {
        "steady_rounds": steady,
        "fl_img_per_s_total": round(fl_total, 2),
        "fl_img_per_s_per_rank": [round(x, 2) for x in per_rank_imgs],
        "share_of_round": {k: round(sum(r[k] for r in st) / sum(r["wall_s"] for r in st), 4)
                           for k in ("local_train_s", "update_chain_s", "aggregate_s", "checkpoint_s",
                                     "eval_s", "other_s")},
        "update_chain_ms_per_round": round(1e3 * statistics.median(r["update_chain_s"] for r in st), 3),
        "bytes_up_per_client": ranks[0]["history"][-1]["bytes_up_per_client"],
        "bytes_down_per_client": ranks[0]["history"][-1]["bytes_down_per_client"],
        "bytes_up_per_round": statistics.median(r["bytes_up"] for r in st),
        "bytes_down_per_round": statistics.median(r["bytes_down"] for r in st),
        "aggregation_ms": round(agg_ms, 3),
        "aggregation_gb_per_s": round(nbytes / (agg_ms / 1e3) / 1e9, 3) if agg_ms > 0 else None,
        "raw_allreduce_ms": round(raw_ms, 3) if raw_all else None,
        "raw_allreduce_ms_all": [round(x, 3) for x in raw_all],
        "raw_allreduce_gb_per_s": round(nbytes / (raw_ms / 1e3) / 1e9, 3) if raw_all and raw_ms > 0 else None,
        "aggregation_over_raw_allreduce": round(agg_ms / raw_ms, 3) if raw_all and raw_ms > 0 else None,
        # share of the ranks' time spent waiting for the slowest rank (imbalance as imbalance): each
        # rank's time runs from its own round start to the moment the last rank is ready (its ready_s +
        # wait_s), not rank 0's wall_s: a rank that ran ahead while rank 0 finished the previous round
        # (logging, hooks) waits longer than rank 0's round lasted
        "wait_share_of_rank_time": round(sum(sum(r["wait_s_per_rank"]) for r in st)
                                         / max(sum(sum(r["ready_s_per_rank"]) + sum(r["wait_s_per_rank"])
                                                   for r in st), 1e-9), 4),
        "load_imbalance_s": round(statistics.median(max(r["ready_s_per_rank"])
                                                    - min(r["ready_s_per_rank"]) for r in st), 4),
        "overhead_ms_per_client": round(statistics.median(r["overhead_ms_per_client"] for r in st), 3),
        "compute_share_of_round": round(sum(r["compute_s"] for r in st)
                                        / sum(r["wall_s"] - r["eval_s"] for r in st), 4),
        "client_state_per_rank": [rk["client_state"] for rk in ranks],
        "peak_rss_mb_end_per_rank": [rk["peak_rss_mb_end"] for rk in ranks],
        "peak_rss_mb_round1_vs_last": [[rk["history"][0].get("peak_rss_mb"),
                                        rk["history"][-1].get("peak_rss_mb")] for rk in ranks],
        "peak_gpu_mb_round1_vs_last": [[rk["history"][0].get("peak_gpu_mb"),
                                        rk["history"][-1].get("peak_gpu_mb")] for rk in ranks],
    }
    if all(rk["plain"] is not None for rk in ranks):
        plain_total = sum(rk["plain"]["img_per_s"] for rk in ranks)
        summary["plain_img_per_s_per_rank"] = [round(rk["plain"]["img_per_s"], 2) for rk in ranks]
        summary["plain_img_per_s_total"] = round(plain_total, 2)
        summary["fl_efficiency"] = round(fl_total / plain_total, 4)
        # per round: FL round r against the plain chunk run right after it (robust to load swings)
        per_round = []
        for j, r in enumerate(st):
            plain_r = sum(rk["plain"]["chunks"][j][0] / rk["plain"]["chunks"][j][1] for rk in ranks)
            per_round.append(r["img_per_s_total"] / plain_r)
        summary["fl_efficiency_per_round"] = [round(x, 4) for x in per_round]
        summary["fl_efficiency_median_round"] = round(statistics.median(per_round), 4)
    return {
        "name": cfg.run.name,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "layout": {"world_size": world, "device": info.device.type, "process_group": bool(raw_all),
                   "threads_per_rank": torch.get_num_threads() if info.device.type == "cpu" else None},
        "setup": {"parameters": params, "allreduce_bytes": nbytes, "data": cfg.data.name,
                  "train_images": train_images,
                  "image_size": cfg.data.image_size, "batch_size": cfg.optim.batch_size,
                  "clients_per_round": cfg.fed.clients_per_round, "local_epochs": cfg.fed.local_epochs,
                  "precision": cfg.train.precision, "channels_last": cfg.train.channels_last,
                  "compile": cfg.train.compile, "clients_at_once": cfg.train.clients_at_once,
                  "checkpoint_every": cfg.checkpoint.every, "compress": cfg.fed.compress,
                  "error_feedback": cfg.fed.error_feedback, "num_clients": cfg.fed.num_clients,
                  "placement": cfg.fed.placement, "client_optimizer": cfg.fed.client_optimizer,
                  "checkpoints": not args.no_checkpoint},
        "config": cfg.to_dict(),
        "rounds": rounds,
        "summary": summary,
    }


def print_summary(result: dict[str, Any], out: Path) -> None:
    s, setup, lay = result["summary"], result["setup"], result["layout"]
    print(f"\n{result['name']}: {setup['parameters'] / 1e6:.2f}M params, "
          f"{lay['world_size']} x {lay['device']}, batch {setup['batch_size']}, {setup['precision']}, "
          f"compile={setup['compile']}, clients_at_once={setup['clients_at_once']}")
    print(f"{'round':>5} {'wall s':>8} {'local':>8} {'agg ms':>8} {'ckpt s':>7} {'eval s':>7} {'img/s':>9} "
          f"{'rss MB':>8} {'gpu MB':>8}")
    for r in result["rounds"]:
        gpu = r["peak_gpu_mb_per_rank"][0]
        print(f"{r['round']:>5} {r['wall_s']:>8.2f} {r['local_train_s']:>8.2f} "
              f"{r['aggregation_ms_last_rank']:>8.2f} {r['checkpoint_s']:>7.3f} {r['eval_s']:>7.2f} "
              f"{r['img_per_s_total']:>9.1f} {r['peak_rss_mb_per_rank'][0]:>8.0f} "
              f"{'-' if gpu is None else f'{gpu:.0f}':>8}")
    print(f"FL img/s (rounds {s['steady_rounds'][0]}..{s['steady_rounds'][-1]}): "
          f"{s['fl_img_per_s_total']:.1f} total, per rank {s['fl_img_per_s_per_rank']}")
    if "fl_efficiency" in s:
        print(f"plain loop img/s: {s['plain_img_per_s_total']:.1f}  ->  "
              f"FL efficiency {s['fl_efficiency']:.3f} (target >= 0.97)")
    share = 100 * s["share_of_round"]["update_chain_s"]
    print(f"update chain (compression {setup['compress']}: encode + decode, ...): "
          f"{s['update_chain_ms_per_round']:.1f} ms per round = {share:.2f} % of the round; bytes per "
          f"client {s['bytes_up_per_client']:,} up, {s['bytes_down_per_client']:,} down (the simulation "
          f"all-reduces {setup['allreduce_bytes']:,} bytes, int64)")
    print(f"waiting {100 * s['wait_share_of_rank_time']:.2f} % of the ranks' time (load imbalance "
          f"{s['load_imbalance_s']:.3f} s); overhead {s['overhead_ms_per_client']:.2f} ms per client "
          f"(round minus local steps; steps {100 * s['compute_share_of_round']:.1f} % of the round)")
    if s["aggregation_over_raw_allreduce"] is not None:
        print(f"aggregation {s['aggregation_ms']:.2f} ms ({s['aggregation_gb_per_s']} GB/s) "
              f"vs raw all_reduce {s['raw_allreduce_ms']:.2f} ms ({s['raw_allreduce_gb_per_s']} GB/s)  "
              f"->  ratio {s['aggregation_over_raw_allreduce']:.2f} (target <= 1.1)")
    else:
        print(f"aggregation {s['aggregation_ms']:.2f} ms (1 rank: no collective)")
    print(f"written to {out}")


if __name__ == "__main__":
    dist.exit_process(main())
