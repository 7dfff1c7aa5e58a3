#!/usr/bin/env python
"""Fingerprints of every training method on a tiny run: did a refactor change any bit?

    python benchmarks/method_fingerprints.py --out before.json              # this checkout
    python benchmarks/method_fingerprints.py --root /path/to/old/tree --out before.json
    python benchmarks/method_fingerprints.py --out after.json --compare before.json

Each method (FedAvg, the server rules, FedProx, SCAFFOLD, kept Adam, EMA, guidance, DP-SGD,
DP-FedAvg, the experimental grouped trainer, LoRA and norms/biases fine-tuning, DP-SGD with noise
multiplicity, int8 compression with error feedback, 2 ranks) trains a 2-round run of the tests' tiny
config (``tests/helpers.py``) as ``python -m fedrun`` started in ``--root`` (so an older tree can
be fingerprinted with the same script), one thread per process. The fingerprint of a run is the
SHA-256 of every tensor of its last checkpoint (model, server state, EMA, per-client state,
RNG state), the privacy ledger's epsilons, and the bytes of its final sample grid; the config
dict and file layout are left out, so adding a config key or a checkpoint field does not count
as a change, and neither does an entry written as None (a kind of state the run does not
keep, which earlier releases wrote for every client). ``--compare`` prints, per method, which
parts differ and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))

from helpers import TINY  # noqa: E402

TINY_RUN = {**TINY, "fed.rounds": "2", "sample.per_class": "1", "diffusion.sample_steps": "3"}
METHODS: dict[str, dict[str, str]] = {
    "fedavg": {},
    "fedavgm": {"fed.server_opt": "fedavgm"},
    "fedadam": {"fed.server_opt": "fedadam", "fed.server_lr": "0.01"},
    "fedprox": {"fed.drift": "fedprox", "fed.prox_mu": "0.1"},
    "scaffold": {"fed.drift": "scaffold", "fed.rounds": "3"},
    "kept_adam": {"fed.client_optimizer": "keep", "fed.rounds": "3"},
    "ema": {"ema.sigma_rel": "0.1"},
    "guidance": {"model.label_dropout": "0.2", "diffusion.guidance": "1.0"},
    # the accountant is pinned to the one of the first fingerprints (the default became "prv")
    "dp_sgd": {"privacy.level": "sample", "privacy.noise_multiplier": "1.5", "privacy.accountant": "rdp"},
    "dp_fedavg": {"privacy.level": "client", "privacy.noise_multiplier": "0.5", "privacy.accountant": "rdp",
                  "fed.clients_per_round": "2", "privacy.clip": "0.5"},
    "feddyn": {"fed.drift": "feddyn", "fed.feddyn_alpha": "0.1", "fed.rounds": "3"},
    "cosine_lr": {"optim.lr_schedule": "cosine", "fed.rounds": "3"},
    "partial_rounds": {"fed.clients_per_round": "2", "fed.rounds": "3"},
    "grouped_trainer": {"train.clients_at_once": "2"},
    "int8_error_feedback": {"fed.compress": "int8", "fed.rounds": "3"},
    "lora": {"model.trainable": "lora", "model.lora_rank": "2", "ema.sigma_rel": "0.1"},
    "norms_biases": {"model.trainable": "norms_biases"},
    "dp_sgd_lora_multiplicity": {"privacy.level": "sample", "privacy.noise_multiplier": "1.5",
                                 "model.trainable": "lora", "model.lora_rank": "2",
                                 "privacy.multiplicity": "2"},
    "centralized": {"run.mode": "centralized"},
}
TWO_RANKS = ("fedavg", "kept_adam")  # also run on 2 torchrun ranks: placement and state homes


def _digest(obj: Any) -> Any:
    """SHA-256 of each tensor of a nested checkpoint entry (structure kept, keys sorted)."""
    if isinstance(obj, torch.Tensor):
        buf = io.BytesIO()
        t = obj.detach().cpu().contiguous()
        buf.write(str((t.dtype, tuple(t.shape))).encode())
        buf.write(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        return hashlib.sha256(buf.getvalue()).hexdigest()[:16]
    if isinstance(obj, dict):  # None entries (a kind of state a run does not keep) count as absent
        return {str(k): _digest(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
                if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_digest(v) for v in obj]
    return obj


def fingerprint(run_dir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from fedrun import checkpoint
    state, _ = checkpoint.load_latest(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    grid = run_dir / "samples" / "final.png"
    parts = {k: _digest(state.get(k)) for k in ("model", "server", "optimizer", "ema", "clients", "rng")}
    # the privacy ledger (its entries are plain numbers) and the epsilons reported
    parts["privacy_ledger"] = state.get("extra", {}).get("privacy")
    privacy = summary.get("privacy") or {}
    parts["epsilon"] = {k: privacy.get(k) for k in ("epsilon_max", "epsilon_per_client")} if privacy else None
    parts["final_grid"] = hashlib.sha256(grid.read_bytes()).hexdigest()[:16] if grid.exists() else None
    parts["round"] = int(state["round"])
    return parts


def run_method(root: Path, name: str, overrides: dict[str, str], out_dir: Path, nproc: int) -> Path:
    args = [f"--{k}={v}" for k, v in {**TINY_RUN, **overrides, "run.out_dir": str(out_dir),
                                        "run.name": name}.items()]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "fedrun"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "fedrun"]
    proc = subprocess.run([*launcher, *args], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"method_fingerprints: {name} failed in {root}:\n{proc.stderr[-3000:]}")
    return out_dir / name


def compare(before: dict[str, Any], after: dict[str, Any]) -> int:
    changed = 0
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            print(f"{name:>20}: only in {'after' if a is None else 'before'}")
            continue
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        changed += bool(diff)
        print(f"{name:>20}: {'bit-identical' if not diff else 'DIFFERS in ' + ', '.join(diff)}")
    return 1 if changed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=HERE, help="the fedrun tree to run (default: this one)")
    p.add_argument("--out", type=Path, required=True, help="JSON of the fingerprints")
    p.add_argument("--compare", type=Path, default=None, help="an earlier JSON to compare with")
    p.add_argument("--only", default="", help="comma-separated method names (default: all)")
    args = p.parse_args()
    only = [m for m in args.only.split(",") if m] or list(METHODS)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedrun-fingerprints-") as tmp:
        os.environ.setdefault("FEDRUN_CACHE_DIR", str(Path(tmp) / "cache"))
        for name in only:
            result[name] = fingerprint(run_method(args.root, name, METHODS[name], Path(tmp), 1))
            print(f"{name}: done", flush=True)
            if name in TWO_RANKS:
                key = f"{name}_2ranks"
                result[key] = fingerprint(run_method(args.root, key, METHODS[name], Path(tmp), 2))
                print(f"{key}: done", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    if args.compare is not None:
        return compare(json.loads(args.compare.read_text()), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
