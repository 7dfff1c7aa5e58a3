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

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


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
                                   "outside_round_s": [], "one_process_outside_round_s": []}
    job = ["-m", "fedrun", "--fed.rounds", "1", "--eval.enabled", "false", "--sample.per_class", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc}"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
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
        "checkout": args.pythonpath or str(ROOT), "nproc": args.nproc, "repeats": args.repeats,
        "best": best, "median": med, "all": {k: [round(x, 3) for x in v] for k, v in fig.items()},
        "outside_round_over_import_torch": round(best["outside_round_s"] / best["import_torch_s"], 3),
        "import_fedrun_over_import_torch": round(best["import_fedrun_train_s"] / best["import_torch_s"], 3),
        "where_it_goes": {
            "launcher_s": launcher, "rank_imports_s": imports, "torch_compiler_import_s": round(compiler, 3),
            "rest_s": round(best["outside_round_s"] - launcher - imports - compiler, 3)},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
