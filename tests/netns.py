"""Two "hosts" on this machine for the multi-node tests: each a Linux network namespace with its
own UTS namespace (its own hostname) and its own mount namespace (its own /etc/hosts and a
node-local folder), joined by a veth pair whose two addresses exist only inside them.

    with two_hosts(tmp_path) as (h1, h2):
        p = h1.popen(["python", "-m", "torch.distributed.run", ...])   # runs "on" host 1
        h2.kill_all()                                                   # host 2 loses power

How a host is made (root, iproute2's ``ip`` and util-linux's ``unshare``/``nsenter``):

* ``ip netns add frXXXXXXa``: a named network namespace (XXXXXX random); one end of the veth
  pair ``frXXXXXXa`` / ``frXXXXXXb`` moves into each, with 10.N.M.1/24 and 10.N.M.2/24 and
  ``lo`` up. No other interface, no default route: the hosts reach each other and nothing else
  (and the addresses exist nowhere else, so they cannot clash with this machine's).
* a holder process, ``nsenter --net=/run/netns/NS unshare --uts --mount --propagation private
  sh -c ...``, sets the hostname (``frXXXXXXn1``, ``frXXXXXXn2``: SLURM's node list of both is
  ``frXXXXXXn[1-2]``), bind-mounts the host's own hosts file over /etc/hosts and its folder
  ``local`` over the shared ``<tmp>/hosts/local`` (what one host writes there the other does
  not see), then waits for its standard input to close (the test's end, or its death). Every
  command of that host enters the holder's three namespaces with ``nsenter``. (Not ``ip netns
  exec``: it mounts a fresh /sys without /sys/fs/cgroup, and slurmd will not start there.)
* the hosts files are Debian's default shape: a host's own name is 127.0.1.1, the peer's name
  is its veth address. (So gloo, left to itself, binds to 127.0.1.1 on a host and tells its
  peers to connect there: fedrun/dist.py picks the interface that reaches the master instead.)

Everything else (the checkout, the venv, the tests' tmp_path) is the same file system on both:
tmp_path is the cluster's shared folder. ``skip_reason()`` says why namespaces cannot be made
here (not root, no ``ip``/``unshare``/``nsenter``, or the kernel refuses), for a pytest skip.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("ip", "unshare", "nsenter", "mount")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=SBIN_PATH)


def _sh(*cmd: str) -> None:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")


_SKIP: list[str] = []  # cached answer of skip_reason


def skip_reason() -> str:
    """'' where two hosts can be made here, else why not (for pytest.skip)."""
    if _SKIP:
        return _SKIP[0]
    why = ""
    if os.geteuid() != 0:
        why = "network namespaces need root (ip netns add); run the tests as root, as CI does"
    elif missing := [t for t in TOOLS if _which(t) is None]:
        why = f"{', '.join(missing)} not found (apt-get install iproute2 util-linux mount)"
    else:
        name = f"frprobe{os.getpid() % 100000}"
        probe = subprocess.run([_which("ip"), "netns", "add", name], capture_output=True, text=True)
        if probe.returncode != 0:
            why = f"the kernel refused a network namespace: ip netns add: {probe.stderr.strip()}"
        else:
            subprocess.run([_which("ip"), "netns", "del", name], capture_output=True)
            uts = subprocess.run([_which("unshare"), "--uts", "--mount", "true"], capture_output=True,
                                 text=True)
            if uts.returncode != 0:
                why = f"the kernel refused UTS/mount namespaces: unshare: {uts.stderr.strip()}"
    _SKIP.append(why)
    return why


@dataclass
class Host:
    """One host: its namespace, hostname and address, and a process holding its namespaces."""

    netns: str
    hostname: str
    addr: str
    local: Path  # this host's node-local folder (seen by it at Hosts.local_path)
    holder: subprocess.Popen | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def command(self, cmd: Sequence[str], cwd: Path | str | None = None) -> list[str]:
        """``cmd`` run inside this host (network, hostname, mounts), in ``cwd`` (entering a mount
        namespace leaves the working directory at /, hence nsenter's --wd)."""
        assert self.holder is not None
        wd = [f"--wd={cwd}"] if cwd is not None else []
        return [_which("nsenter"), "-t", str(self.holder.pid), "-n", "-u", "-m", *wd, "--", *cmd]

    def popen(self, cmd: Sequence[str], cwd: Path | str | None = None, **kwargs) -> subprocess.Popen:
        p = subprocess.Popen(self.command(cmd, cwd), **kwargs)
        self.procs.append(p)
        return p

    def run(self, cmd: Sequence[str], cwd: Path | str | None = None, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(cmd, cwd), timeout=timeout, **kwargs)

    def pids(self) -> list[int]:
        """Every process in this host's network namespace except its holder."""
        out = subprocess.run([_which("ip"), "netns", "pids", self.netns], capture_output=True, text=True)
        holder = self.holder.pid if self.holder else -1
        return [int(p) for p in out.stdout.split() if int(p) != holder]

    def kill_all(self, timeout: float = 10) -> list[int]:
        """SIGKILL every process of this host (as a power cut would), until none is left; the
        namespaces stay, so the host can start processes again. Returns the pids killed."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for p in self.procs:  # reap what we started
            if p.poll() is None:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        if self.pids():
            raise RuntimeError(f"host {self.hostname}: processes survive SIGKILL: {self.pids()}")
        return killed


def _hosts_file(own: Host, peers: Sequence[Host]) -> str:
    lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{own.hostname}",
             "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{p.addr}\t{p.hostname}" for p in peers]
    return "\n".join(lines) + "\n"


@contextmanager
def two_hosts(folder: Path) -> Iterator[tuple[Host, Host]]:
    """Two hosts joined by a veth pair; their files (hosts files, node-local folders) under
    ``folder``. Everything is removed on exit: processes killed, namespaces deleted (which
    deletes the veth pair)."""
    tag = f"fr{secrets.token_hex(3)}"  # names unique per call: tests may run side by side
    net = f"10.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    root = folder / "hosts"
    (root / "local").mkdir(parents=True, exist_ok=True)
    hosts = [Host(f"{tag}{x}", f"{tag}n{i}", f"{net}.{i}", root / f"n{i}-local")
             for i, x in ((1, "a"), (2, "b"))]
    ip = _which("ip")
    try:
        for h in hosts:
            _sh(ip, "netns", "add", h.netns)
        _sh(ip, "link", "add", hosts[0].netns, "type", "veth", "peer", "name", hosts[1].netns)
        for h in hosts:
            _sh(ip, "link", "set", h.netns, "netns", h.netns)
            _sh(ip, "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.netns)
            _sh(ip, "-n", h.netns, "link", "set", h.netns, "up")
            _sh(ip, "-n", h.netns, "link", "set", "lo", "up")
        for h, peer in ((hosts[0], hosts[1]), (hosts[1], hosts[0])):
            h.local.mkdir(parents=True, exist_ok=True)
            hosts_file = root / f"{h.hostname}.hosts"
            hosts_file.write_text(_hosts_file(h, [peer]))
            # the holder lives until its standard input closes: when the test ends, or dies
            script = (f"hostname {h.hostname} && mount --bind {hosts_file} /etc/hosts && "
                      f"mount --bind {h.local} {root / 'local'} && echo ready && exec cat >/dev/null")
            h.holder = subprocess.Popen([_which("nsenter"), f"--net=/run/netns/{h.netns}", _which("unshare"),
                                         "--uts", "--mount", "--propagation", "private", "sh", "-c", script],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
            ready = h.holder.stdout.readline()
            if ready.strip() != "ready":
                raise RuntimeError(f"host {h.hostname} did not start: {h.holder.stderr.read()}")
        yield hosts[0], hosts[1]
    finally:
        for h in hosts:
            if h.holder is not None:
                try:
                    h.kill_all()
                finally:
                    h.holder.kill()
                    h.holder.wait()
        for h in hosts:
            subprocess.run([ip, "netns", "del", h.netns], capture_output=True)


# --------------------------------------------------------------------------------------------
# A two-node SLURM on two hosts: slurmctld on the first, one slurmd and one munged on each (same
# munge key, each munged's socket in its host's node-local folder, so each slurmd talks to its
# own). Debian's slurm-wlm and munge, as launch/slurm_local_cluster.sh uses them.

SLURM_TOOLS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged")


def slurm_missing() -> list[str]:
    return [t for t in SLURM_TOOLS if _which(t) is None]


@dataclass
class SlurmCluster:
    """A running two-node cluster: its config and how to run a client command on host 1."""

    conf: Path
    hosts: tuple[Host, Host]
    state: Path  # where the hosts' folders (and so the daemons' logs) are
    key: Path  # the munge key
    local: Path  # the path at which each host sees its node-local folder

    @property
    def nodes(self) -> list[str]:
        return [h.hostname for h in self.hosts]

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "SLURM_CONF": str(self.conf), "PATH": SBIN_PATH}

    def restart_host(self, i: int) -> None:
        """munged and slurmd on host ``i`` again (after its kill_all)."""
        start_munged(self.hosts[i], self.key, self.local)
        start_slurmd(self.hosts[i], self.conf)

    def ctld_log(self) -> str:
        log = self.hosts[0].local / "slurmctld.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def logs(self) -> str:
        """The daemons' logs, last lines of each (for a failing test's message)."""
        out = []
        for f in sorted(self.state.rglob("*.log")):
            out.append(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(out)


def _slurm_conf(hosts: Sequence[Host], state: Path, local: Path) -> str:
    head = hosts[0]
    nodes = "\n".join(f"NodeName={h.hostname} NodeAddr={h.addr} CPUs={os.cpu_count()} RealMemory=1000 "
                      f"State=UNKNOWN" for h in hosts)
    return f"""# written by tests/netns.py: two nodes, each a network namespace of this machine
ClusterName=fedrun-two
SlurmctldHost={head.hostname}({head.addr})
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={local}/munge.socket,cred_expire=10
StateSaveLocation={state}/ctld
SlurmdSpoolDir={local}/spool
SlurmctldPidFile={local}/slurmctld.pid
SlurmdPidFile={local}/slurmd.pid
SlurmctldLogFile={local}/slurmctld.log
SlurmdLogFile={local}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# a requeued job starts as soon as it may (the main scheduler passes every 60 s by default)
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# a node that stops answering is DOWN after 3 s, and its batch jobs are requeued (JobRequeue=1)
SlurmdTimeout=3
MessageTimeout=3
JobRequeue=1
KillWait=2
InactiveLimit=0
MinJobAge=5
{nodes}
PartitionName=two Nodes={','.join(h.hostname for h in hosts)} Default=YES MaxTime=INFINITE State=UP
"""


def start_slurmd(host: Host, conf: Path) -> None:
    """slurmd on ``host`` (again, after kill_all)."""
    out = host.run([_which("slurmd"), "-f", str(conf)], env={"PATH": SBIN_PATH, "SLURM_CONF": str(conf)})
    if out.returncode != 0:
        raise RuntimeError(f"slurmd on {host.hostname}: {out.stderr}")


def start_munged(host: Host, key: Path, local: Path) -> None:
    out = host.run([_which("munged"), "--force", f"--key-file={key}", f"--socket={local}/munge.socket",
                    f"--pid-file={local}/munged.pid", f"--log-file={local}/munged.log",
                    f"--seed-file={local}/munge.seed"])
    if out.returncode != 0:
        raise RuntimeError(f"munged on {host.hostname}: {out.stderr}")


@contextmanager
def slurm_cluster(hosts: tuple[Host, Host], folder: Path, wait: float = 60) -> Iterator[SlurmCluster]:
    """slurmctld on hosts[0], munged and slurmd on both; yields once both nodes are idle."""
    state = folder / "slurm"
    (state / "ctld").mkdir(parents=True, exist_ok=True)
    local = hosts[0].local.parent / "local"  # the path each host sees its own node-local folder at
    conf = state / "slurm.conf"
    conf.write_text(_slurm_conf(hosts, state, local))
    key = state / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    cluster = SlurmCluster(conf, hosts, folder / "hosts", key, local)
    env = cluster.env({})
    for h in hosts:
        (h.local / "spool").mkdir(parents=True, exist_ok=True)
        start_munged(h, key, local)
    out = hosts[0].run([_which("slurmctld"), "-f", str(conf)], env=env)
    if out.returncode != 0:
        raise RuntimeError(f"slurmctld: {out.stderr}\n{cluster.logs()}")
    for h in hosts:
        start_slurmd(h, conf)
    deadline = time.monotonic() + wait
    states = ""
    while time.monotonic() < deadline:
        states = hosts[0].run([_which("sinfo"), "-h", "-N", "-o", "%N %T"], env=env).stdout
        if states.count("idle") == 2:
            break
        time.sleep(0.3)
    else:
        raise RuntimeError(f"the two nodes are not idle after {wait:.0f}s: {states!r}\n{cluster.logs()}")
    try:
        yield cluster
    finally:
        hosts[0].run([_which("scancel"), "--partition=two"], env=env)
        # the daemons go with the hosts' processes (two_hosts kills them on exit)
