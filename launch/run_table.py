#!/usr/bin/env python
"""Run one sweep (configs/paper/*.toml, configs/digits_study/*.toml): one fedrun job per
(data set, setting, seed), N jobs at a time.

    python launch/run_table.py configs/paper/table2_alpha.toml --nproc 8
    python launch/run_table.py configs/paper/table2_alpha.toml --dry-run
    python launch/run_table.py SWEEP.toml --nproc 2 -- --fed.rounds 10 --run.out_dir runs/quick
    python launch/run_table.py configs/digits_study/table2_alpha.toml --jobs 2 --seeds 0,1,2

Sweep file (TOML)::

    table = "table2"                        # run names: <table>_<data set>_<run name>[_s<seed>]
    title = "..."                           # optional, for reports (ignored here)
    finding = "..."                         # optional: what the table shows, printed under it
    configs = ["configs/digits.toml"]       # one job set per config file (paths from the repo root)
    seeds = [0, 1, 2]                       # optional: every run once per seed (--run.seed), _s<seed>
    base_file = "base.toml"                 # optional, next to the sweep: fedrun-style TOML
    base = { "fed.rounds" = 10 }            # optional: overrides for every run, after base_file

    [[runs]]
    name = "alpha0.1"
    set = { "fed.alpha" = 0.1 }             # this run's overrides, after base
    equal_epochs = false                    # optional: true = fed.rounds chosen so that rounds x
                                            # local_epochs equals that of the sweep's base

Precedence: config file <- base_file <- base <- the run's set <- run.seed <- the arguments after
``--`` (the same for every job) <- equal_epochs' fed.rounds. ``--seeds`` replaces the sweep's seeds.

Every job's config is built and validated before the first one starts, so a typo fails in a
second, not after the first job's hours. A run whose summary.json exists with the same config
is skipped; any other run (new, interrupted, or finished with other settings) is started, and
fedrun resumes it from its run directory (or refuses, naming the fix, when its model settings
changed), so the script can simply be started again after an interruption.

``--jobs N`` runs N jobs at a time, each with ``--nproc`` ranks of cores / (N x nproc) threads
(or $OMP_NUM_THREADS when set; passed on as OMP_NUM_THREADS and --run.threads). With N > 1 each
job's output goes to ``<run dir>/run_table.log``; one line per finished job says its name and
wall time. Jobs of one rank start as ``python -m fedrun`` (no torchrun), of more as torchrun
(--standalone when N > 1, so that the jobs do not share a port). Then:
``fedrun report runs/<table>_*``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrun.config import Config, key_facts, load_config, parse_overrides  # noqa: E402
from fedrun.errors import ConfigError  # noqa: E402

SWEEP_KEYS = {"table", "title", "finding", "configs", "seeds", "base_file", "base", "runs"}
RUN_KEYS = {"name", "set", "equal_epochs"}


@dataclass
class Job:
    """One fedrun run of a sweep: its name, its fedrun arguments and its resolved config."""

    name: str
    args: list[str]
    config: Config
    table: str = ""
    setting: str = ""  # the sweep's run name, without data set and seed
    seed: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        path = self.config.run_dir
        return path if path.is_absolute() else ROOT / path

    def finished(self) -> bool:
        """summary.json exists and was written by a run of this config (threads aside)."""
        summary = self.run_dir / "summary.json"
        if not summary.is_file():
            return False
        try:
            saved = json.loads(summary.read_text()).get("config")
        except (OSError, json.JSONDecodeError):
            return False
        return isinstance(saved, dict) and same_config(saved, self.config.to_dict())


def _repo_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def _arg(value: Any) -> str:
    """A TOML value as fedrun's CLI reads it: true/false, lists as 1,2,4 ([] as "")."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_arg(v) for v in value)
    return str(value)


def _as_args(overrides: dict[str, Any]) -> list[str]:
    return [a for key, value in overrides.items() for a in (f"--{key}", _arg(value))]


def _flat_table(table: dict[str, Any], where: str) -> dict[str, Any]:
    """``{"fed": {"rounds": 3}}`` (fedrun TOML) or ``{"fed.rounds": 3}`` -> dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif "." in key:
            flat[key] = value
        else:
            raise ConfigError(f"{where}: '{key}' is neither a [section] nor a section.key override")
    return flat


def same_config(saved: dict[str, Any], planned: dict[str, Any]) -> bool:
    """Equal apart from run.threads/run.device/run.out_dir (the run was found there) and keys
    that do not apply to the planned run (privacy.* without privacy, ...: a changed default of
    such a key must not re-run it); keys absent from ``saved`` (added to fedrun later) count as
    equal when ``planned`` holds their default."""
    defaults = Config().to_dict()
    flat = {f"{section}.{key}": value for section, body in planned.items() for key, value in body.items()}
    for section, body in planned.items():
        for key, value in body.items():
            if section == "run" and key in ("threads", "device", "out_dir"):  # where, not what
                continue
            if not key_facts(f"{section}.{key}").applies.holds(flat):
                continue
            old_body = saved.get(section, {})
            if not isinstance(old_body, dict) or old_body.get(key, defaults[section][key]) != value:
                return False
    return True


def read_sweep(sweep_path: Path) -> dict[str, Any]:
    spec = tomllib.loads(sweep_path.read_text())
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(SWEEP_KEYS))}")
    for key in ("table", "configs", "runs"):
        if key not in spec:
            raise ConfigError(f"missing '{key}'; a sweep names its table, configs and [[runs]]")
    for run in spec["runs"]:
        bad = set(run) - RUN_KEYS
        if bad or "name" not in run:
            raise ConfigError(f"[[runs]] {run.get('name', '?')}: keys are {', '.join(sorted(RUN_KEYS))}"
                              f" (name required); got {', '.join(sorted(run))}")
    return spec


def plan(sweep_path: Path, extra: list[str], seeds: Sequence[int] | None = None) -> list[Job]:
    """Every job of the sweep, validated. ``seeds`` (e.g. from --seeds) replaces the sweep's."""
    spec = read_sweep(sweep_path)
    if seeds is None:
        seeds = spec.get("seeds")
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    base: dict[str, Any] = {}
    if "base_file" in spec:
        base_path = Path(spec["base_file"])
        base_path = base_path if base_path.is_absolute() else sweep_path.parent / base_path
        if not base_path.is_file():
            raise ConfigError(f"base_file: no file at {base_path}")
        base.update(_flat_table(tomllib.loads(base_path.read_text()), str(base_path)))
    base.update(_flat_table(spec.get("base", {}), "base"))
    base_args = _as_args(base)
    if "run.seed" in parse_overrides(extra) and seeds:
        raise ConfigError("run.seed given after -- while the sweep has seeds; use --seeds instead")
    jobs = []
    for config in spec["configs"]:
        config_path = _repo_path(config)
        # the budget equal_epochs keeps: everything but the run's own settings
        reference = load_config(config_path, parse_overrides(base_args + extra))
        for run in spec["runs"]:
            set_args = _as_args(run.get("set", {}))
            for seed in seed_list:
                name = f"{spec['table']}_{reference.data.name}_{run['name']}"
                name += "" if seed is None else f"_s{seed}"
                args = base_args + set_args + (["--run.seed", str(seed)] if seed is not None else [])
                args += extra + ["--run.name", name]
                notes = []
                if run.get("equal_epochs"):
                    cfg = load_config(config_path, parse_overrides(args))
                    total = reference.fed.rounds * reference.fed.local_epochs
                    rounds = max(1, round(total / cfg.fed.local_epochs))
                    if rounds * cfg.fed.local_epochs != total:
                        notes.append(f"equal_epochs: {total} epochs / E={cfg.fed.local_epochs} is not "
                                     f"whole; {rounds} rounds ({rounds * cfg.fed.local_epochs} epochs)")
                    args += ["--fed.rounds", str(rounds)]
                cfg = load_config(config_path, parse_overrides(args))  # validate now, fail early
                jobs.append(Job(name, ["--config", str(config_path), *args], cfg, spec["table"],
                                run["name"], seed, notes))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ConfigError("two runs get the same name; give each [[runs]] a distinct name")
    return jobs


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_rank(parallel: int, nproc: int) -> int:
    """OMP_NUM_THREADS when set (the user's choice), else cores / (jobs x ranks), at least 1."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, cores() // (parallel * nproc))


def command(job: Job, nproc: int, standalone: bool = False, threads: int = 0) -> list[str]:
    """The process to start for ``job``: python -m fedrun (1 rank) or torchrun (more); a
    ``threads`` setting goes first, so that an override after ``--`` still wins."""
    args = (["--run.threads", str(threads)] if threads else []) + job.args
    if nproc == 1:
        return [sys.executable, "-m", "fedrun", *args]
    return [sys.executable, "-m", "torch.distributed.run", *(["--standalone"] if standalone else []),
            f"--nproc_per_node={nproc}", "-m", "fedrun", *args]


def show(cmd: list[str]) -> str:
    """``cmd`` as a user would type it (torchrun / python -m fedrun)."""
    if cmd[1:3] == ["-m", "torch.distributed.run"]:
        return shlex.join(["torchrun", *cmd[3:]])
    return shlex.join(["python", *cmd[1:]])


def run_jobs(jobs: Sequence[Job], nproc: int = 1, parallel: int = 1, keep_going: bool = False,
             log: Any = print) -> tuple[int, list[str]]:
    """Run the unfinished ``jobs``, ``parallel`` at a time. Returns (exit code, failed names):
    0 when all finished; else the first failure's code. Without ``keep_going`` no job starts
    after a failure (those running finish)."""
    threads = threads_per_rank(parallel, nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if parallel > 1:
        log(f"run_table: {parallel} jobs at a time, {nproc} rank(s) x {threads} thread(s) each")
    todo = [j for j in jobs if not j.finished()]
    if len(todo) < len(jobs):
        log(f"run_table: {len(jobs) - len(todo)} of {len(jobs)} runs already finished, skipped")
    running: list[tuple[Job, subprocess.Popen, float, Any]] = []
    failed: list[str] = []
    code, done, total = 0, 0, len(todo)
    try:
        while todo or running:
            while todo and len(running) < parallel and not (failed and not keep_going):
                job = todo.pop(0)
                cmd = command(job, nproc, standalone=parallel > 1, threads=threads)
                for note in job.notes:
                    log(f"run_table: {job.name}: {note}")
                if parallel == 1:
                    log(show(cmd))
                    out = None
                else:
                    job.run_dir.mkdir(parents=True, exist_ok=True)
                    out = (job.run_dir / "run_table.log").open("a")
                    log(f"run_table: started {job.name} (output: {job.run_dir / 'run_table.log'})")
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                                        stderr=subprocess.STDOUT if out else None)
                running.append((job, proc, time.perf_counter(), out))
            if not todo and not running:
                break
            if failed and not keep_going and not running:
                break
            time.sleep(0.2)
            for item in list(running):
                job, proc, t0, out = item
                rc = proc.poll()
                if rc is None:
                    continue
                running.remove(item)
                if out is not None:
                    out.close()
                done += 1
                wall = time.perf_counter() - t0
                if rc == 0:
                    log(f"run_table: [{done}/{total}] {job.name} done, {wall:.1f} s")
                else:
                    failed.append(job.name)
                    code = code or rc
                    where = f"; its output: {job.run_dir / 'run_table.log'}" if out is not None else ""
                    log(f"run_table: [{done}/{total}] {job.name} FAILED (exit {rc}) after {wall:.1f} s"
                        f"{where}")
    except KeyboardInterrupt:
        for _, proc, _, _ in running:
            proc.terminate()
        for _, proc, _, _ in running:
            proc.wait()
        log("run_table: interrupted; start it again to resume (finished runs are skipped)")
        return 130, failed
    if failed:
        log(f"run_table: {len(failed)} run(s) failed: {', '.join(failed)}; fix and start the script "
            f"again: finished runs are skipped, interrupted ones resume")
    return code, failed


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected e.g. 0,1,2, got {text!r}") from None


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """(own arguments, fedrun overrides after ``--``)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_extra(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="a sweep file, e.g. configs/paper/table2_alpha.toml")
    p.add_argument("--nproc", type=int, default=1, help="ranks per job (torchrun --nproc_per_node)")
    p.add_argument("--jobs", type=int, default=1, help="jobs at a time (default 1)")
    p.add_argument("--seeds", type=parse_seeds, default=None, help="e.g. 0,1,2: replaces the sweep's seeds")
    p.add_argument("--keep-going", action="store_true", help="start the other jobs after a failure")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    if args.nproc < 1 or args.jobs < 1:
        p.error("--nproc and --jobs must be >= 1")
    try:
        jobs = plan(args.sweep, extra, args.seeds)
    except (ConfigError, KeyError, TypeError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"run_table: error: {args.sweep}: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for job in jobs:
            state = " # finished, skipped" if job.finished() else ""
            print(show(command(job, args.nproc, standalone=args.jobs > 1)) + state)
        print(f"run_table: {len(jobs)} runs, {sum(j.finished() for j in jobs)} finished", file=sys.stderr)
        return 0
    code, _ = run_jobs(jobs, args.nproc, args.jobs, args.keep_going,
                       log=lambda line: print(line, flush=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
