"""The paper's sweeps: every job validates, a real (tiny) sweep runs, and `fedrun report` reads it."""

import csv
import os
import subprocess
import sys

import pytest

from fedrun.__main__ import main

from helpers import ROOT, TINY

SWEEPS = sorted((ROOT / "configs" / "paper").glob("*.toml"))


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_every_paper_sweep_validates(sweep):
    res = subprocess.run([sys.executable, "launch/run_table.py", str(sweep), "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines and all(l.startswith("torchrun --nproc_per_node=1 -m fedrun --config") for l in lines)
    assert len(set(l.split("--run.name ")[1].split()[0] for l in lines)) == len(lines)  # unique runs


def test_tiny_alpha_sweep_then_report(tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('table = "t"\nconfigs = ["configs/digits.toml"]\n'
                     '[[runs]]\nname = "a0.1"\nset = { "fed.alpha" = 0.1 }\n'
                     '[[runs]]\nname = "a5"\nset = { "fed.alpha" = 5.0 }\n')
    over = {**TINY, "fed.rounds": "1", "eval.num_samples": "20", "eval.batch_size": "20",
            "run.out_dir": str(tmp_path / "runs")}
    extra = [a for k, v in over.items() for a in (f"--{k}", v)]
    res = subprocess.run([sys.executable, "launch/run_table.py", str(sweep), "--", *extra], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert [p.name for p in runs] == ["t_digits_a0.1", "t_digits_a5"]
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "report")]) == 0
    rows = list(csv.reader((tmp_path / "report" / "report.csv").open()))
    labels = [r[0] for r in rows[1:]]
    assert any("fed.alpha=0.1" in l for l in labels) and any("fed.alpha=5" in l for l in labels)
    assert (tmp_path / "report" / "report.png").stat().st_size > 0
    assert "| fed.alpha=0.1" in (tmp_path / "report" / "report.md").read_text()
