"""A command-line error answers before torch is imported, and a config error before any process
group, in a real ``python -m fedrun`` process from start to exit (the rank comes from
``fedrun.dist.launch_rank``, the exit from ``fedrun.dist.exit_process``). A config key's choices
come from the methods' registries (fedrun/registry.py), which import the methods, and torch with
them: config errors import torch, but never start a process group."""

from __future__ import annotations

import subprocess
import sys

from helpers import clean_env

# runs `python -m fedrun ARGS` in this interpreter and reports, at exit, whether torch was loaded
# and whether a process group was started
PROBE = ("import atexit, runpy, sys\n"
         "def _report():\n"
         "    if 'torch' not in sys.modules:\n"
         "        print('no torch')\n"
         "    else:\n"
         "        import torch.distributed as d\n"
         "        print('group' if d.is_available() and d.is_initialized() else 'torch loaded')\n"
         "atexit.register(_report)\n"
         "sys.argv = ['fedrun', *sys.argv[1:]]\n"
         "runpy.run_module('fedrun', run_name='__main__')\n")


def probe(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env={**clean_env(), **(env or {})}, timeout=120)


def test_a_command_line_error_never_imports_torch_and_a_config_error_starts_no_process_group():
    for args in (["--config"], ["eval"], ["eval", "runs/x", "--checkpoint"], ["frobnicate"]):
        res = probe(args)
        assert res.returncode == 2, res.stderr
        assert res.stdout.strip().endswith("no torch"), (args, res.stdout, res.stderr)
        assert res.stderr.count("fedrun:") == 1 and "Traceback" not in res.stderr
    res = probe(["--fed.roundz", "3"])  # (every config error of the catalogue: test_bad_inputs.py)
    assert res.returncode == 2, res.stderr
    assert res.stdout.strip() == "torch loaded", (res.stdout, res.stderr)
    assert res.stderr.count("fedrun: error:") == 1 and "Traceback" not in res.stderr
    # a rank other than 0 keeps a config error to itself (rank 0 says it)
    res = probe(["--fed.roundz", "3"], env={"RANK": "1", "WORLD_SIZE": "2"})
    assert res.returncode == 2 and res.stderr == "" and res.stdout.strip() == "torch loaded"
