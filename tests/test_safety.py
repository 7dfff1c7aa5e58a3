"""Safety: weights-only checkpoint loading, no code execution from data, no network by default.

* Every ``torch.load`` in fedrun/ passes ``weights_only=True``; nothing calls eval/exec/compile,
  pickle/marshal/shelve loads or dumps, or ``np.load(allow_pickle=True)`` (checked on the AST,
  so comments and ``model.eval()`` do not count).
* The default job runs with sockets blocked: the sitecustomize.py below is put first on the
  child's PYTHONPATH and makes every connect (and name lookup) fail; it also logs each attempt
  to a file, so an attempt that the code caught and ignored is still seen. Under torchrun the
  ranks must talk over loopback, so there only non-loopback addresses are blocked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, as_args, run_cli, tiny_overrides

PACKAGE = ROOT / "fedrun"

# --------------------------------------------------------------------------------------------
# Static checks


def violations(source: str, where: str = "<src>") -> list[str]:
    """Calls that could run code from a file or from config data."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            bad = {n.split(".")[0] for n in names if n} & {"marshal", "shelve", "dill", "cloudpickle", "joblib"}
            found += [f"{where}:{node.lineno}: imports {b}" for b in sorted(bad)]
            if isinstance(node, ast.ImportFrom) and node.module == "pickle":
                found.append(f"{where}:{node.lineno}: from pickle import ...")
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        kw = {k.arg: k.value for k in node.keywords}
        if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
            found.append(f"{where}:{node.lineno}: {f.id}()")
        if isinstance(f, ast.Attribute):
            owner = ast.unparse(f.value)
            if owner == "torch" and f.attr == "load":
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if owner == "pickle" and f.attr != "UnpicklingError":
                found.append(f"{where}:{node.lineno}: pickle.{f.attr}()")
            if owner in ("np", "numpy") and f.attr == "load":
                ap = kw.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    found.append(f"{where}:{node.lineno}: np.load(allow_pickle=...)")
    return found


def test_fedrun_loads_weights_only_and_runs_no_code_from_data():
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) > 10
    found = [v for p in files for v in violations(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []
    # and the loader that matters is there at all
    assert "weights_only=True" in (PACKAGE / "checkpoint.py").read_text()


@pytest.mark.parametrize("snippet", [
    "import torch\nstate = torch.load(path)\n",
    "import torch\nstate = torch.load(path, weights_only=False)\n",
    "import torch\nstate = torch.load(path, weights_only=flag)\n",
    "import pickle\ncfg = pickle.loads(blob)\n",
    "from pickle import loads\n",
    "x = eval(cfg.run.name)\n",
    "exec(text)\n",
    "import numpy as np\na = np.load(f, allow_pickle=True)\n",
    "import marshal\n",
])
def test_the_static_check_catches(snippet):
    assert violations(snippet)


def test_the_static_check_allows_what_fedrun_does():
    ok = ("import torch, pickle\nmodel.eval()\nnet = torch.compile(model)\n"
          "s = torch.load(b, map_location='cpu', weights_only=True)\n"
          "try:\n    pass\nexcept pickle.UnpicklingError:\n    pass\n")
    assert violations(ok) == []


# --------------------------------------------------------------------------------------------
# No network unless a download is asked for

SITECUSTOMIZE = '''
"""Test-only: block network access in this process and log every attempt."""
import ipaddress, os, socket

_LOG = os.environ["FEDRUN_NET_LOG"]
_LOOPBACK_OK = os.environ.get("FEDRUN_NET_ALLOW_LOOPBACK") == "1"
with open(os.environ["FEDRUN_NET_ACTIVE"], "a") as _f:  # proves the blocker ran in this process
    _f.write(f"{os.getpid()}\\n")


def _loopback(host):
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard(what, host):
    if _LOOPBACK_OK and _loopback(str(host)):
        return
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {what} {host}\\n")
    raise OSError(f"network access blocked by the fedrun test: {what} {host}")


def _checked(method):
    original = getattr(socket.socket, method)

    def wrapper(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _guard(method, address[0])
        return original(self, address, *args, **kwargs)
    return wrapper


for _m in ("connect", "connect_ex", "sendto"):
    setattr(socket.socket, _m, _checked(_m))
_getaddrinfo = socket.getaddrinfo


def _lookup(host, *args, **kwargs):
    if host is not None:
        _guard("getaddrinfo", host)
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _lookup
'''


@pytest.fixture
def offline(tmp_path) -> tuple[dict[str, str], Path]:
    site = tmp_path / "offline_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "network_attempts.log"
    env = {"PYTHONPATH": f"{site}:{ROOT}", "FEDRUN_NET_LOG": str(log),
           "FEDRUN_NET_ACTIVE": str(tmp_path / "blocker_active.log")}
    return env, log


def guarded_processes(env: dict[str, str]) -> int:
    return len(Path(env["FEDRUN_NET_ACTIVE"]).read_text().split())


def test_the_blocker_blocks(offline):
    env, log = offline
    code = "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=5)"
    res = subprocess.run([sys.executable, "-c", code], env={**env, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "network access blocked by the fedrun test" in res.stderr
    assert "example.com" in log.read_text()


def test_the_default_job_runs_with_the_network_blocked(offline, tmp_path):
    """configs/digits.toml as shipped (FID/IS with the offline classifier included), made tiny."""
    env, log = offline
    o = tiny_overrides(tmp_path, "offline", fed__rounds=1, eval__num_samples=40)
    res = run_cli(as_args(o), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert guarded_processes(env) == 1
    assert not log.exists(), log.read_text()  # not even an attempt that was caught and ignored
    summary = (tmp_path / "offline" / "summary.json").read_text()
    assert '"fid_test"' in summary  # evaluation really ran, offline


def test_two_ranks_talk_only_over_loopback(offline, tmp_path):
    env, log = offline
    o = tiny_overrides(tmp_path, "offline2", fed__rounds=1, eval__enabled="false")
    res = run_cli(as_args(o), nproc=2, env={**env, "FEDRUN_NET_ALLOW_LOOPBACK": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert guarded_processes(env) == 3  # torchrun itself and both ranks
    assert not log.exists(), log.read_text()
