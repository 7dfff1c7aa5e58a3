"""A config or command-line error answers before torch is imported, in a real ``python -m fedrun``
process from start to exit (the rank comes from ``fedrun.dist.launch_rank``, the exit from
``fedrun.dist.exit_process``: neither imports torch)."""

from __future__ import annotations

import subprocess
import sys

from helpers import clean_env

# runs `python -m fedrun ARGS` in this interpreter and reports, at exit, whether torch was loaded
PROBE = ("import atexit, runpy, sys\n"
         "atexit.register(lambda: print('torch loaded' if 'torch' in sys.modules else 'no torch'))\n"
         "sys.argv = ['fedrun', *sys.argv[1:]]\n"
         "runpy.run_module('fedrun', run_name='__main__')\n")


def probe(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env={**clean_env(), **(env or {})}, timeout=120)


def test_a_config_error_never_imports_torch():
    for args in (["--fed.roundz", "3"], ["--config"], ["--print-config", "--run.seed", "-1"], ["eval"],
                 ["eval", "runs/x", "--checkpoint"]):
        res = probe(args)
        assert res.returncode == 2, res.stderr
        assert res.stdout.strip() == "no torch", (args, res.stdout, res.stderr)
        assert res.stderr.count("fedrun: error:") == 1 and "Traceback" not in res.stderr
    # a rank other than 0 keeps a config error to itself (rank 0 says it), still without torch
    res = probe(["--fed.roundz", "3"], env={"RANK": "1", "WORLD_SIZE": "2"})
    assert res.returncode == 2 and res.stderr == "" and res.stdout.strip() == "no torch"
    # the probe can tell: a training run imports torch (here stopped by a missing data set, after
    # the config was accepted)
    res = probe(["--data.name", "cifar10", "--data.channels", "3", "--data.root", "/nonexistent"])
    assert res.returncode == 3 and res.stdout.strip() == "torch loaded", res.stderr
