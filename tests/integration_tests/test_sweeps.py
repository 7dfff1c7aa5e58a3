"""The sweeps (configs/paper/, configs/digits_study/): every job validates, seeds and a shared
base expand as documented, real (tiny) sweeps run, two at a time, finished runs are skipped, and
`fedrun report` reads them."""

import csv
import json
import os
import subprocess
import sys

import pytest

from fedrun.__main__ import main

from helpers import ROOT, TINY, clean_env

sys.path.insert(0, str(ROOT / "launch"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import fidelity_study  # noqa: E402
import run_table  # noqa: E402

STUDY = ROOT / "configs" / "digits_study"
SWEEPS = sorted((ROOT / "configs" / "paper").glob("*.toml")) + fidelity_study.sweep_files(STUDY)


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_every_paper_sweep_validates(sweep, capsys):
    """run_table's own entry point, in-process (its command line as a process: the tests below)."""
    assert run_table.main([str(sweep), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(l.startswith("python -m fedrun --config") for l in lines)
    assert len(set(l.split("--run.name ")[1].split()[0] for l in lines)) == len(lines)  # unique runs


@pytest.mark.slow  # ~8 s: four tiny runs
def test_tiny_alpha_sweep_then_report(tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('table = "t"\nconfigs = ["configs/digits.toml"]\n'
                     '[[runs]]\nname = "a0.1"\nset = { "fed.alpha" = 0.1 }\n'
                     '[[runs]]\nname = "a5"\nset = { "fed.alpha" = 5.0 }\n')
    over = {**TINY, "fed.rounds": "1", "eval.num_samples": "20", "eval.batch_size": "20",
            "run.out_dir": str(tmp_path / "runs")}
    extra = [a for k, v in over.items() for a in (f"--{k}", v)]
    cmd = [sys.executable, str(ROOT / "launch" / "run_table.py"), str(sweep), "--jobs", "2", "--", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert [p.name for p in runs] == ["t_digits_a0.1", "t_digits_a5"]
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "report")]) == 0
    rows = list(csv.reader((tmp_path / "report" / "report.csv").open()))
    labels = [r[0] for r in rows[1:]]
    assert any("fed.alpha=0.1" in l for l in labels) and any("fed.alpha=5" in l for l in labels)
    assert (tmp_path / "report" / "report.png").stat().st_size > 0
    assert "| fed.alpha=0.1" in (tmp_path / "report" / "report.md").read_text()


def _sweep(tmp_path, text: str, base: str = "[fed]\nrounds = 3\nlocal_epochs = 2\n"):
    (tmp_path / "base.toml").write_text(base)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(text)
    return sweep


def test_seeds_base_file_base_and_equal_epochs_expand_in_order(tmp_path):
    sweep = _sweep(tmp_path, 'table = "t"\nconfigs = ["configs/digits.toml"]\nseeds = [0, 1, 2]\n'
                   'base_file = "base.toml"\nbase = { "fed.alpha" = 0.1, "eval.local_models_at" = [] }\n'
                   '[[runs]]\nname = "plain"\n'
                   '[[runs]]\nname = "a5"\nset = { "fed.alpha" = 5.0, "fed.rounds" = 7 }\n'
                   '[[runs]]\nname = "e4"\nset = { "fed.local_epochs" = 4 }\nequal_epochs = true\n')
    jobs = run_table.plan(sweep, ["--optim.lr", "0.01"])
    assert [j.name for j in jobs] == [f"t_digits_{r}_s{s}" for r in ("plain", "a5", "e4") for s in (0, 1, 2)]
    by = {j.name: j.config for j in jobs}
    assert [by[f"t_digits_plain_s{s}"].run.seed for s in (0, 1, 2)] == [0, 1, 2]
    plain, a5, e4 = by["t_digits_plain_s1"], by["t_digits_a5_s1"], by["t_digits_e4_s2"]
    assert (plain.fed.rounds, plain.fed.local_epochs, plain.fed.alpha) == (3, 2, 0.1)  # base_file, base
    assert plain.eval.local_models_at == [] and plain.optim.lr == 0.01  # after --
    assert (a5.fed.rounds, a5.fed.alpha) == (7, 5.0)  # the run's set beats base
    assert (e4.fed.local_epochs, e4.fed.rounds) == (4, 2)  # 3 x 2 = 6 epochs: 6 / 4 -> 2 rounds (8)
    assert jobs[-1].notes and "not whole" in jobs[-1].notes[0]
    assert len(run_table.plan(sweep, [], seeds=[5])) == 3  # --seeds replaces the sweep's
    assert run_table.plan(sweep, [], seeds=[5])[0].name == "t_digits_plain_s5"
    with pytest.raises(run_table.ConfigError, match="--seeds"):
        run_table.plan(sweep, ["--run.seed", "3"])
    (tmp_path / "base.toml").write_text("[fed]\nroundz = 3\n")  # a typo in the base: before any run
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "run_table.py"), str(sweep), "--dry-run"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "roundz" in res.stderr


@pytest.mark.slow  # ~12 s: two jobs at once
def test_two_jobs_run_at_once_and_finished_runs_are_skipped(tmp_path):
    # a base file of dotted keys; fedrun reads every value as on its command line
    over = {**TINY, "fed.rounds": "1", "run.out_dir": str(tmp_path / "runs")}
    base = "".join(f'"{k}" = "{v}"\n' for k, v in over.items())
    sweep = _sweep(tmp_path, 'table = "t"\nconfigs = ["configs/digits.toml"]\nseeds = [0, 1]\n'
                   'base_file = "base.toml"\n[[runs]]\nname = "x"\n', base=base)
    cmd = [sys.executable, str(ROOT / "launch" / "run_table.py"), str(sweep), "--jobs", "2"]
    env = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}  # run_table splits the cores
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    events = [l.split()[1] if "started" in l else "done" for l in res.stdout.splitlines()
              if "started" in l or " done, " in l]
    assert events == ["started", "started", "done", "done"], res.stdout  # both running at once
    runs = [tmp_path / "runs" / f"t_digits_x_s{s}" for s in (0, 1)]
    assert all((r / "summary.json").is_file() and (r / "run_table.log").is_file() for r in runs)
    seeds = [json.loads((r / "summary.json").read_text())["config"]["run"]["seed"] for r in runs]
    threads = [json.loads((r / "summary.json").read_text())["config"]["run"]["threads"] for r in runs]
    assert seeds == [0, 1] and threads == [max(1, run_table.cores() // 2)] * 2
    stamp = [(r / "summary.json").stat().st_mtime_ns for r in runs]

    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "2 of 2 runs already finished, skipped" in again.stdout
    assert "started" not in again.stdout and [(r / "summary.json").stat().st_mtime_ns for r in runs] == stamp
    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, env=env)
    assert dry.stdout.count("# finished, skipped") == 2
    # a summary written by other settings is not "finished": that run is started again
    job = run_table.plan(sweep, [])[0]
    assert job.finished()
    summary = json.loads((runs[0] / "summary.json").read_text())
    summary["config"]["optim"]["lr"] = 0.5
    (runs[0] / "summary.json").write_text(json.dumps(summary))
    assert not job.finished()
    # report: the two seeds form one row
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "report")]) == 0
