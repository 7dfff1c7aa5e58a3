"""What a job costs before and after its rounds: startup against a bare ``import torch``.

Measured in one run, alternating, ``--repeats`` times each (median reported):

* ``import_torch_s``: ``python -c "import torch"``, the floor every rank pays;
* ``import_fedrun_train_s``: ``python -c "import fedrun.train"`` (what a training rank imports);
* ``job_s`` / ``outside_round_s``: ``torchrun --standalone --nproc_per_node=W -m fedrun
  --fed.rounds 1`` on the digits default without evaluation or grids, whole wall time, and that
  minus the round's own ``wall_s`` from metrics.jsonl (torchrun start, imports, data, partition,
  process group, teardown);

and the ratios ``outside_round_over_import_torch`` and ``import_fedrun_over_import_torch``.
``--pythonpath DIR`` measures another checkout (e.g. an older commit) the same way.

    python benchmarks/startup.py --out benchmarks/results/startup_cpu.json
"""

from __future__ import annotations

import argparse
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
    fig: dict[str, list[float]] = {"import_torch_s": [], "import_fedrun_train_s": [], "job_s": [],
                                   "outside_round_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            fig["import_torch_s"].append(timed([sys.executable, "-c", "import torch"], env, cwd))
            fedrun_import = timed([sys.executable, "-c", "import fedrun.train"], env, cwd)
            fig["import_fedrun_train_s"].append(fedrun_import)
            out = Path(tmp) / f"r{i}"
            job = timed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={args.nproc}", "-m", "fedrun", "--fed.rounds", "1",
                         "--eval.enabled", "false", "--sample.per_class", "0", "--run.out_dir", str(out)],
                        env, cwd)
            round_s = json.loads((out / "digits" / "metrics.jsonl").read_text().splitlines()[0])["wall_s"]
            fig["job_s"].append(job)
            fig["outside_round_s"].append(job - round_s)
    med = {k: round(statistics.median(v), 3) for k, v in fig.items()}
    result = {
        "machine": {"cpu_cores": os.cpu_count(), "python": platform.python_version()},
        "checkout": args.pythonpath or str(ROOT), "nproc": args.nproc, "repeats": args.repeats,
        "median": med, "all": {k: [round(x, 3) for x in v] for k, v in fig.items()},
        "outside_round_over_import_torch": round(med["outside_round_s"] / med["import_torch_s"], 3),
        "import_fedrun_over_import_torch": round(med["import_fedrun_train_s"] / med["import_torch_s"], 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
