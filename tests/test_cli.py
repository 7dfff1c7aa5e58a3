import subprocess
import sys

from conftest import ROOT, run_cli


def test_help_works_both_ways():
    res = subprocess.run([sys.executable, "-m", "fedrun", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "torchrun --nproc_per_node" in res.stdout and "--section.key" in res.stdout


def test_no_config_means_the_digits_default():
    res = run_cli(["--print-config", "--fed.rounds", "1"])
    assert res.returncode == 0
    assert 'name = "digits"' in res.stdout and "rounds = 1" in res.stdout


def test_a_bad_key_is_one_line_and_no_traceback():
    res = run_cli(["--fed.roundz", "3"])
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "fed.roundz" in res.stderr and "known:" in res.stderr
