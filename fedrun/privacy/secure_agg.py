"""Secure aggregation (SecAgg+) over the round's exact int64 sum: the server learns the sum of the
surviving clients' vectors and nothing else about any one of them.

The protocol is SecAgg (Bonawitz et al., CCS 2017) on the sparse neighbour graph of SecAgg+ (Bell
et al., CCS 2020), run in simulation (every message goes through Python objects, or through
``exchange`` between ranks) but with real cryptography:

1. **Keys.** Each participant u draws two X25519 key pairs, (c_u, C_u) to encrypt its shares and
   (s_u, S_u) to agree on masks, and a 32-byte self-mask seed b_u; it sends C_u, S_u (64 bytes).
2. **Shares.** u Shamir-shares b_u and s_u with threshold t among its k neighbours in the round's
   graph and sends each neighbour v its two shares encrypted with AES-256-GCM under
   HKDF-SHA256(X25519(c_u, C_v)) (authenticated with the round and both ids).
3. **Masked input.** u adds to its int64 vector, modulo 2^64, PRG(b_u) and, for every neighbour v,
   +PRG(s_uv) if u < v and -PRG(s_uv) if u > v, with s_uv = HKDF-SHA256(X25519(s_u, S_v)) (the same
   for both ends): the pairwise masks of two neighbours cancel in the sum, bit for bit.
4. **Unmasking.** Clients that masked but whose vectors never reached the sum are the dropped ones.
   Each survivor decrypts the shares it holds and reveals b-shares of its surviving neighbours and
   s-shares of its dropped ones (never both for one client); from t shares each, the server
   rebuilds b_u of every survivor and s_u of every dropped client (checked against S_u), then
   subtracts PRG(b_u) of the survivors and the dropped clients' pairwise masks with their
   surviving neighbours. The result is the plain sum, exactly (all arithmetic is modulo 2^64).

Choices, and why:

* Key agreement, KDF, share encryption and the PRG come from ``cryptography`` (OpenSSL): X25519,
  HKDF-SHA256, AES-GCM, and **AES-128-CTR** as the mask generator (the 32-byte seed is the AES key
  and the initial counter block). With AES-NI it expands ~8.6 GB/s on this project's CPU against
  ~4.7 GB/s for ChaCha20, and a mask for the 23.2M-number U-Net is 186 MB of keystream. Masks are
  expanded chunk by chunk (MASK_CHUNK words) into one reused buffer and added to the vector in
  numpy uint64, which wraps modulo 2^64 by definition: no model-sized temporary.
* Shamir sharing is implemented here, over the prime field of p = 2^256 + 297 (the smallest prime
  above 2^256, so a 32-byte secret is one field element; the tests check primality): Horner
  evaluation to share, Lagrange interpolation at 0 to rebuild, with Python's integers. No library
  fit: ``cryptography`` has no secret sharing, and pycryptodome's ``Shamir`` (GF(2^128), 16-byte
  secrets) does its field arithmetic in pure Python at ~70 us a multiplication; measured with it,
  a round of 100 clients took 2.7 s (k = 16) and 13.3 s (the paper's k = 66) of recovery and
  0.2 s of key agreement per client at k = 66, against about 100x less here. The polynomial's
  coefficients come from the client's randomness (os.urandom, or the seeded generator), drawn as
  64 bytes reduced modulo p (bias < 2^-250).
* The graph: a Harary graph (circulant ring, each node joined to its k/2 nearest on each side)
  over a random order of the round's participants, drawn from the registered stream
  ``secagg_graph`` (seed, round): public, as in SecAgg+, where the server chooses it. k at least
  participants - 1 is the complete graph (plain SecAgg); an odd k below that becomes k + 1.
  ``recommended_graph`` gives the paper's (k, t) for n clients.
* Keys and self-mask seeds come from ``os.urandom`` by default: the masks cancel exactly, so the
  trained model never depends on them and a resumed round needs none of them. ``key_source =
  "seed"`` derives them from the registered stream ``secagg_keys`` (seed, round, client) through a
  ChaCha20 generator (and the shares' polynomials and nonces with them): reproducible masked
  vectors for tests, but only 63 bits of entropy per client and known to anyone who knows
  run.seed: never for a deployment. ``key_source = "shared"`` derives them the same way under a
  round ``secret`` (32 bytes of os.urandom drawn by rank 0 and broadcast each round, as
  fedrun.privacy.secure_sum does): every rank can then play every client, so any placement of
  clients on ranks works, while nothing that outlives the round (run.seed, a checkpoint) reveals
  a key.
* Between ranks, ``exchange`` (e.g. ``all_gather_exchange``) merges each rank's messages (public
  keys, encrypted shares, revealed shares: a few hundred bytes per client); every rank then plays
  the server's part identically, so the unmasked sum is the same bits on every rank.

What this simulation does not give: every process holds the keys of the clients it simulates,
so the guarantee is against an aggregator that sees only the masked vectors and the messages; a
deployment also needs authenticated channels to the server (TLS), authenticated public keys
(against a server that substitutes keys) and, against a server that lies about who dropped, the
consistency check round of Bonawitz et al.'s active protocol.

``costs`` counts seconds of key agreement, mask expansion and recovery, and the bytes a real
client would send and receive on top of its vector (modulo 2^64 the masked vector is as long as
the plain one).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .. import seeding
from ..errors import ConfigError

SEED_BYTES = 32  # self-mask and pairwise seeds: AES-128 key (16) + initial counter block (16)
KEY_BYTES = 32  # an X25519 public or private key
PRIME = 2**256 + 297  # Shamir's field: the smallest prime above 2^256
SHARE_BYTES = 33  # one share: an element of that field
NONCE_BYTES, TAG_BYTES, ID_BYTES = 12, 16, 8  # AES-GCM nonce and tag; a client id on the wire
# plaintext of an encrypted share message: sender id, receiver id, share of b_u, share of s_u
SHARE_PLAINTEXT = 2 * ID_BYTES + 2 * SHARE_BYTES
SHARE_MESSAGE = NONCE_BYTES + SHARE_PLAINTEXT + TAG_BYTES
REVEAL_MESSAGE = ID_BYTES + SHARE_BYTES  # a revealed share: whose secret, the share
MASK_CHUNK = 1 << 16  # words per PRG call: 512 KB of keystream and of the vector stay in L2

Exchange = Callable[[dict[Any, Any]], dict[Any, Any]]


# --------------------------------------------------------------------------------------------
# Settings


def _hypergeom_tail_bounds(n: int, bad: int, good: int, k: int, p_secure: float,
                           p_correct: float) -> tuple[int, int]:
    """(a, s): with probability >= 1 - p_secure a node has at most ``a`` adversarial neighbours
    (``bad`` adversaries among n), and with probability >= 1 - p_correct at least ``s`` surviving
    ones (``good`` survivors among n); both hypergeometric over its k neighbours."""
    from scipy.stats import hypergeom
    adv = hypergeom(n, bad, k)
    a = next(x for x in range(k + 1) if adv.sf(x) <= p_secure)
    surv = hypergeom(n, good, k)
    s = max(x for x in range(k + 1) if x == 0 or surv.cdf(x - 1) <= p_correct)
    return a, s


def recommended_graph(n: int, dropout_rate: float = 0.3, adversarial_rate: float = 0.05,
                      security_bits: int = 40, correctness_bits: int = 20,
                      semi_malicious: bool = True) -> tuple[int, int]:
    """SecAgg+'s (neighbours k, threshold t) for n clients (Bell et al. 2020, Sec. 4 and App.;
    the analysis their production parameter finder implements, re-derived here).

    The smallest even k < n - 1 such that (i) the graph of honest survivors stays connected except
    with probability 2^-(security_bits + 1): a random Harary graph disconnects only when k nodes
    in two runs of k/2 ring neighbours are all adversarial or dropped (union bound over the pairs
    of runs); (ii) a threshold t exists above the adversarial neighbours a client can have (at
    probability 2^-(security_bits + 1) / n) and at most its surviving neighbours (at probability
    2^-correctness_bits / n). ``semi_malicious`` (a server that lies about who dropped, the
    default): 2t > k + a, so the honest neighbours never reveal both of a client's secrets;
    otherwise t = a + 1. t >= 2 always. 10 clients give (8, 5), 100 give (66, 36) (semi-honest:
    (6, 2) and (26, 6)). When no k below n - 1 qualifies, the complete graph k = n - 1 with the
    same rule for t.
    """
    if n < 3:
        return max(n - 1, 1), 2
    bad = math.floor(adversarial_rate * n + 1e-12)
    dropped = math.floor(dropout_rate * n + 1e-12)
    good = math.ceil((1 - dropout_rate) * n - 1e-12)
    p_secure = 2.0 ** -(security_bits + 1) / n
    p_correct = 2.0 ** -correctness_bits / n

    def threshold(k: int) -> tuple[int, int]:
        a, s = _hypergeom_tail_bounds(n, bad, good, k, p_secure, p_correct)
        t = (k + a) // 2 + 1 if semi_malicious else a + 1
        return max(t, 2), s

    for k in range(2, n - 1, 2):
        if k <= bad + dropped:  # can k removed nodes in two runs of k/2 disconnect the ring?
            log_p = (math.log(n) + math.log(n - k - 1) - math.log(2) + math.lgamma(bad + dropped + 1)
                     + math.lgamma(n - k + 1) - math.lgamma(n + 1) - math.lgamma(bad + dropped - k + 1))
            if log_p >= -(security_bits + 1) * math.log(2):
                continue
        t, s = threshold(k)
        if t <= s:
            return k, t
    k = n - 1
    return k, min(threshold(k)[0], k)


def recommended_neighbours(n: int, **threat_model: Any) -> int:
    """The paper's number of neighbours k for n clients (``recommended_graph``'s first value)."""
    return recommended_graph(n, **threat_model)[0]


def check_settings(clients_per_round: int, neighbours: int, threshold: int, min_survivors: int,
                   bits: int | None = None) -> None:
    """Raise a one-line ConfigError naming the key and the fix for settings no round could use.

    ``neighbours`` k: 2..clients_per_round - 1, even unless it is clients_per_round - 1 (the
    complete graph); ``threshold`` t: 2..k; ``min_survivors``: 2..clients_per_round; ``bits``
    (distributed DP's modulus 2^bits; None when unused): 2..64.
    """
    n, k, t, m = int(clients_per_round), int(neighbours), int(threshold), int(min_survivors)
    if n < 3:
        raise ConfigError(f"secure_agg.protocol: secure aggregation needs at least 3 clients per round "
                          f"(a sum of 2 reveals each to the other), fed.clients_per_round is {n}; set "
                          f"fed.clients_per_round >= 3 or secure_agg.protocol = \"none\"")
    if not 2 <= k <= n - 1:
        raise ConfigError(f"secure_agg.neighbours: {k} neighbours need {k + 1} clients per round and at "
                          f"least 2; with fed.clients_per_round = {n} set secure_agg.neighbours between 2 "
                          f"and {n - 1} (recommended: {recommended_neighbours(n)})")
    if k % 2 and k != n - 1:
        raise ConfigError(f"secure_agg.neighbours: {k} is odd; a Harary ring has an even degree below "
                          f"fed.clients_per_round - 1 = {n - 1}: set it to {k - 1}, {k + 1} or {n - 1}")
    if t < 2:
        raise ConfigError(f"secure_agg.threshold: {t} would let a single neighbour rebuild a client's "
                          f"secrets; set secure_agg.threshold >= 2 (recommended for {n} clients: "
                          f"{recommended_graph(n)[1]})")
    if t > k:
        raise ConfigError(f"secure_agg.threshold: {t} shares needed but each secret has only "
                          f"secure_agg.neighbours = {k} holders; set secure_agg.threshold <= {k} "
                          f"or raise secure_agg.neighbours")
    if m > n:
        raise ConfigError(f"secure_agg.min_survivors: {m} survivors can never be reached with "
                          f"fed.clients_per_round = {n}; set secure_agg.min_survivors <= {n}")
    if m < 2:
        raise ConfigError(f"secure_agg.min_survivors: {m}; the sum of one survivor is its update; set "
                          f"secure_agg.min_survivors >= 2")
    if bits is not None and not 2 <= int(bits) <= 64:
        raise ConfigError(f"secure_agg.bits: {bits} is outside 2..64 (the modulus 2^bits of the "
                          f"secure sum); set secure_agg.bits between 2 and 64 (16 to 20 is usual)")


# --------------------------------------------------------------------------------------------
# The neighbour graph


def neighbour_graph(participants: Sequence[int], k: int, seed: int,
                    round_: int) -> dict[int, tuple[int, ...]]:
    """A k-regular Harary graph over ``participants`` in a random ring order (stream
    ``secagg_graph``): client -> its neighbours, sorted. k >= len - 1 gives the complete graph; an
    odd k below it is raised to k + 1."""
    clients = sorted(int(c) for c in participants)
    n = len(clients)
    if len(set(clients)) != n:
        raise ValueError("participants must be distinct")
    if k >= n - 1:
        return {u: tuple(v for v in clients if v != u) for u in clients}
    half = (k + 1) // 2
    rng = np.random.default_rng(seeding.stream_seed("secagg_graph", seed=seed, round=round_))
    ring = [clients[i] for i in rng.permutation(n)]
    out: dict[int, set[int]] = {u: set() for u in clients}
    for i, u in enumerate(ring):
        for d in range(1, half + 1):
            v = ring[(i + d) % n]
            out[u].add(v)
            out[v].add(u)
    return {u: tuple(sorted(vs)) for u, vs in out.items()}


# --------------------------------------------------------------------------------------------
# Primitives: PRG masks, KDF, Shamir


def _prg(seed: bytes) -> Any:
    """AES-128-CTR keystream of ``seed`` (key = its first 16 bytes, counter block = the rest)."""
    return Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:32])).encryptor()


def add_masks_(out: np.ndarray, seeds: Sequence[tuple[bytes, int]], chunk: int = MASK_CHUNK) -> None:
    """out (uint64, 1-D, contiguous) += sum_j sign_j * PRG(seed_j)[:len(out)], modulo 2^64.

    Chunk by chunk: each chunk of ``out`` takes every mask's next keystream words while it is in
    cache; one keystream buffer of ``chunk`` words is reused, nothing vector-sized is allocated."""
    if out.dtype != np.uint64 or out.ndim != 1:
        raise TypeError("add_masks_ needs a 1-D uint64 array")
    n = out.size
    if n == 0 or not seeds:
        return
    width = min(chunk, n)
    zeros = memoryview(bytes(width * 8))
    buf = bytearray(width * 8 + 16)  # update_into may need a block of room
    ks_all = np.frombuffer(buf, dtype=np.uint64, count=width)
    streams = [(_prg(s), sign) for s, sign in seeds]
    for i in range(0, n, width):
        m = min(width, n - i)
        piece, ks = out[i:i + m], ks_all[:m]
        for ctx, sign in streams:
            ctx.update_into(zeros[:m * 8], buf)
            if sign > 0:
                np.add(piece, ks, out=piece)
            else:
                np.subtract(piece, ks, out=piece)


def prg_words(seed: bytes, n: int) -> np.ndarray:
    """The first n uint64 words of PRG(seed) (a fresh array: for tests and small vectors)."""
    out = np.zeros(n, dtype=np.uint64)
    add_masks_(out, [(seed, 1)])
    return out


def _kdf(secret: bytes, info: bytes, length: int = SEED_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def _ids(*values: int) -> bytes:
    return b"".join(int(v).to_bytes(ID_BYTES, "big") for v in values)


def _pub_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _priv_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def shamir_split(secret: bytes, threshold: int, holders: int,
                 rand: Callable[[int], bytes] = os.urandom) -> list[bytes]:
    """Shares of a secret of at most 32 bytes for the evaluation points 1..holders: any
    ``threshold`` of them rebuild it, fewer reveal nothing. A random polynomial of degree
    threshold - 1 over GF(PRIME) with the secret as its constant, coefficients from ``rand``."""
    if len(secret) > 32 or not 1 <= threshold <= holders:
        raise ValueError("need a secret of <= 32 bytes and 1 <= threshold <= holders")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [int.from_bytes(rand(64), "big") % PRIME for _ in range(threshold - 1)]
    shares = []
    for x in range(1, holders + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(y.to_bytes(SHARE_BYTES, "big"))
    return shares


def shamir_combine(shares: Sequence[tuple[int, bytes]], size: int = 32) -> bytes:
    """The ``size``-byte secret from (evaluation point, share) pairs (at least the threshold's
    number of them, distinct points): Lagrange interpolation at 0 over GF(PRIME)."""
    xs = [int(x) for x, _ in shares]
    if len(set(xs)) != len(xs) or min(xs) < 1:
        raise ValueError("evaluation points must be distinct and >= 1")
    secret = 0
    for j, (xj, share) in enumerate(shares):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        secret = (secret + int.from_bytes(share, "big") * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * size):
        raise RuntimeError("secure aggregation: shares from different secrets (inconsistent shares)")
    return secret.to_bytes(size, "big")


class _SeededBytes:
    """Reproducible bytes from a registered stream's 63-bit seed, or from a secret (ChaCha20
    keystream under a key derived from it)."""

    def __init__(self, stream_seed: int, secret: bytes = b""):
        material = secret if secret else stream_seed.to_bytes(8, "big")
        key = _kdf(material + stream_seed.to_bytes(8, "big"), b"fedrun secagg seeded keys")
        self._ctx = Cipher(algorithms.ChaCha20(key, bytes(16)), None).encryptor()

    def __call__(self, n: int) -> bytes:
        return self._ctx.update(bytes(n))


def all_gather_exchange(local: dict[Any, Any]) -> dict[Any, Any]:
    """Merge every rank's messages (torch.distributed.all_gather_object; the identity in one
    process). Every rank must call it at the same point."""
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return dict(local)
    parts: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(parts, local)
    merged: dict[Any, Any] = {}
    for p in parts:
        merged.update(p)
    return merged


# --------------------------------------------------------------------------------------------
# One round


@dataclass
class SecAggCosts:
    """What secure aggregation cost this process in one round (its local clients; the server's
    part for recovery). Seconds: ``key_agreement_s`` (key generation, X25519 agreements, HKDF,
    Shamir splits, share encryption), ``mask_s`` (PRG expansion and adds in ``mask_``),
    ``recovery_s`` (share decryption, Shamir reconstruction, re-expanding the removed masks).
    Bytes per client beyond its vector: ``sent`` and ``received`` (client id -> bytes)."""

    key_agreement_s: float = 0.0
    mask_s: float = 0.0
    recovery_s: float = 0.0
    masked: int = 0
    sent: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        clients = max(len(self.sent), 1)
        return {"key_agreement_s": self.key_agreement_s, "mask_s": self.mask_s,
                "recovery_s": self.recovery_s, "clients": len(self.sent),
                "bytes_sent_per_client": sum(self.sent.values()) / clients,
                "bytes_received_per_client": sum(self.received.values()) / clients}


@dataclass
class _Secrets:
    c_key: X25519PrivateKey  # encrypts the shares it sends and decrypts those it holds
    s_key: X25519PrivateKey  # agrees the pairwise mask seeds
    b: bytes  # self-mask seed


def _as_words(vec: torch.Tensor | np.ndarray) -> tuple[np.ndarray, Callable[[], None]]:
    """A 1-D uint64 view of an int64/uint64 vector (torch or numpy) and a function writing it
    back (a no-op for CPU memory viewed in place; a copy for other devices)."""
    if isinstance(vec, np.ndarray):
        if vec.dtype not in (np.int64, np.uint64) or not vec.flags.c_contiguous:
            raise TypeError("masks apply to contiguous int64/uint64 arrays")
        return vec.reshape(-1).view(np.uint64), lambda: None
    if vec.dtype != torch.int64:
        raise TypeError(f"masks apply to int64 tensors, got {vec.dtype}")
    if vec.device.type == "cpu" and vec.is_contiguous():
        return vec.view(-1).numpy().view(np.uint64), lambda: None
    host = vec.detach().to("cpu").contiguous()

    def back() -> None:
        vec.copy_(host.view_as(vec))
    return host.view(-1).numpy().view(np.uint64), back


class SecureRound:
    """SecAgg+ for one round (module docstring).

    ``participants``: the clients that take part (they all get keys and shares); ``neighbours`` k
    and ``threshold`` t (``check_settings``; k is capped at len(participants) - 1);
    ``seed``: run.seed (the graph's stream, and the keys' with ``key_source = "seed"``);
    ``min_survivors``: fewer survivors abandon the round (default t); ``local``: the clients this
    process simulates (default all); ``exchange``: merges messages between processes
    (``all_gather_exchange``; default: one process). Every process must construct the round and
    call ``unmask_`` with the same arguments, in the same order.
    """

    def __init__(self, round_: int, participants: Iterable[int], neighbours: int, threshold: int, seed: int,
                 *, min_survivors: int | None = None, key_source: str = "urandom",
                 local: Iterable[int] | None = None, exchange: Exchange | None = None, secret: bytes = b""):
        self.round = int(round_)
        self.participants = tuple(sorted(int(c) for c in participants))
        self.threshold = int(threshold)
        self.min_survivors = self.threshold if min_survivors is None else int(min_survivors)
        if key_source not in ("urandom", "seed", "shared"):
            raise ConfigError(f"secure_agg.keys: {key_source!r} is not a key source; use \"urandom\" "
                              f"(the default) or \"seed\" (reproducible tests only)")
        if key_source == "shared" and len(secret) < 16:
            raise ValueError("key_source 'shared' needs a secret of >= 16 bytes")
        self._secret = secret
        if self.threshold < 2:
            raise ConfigError(f"secure_agg.threshold: {threshold} would let one neighbour rebuild a "
                              f"secret; set secure_agg.threshold >= 2")
        self.seed, self.key_source = int(seed), key_source
        self.graph = neighbour_graph(self.participants, int(neighbours), self.seed, self.round)
        self.local = self.participants if local is None else tuple(sorted(int(c) for c in local))
        if not set(self.local) <= set(self.participants):
            raise ValueError("local clients must be participants")
        self.exchange: Exchange = exchange or dict
        self.costs = SecAggCosts()
        self.last_failure = ""  # why the last unmask_ returned False
        self._secrets: dict[int, _Secrets] = {}
        self._mask_seeds: dict[int, list[tuple[bytes, int]]] = {}
        self._info = b"fedrun secagg round " + _ids(self.round)
        self._advertise_and_share()

    # -- steps 1 and 2: keys and encrypted shares ---------------------------------------------

    def _random(self, client: int) -> Callable[[int], bytes]:
        if self.key_source in ("seed", "shared"):  # "shared": under the round's secret, not run.seed
            return _SeededBytes(seeding.stream_seed("secagg_keys", seed=self.seed, round=self.round,
                                                    client=client), self._secret)
        return os.urandom

    def _advertise_and_share(self) -> None:
        start = time.perf_counter()
        rand: dict[int, Callable[[int], bytes]] = {}
        public: dict[int, tuple[bytes, bytes]] = {}
        for u in self.local:
            rand[u] = self._random(u)
            c_key = X25519PrivateKey.from_private_bytes(rand[u](KEY_BYTES))
            s_key = X25519PrivateKey.from_private_bytes(rand[u](KEY_BYTES))
            self._secrets[u] = _Secrets(c_key, s_key, rand[u](SEED_BYTES))
            public[u] = (_pub_bytes(c_key), _pub_bytes(s_key))
        elapsed = time.perf_counter() - start
        self.public = self.exchange(public)  # every participant's (C_u, S_u): public
        start = time.perf_counter()
        messages: dict[tuple[int, int], bytes] = {}
        for u in self.local:
            sec, nbrs = self._secrets[u], self.graph[u]
            if len(nbrs) < self.threshold:  # no share can ever be rebuilt: the round is abandoned
                b_shares = s_shares = [bytes(SHARE_BYTES)] * len(nbrs)
            else:
                b_shares = shamir_split(sec.b, self.threshold, len(nbrs), rand[u])
                s_shares = shamir_split(_priv_bytes(sec.s_key), self.threshold, len(nbrs), rand[u])
            seeds = [(sec.b, 1)]
            for j, v in enumerate(nbrs):
                key = _kdf(sec.c_key.exchange(X25519PublicKey.from_public_bytes(self.public[v][0])),
                           b"fedrun secagg shares " + self._info)
                nonce = rand[u](NONCE_BYTES)
                plain = _ids(u, v) + b_shares[j] + s_shares[j]
                messages[(u, v)] = nonce + AESGCM(key).encrypt(nonce, plain, self._info + _ids(u, v))
                seeds.append((self._pair_seed(sec.s_key, u, v), 1 if u < v else -1))
            self._mask_seeds[u] = seeds
            k = len(nbrs)
            self.costs.sent[u] = 2 * KEY_BYTES + k * SHARE_MESSAGE
            self.costs.received[u] = k * (2 * KEY_BYTES + SHARE_MESSAGE)
        self.costs.key_agreement_s += elapsed + time.perf_counter() - start
        self._inbox = self.exchange(messages)  # routed by the server: (sender, receiver) -> ciphertext

    def _pair_seed(self, s_key: X25519PrivateKey, u: int, v: int) -> bytes:
        shared = s_key.exchange(X25519PublicKey.from_public_bytes(self.public[v][1]))
        return _kdf(shared, b"fedrun secagg mask " + self._info + _ids(min(u, v), max(u, v)))

    # -- step 3: the masked input -------------------------------------------------------------

    def mask_(self, client: int, vec: torch.Tensor | np.ndarray) -> None:
        """Add ``client``'s self mask and signed pairwise masks to its int64 vector, in place
        (modulo 2^64). Every client of the round must mask a vector of the same length."""
        if client not in self._mask_seeds:
            raise KeyError(f"client {client} is not a local participant of round {self.round}")
        start = time.perf_counter()
        words, back = _as_words(vec)
        add_masks_(words, self._mask_seeds[client])
        back()
        self.costs.mask_s += time.perf_counter() - start
        self.costs.masked += 1

    # -- step 4: unmasking --------------------------------------------------------------------

    def recoverable(self, survivors: Iterable[int]) -> str:
        """'' when ``unmask_`` can recover the sum of ``survivors``, else why not (one line)."""
        alive = set(int(c) for c in survivors)
        smallest = min((len(vs) for vs in self.graph.values()), default=0)
        if smallest < self.threshold:
            return (f"{len(self.participants)} participants give a client {smallest} neighbours, fewer than "
                    f"secure_agg.threshold = {self.threshold}")
        if not alive <= set(self.participants):
            return f"survivors {sorted(alive - set(self.participants))} did not take part in the round"
        if len(alive) < self.min_survivors:
            return (f"{len(alive)} of {len(self.participants)} clients survived, fewer than "
                    f"secure_agg.min_survivors = {self.min_survivors}")
        for u in self.participants:
            held = sum(v in alive for v in self.graph[u])
            needed = u in alive or held > 0  # a dropped client's masks matter only next to survivors
            if needed and held < self.threshold:
                what = "survivor" if u in alive else "dropped client"
                return (f"{what} {u} kept {held} surviving neighbours, fewer than secure_agg.threshold = "
                        f"{self.threshold}")
        return ""

    def unmask_(self, total: torch.Tensor | np.ndarray, survivors: Iterable[int]) -> bool:
        """Remove every mask left in ``total`` (the sum of the survivors' masked vectors) in place.

        Returns False, touching nothing, when the round cannot be recovered (``last_failure``
        says why): too few survivors, or a survivor or dropped client with fewer than t surviving
        neighbours. The decision depends on the graph and ``survivors`` only, so every process
        makes it alike (before any exchange)."""
        alive = tuple(sorted(set(int(c) for c in survivors)))
        self.last_failure = self.recoverable(alive)
        if self.last_failure:
            return False
        alive_set = set(alive)
        dropped = [u for u in self.participants if u not in alive_set]
        start = time.perf_counter()
        revealed: dict[tuple[int, int], bytes] = {}  # (holder v, owner u) -> share of b_u or s_u
        for v in self.local:
            if v not in alive_set:
                continue
            sec = self._secrets[v]
            for u in self.graph[v]:
                key = _kdf(sec.c_key.exchange(X25519PublicKey.from_public_bytes(self.public[u][0])),
                           b"fedrun secagg shares " + self._info)
                blob = self._inbox[(u, v)]
                plain = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], self._info + _ids(u, v))
                if plain[:2 * ID_BYTES] != _ids(u, v):
                    raise RuntimeError(f"secure aggregation: share of client {u} misrouted to {v}")
                b_share, s_share = plain[2 * ID_BYTES:2 * ID_BYTES + SHARE_BYTES], plain[-SHARE_BYTES:]
                revealed[(v, u)] = b_share if u in alive_set else s_share  # never both for one u
            self.costs.sent[v] = self.costs.sent.get(v, 0) + len(self.graph[v]) * REVEAL_MESSAGE
        elapsed = time.perf_counter() - start
        revealed = self.exchange(revealed)
        start = time.perf_counter()
        seeds: list[tuple[bytes, int]] = []
        for u in alive:
            seeds.append((self._rebuild(u, revealed, alive_set), -1))
        for u in dropped:
            holders = [v for v in self.graph[u] if v in alive_set]
            if not holders:
                continue
            s_key = X25519PrivateKey.from_private_bytes(self._rebuild(u, revealed, alive_set))
            if _pub_bytes(s_key) != self.public[u][1]:
                raise RuntimeError(f"secure aggregation: the rebuilt key of client {u} does not match "
                                   f"its public key (inconsistent shares)")
            for v in holders:  # v added sign(v, u) * PRG(s_uv); u's opposite mask never arrived
                seeds.append((self._pair_seed(s_key, u, v), -1 if v < u else 1))
        words, back = _as_words(total)
        add_masks_(words, seeds)
        back()
        self.costs.recovery_s += elapsed + time.perf_counter() - start
        return True

    def _rebuild(self, u: int, revealed: Mapping[tuple[int, int], bytes], alive: set[int]) -> bytes:
        points = [(j + 1, revealed[(v, u)]) for j, v in enumerate(self.graph[u]) if v in alive]
        return shamir_combine(points[:self.threshold])
