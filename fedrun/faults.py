"""Test-only fault injection, switched on by environment variables and never by the config.

``FEDRUN_FAULT_AT`` names one point (R = round, C = client, S = local step, 1-based; R and C
may be ``*`` for "any"):

  ``R:C:S``     kill -9 the process that trains client C of round R, right after its step S
  ``ckpt:R``    kill -9 rank 0 right after it wrote the checkpoint of round R (the other ranks
                still wait at the barrier that follows)
  ``nan:R:C``   set client C's weights to NaN after its first step in round R, so its update
                is non-finite and must be left out of the average

``FEDRUN_FAULT_MARKER=PATH`` makes a kill fire once: the hook creates PATH (exclusively) before
killing and does nothing if PATH already exists, so the job that torchrun restarts runs through.
Without a marker a kill fires every time its point is reached. NaN faults ignore the marker.

With ``FEDRUN_FAULT_AT`` unset, ``PLAN`` is None and each hook is one global lookup.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

ENV_AT, ENV_MARKER = "FEDRUN_FAULT_AT", "FEDRUN_FAULT_MARKER"
ANY = -1  # "*" in the spec


@dataclass(frozen=True)
class FaultPlan:
    kind: str  # "kill" | "ckpt" | "nan"
    round: int
    client: int = ANY
    step: int = ANY
    marker: str = ""


def _field(text: str, spec: str) -> int:
    if text == "*":
        return ANY
    if not text.isdigit():
        raise ConfigError(f"{ENV_AT}: cannot read {text!r} in {spec!r}; use a number >= 0 or '*'")
    return int(text)


def parse(spec: str | None, marker: str = "") -> FaultPlan | None:
    """``"2:1:3"`` -> kill at round 2, client 1, step 3; None for an unset/empty spec."""
    if not spec:
        return None
    parts = spec.strip().split(":")
    if parts[0] == "nan" and len(parts) == 3:
        return FaultPlan("nan", _field(parts[1], spec), _field(parts[2], spec))
    if parts[0] == "ckpt" and len(parts) == 2:
        return FaultPlan("ckpt", _field(parts[1], spec), marker=marker)
    if len(parts) == 3 and parts[0] not in ("nan", "ckpt"):
        r, c, s = (_field(p, spec) for p in parts)
        return FaultPlan("kill", r, c, s, marker=marker)
    raise ConfigError(f"{ENV_AT}: cannot parse {spec!r}; use ROUND:CLIENT:STEP, ckpt:ROUND or "
                      f"nan:ROUND:CLIENT (ROUND and CLIENT may be '*')")


PLAN: FaultPlan | None = parse(os.environ.get(ENV_AT), os.environ.get(ENV_MARKER, ""))


def _matches(want: int, got: int) -> bool:
    return want == ANY or want == got


def _kill(plan: FaultPlan, where: str) -> None:
    if plan.marker:
        try:  # O_EXCL: exactly one process, once, even if several reach the point
            fd = os.open(plan.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{where} pid={os.getpid()}\n".encode())
        os.fsync(fd)
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def at_step(model: nn.Module, round_: int, client: int, step: int) -> None:
    """Called by local training after each step (``step`` counts from 1)."""
    plan = PLAN
    if plan is None or not (_matches(plan.round, round_) and _matches(plan.client, client)):
        return
    if plan.kind == "kill" and _matches(plan.step, step):
        _kill(plan, f"round={round_} client={client} step={step}")
    elif plan.kind == "nan" and step == 1:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))


def after_checkpoint(round_: int) -> None:
    """Called by the process that has just written the checkpoint of ``round_``."""
    plan = PLAN
    if plan is not None and plan.kind == "ckpt" and _matches(plan.round, round_):
        _kill(plan, f"checkpoint round={round_}")
