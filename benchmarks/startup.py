"""What a job costs before and after its rounds: startup against a bare ``import torch``.

Measured in one run, alternating, ``--repeats`` times each (median reported):

* ``import_torch_s``: ``python -c "import torch"``, the floor every rank pays;
* ``import_fedrun_train_s``: ``python -c "import fedrun.train"`` (what a training rank imports);
* ``import_torch_dynamo_s``: ``python -c "import torch._dynamo"``: torch imports its compiler
  lazily the first time anything wrapped by ``torch._disable_dynamo`` runs, and every optimizer's
  constructor is (as are meta-device decompositions): every training process pays it once;
* ``torchrun_empty_s``: ``torchrun --standalone --nproc_per_node=W --no-python true``, the
  launcher alone: its own interpreter imports torch before any rank starts;
* ``job_s`` / ``outside_round_s``: ``torchrun --standalone --nproc_per_node=W -m fedrun
  --fed.rounds 1`` on the digits default without evaluation or grids, whole wall time, and that
  minus the round's own ``wall_s`` from metrics.jsonl (torchrun start, imports, data, partition,
  process group, teardown);
* ``one_process_outside_round_s``: the same job as one plain process (``python -m fedrun``);

and the ratios ``outside_round_over_import_torch`` and ``import_fedrun_over_import_torch``, and
``where_it_goes``: the outside-the-round time split into the launcher, the ranks' imports of
fedrun (torch included), torch's compiler, and the rest (fedrun's own set-up and teardown).

What could be deferred, measured in the same run:

* ``without_compiler``: the torchrun job again with a stand-in for ``torch._dynamo`` (a module
  whose ``disable`` returns the function it is given), so that nothing imports the compiler:
  its ``outside_round_s`` and ratio are what the job would cost if fedrun never triggered that
  import (fedrun does not use torch.compile on CPU; see docs/systems.md "Several hosts" for the two
  places that trigger it). A measurement only: fedrun itself never installs the stand-in.
* ``import_beyond_torch_s``: ``python -X importtime -c "import fedrun.train"``, the modules that
  ``import torch`` alone does not import, summed by top-level package (``fedrun``, ``numpy``,
  ``rich``, ``torch`` for torch submodules fedrun pulls in), largest first: the ceiling of what
  deferring fedrun's own imports could save.
The machine may be busy: every figure is the **best** of ``--repeats`` (the least disturbed),
the medians are in the JSON too. ``--pythonpath DIR`` measures another checkout (e.g. an older
commit) the same way.

    python benchmarks/startup.py --out benchmarks/results/startup_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' own modules
from portable import portable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


# A stand-in torch._dynamo, first on the job's PYTHONPATH as sitecustomize.py (without_compiler).
NO_COMPILER_SITE = '''
"""benchmarks/startup.py only: a stand-in for torch._dynamo, so that nothing imports the compiler."""
import importlib.abc
import importlib.machinery
import sys
import types


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "torch._dynamo" else None

    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.disable = lambda fn=None, recursive=True, wrapping=True, **kw: fn
        m.is_compiling = lambda: False
        m.graph_break = lambda *a, **k: None
        m.trace_rules = types.SimpleNamespace(clear_lru_cache=lambda: None)  # init_process_group calls it
        return m

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _StandIn())
'''


def import_times(code: str, env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Self time (s) of every module ``python -X importtime -c CODE`` imports."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, cwd=cwd, check=True,
                         capture_output=True, text=True).stderr
    times: dict[str, float] = {}
    for line in out.splitlines():
        if line.startswith("import time:") and "|" in line:
            self_us, _, name = line[len("import time:"):].split("|")
            if self_us.strip().isdigit():
                times[name.strip()] = int(self_us) / 1e6
    return times


def import_beyond_torch(env: dict[str, str], cwd: Path, repeats: int) -> dict[str, float]:
    """What ``import fedrun.train`` imports that ``import torch`` does not, by top-level package
    (best of ``repeats`` per package), largest first."""
    torch_mods = set(import_times("import torch", env, cwd))
    best: dict[str, float] = {}
    for _ in range(repeats):
        by_pkg: dict[str, float] = {}
        for name, t in import_times("import fedrun.train", env, cwd).items():
            if name not in torch_mods:
                by_pkg[name.split(".")[0]] = by_pkg.get(name.split(".")[0], 0.0) + t
        for pkg, t in by_pkg.items():
            best[pkg] = min(best.get(pkg, t), t)
    return {k: round(v, 3) for k, v in sorted(best.items(), key=lambda kv: -kv[1]) if v >= 0.002}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--pythonpath", default="", help="measure the fedrun found here instead")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    launcher = ("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env["OMP_NUM_THREADS"] = "1"
    cwd = ROOT
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
        cwd = Path(args.pythonpath)
    fig: dict[str, list[float]] = {"import_torch_s": [], "import_fedrun_train_s": [],
                                   "import_torch_dynamo_s": [], "torchrun_empty_s": [], "job_s": [],
                                   "outside_round_s": [], "one_process_outside_round_s": [],
                                   "outside_round_without_compiler_s": []}
    job = ["-m", "fedrun", "--fed.rounds", "1", "--eval.enabled", "false", "--sample.per_class", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc}"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "no_compiler_site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(NO_COMPILER_SITE)
        paths = (str(site), env.get("PYTHONPATH", ""))
        no_compiler_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        for i in range(args.repeats):
            fig["import_torch_s"].append(timed([sys.executable, "-c", "import torch"], env, cwd))
            fedrun_import = timed([sys.executable, "-c", "import fedrun.train"], env, cwd)
            fig["import_fedrun_train_s"].append(fedrun_import)
            compiler = timed([sys.executable, "-c", "import torch._dynamo"], env, cwd)
            fig["import_torch_dynamo_s"].append(compiler)
            fig["torchrun_empty_s"].append(timed([*torchrun, "--no-python", "true"], env, cwd))
            for name, command in (("", torchrun), ("one_process_", [sys.executable])):
                out = Path(tmp) / f"{name}r{i}"
                took = timed([*command, *job, "--run.out_dir", str(out)], env, cwd)
                round_s = json.loads((out / "digits" / "metrics.jsonl").read_text().splitlines()[0])["wall_s"]
                if not name:
                    fig["job_s"].append(took)
                fig[f"{name}outside_round_s"].append(took - round_s)
            out = Path(tmp) / f"no_compiler_r{i}"
            took = timed([*torchrun, *job, "--run.out_dir", str(out)], no_compiler_env, cwd)
            round_s = json.loads((out / "digits" / "metrics.jsonl").read_text().splitlines()[0])["wall_s"]
            fig["outside_round_without_compiler_s"].append(took - round_s)
        beyond = import_beyond_torch(env, cwd, args.repeats)
    best = {k: round(min(v), 3) for k, v in fig.items()}
    med = {k: round(statistics.median(v), 3) for k, v in fig.items()}
    # the ranks import in parallel; torch's compiler comes on top of the plain import
    launcher = best["torchrun_empty_s"]
    imports = best["import_fedrun_train_s"]
    compiler = max(best["import_torch_dynamo_s"] - best["import_torch_s"], 0.0)
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu_cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": load},
        "checkout": portable(args.pythonpath or str(ROOT)), "nproc": args.nproc, "repeats": args.repeats,
        "best": best, "median": med, "all": {k: [round(x, 3) for x in v] for k, v in fig.items()},
        "outside_round_over_import_torch": round(best["outside_round_s"] / best["import_torch_s"], 3),
        "import_fedrun_over_import_torch": round(best["import_fedrun_train_s"] / best["import_torch_s"], 3),
        "where_it_goes": {
            "launcher_s": launcher, "rank_imports_s": imports, "torch_compiler_import_s": round(compiler, 3),
            "rest_s": round(best["outside_round_s"] - launcher - imports - compiler, 3)},
        "without_compiler": {
            "outside_round_s": best["outside_round_without_compiler_s"],
            "outside_round_over_import_torch": round(best["outside_round_without_compiler_s"]
                                                     / best["import_torch_s"], 3)},
        "import_beyond_torch_s": beyond,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
