#!/usr/bin/env python
"""The communication study (issue 18): bytes against quality for compressed client updates.

    python benchmarks/communication_study.py --dry-run     # the plan: runs, epochs, a time estimate
    python benchmarks/communication_study.py               # the study (start it again to resume)
    python benchmarks/communication_study.py --seeds 0 --out /tmp/cs --results /tmp/cs/results \
        -- --fed.rounds 2 --eval.steps 5                   # a smoke run of the whole pipeline

The sweeps of configs/communication_study/ (no compression, bf16, int8, sign, top-k at 10 %,
1 %, 0.1 %, with and without error feedback; 2 seeds; the default's budget: configs/digits.toml,
100 rounds of E = 1) run through benchmarks/fidelity_study.py, i.e. launch/run_table.py (one rank
per run, two at a time, resumable) and ``fedrun report`` per sweep: FID, class accuracy, MB up
and down per round and how many times fewer bytes each client sends than its fp32 update, mean
± std over seeds. This script passes its arguments on (--out, --seeds, --jobs, --dry-run,
--report-only, fedrun overrides after ``--``) and then adds to
``<results>/communication_study.md`` the issue's goals, each row against the uncompressed one:
int8 >= 3.9x fewer uplink bytes at <= 1.05x its FID (test); top-k 1 % with error feedback >= 30x
at <= 1.3x; and how far the runs without error feedback fall.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "launch"))

import fidelity_study  # noqa: E402
import run_table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' own modules
from portable import portable  # noqa: E402

NAME = "communication_study"
TITLE = "Compressed client updates with error feedback: bytes against quality on the digits default"
# (compressor, density or None, error feedback) -> the goal: (x fewer bytes up, FID / none)
GOALS = {("int8", None, True): (3.9, 1.05), ("topk", 0.01, True): (30.0, 1.3)}


def _method(run_dir: str) -> tuple[str, float | None, bool]:
    """(fed.compress, its density for top-k, error feedback) of a finished run."""
    fed = json.loads((Path(run_dir) / "summary.json").read_text())["config"]["fed"]
    compress = fed.get("compress", "none")
    return compress, fed.get("compress_density") if compress == "topk" else None, \
        bool(fed.get("error_feedback", True)) and compress != "none"


def _mean(row: dict[str, Any], key: str) -> float | None:
    value = row["scores"].get(key)
    return value["mean"] if isinstance(value, dict) else value


def goals_section(numbers: dict[str, Any]) -> list[str]:
    """The goals' table: every row of every sweep against the uncompressed row of its sweep."""
    lines = ["## Against no compression (the issue's goals)", "",
             "| sweep | setting | x fewer bytes up | MB up / round | FID (test) / none | class acc | goal "
             "| met |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for table, spec in numbers["tables"].items():
        rows = [(r, _method(r["runs"][0])) for r in spec["rows"] if r["runs"]]
        base = next((r for r, m in rows if m[0] == "none"), None)
        base_fid = _mean(base, "fid_test") if base else None
        for row, method in rows:
            if method[0] == "none":
                continue
            fid, fewer = _mean(row, "fid_test"), _mean(row, "uplink_reduction")
            ratio = fid / base_fid if fid is not None and base_fid else None
            goal = GOALS.get(method)
            met = "" if goal is None or ratio is None or fewer is None else \
                ("yes" if fewer >= goal[0] and ratio <= goal[1] else "no")
            mb, acc = _mean(row, "bytes_up_per_round"), _mean(row, "class_acc")
            cells = ["–" if fewer is None else f"{fewer:.3g}", "–" if mb is None else f"{mb / 1e6:.3g}",
                     "–" if ratio is None else f"{ratio:.2f}", "–" if acc is None else f"{acc:.3f}",
                     "" if goal is None else f">= {goal[0]:g}x at <= {goal[1]:g}x", met]
            lines.append(f"| {table} | {row['setting']} | " + " | ".join(cells) + " |")
    lines += ["", "FID (test) / none: the row's mean FID over that of the uncompressed row of the same "
              "sweep (same seeds). x fewer bytes up: 4 bytes a parameter (the fp32 update) over what a "
              "client sends; the download stays the fp32 model.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    own, extra = run_table.split_extra(given)
    code = fidelity_study.main(["--sweeps", str(ROOT / "configs" / "communication_study"), "--name", NAME,
                                "--title", TITLE, *own, *(["--", *extra] if extra else [])])
    if "--dry-run" in own:
        return code
    results = Path(own[own.index("--results") + 1]) if "--results" in own else ROOT / "benchmarks" / "results"
    md, js = results / f"{NAME}.md", results / f"{NAME}.json"
    if md.is_file() and js.is_file():
        text = md.read_text()
        written = text.index("Written by `") + len("Written by `")  # the command to run it again: this one
        text = text[:written] + shlex.join(["python", "benchmarks/communication_study.py", *given]) \
            + text[text.index("`", written):]
        md.write_text(portable(text + "\n" + "\n".join(goals_section(json.loads(js.read_text())))))
        print(f"communication_study: goals added to {md}")
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
