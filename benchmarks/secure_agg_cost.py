#!/usr/bin/env python
"""What secure aggregation (SecAgg+, fedrun/privacy/secure_agg.py) costs a client and a round, on
one CPU core, against the plain int64 add of the same vector measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/secure_agg_cost.py [--sizes 336405,23200000] [--out FILE]

For each model size P (the digits default's flat model, 336,405 numbers; the authors' U-Net,
23.2M), each neighbour count k in {4, 8, 16} (threshold t = k // 2 + 1, the majority rule that
recommended_graph gives at these sizes) and 10 clients per round (k = 16 needs 17: that row
runs 17), one SecureRound with keys from os.urandom:
  * key agreement: key generation, X25519 agreements, HKDF, Shamir splits, share encryption,
    per client;
  * mask expansion: ``mask_`` of each client's int64 vector (k + 1 AES-128-CTR masks), per client;
  * dropout recovery at 0 / 10 / 30 % of the clients dropped after masking (a fixed random
    choice): share decryption, Shamir reconstruction and the removal of the survivors' self masks
    and the dropped clients' pairwise masks (``unmask_``), per round and per client;
  * bytes a real client sends and receives beyond its vector (public keys, encrypted shares,
    revealed shares);
  * the baseline: ``total += v`` of one client's int64 vector, and the round's plain sum.
Each unmasked sum is checked bit for bit against the plain sum. A section at 100 clients per round
times key agreement (which grows with k, not with the clients) and says what grows with them.
Output: JSON on stdout and in --out (default benchmarks/results/secure_agg_cost_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fedrun.privacy import secure_agg as sa  # noqa: E402

DEFAULT_OUT = Path("benchmarks/results/secure_agg_cost_cpu.json")


def client_vector(client: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(client)
    return torch.randint(-2**40, 2**40, (size,), generator=g, dtype=torch.int64)


def plain_add_ms(size: int, reps: int = 5) -> float:
    total, v = torch.zeros(size, dtype=torch.int64), client_vector(0, size)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        total += v
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def one_setting(size: int, k: int, clients: int, dropouts: list[float], plain_ms: float) -> list[dict]:
    t = k // 2 + 1
    participants = list(range(clients))
    rng = np.random.default_rng(k)
    order = [int(c) for c in rng.permutation(clients)]
    dropped = {f: sorted(order[:math.floor(f * clients)]) for f in dropouts}
    survivors = {f: [c for c in participants if c not in dropped[f]] for f in dropouts}
    rnd = sa.SecureRound(1, participants, k, t, seed=0)
    key_s = rnd.costs.key_agreement_s
    totals = {f: torch.zeros(size, dtype=torch.int64) for f in dropouts}
    plain = {f: torch.zeros(size, dtype=torch.int64) for f in dropouts}
    mask_times = []
    for c in participants:
        v = client_vector(c, size)
        for f in dropouts:
            if c in survivors[f]:
                plain[f] += v
        start = time.perf_counter()
        rnd.mask_(c, v)
        mask_times.append(time.perf_counter() - start)
        for f in dropouts:
            if c in survivors[f]:
                totals[f] += v
        del v
    rows = []
    sent_keys = dict(rnd.costs.sent)
    for f in dropouts:
        before = rnd.costs.recovery_s
        rnd.costs.sent = dict(sent_keys)
        ok = rnd.unmask_(totals[f], survivors[f])
        recovery = rnd.costs.recovery_s - before
        exact = bool(ok and torch.equal(totals[f], plain[f]))
        if ok and not exact:
            raise SystemExit(f"unmasked sum differs from the plain sum at P={size}, k={k}, dropout={f}")
        mask_ms = 1e3 * float(np.mean(mask_times))
        key_ms = 1e3 * key_s / clients
        rec_round_ms = 1e3 * recovery
        per_client = key_ms + mask_ms + rec_round_ms / clients
        rows.append({
            "P": size, "k": k, "t": t, "clients": clients, "dropout": f, "dropped": len(dropped[f]),
            "recovered": ok, "bit_exact": exact, "why_not": rnd.last_failure or None,
            "key_agreement_ms_per_client": round(key_ms, 3),
            "mask_ms_per_client": round(mask_ms, 2),
            "recovery_ms_round": round(rec_round_ms, 2),
            "recovery_ms_per_client": round(rec_round_ms / clients, 2),
            "overhead_ms_per_client": round(per_client, 2),
            "plain_add_ms_per_client": round(plain_ms, 3),
            "mask_over_plain_add": round(mask_ms / plain_ms, 1),
            "round_ms_secure": round(1e3 * (key_s + sum(mask_times)) + rec_round_ms + plain_ms * clients, 1),
            "round_ms_plain_sum": round(plain_ms * clients, 2),
            "bytes_sent_per_client": round(float(np.mean([rnd.costs.sent[c] for c in participants])), 1),
            "bytes_received_per_client": round(float(np.mean([rnd.costs.received[c]
                                                              for c in participants])), 1),
        })
        del totals[f], plain[f]
    return rows


def at_100_clients() -> dict:
    """Key agreement, bytes, and the shares' part of recovery (a 1-number vector, so no mask
    expansion) at 100 clients per round, 30 % dropped."""
    out = {}
    dropped = set(int(c) for c in np.random.default_rng(0).permutation(100)[:30])
    survivors = [c for c in range(100) if c not in dropped]
    for k in (16, sa.recommended_neighbours(100)):
        rnd = sa.SecureRound(1, range(100), k, k // 2 + 1, seed=0)
        ok = rnd.unmask_(torch.zeros(1, dtype=torch.int64), survivors)
        out[f"k={k}"] = {
            "t": k // 2 + 1,
            "key_agreement_ms_per_client": round(1e3 * rnd.costs.key_agreement_s / 100, 3),
            "recovery_ms_round_shares_only_30pct": round(1e3 * rnd.costs.recovery_s, 1) if ok else None,
            "recovered": ok, "why_not": rnd.last_failure or None,
            "bytes_sent_per_client": 2 * sa.KEY_BYTES + k * (sa.SHARE_MESSAGE + sa.REVEAL_MESSAGE)}
    k, t = sa.recommended_graph(100)
    semi_honest = list(sa.recommended_graph(100, semi_malicious=False))
    out["recommended_graph_100"] = {"k": k, "t": t, "semi_honest": semi_honest}
    out["what_changes"] = (
        "A client's costs depend on k, not on the clients per round: key agreement and bytes grow "
        "linearly in k, mask expansion is k + 1 PRG streams over P. The server's recovery grows with "
        "the round: one self mask per survivor plus one pairwise mask per (dropped client, surviving "
        "neighbour), so recovery per round at 100 clients is about 10x the 10-client figure at the same "
        "dropout rate (per client about the same), plus the shares' reconstruction measured here. The "
        "paper's k for 100 clients is larger than 16 (recommended_graph_100): the semi-malicious rule at "
        "30 % dropouts; a semi-honest server allows less.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="336405,23200000")
    ap.add_argument("--neighbours", default="4,8,16")
    ap.add_argument("--dropouts", default="0,0.1,0.3")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dropouts = [float(x) for x in args.dropouts.split(",")]
    rows = []
    for size in (int(x) for x in args.sizes.split(",")):
        plain_ms = plain_add_ms(size)
        for k in (int(x) for x in args.neighbours.split(",")):
            rows += one_setting(size, k, max(args.clients, k + 1), dropouts, plain_ms)
            print(json.dumps(rows[-1]), file=sys.stderr)
    import cryptography
    from cryptography.hazmat.backends.openssl import backend
    result = {
        "benchmark": "secure_agg_cost",
        "command": "OMP_NUM_THREADS=1 python benchmarks/secure_agg_cost.py",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "libraries": {"cryptography": cryptography.__version__, "openssl": backend.openssl_version_text()},
        "setup": {"mask_prg": "AES-128-CTR (cryptography/OpenSSL)", "key_agreement": "X25519 + HKDF-SHA256",
                  "share_encryption": "AES-256-GCM", "shamir": "GF(2^256 + 297), Python integers",
                  "threshold_rule": "t = k // 2 + 1", "clients_per_round": args.clients,
                  "keys": "os.urandom"},
        "rows": rows,
        "at_100_clients": at_100_clients(),
        "notes": [
            "overhead_ms_per_client = key agreement + mask expansion of one client + the round's recovery "
            "divided by its clients (the server's work shared out); the issue's goal is <= 1000 ms at "
            "P = 23.2M on one core.",
            "k = 16 needs at least 17 clients: those rows run 17 clients per round.",
            "recovered = false: some survivor or dropped client kept fewer than t surviving neighbours "
            "(why_not); the round is abandoned and the model unchanged.",
            "The machine is shared (2 cores, other work running): timings carry that noise.",
        ],
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
