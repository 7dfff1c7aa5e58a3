"""Process-group setup, and the one place that calls collectives.

This is the only module that reads launcher environment variables. It understands torchrun
(RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), SLURM tasks started by ``srun``
without torchrun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST), and a plain
single process. NCCL on GPU, gloo on CPU.

Importing it does not import torch (each function that needs torch imports it): ``fedrun``'s
command line asks it for the rank (``launch_rank``) to say a config error once, and ends through
``exit_process``, both without paying torch's import for a config error.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _split_top_level(text: str) -> list[str]:
    """'a[1-2],b' -> ['a[1-2]', 'b']: commas inside brackets separate ranges, not hosts."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise ValueError(f"cannot parse SLURM node list {text!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"cannot parse SLURM node list {text!r}: unbalanced brackets")
    return parts + [text[start:]]


def _expand_range(group: str, nodelist: str) -> list[str]:
    """'003-005,010' -> ['003', '004', '005', '010'] (zero padding as written)."""
    out = []
    for item in group.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"cannot parse SLURM node list {nodelist!r}: bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def slurm_hostnames(nodelist: str) -> list[str]:
    """Every host of a SLURM node list, in SLURM's order (what ``scontrol show hostnames``
    prints, without asking SLURM): 'gpu[003-005,010],cpu1' -> gpu003 gpu004 gpu005 gpu010 cpu1;
    'rack[1-2]-n[07-08]' -> rack1-n07 rack1-n08 rack2-n07 rack2-n08; 'gpu[01-02]-ib' -> gpu01-ib
    gpu02-ib."""
    hosts: list[str] = []
    for expr in _split_top_level(nodelist.strip()):
        if not expr.strip():
            raise ValueError(f"cannot parse SLURM node list {nodelist!r}: empty host")
        names = [""]
        for text, group in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", expr.strip()):
            names = [n + text for n in names]
            if group:
                names = [n + r for n in names for r in _expand_range(group, nodelist)]
        hosts += names
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,010],cpu1' -> 'gpu003',
    'rack[1-2]-n[07-08]' -> 'rack1-n07', 'gpu[01-02]-ib' -> 'gpu01-ib'."""
    try:
        return slurm_hostnames(nodelist)[0]
    except ValueError as e:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}: {e}") from None


def slurm_tasks_on_node(spec: str, node_id: int) -> int:
    """This node's task count from SLURM's compressed list: '4(x2),3' -> 4, 4, 3 for nodes 0, 1, 2."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot parse SLURM tasks-per-node value {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[min(node_id, len(counts) - 1)]


def _slurm_local_world_size(env: dict[str, str]) -> int:
    """Tasks on this node: LOCAL_WORLD_SIZE if a wrapper set it, else SLURM's per-node lists.

    The step's own list comes first: an ``srun`` inside the allocation may start fewer tasks.
    Node lists can be uneven ('2(x3),1'), so the entry of this node (SLURM_NODEID) is taken.
    """
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key):
            return slurm_tasks_on_node(env[key], int(env.get("SLURM_NODEID", "0")))
    return 1


def _launcher(env: Mapping[str, str]) -> str:
    """"torchrun" (also accelerate, and torchrun inside a SLURM allocation), "slurm" (tasks
    started by srun) or "" (one plain process)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return ""


def launch_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank as its launcher numbered it (0 for one plain process), read from the
    environment alone: nothing is started, torch is not imported."""
    env = os.environ if env is None else env
    kind = _launcher(env)
    if kind == "torchrun":
        return int(env["RANK"])
    return int(env["SLURM_PROCID"]) if kind == "slurm" else 0


def local_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank on its node (which GPU it takes), 0 for one plain process."""
    return int(launch_env(env)["local_rank"])


def launch_env(env: Mapping[str, str] | None = None) -> dict[str, int | str]:
    """rank / world / local rank and rendezvous address from torchrun, SLURM or nothing."""
    env = dict(os.environ if env is None else env)
    if _launcher(env) == "torchrun":
        return {
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "local_world_size": int(env.get("LOCAL_WORLD_SIZE", 1)),
            "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
            "master_port": env.get("MASTER_PORT", "29500"),
        }
    if _launcher(env) == "slurm":  # srun, one task per GPU
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return {
            "rank": int(env["SLURM_PROCID"]),
            "world_size": int(env["SLURM_NTASKS"]),
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
            "local_world_size": _slurm_local_world_size(env),
            "master_addr": env.get("MASTER_ADDR", first_slurm_host(nodelist)),
            # a port derived from the job id keeps two jobs on one node apart
            "master_port": env.get("MASTER_PORT", str(20000 + job_id % 20000)),
        }
    return {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1,
            "master_addr": "127.0.0.1", "master_port": "29500"}


def _source_address(host: str, port: int) -> str | None:
    """The local address this host would send from to reach ``host`` (no packet is sent: a UDP
    socket's connect only asks the routing table); None where ``host`` does not resolve or has
    no route."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(sockaddr)
                return str(s.getsockname()[0]).split("%")[0]
        except OSError:
            continue
    return None


def interface_addresses() -> dict[str, list[str]]:
    """Every up interface of this host with its addresses: IPv4 (the primary address, from
    ``SIOCGIFADDR``) and IPv6 (``/proc/net/if_inet6``). Linux only; {} elsewhere."""
    import struct
    out: dict[str, list[str]] = {}
    try:
        import fcntl
        names = [name for _, name in socket.if_nameindex()]
    except (ImportError, OSError):
        return out
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                req = struct.pack("256s", name.encode()[:15])
                flags = struct.unpack("H", fcntl.ioctl(s.fileno(), 0x8913, req)[16:18])[0]  # SIOCGIFFLAGS
                if not flags & 1:  # IFF_UP
                    continue
                out[name] = []
                out[name].append(socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24]))  # SIOCGIFADDR
            except OSError:  # no IPv4 address
                continue
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            fields = line.split()
            if len(fields) == 6 and fields[5] in out:
                out[fields[5]].append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    except (OSError, ValueError):
        pass
    return out


def is_own_address(host: str) -> bool:
    """``host`` (a name or an address) resolves to a non-loopback address of one of this
    machine's up interfaces. launch/torchrun_multinode.sh asks it whether this node hosts the
    c10d rendezvous at HEAD."""
    try:
        addrs = {str(i[4][0]).split("%")[0] for i in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    own = {a for found in interface_addresses().values() for a in found}
    return any(a in own and not _is_loopback(a) for a in addrs)


def _default_route_interface() -> str | None:
    """The interface of this host's IPv4 default route (``/proc/net/route``), if it has one."""
    try:
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return fields[0]
    except OSError:
        pass
    return None


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def gloo_interface(master_addr: str, master_port: int) -> str | None:
    """The network interface gloo must bind to so that the ranks of other hosts can reach this
    one, or None where gloo's own choice already works.

    Left alone, gloo binds to the address that this host's *own name* resolves to, and tells
    every peer to connect there. On Debian and Ubuntu, /etc/hosts maps a machine's own name to
    127.0.1.1, so a multi-host job fails ("Gloo connectFullMesh failed ... Connection refused,
    remote=[127.0.1.1]") or hangs. Chosen here, in this order:

    1. the interface holding the address this host sends from to reach ``master_addr``: the
       network the job's rendezvous already goes over (every host but the master's, and the
       master's own where its name resolves to a real address);
    2. nothing where ``master_addr`` is written as loopback (127.0.0.1, ::1, localhost: every
       "node" is this machine), where this host's name resolves to an address of an up,
       non-loopback interface (gloo's default works), or where this host has no such interface;
    3. else (the master's own host, whose name resolves to loopback here) the interface of the
       default route, else the only up non-loopback interface.

    Raises ConfigError, naming GLOO_SOCKET_IFNAME, where several interfaces remain.
    """
    interfaces = interface_addresses()
    owner = {a: name for name, addrs in interfaces.items() for a in addrs}
    src = _source_address(master_addr, master_port)
    if src is not None and not _is_loopback(src) and src in owner:
        return owner[src]
    if master_addr == "localhost" or _is_loopback(master_addr):
        return None
    try:
        own = {str(i[4][0]).split("%")[0] for i in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        own = set()
    outside = [name for name, addrs in interfaces.items() if addrs and not all(map(_is_loopback, addrs))]
    if not outside or any(a in owner and not _is_loopback(a) for a in own):
        return None
    default = _default_route_interface()
    if default in outside:
        return default
    if len(outside) == 1:
        return outside[0]
    raise ConfigError(
        f"GLOO_SOCKET_IFNAME: this host's name ({socket.gethostname()}) resolves to no address of its "
        f"interfaces but loopback, and fedrun cannot tell which of {', '.join(outside)} reaches the "
        f"other hosts; export GLOO_SOCKET_IFNAME=<that interface> (see `ip -br addr`)")


def pick_device(requested: str, local_rank: int) -> torch.device:
    import torch
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' but no CUDA device is visible; use --run.device cpu or auto")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)  # pin this rank to its own GPU before NCCL starts
    # batch shapes repeat every step (only the last batch of a client differs): let cuDNN time
    # its convolution algorithms once per shape and keep the fastest
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", index)


def init(device: str = "auto", threads: int = 0, keep_freed_memory: bool = True) -> DistInfo:
    """Start the process group (if more than one process) and choose this rank's device, CPU
    threads and host allocator (``fedrun.host_memory``)."""
    import torch
    import torch.distributed as dist
    if keep_freed_memory:
        from .host_memory import keep_freed_memory as keep
        keep()
    env = launch_env()
    dev = pick_device(device, int(env["local_rank"]))
    if dev.type == "cpu":
        # torchrun sets OMP_NUM_THREADS=1; otherwise share the cores between local ranks.
        n = threads or max(1, (os.cpu_count() or 1) // int(env["local_world_size"]))
        if threads or "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(n)
    if int(env["world_size"]) > 1 and not dist.is_initialized():
        if restarts_share_agent_store():
            warnings.warn("torchrun --max-restarts with the agent's shared TCPStore can give the restarted "
                          "job stale rendezvous keys, so it fails to connect or hangs; launch with "
                          "--rdzv-backend=c10d (or --standalone) and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                          stacklevel=2)
        os.environ.setdefault("MASTER_ADDR", str(env["master_addr"]))
        os.environ.setdefault("MASTER_PORT", str(env["master_port"]))
        if dev.type == "cpu" and not os.environ.get("GLOO_SOCKET_IFNAME") \
                and int(env["world_size"]) > int(env["local_world_size"]):  # ranks on other hosts
            ifname = gloo_interface(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
            if ifname:
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
        global _HAD_GROUP
        _HAD_GROUP = True
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            rank=int(env["rank"]),
            world_size=int(env["world_size"]),
            timeout=datetime.timedelta(minutes=30),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(int(env["rank"]), int(env["world_size"]), int(env["local_rank"]),
                    int(env["local_world_size"]), dev)


def restarts_share_agent_store(env: dict[str, str] | None = None) -> bool:
    """torchrun will restart workers, and they rendezvous through the agent's TCPStore.

    That store outlives a restart and the keys of init_process_group carry no attempt number,
    so a restarted rank can read a dead peer's address (seen with torch 2.14, gloo: "Gloo
    connectFullMesh failed ... Connection refused", then a hang). With c10d rendezvous and
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, rank 0 hosts a fresh store on every attempt instead.
    """
    env = os.environ if env is None else env
    return (env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and env.get("TORCHELASTIC_MAX_RESTARTS", "0") not in ("", "0"))


_HAD_GROUP = False  # this process created a process group (see exit_process)


def exit_process(code: int) -> NoReturn:
    """End a launcher-started process (``python -m fedrun`` under torchrun, the benchmarks).

    With torch 2.14 on gloo a rank sometimes aborts *after* its work is done and its group
    destroyed ("terminate called without an active exception" from a native thread during
    interpreter teardown; seen about 1 run in 8 of two CPU ranks), which torchrun reports as a
    failed job. Once a process group has existed, the process therefore flushes its streams and
    leaves with os._exit, skipping the C++ static destructors; every file fedrun writes is
    closed by then. Without a group it exits normally."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _HAD_GROUP:
        os._exit(code)
    sys.exit(code)


def shutdown() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    import torch.distributed as dist
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object_to_main(obj: object) -> list[object] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere); [obj] on one process."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return [obj]
    out: list[object] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


_LOCAL_COUNTERS: dict[str, int] = {}  # one process: the counters live here


def restart_attempt(env: Mapping[str, str] | None = None) -> int:
    """Which attempt of a torchrun job with --max-restarts this is (0 for the first, or without
    torchrun): keys in the rendezvous store carry it, so that a restarted job never reads the
    counters of the attempt before it when the store outlives a restart."""
    env = os.environ if env is None else env
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def counter_add(key: str, amount: int = 1) -> int:
    """Atomically add ``amount`` to the job-wide counter ``key`` and return its new value (a
    counter starts at 0). All ranks share it through the process group's rendezvous store (one
    round trip to the store's host, rank 0); without a process group it is a local counter.

    The round loop hands out clients on demand with it (``placement.OnDemand``): each rank takes
    the next ticket until the round's clients run out."""
    import torch.distributed as dist
    full = f"fedrun/{restart_attempt()}/{key}"
    if not dist.is_initialized():
        _LOCAL_COUNTERS[full] = _LOCAL_COUNTERS.get(full, 0) + amount
        return _LOCAL_COUNTERS[full]
    store = dist.distributed_c10d._get_default_store()  # torch has no public getter for it
    return int(store.add(full, amount))
