"""The package's layers hold: no import runs from a lower layer to a higher one, lazy or not,
and the round loop stays one screen that only calls its parts (docs/architecture.md)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import fedrun
from fedrun.federated.rounds import FederatedRounds

PACKAGE = Path(fedrun.__file__).parent
# what each layer must not import; the core is the package's top-level modules, except the
# composition roots that sit above everything (train, centralized, __main__, and methods: the
# catalogue that imports every built-in method so that the config knows them)
FORBIDDEN = {
    "core": {"federated", "privacy", "evaluation", "experimental"},
    "evaluation": {"federated", "privacy", "experimental"},
    "privacy": {"federated", "experimental"},
    "federated": {"privacy", "experimental"},
    "experimental": {"federated", "privacy"},
}
ROOTS = {"train.py", "centralized.py", "__main__.py", "methods.py"}


def _imported_packages(source: str, parts: tuple[str, ...]) -> set[tuple[int, str]]:
    """(line, first fedrun sub-package) of every import in a module at ``parts`` (its path in the
    package), nested ones included."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("fedrun."):
                names = [node.module.split(".")[1]]
            elif node.level > 0:  # relative: resolve against this file's package
                base = list(parts[:-1])[:len(parts) - node.level]
                full = base + (node.module.split(".") if node.module else [])
                names = [full[0]] if full else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("fedrun.")]
        found |= {(node.lineno, n) for n in names}
    return found


def test_no_import_runs_back_up_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1 and parts[0] in ROOTS:
            continue
        layer = "core" if len(parts) == 1 else parts[0]
        for line, package in _imported_packages(path.read_text(), parts):
            if package in FORBIDDEN.get(layer, set()):
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports fedrun.{package} ({layer} layer)")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_relative_absolute_and_lazy_imports():
    source = ("import fedrun.privacy\n"
              "def f():\n    from ..federated import rounds\n    from .. import evaluation\n")
    found = _imported_packages(source, ("privacy", "probe.py"))
    assert found == {(1, "privacy"), (3, "federated"), (4, "evaluation")}
    assert _imported_packages("from .flat import x\n", ("ema.py",)) == {(1, "flat")}


def test_the_round_loop_fits_on_a_screen_and_only_calls_its_parts():
    source = inspect.getsource(FederatedRounds.run)
    body = [line for line in source.splitlines() if line.strip()]
    assert len(body) <= 50, f"FederatedRounds.run is {len(body)} lines"
    tree = ast.parse(inspect.getsource(inspect.getmodule(FederatedRounds)))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    # no privacy-level branch, no isinstance on a rule, no hand-made timings
    assert not {n for n in names if "privacy" in n.lower() or n in ("isinstance", "perf_counter")}
    nested = [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not nested, "imports inside the round loop's functions"
