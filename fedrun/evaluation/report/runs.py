"""Loading finished runs for the report: summary.json, audit.json and metrics.jsonl of a run dir.

Nothing here formats or draws; a file that exists but cannot be read is a ``ReportError`` naming
the file and the fix, a file that is optional and absent is simply left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ReportError

# Column order and titles of the paper; other data sets follow in order of appearance.
DATASET_TITLES = {"cifar10": "CIFAR-10", "fashion_mnist": "Fashion-MNIST", "svhn": "SVHN",
                  "image_folder": "CT scans", "digits": "digits", "synthetic": "synthetic"}


@dataclass
class Run:
    """One finished run dir, as the report sees it."""

    path: Path
    flat: dict[str, Any]  # "section.key" -> value (lists as tuples)
    scores: dict[str, Any]
    dataset: str  # column group
    client_scores: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # round -> rows
    extra: dict[str, float] = field(default_factory=dict)  # epsilon, audit_auc, near_copies
    label: str = ""
    parts: list[tuple[str, Any]] = field(default_factory=list)
    seeded: bool = False  # one of several seeds of its row
    wall_s: float | None = None  # the run's wall time (summary.json)

    def value(self, key: str) -> float | None:
        v = self.scores.get(key, self.extra.get(key))
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def interval(self, key: str) -> tuple[float, float] | None:
        """The score's confidence interval (scores' ``<key>_ci``), None when the run has none."""
        ci = self.scores.get(f"{key}_ci")
        if isinstance(ci, list) and len(ci) == 2 and all(number(v) is not None for v in ci):
            return float(ci[0]), float(ci[1])
        return None

    @property
    def confidence(self) -> float:
        """The confidence of the run's intervals (0.95 when it does not say)."""
        boot = self.scores.get("bootstrap")
        c = boot.get("confidence") if isinstance(boot, dict) else None
        return float(c) if number(c) is not None else 0.95

    @property
    def title(self) -> str:
        """The row label, plus the seed when the row averages several."""
        return f"{self.label} [seed {self.flat.get('run.seed')}]" if self.seeded else self.label


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """``Config.to_dict()`` -> {"section.key": value}, lists as tuples (hashable, comparable)."""
    return {f"{section}.{key}": tuple(v) if isinstance(v, list) else v
            for section, body in config.items() if isinstance(body, dict) for key, v in body.items()}


def dataset_of(flat: dict[str, Any]) -> str:
    name = str(flat.get("data.name", "?"))
    if name == "image_folder":  # several folders may be compared: name them by their folder
        root = Path(str(flat.get("data.root", ""))).name
        return f"{name}:{root}" if root else name
    return name


def dataset_title(dataset: str) -> str:
    name, _, root = dataset.partition(":")
    return root if root else DATASET_TITLES.get(name, name)


def number(value: Any) -> float | None:
    """A JSON number as a float (a list counts its items); None for anything else."""
    if isinstance(value, list):
        return float(len(value))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


COMMUNICATION = ("bytes_up_per_round", "bytes_down_per_round", "uplink_reduction")  # summary.json's


def _extra(data: dict[str, Any], path: Path) -> dict[str, float]:
    """epsilon from summary.json's "privacy", bytes per round from its "communication",
    audit_auc / near_copies from audit.json."""
    out: dict[str, float] = {}
    privacy = data.get("privacy")
    if isinstance(privacy, dict) and (eps := number(privacy.get("epsilon_max"))) is not None:
        out["epsilon"] = eps
    traffic = data.get("communication")
    if isinstance(traffic, dict):
        out.update({key: v for key in COMMUNICATION if (v := number(traffic.get(key))) is not None})
    audit_path = path / "audit.json"
    if audit_path.is_file():
        try:
            audit = json.loads(audit_path.read_text())
        except json.JSONDecodeError as exc:
            raise ReportError(f"{audit_path}: not valid JSON ({exc}); delete it or rerun the audit") from None
        for src, dst in (("auc", "audit_auc"), ("near_copies", "near_copies")):
            if isinstance(audit, dict) and (v := number(audit.get(src))) is not None:
                out[dst] = v
    return out


def load_run(run_dir: str | Path) -> Run:
    """Read ``run_dir/summary.json`` (required) and ``audit.json`` (optional)."""
    path = Path(run_dir)
    summary = path / "summary.json"
    if not summary.is_file():
        raise ReportError(f"{summary}: not found; a run writes it when it finishes (is {path} a run dir?)")
    try:
        data = json.loads(summary.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{summary}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ReportError(f"{summary}: has no 'config' table; it was not written by fedrun train")
    flat = flatten(data["config"])
    return Run(path, flat, dict(data.get("scores") or {}), dataset_of(flat),
               client_scores=dict(data.get("client_scores") or {}), extra=_extra(data, path),
               wall_s=number(data.get("wall_s")))


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-round records of ``run_dir/metrics.jsonl``, ordered by round, the last record of a
    round winning; [] when the file is absent (a run from before metrics.jsonl, or a copy of
    summary.json only). A line that does not parse is skipped: kill -9 can tear the last line,
    and the next resume of that run drops it anyway."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_round: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            r = int(record["round"])
        except (ValueError, KeyError, TypeError):
            continue
        by_round[r] = record
    return [by_round[r] for r in sorted(by_round)]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of a numeric record field; "scores.fid_test" reads a nested one. Rounds
    without the field (or with a non-finite value) are left out."""
    xs, ys = [], []
    for rec in records:
        value: Any = rec
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        v = number(value) if not isinstance(value, list) else None
        if v is not None and math.isfinite(v):
            xs.append(int(rec["round"]))
            ys.append(v)
    return xs, ys
