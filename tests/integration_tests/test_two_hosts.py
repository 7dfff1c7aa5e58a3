"""fedrun across two real network stacks: two "hosts" on this machine (tests/netns.py: each a
network namespace with its own hostname, its own /etc/hosts and a node-local folder, joined by a
veth pair whose addresses exist only inside them), and the result must not notice.

* torchrun: ``launch/torchrun_multinode.sh`` on each host, one rank per host, c10d rendezvous
  on host 1's address. The global model after every round must be bit-identical to a one-host
  run with the same world size (2 ranks under ``torchrun --standalone``): see
  test_world_size.py for why bit-identical is the right bar.
* the same with host 2 killed in round 2 (every process of its namespace, SIGKILL) and the job
  started again on both hosts: it resumes from the shared folder and ends bit-identical (slow).
* SLURM: slurmctld, and munged and slurmd on each host; ``sbatch --nodes=2 launch/slurm.sbatch``
  in both launch shapes, and the srun shape with host 2 killed and the job resubmitted (slow).

The hosts' files are Debian's default shape (a host's own name resolves to 127.0.1.1), which is
what makes gloo's own interface choice fail across hosts; fedrun/dist.py (gloo_interface) binds
to the interface that reaches the master instead: revert that and these tests fail ("Gloo
connectFullMesh failed ... remote=[127.0.1.1]"). tmp_path is the cluster's shared folder.

Skipped, with the reason, where namespaces cannot be made (not root, no ip/unshare/nsenter);
the SLURM tests also where SLURM is missing, except with CI=true (.ci/run installs it), where
that fails. Times on this 2-core machine are in docs/systems.md "Several hosts".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import netns
import pytest

from fedrun import checkpoint
from fedrun.dist import slurm_hostnames

from helpers import (
    ROOT,
    as_args,
    clean_env,
    clients_of_rank,
    max_abs_diff,
    model_at,
    same_bits,
    tiny_overrides,
)

if why := netns.skip_reason():
    pytest.skip(why, allow_module_level=True)

ROUNDS = 3  # the killed runs': killed in round 2, then round 3; the others train 2
KEEP = {"checkpoint__keep": ROUNDS}
TORCHRUN_SH = ROOT / "launch" / "torchrun_multinode.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
PORT = 29500  # free: nothing else lives in the hosts' network namespaces


def overrides(out: Path, name: str, rounds: int = 2) -> list[str]:
    return as_args(tiny_overrides(out, name, fed__rounds=rounds, **KEEP))


def base_env() -> dict[str, str]:
    return {**clean_env(), "OMP_NUM_THREADS": "1", "PATH": netns.SBIN_PATH}


def assert_same_as(reference: Path, run_dir: Path, rounds: int) -> None:
    for r in range(1, rounds + 1):
        a, b = model_at(reference, r), model_at(run_dir, r)
        assert same_bits(a, b), f"round {r}: max |diff| {max_abs_diff(a, b):.3g} from the one-host run"


def world_sizes(run_dir: Path) -> list[int]:
    return [json.loads(line)["world_size"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric_rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The folder both hosts see: run directories, job outputs, the SLURM state."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def hosts(shared) -> Iterator[tuple[netns.Host, netns.Host]]:
    with netns.two_hosts(shared) as pair:
        yield pair


@pytest.fixture(scope="module")
def references(shared) -> Iterator[dict[int, Future]]:
    """The one-host runs, by number of rounds: 2 ranks under ``torchrun --standalone`` on this
    machine's own network. Each starts in the background when first asked for (a Future of its
    run dir), so that it trains while the two-host job it is compared with starts."""
    pool = ThreadPoolExecutor(2)

    def run(rounds: int) -> Path:
        out = shared / f"one_host_{rounds}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fedrun", *overrides(out, "reference", rounds)]
        res = subprocess.run(cmd, cwd=out, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return out / "reference"

    class Lazy(dict):
        def __missing__(self, rounds: int) -> Future:
            self[rounds] = pool.submit(run, rounds)
            return self[rounds]

    yield Lazy()
    pool.shutdown()


@pytest.fixture
def reference(references) -> Future:
    """The 2-round one-host run."""
    return references[2]


@pytest.fixture
def reference3(references) -> Future:
    """The 3-round one-host run (for the kill tests: killed in round 2, then round 3)."""
    return references[3]


def start_torchrun(hosts, out: Path, name: str, job_id: str, rounds: int = 2,
                   host2_env: dict[str, str] | None = None) -> list[tuple[subprocess.Popen, Path]]:
    """launch/torchrun_multinode.sh on both hosts, HEAD = host 1's address; each host's output
    goes to a file in ``out`` (a pipe nobody reads could fill and stall a rank)."""
    env = {**base_env(), "NNODES": "2", "NPROC": "1", "HEAD": hosts[0].addr, "HEAD_PORT": str(PORT),
           "JOB_ID": job_id, "PYTHON": sys.executable}
    cmd = ["bash", str(TORCHRUN_SH), *overrides(out, name, rounds)]
    started = []
    for h, extra in zip(hosts, ({}, host2_env), strict=True):
        log = out / f"{job_id}.{h.hostname}.log"
        with open(log, "w") as f:
            started.append((h.popen(cmd, cwd=out, env={**env, **(extra or {})}, stdout=f,
                                    stderr=subprocess.STDOUT), log))
    return started


def finish(started: list[tuple[subprocess.Popen, Path]], timeout: float = 120) -> list[tuple[int, str]]:
    """(exit code, output) of each host's torchrun, once all have ended (killed after ``timeout``)."""
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p, _ in started]
    finally:
        for p, _ in started:
            p.kill()
    return [(code, log.read_text(errors="replace")) for code, (_, log) in zip(codes, started, strict=True)]


def test_dry_run_prints_what_each_host_runs(hosts, tmp_path):
    """DRY_RUN=1 on each host: host 1 (HEAD is its own address) hosts the rendezvous, host 2
    does not, both print their host name and the same torchrun line."""
    env = {**base_env(), "NNODES": "2", "NPROC": "1", "HEAD": hosts[0].addr, "DRY_RUN": "1",
           "PYTHON": sys.executable}
    lines = []
    for h in hosts:
        res = h.run(["bash", str(TORCHRUN_SH), "--fed.rounds", "3"], cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr
        lines.append(res.stdout.strip())
    assert lines[0].startswith(f"{hosts[0].hostname}: ") and lines[1].startswith(f"{hosts[1].hostname}: ")
    assert "--rdzv_conf=is_host=1" in lines[0] and "is_host" not in lines[1]
    for line in lines:
        assert f"--nnodes=2 --nproc_per_node=1 --rdzv_id=fedrun --rdzv_backend=c10d " \
               f"--rdzv_endpoint={hosts[0].addr}:29500" in line and line.endswith("-m fedrun --fed.rounds 3")


def test_gloo_binds_to_the_link_between_the_hosts(hosts, tmp_path):
    """fedrun.dist.gloo_interface with host 1's name as MASTER_ADDR, asked on each host: host 2
    reaches it over the veth; on host 1 that name is 127.0.1.1 (its own hosts file), and the
    veth, its only other interface, is chosen. gloo's own choice would be 127.0.1.1 on both."""
    code = "import sys; from fedrun.dist import gloo_interface; print(gloo_interface(sys.argv[1], 29500))"
    for h in hosts:
        res = h.run([sys.executable, "-c", code, hosts[0].hostname], cwd=tmp_path, env=base_env())
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == h.netns  # each host's end of the veth pair bears its netns name
        own = h.run(["getent", "hosts", h.hostname], cwd=tmp_path).stdout
        assert own.startswith("127.0.1.1"), own


@pytest.mark.slow  # ~20 s (.ci/run runs it); the suite's quick part: the dry run, gloo's interface, srun
def test_torchrun_two_hosts_equals_one_host(hosts, reference, shared):
    """One torchrun agent per host, the c10d rendezvous on host 1's address, 2 rounds: the same
    global model after each round as the one-host run, bit for bit."""
    out = shared / "torchrun"
    out.mkdir()
    results = finish(start_torchrun(hosts, out, "two_hosts", "two-hosts"))
    for code, err in results:
        assert code == 0, err[-3000:]
    assert world_sizes(out / "two_hosts") == [2, 2]
    assert_same_as(reference.result(timeout=300), out / "two_hosts", 2)


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or all(p.poll() is not None for p in procs):
            raise AssertionError(f"{path} never appeared (the fault did not fire)")
        time.sleep(0.02)


@pytest.mark.slow  # ~25 s: two jobs of two hosts one after the other
def test_torchrun_host2_killed_in_round2_then_restarted_ends_bit_identical(hosts, reference3, shared):
    """Host 2's rank kills itself at its first step of round 2 (fedrun/faults.py, on host 2 only),
    and the test kills every other process of host 2 at once (its torchrun agent): host 1's rank
    loses its peer and the job fails. The same command on both hosts again (a new rendezvous id,
    as a resubmitted job gets) resumes from round 1's checkpoint in the shared folder and ends
    with the one-host run's model, bit for bit."""
    out = shared / "torchrun_killed"
    out.mkdir()
    marker = out / "fault.marker"
    fault = {"FEDRUN_FAULT_AT": "2:*:1", "FEDRUN_FAULT_MARKER": str(marker)}
    procs = start_torchrun(hosts, out, "killed", "killed-1", ROUNDS, host2_env=fault)
    wait_for(marker, [p for p, _ in procs])
    assert hosts[1].kill_all(), "host 2 had no process left to kill"
    first = finish(procs, timeout=120)
    assert first[0][0] != 0, "host 1's job went on without host 2"
    run_dir = out / "killed"
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["round_0001.pt"]

    again = finish(start_torchrun(hosts, out, "killed", "killed-2", ROUNDS, host2_env=fault))
    for code, err in again:
        assert code == 0, err[-3000:]
    assert any("resuming from" in err and "(round 1)" in err for _, err in again), again[0][1][-3000:]
    assert metric_rounds(run_dir) == [1, 2, 3]
    assert_same_as(reference3.result(timeout=300), run_dir, ROUNDS)


# ---------------------------------------------------------------------------------------------
# SLURM


def test_node_list_expansion_matches_scontrol(tmp_path):
    """fedrun's SLURM_NODELIST expansion (slurm.sbatch's dry runs, the srun shape's master) is
    SLURM's own: ``scontrol show hostnames`` of the installed SLURM, on a do-nothing slurm.conf."""
    if netns.slurm_missing():
        pytest.skip(f"SLURM is not installed ({', '.join(netns.slurm_missing())} not found)")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=a\nPartitionName=p Nodes=a\n")
    for nodelist in ("gpu[003-005,010],cpu1", "rack[1-2]-n[07-08]", "a,b[8-11]", "n[9-10]", "n[08-10],x1",
                     "fr12n[1-2]", "a[1-2],a[2-3]", "node7"):
        res = subprocess.run([netns._which("scontrol"), "show", "hostnames", nodelist], capture_output=True,
                             text=True, env={**base_env(), "SLURM_CONF": str(conf)}, timeout=30)
        assert res.returncode == 0, res.stderr
        assert slurm_hostnames(nodelist) == res.stdout.split(), nodelist


@pytest.fixture(scope="module")
def slurm(hosts, shared) -> Iterator[netns.SlurmCluster]:
    if missing := netns.slurm_missing():
        why = (f"SLURM is not installed ({', '.join(missing)} not found); `bash "
               f"launch/slurm_local_cluster.sh install` installs it (as .ci/run does)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    with netns.slurm_cluster(hosts, shared) as cluster:
        yield cluster


def test_srun_tasks_see_their_node_local_ranks(slurm, tmp_path):
    """``srun --nodes=2 --ntasks-per-node=2`` on the real two-node cluster, each task printing
    what fedrun.dist reads from SLURM's variables: global ranks 0-3 in blocks (0, 1 on node 1),
    node-local ranks 0, 1 and 2 tasks per node on each node, the master = the first node of
    SLURM_JOB_NODELIST (``frXXXXXXn[1-2]``) for all, and gloo bound to each node's own link."""
    code = ("import json, socket; from fedrun.dist import gloo_interface, launch_env; e = launch_env(); "
            "print(json.dumps({**e, 'host': socket.gethostname(), "
            "'gloo': gloo_interface(e['master_addr'], int(e['master_port']))}))")
    cmd = ["srun", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--job-name=ranks",
           sys.executable, "-c", code]
    res = slurm.hosts[0].run(cmd, cwd=tmp_path, env=slurm.env(base_env()), timeout=120)
    assert res.returncode == 0, res.stderr + slurm.logs()
    tasks = sorted((json.loads(line) for line in res.stdout.splitlines()), key=lambda t: t["rank"])
    nodes = [h.hostname for h in slurm.hosts]
    assert [t["rank"] for t in tasks] == [0, 1, 2, 3] and {t["world_size"] for t in tasks} == {4}
    assert [t["host"] for t in tasks] == [nodes[0], nodes[0], nodes[1], nodes[1]]
    assert [t["local_rank"] for t in tasks] == [0, 1, 0, 1] and {t["local_world_size"] for t in tasks} == {2}
    assert {t["master_addr"] for t in tasks} == {nodes[0]} and len({t["master_port"] for t in tasks}) == 1
    assert [t["gloo"] for t in tasks] == [slurm.hosts[i].netns for i in (0, 0, 1, 1)]


SHAPES = ("torchrun", "srun")


def sbatch(cluster: netns.SlurmCluster, out: Path, shape: str, name: str, rounds: int = 2,
           extra: dict[str, str] | None = None) -> subprocess.Popen:
    """``sbatch --wait --nodes=2 launch/slurm.sbatch`` from host 1, one rank per node."""
    env = cluster.env({**base_env(), "FEDRUN_LAUNCH": shape, "FEDRUN_PYTHON": sys.executable,
                       **(extra or {})})
    cmd = ["sbatch", "--wait", "--nodes=2", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1",
           f"--job-name={name}", f"--output={out / name}.out", str(SBATCH), *overrides(out, name, rounds)]
    return cluster.hosts[0].popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)


def job_output(job: subprocess.Popen, out: Path, name: str, timeout: float = 180) -> tuple[int, str]:
    try:
        submitted = job.communicate(timeout=timeout)[0]
    finally:
        job.kill()
    log = out / f"{name}.out"
    return job.returncode, submitted + (log.read_text() if log.exists() else "")


@pytest.fixture(scope="module")
def slurm_runs(slurm, shared, references) -> dict[str, tuple[int, str, Path]]:
    """Both shapes submitted at once (each takes 1 of the 2 CPUs of each node, so they run
    together), the one-host run meanwhile. {shape: (exit code, job output, run dir)}"""
    out = shared / "slurm_runs"
    out.mkdir()
    references[2]  # noqa: B018 (starts it)
    jobs = {shape: sbatch(slurm, out, shape, shape) for shape in SHAPES}
    return {shape: (*job_output(job, out, shape), out / shape) for shape, job in jobs.items()}


@pytest.mark.slow  # ~20 s for both shapes, the cluster included
@pytest.mark.parametrize("shape", SHAPES)
def test_sbatch_two_nodes_equals_one_host(slurm_runs, slurm, reference, shape):
    code, output, run_dir = slurm_runs[shape]
    assert code == 0, output[-3000:] + slurm.logs()
    assert f"2 node(s) x 1 rank(s), launch={shape}, head={slurm.nodes[0]}" in output, output[-3000:]
    assert world_sizes(run_dir) == [2, 2]
    assert_same_as(reference.result(timeout=300), run_dir, 2)


def wait_until(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def wait_idle(cluster: netns.SlurmCluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        states = cluster.hosts[0].run(["sinfo", "-h", "-N", "-o", "%N %T"],
                                      env=cluster.env(base_env())).stdout
        if states.count("idle") == 2:
            return
        time.sleep(0.3)
    raise AssertionError(f"nodes not idle after {timeout:.0f}s: {states!r}\n{cluster.logs()}")


@pytest.mark.slow  # ~40 s: SLURM notices the lost node, requeues the job, runs it again
def test_sbatch_host2_killed_in_round2_requeued_ends_bit_identical(slurm, reference3, shared):
    """The srun shape (rank 1 on node 2): rank 1 kills itself at its first step of round 2 and the
    test kills every other process of host 2 (slurmd, munged, slurmstepd). slurmctld finds node 2
    not responding, sets it DOWN and requeues the batch job (what SLURM does on a node failure);
    host 2 comes back (munged and slurmd started again), the requeued job runs on both nodes,
    resumes from round 1 and ends bit-identical to the one-host run."""
    wait_idle(slurm)
    out = shared / "slurm_killed"
    out.mkdir()
    marker = out / "fault.marker"
    client = clients_of_rank(2)[1][0]
    fault = {"FEDRUN_FAULT_AT": f"2:{client}:1", "FEDRUN_FAULT_MARKER": str(marker)}
    job = sbatch(slurm, out, "srun", "killed", ROUNDS, extra=fault)
    wait_for(marker, [job])
    assert slurm.hosts[1].kill_all(), "host 2 had no process left to kill"
    requeued = wait_until(lambda: "requeue job" in slurm.ctld_log(), 60)
    assert requeued, f"slurmctld did not requeue the job\n{slurm.logs()}"
    run_dir = out / "killed"
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["round_0001.pt"]

    slurm.restart_host(1)
    code, output = job_output(job, out, "killed")
    assert code == 0, output[-3000:] + slurm.logs()
    assert "resuming from" in output and "(round 1)" in output, output[-3000:]
    assert metric_rounds(run_dir) == [1, 2, 3]
    assert_same_as(reference3.result(timeout=300), run_dir, ROUNDS)
