"""What the studies share (privacy_study.py, secure_privacy_study.py, async_study.py): the rows
asked for, overrides of every run after ``--``, one fedrun command as a subprocess, a run's
metrics, the mean ± std cells of a report, the runs in a pool of workers, the sessions' wall time,
and the report's three files with paths made relative to the repository."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "launch")]  # the benchmarks' and launchers' modules
from portable import portable  # noqa: E402
from run_table import split_extra  # noqa: E402, F401  (the studies' own options | overrides after --)

# every study's runs: one thread each (two runs share the 2-core machine), the last checkpoint only,
# no client grids or local models (the scores are the studies' figures, not the pictures)
COMMON = {"run.threads": "1", "checkpoint.keep": "1", "eval.client_samples": "0", "eval.local_models_at": ""}


@dataclass
class Job:
    """One run of a study: its row, seed, config file, overrides and what it must wait for."""

    row: str
    seed: int
    config: Path
    overrides: dict[str, str]
    after: str | None = None  # the job whose run this one starts from (model.init_from)
    score_as: dict[str, str] = field(default_factory=dict)  # overrides of its eval and audit

    @property
    def name(self) -> str:
        return f"{self.row}_s{self.seed}"


def select_rows(parser: argparse.ArgumentParser, jobs: list[Job], rows_arg: str,
                known: list[tuple[str, str]]) -> list[Job]:
    """The jobs of the rows asked (comma-separated; every row when empty) and the runs they start
    from; an unknown row is one line of error naming the known ones."""
    if not rows_arg:
        return jobs
    rows = set(rows_arg.split(","))
    unknown = rows - {row for row, _ in known}
    if unknown:
        parser.error(f"--rows: unknown {sorted(unknown)}; known: {', '.join(row for row, _ in known)}")
    needed = {j.after for j in jobs if j.row in rows and j.after}
    return [j for j in jobs if j.row in rows or j.name in needed]


def parse_overrides(parser: argparse.ArgumentParser, extra_args: list[str]) -> dict[str, str]:
    """``--section.key VALUE`` pairs as {section.key: VALUE}; an odd count is one line of error."""
    if len(extra_args) % 2:
        parser.error("overrides after -- come in pairs: --section.key VALUE")
    return {k.lstrip("-"): v for k, v in zip(extra_args[::2], extra_args[1::2], strict=True)}


def cli_args(overrides: dict[str, str]) -> list[str]:
    return [a for k, v in overrides.items() for a in (f"--{k}", v)]


def run_fedrun(args: list[str], log: Path) -> None:
    """``python -m fedrun ARGS`` from the repository, one thread, its output appended to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("a") as f:
        res = subprocess.run([sys.executable, "-m", "fedrun", *args], cwd=ROOT, env=env, stdout=f,
                             stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"fedrun {' '.join(args[:3])} ... failed (exit {res.returncode}); see {log}")


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, one record a round ([] before its first round)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stat(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (None for one value) and count of the finite values."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None), len(v)


def mb(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def cell(values: list[float | None], spec: str = ".2f") -> str:
    """A report's cell: "mean ± std", "mean" for one value, "–" for none."""
    mean, std, _ = stat(values)
    if mean is None:
        return "–"
    return f"{mean:{spec}}" + (f" ± {std:{spec}}" if std is not None else "")


def record_session(out: Path, seconds: float, runs: int, jobs: int) -> None:
    """Append one session (its wall time, runs to do, parallel jobs) to ``<out>/sessions.json``: a
    study stopped and started again sums its sessions' wall time."""
    path = out / "sessions.json"
    past = json.loads(path.read_text()) if path.exists() else []
    past.append({"wall_s": round(seconds, 1), "runs": runs, "jobs": jobs})
    path.write_text(json.dumps(past, indent=2))


def sessions(out: Path) -> tuple[list[dict[str, Any]], float]:
    """The sessions recorded in ``out`` and their summed wall time."""
    path = out / "sessions.json"
    past = json.loads(path.read_text()) if path.exists() else []
    return past, sum(s["wall_s"] for s in past)


def run_pool(label: str, tasks: list[Callable[[], None]], jobs: int, out: Path) -> int:
    """Run ``tasks`` (in their order) on ``jobs`` workers and record the session. A task's
    RuntimeError (a failed run) is printed in one line and the others go on; returns 1 if any
    failed, else 0."""
    code, t0 = 0, time.perf_counter()
    try:
        with ThreadPoolExecutor(jobs) as pool:
            for fut in [pool.submit(task) for task in tasks]:
                try:
                    fut.result()
                except RuntimeError as exc:  # results are collected here, in this thread, in order
                    print(f"{label}: {exc}", flush=True)
                    code = 1
    finally:
        record_session(out, time.perf_counter() - t0, len(tasks), jobs)
    return code


def write_report(results: Path, stem: str, lines: list[str], payload: dict[str, Any],
                 png: Callable[[Path], None]) -> dict[str, Path]:
    """``results/<stem>.{md,json,png}``: the lines, the payload and the figure, with paths made
    relative to the repository."""
    results.mkdir(parents=True, exist_ok=True)
    md, js, fig = (results / f"{stem}.{ext}" for ext in ("md", "json", "png"))
    md.write_text(portable("\n".join(lines) + "\n"))
    js.write_text(portable(json.dumps(payload, indent=2)))
    png(fig)
    return {"md": md, "json": js, "png": fig}
