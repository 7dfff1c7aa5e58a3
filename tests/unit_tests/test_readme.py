"""The README is part of the interface: its commands and config reference must stay true."""

import re
import sys
from dataclasses import asdict

from fedrun.config import Config

from helpers import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def test_readme_starts_with_the_install_and_run_lines_and_ci_runs_its_test_command():
    lines = (ROOT / "README.md").read_text().splitlines()
    head = "\n".join(lines[:6])
    assert 'pip install -e ".[test]" && torchrun --nproc_per_node=2 -m fedrun' in head
    test_cmd = next(l for l in lines[:6] if "pytest" in l)
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()


def _reference_rows() -> dict[str, str]:
    """"section.key" -> the default as written in README "Config reference" (a TOML literal).

    A row may name several keys with as many defaults: | `a.x`, `a.y` | `1e-4`, `0.02` | ... |
    """
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Config reference"):]
    table = table[:table.index("\n## ")]
    rows: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([a-z_0-9]+\.[a-z_0-9]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1])
        assert len(keys) == len(defaults), f"README row for {keys}: {len(defaults)} defaults"
        for key, default in zip(keys, defaults, strict=True):
            assert key not in rows, f"README config reference names {key} twice"
            rows[key] = default
    return rows


def test_config_reference_lists_every_key_with_its_default():
    rows = _reference_rows()
    keys = [f"{section}.{key}" for section, body in asdict(Config()).items() for key in body]
    assert sorted(rows) == sorted(keys), (f"README lacks {sorted(set(keys) - set(rows))}, "
                                          f"names unknown {sorted(set(rows) - set(keys))}")
    defaults = Config().to_dict()
    wrong = []
    for key, written in rows.items():
        section, name = key.split(".")
        value = tomllib.loads(f"v = {written}")["v"]  # the README writes TOML values
        expected = defaults[section][name]
        if value != expected or type(value) is not type(expected):
            wrong.append(f"{key}: README {written}, Config() {expected!r}")
    assert not wrong, "README config reference has wrong defaults: " + "; ".join(wrong)
