"""Safety, statically: every ``torch.load`` in fedrun/ passes ``weights_only=True``; nothing calls
eval/exec/compile, pickle/marshal/shelve loads or dumps, or ``np.load(allow_pickle=True)``
(checked on the AST, so comments and ``model.eval()`` do not count). The network side is in
tests/integration_tests/test_smoke_offline.py.
"""

from __future__ import annotations

import ast

import pytest

from helpers import ROOT

PACKAGE = ROOT / "fedrun"

# --------------------------------------------------------------------------------------------
# Static checks


def violations(source: str, where: str = "<src>") -> list[str]:
    """Calls that could run code from a file or from config data."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            unsafe = {"marshal", "shelve", "dill", "cloudpickle", "joblib"}
            bad = {n.split(".")[0] for n in names if n} & unsafe
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
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 25 and PACKAGE / "evaluation" / "extractors.py" in files
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
