"""What the studies share (benchmarks/study_runner.py): a failed run is reported and the others go
on, each session's wall time is recorded and summed, report cells are mean ± std, and the
report's files carry paths relative to the repository."""

import argparse
import json
import sys
import threading

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import study_runner as sr  # noqa: E402


def test_a_failed_task_is_reported_and_the_others_still_run(tmp_path, capsys):
    ran, lock = [], threading.Lock()

    def task(name, fail=False):
        def run():
            with lock:
                ran.append(name)
            if fail:
                raise RuntimeError(f"{name} failed")
        return run

    assert sr.run_pool("study", [task("a"), task("b", fail=True), task("c")], 2, tmp_path) == 1
    assert sorted(ran) == ["a", "b", "c"]
    assert "study: b failed" in capsys.readouterr().out
    assert sr.run_pool("study", [task("d")], 1, tmp_path) == 0
    past, wall = sr.sessions(tmp_path)
    assert [(s["runs"], s["jobs"]) for s in past] == [(3, 2), (1, 1)]
    assert wall == sum(s["wall_s"] for s in past)
    assert json.loads((tmp_path / "sessions.json").read_text()) == past


def test_cells_overrides_and_relative_paths(tmp_path):
    assert sr.cell([1.0, 3.0]) == "2.00 ± 1.41"  # sample std of {1, 3}: sqrt(2)
    assert sr.cell([0.5, None, float("nan")], ".3f") == "0.500"  # only the finite values count
    assert sr.cell([None]) == "–" and sr.stat([]) == (None, None, 0)
    options, extra = sr.split_extra(["--jobs", "1", "--", "--fed.rounds", "2"])
    assert (options, extra) == (["--jobs", "1"], ["--fed.rounds", "2"])
    parser = argparse.ArgumentParser(prog="study")
    assert sr.parse_overrides(parser, ["--fed.rounds", "2"]) == {"fed.rounds": "2"}
    with pytest.raises(SystemExit):
        sr.parse_overrides(parser, ["--fed.rounds"])
    paths = sr.write_report(tmp_path, "study", [f"run: {ROOT}/runs/x"], {"run": f"{ROOT}/runs/x"},
                            lambda path: path.write_bytes(b"png"))
    assert paths["md"].read_text() == "run: runs/x\n"
    assert json.loads(paths["json"].read_text()) == {"run": "runs/x"}
    assert paths["png"].read_bytes() == b"png"
