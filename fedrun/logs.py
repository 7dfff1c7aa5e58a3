"""What a person sees (rich progress and one line per round) and what a program reads
(metrics.jsonl; with run.tensorboard also TensorBoard scalars). Only rank 0 logs; the others stay
quiet unless they fail."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .errors import ConfigError

TENSORBOARD_HINT = ("run.tensorboard: the tensorboard package is not installed; pip install tensorboard "
                    "(or pip install 'fedrun[tensorboard]'), or set run.tensorboard = false")


def summary_writer_class() -> type:
    """torch.utils.tensorboard.SummaryWriter, or a ConfigError that names run.tensorboard and the
    pip command (torch ships the writer, the tensorboard package its event-file format)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(TENSORBOARD_HINT) from None
    return SummaryWriter


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric fields of a round's record, nested dicts as "scores/fid_test"; lists (per
    rank, per client), strings, booleans and the round itself are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("round", "time") and not prefix:
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


LOG_WIDTH = 240  # columns when the stream is not a terminal: every table fits, nothing is cut


def log_console(stderr: bool = True) -> Console:
    """A rich console for fedrun's output. On a terminal it follows the terminal's width; in a
    SLURM log or a pipe (not a terminal) rich would lay tables out at 80 columns and cut their
    figures ("16.…"), so it gets LOG_WIDTH columns instead: a job's log carries every figure."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=LOG_WIDTH)


class RunLogger:
    """Progress on the terminal and one metrics.jsonl line per round (rank 0 only).

    ``tensorboard``: rank 0 also writes each record's numbers as TensorBoard scalars to
    ``<run dir>/tensorboard/`` (step = the round). Checked on every rank at construction, so a
    missing package stops every rank with the same ConfigError before training."""

    def __init__(self, run_dir: Path, enabled: bool, total_rounds: int, start_round: int = 0,
                 tensorboard: bool = False):
        self.enabled = enabled
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.console = log_console()
        self.progress: Progress | None = None
        self.tensorboard_dir = Path(run_dir) / "tensorboard"
        self._writer_class = summary_writer_class() if tensorboard else None
        self._writer: Any = None  # opened at the first round written: that round is the purge step
        if enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
                disable=not self.console.is_terminal,
            )
            self.progress.start()
            self.rounds_task = self.progress.add_task("rounds", total=total_rounds, completed=start_round)
            self.inner_task = self.progress.add_task("round", total=None)

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)

    def start_round(self, round_: int, steps: int | None = None, description: str = "") -> None:
        """A new inner bar: ``steps`` local steps, or None to count steps as they come (a
        federated rank learns its clients while it takes them)."""
        if self.progress is not None:
            self.progress.reset(self.inner_task, total=steps, description=description or f"round {round_}")

    def step(self, advance: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.inner_task, advance)

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.inner_task, description=text)

    def end_round(self, record: dict[str, Any], line: str) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer_class is not None:
            self._write_scalars(record)
        if "scores" in record:
            sc = record["scores"]
            line += (f"  IS {sc['is_mean']:.2f}  FID train {sc['fid_train']:.2f}  "
                     f"test {sc['fid_test']:.2f}")
            if sc.get("kid_test") is not None:
                line += f"  KID {1e3 * sc['kid_test']:.2f}e-3"
            if sc.get("precision") is not None:
                line += f"  P {sc['precision']:.2f} R {sc['recall']:.2f}"
            fid, is_ = sc["extractor"], sc.get("is_extractor", sc["extractor"])
            line += f" ({fid})" if fid == is_ else f" ({fid}; IS {is_})"
        if record.get("client_scores"):
            own = [r["fid_own"] for r in record["client_scores"] if r.get("fid_own") is not None]
            test = [r["fid_test"] for r in record["client_scores"] if r.get("fid_test") is not None]
            if own and test:
                line += (f"  local FID own/test (median of {len(own)}) "
                         f"{statistics.median(own):.2f}/{statistics.median(test):.2f}")
        self.console.print(line)
        if self.progress is not None:
            self.progress.advance(self.rounds_task)

    def _write_scalars(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        if self._writer is None:
            # purge_step: after a resume, events of this round and later from the crashed
            # session are hidden, as metrics.jsonl drops its lines past the checkpoint
            self._writer = self._writer_class(log_dir=str(self.tensorboard_dir), purge_step=step)
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()  # a round is minutes apart: make it visible now, not in 2 minutes

    def has_round(self, round_: int) -> bool:
        """Does metrics.jsonl hold a line for ``round_``?"""
        if not self.metrics_path.exists():
            return False
        return any(_round_of(line) == round_ for line in self.metrics_path.read_text().splitlines())

    def drop_after(self, round_: int) -> None:
        """Keep only metrics.jsonl lines of rounds <= ``round_`` (the checkpoint we resume from).

        After a crash the rounds past the checkpoint are trained again: without this their old
        lines (checkpoint.every > 1, or a line torn by kill -9) would appear twice or corrupt it.
        """
        if not self.enabled or not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and _round_of(line) <= round_]
        if kept != lines:
            tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.metrics_path)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _round_of(line: str) -> float:
    """The round of one metrics.jsonl line; infinity for a line that does not parse (torn)."""
    try:
        return int(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
