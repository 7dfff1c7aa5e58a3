#!/usr/bin/env python
"""Run one of the paper's sweeps (configs/paper/*.toml), one torchrun job per (data set, setting).

    python launch/run_table.py configs/paper/table2_alpha.toml --nproc 8
    python launch/run_table.py configs/paper/table2_alpha.toml --dry-run
    python launch/run_table.py SWEEP.toml --nproc 2 -- --fed.rounds 10 --run.out_dir runs/quick

Every job's config is built and validated before the first one starts, so a typo fails in a
second, not after the first job's hours. Runs are named ``<table>_<data set>_<setting>``; a run
that already finished resumes instantly (fedrun resumes from its run directory), so the script
can simply be started again after an interruption. Then: ``fedrun report runs/<table>_*``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrun.config import load_config, parse_overrides  # noqa: E402
from fedrun.errors import ConfigError  # noqa: E402


def plan(sweep_path: Path, extra: list[str]) -> list[tuple[str, list[str]]]:
    """(run name, fedrun arguments) for every job of the sweep, validated."""
    spec = tomllib.loads(sweep_path.read_text())
    jobs = []
    for config in spec["configs"]:
        config_path = ROOT / config if not Path(config).is_absolute() else Path(config)
        for run in spec["runs"]:
            base = load_config(config_path)
            name = f"{spec['table']}_{base.data.name}_{run['name']}"
            args = ["--config", str(config_path), "--run.name", name]
            for key, value in run.get("set", {}).items():
                args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
            args += extra
            load_config(config_path, parse_overrides(args[2:]))  # validate now, fail early
            jobs.append((name, args))
    return jobs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="a sweep file from configs/paper/")
    p.add_argument("--nproc", type=int, default=1, help="ranks per job (torchrun --nproc_per_node)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    try:
        jobs = plan(args.sweep, extra)
    except (ConfigError, KeyError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"run_table: error: {args.sweep}: {exc}", file=sys.stderr)
        return 2
    for name, fedrun_args in jobs:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
               "-m", "fedrun", *fedrun_args]
        print(" ".join(["torchrun", *cmd[3:]]), flush=True)
        if not args.dry_run:
            code = subprocess.call(cmd, cwd=ROOT)
            if code != 0:
                print(f"run_table: {name} failed (exit {code}); fix it and start the script again: "
                      f"finished runs resume instantly", file=sys.stderr)
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
