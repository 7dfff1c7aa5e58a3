"""The README is part of the interface: its commands and config reference must stay true."""

import re
from dataclasses import asdict

from fedrun.config import Config

from helpers import ROOT


def test_readme_starts_with_the_install_and_run_lines_and_ci_runs_its_test_command():
    lines = (ROOT / "README.md").read_text().splitlines()
    head = "\n".join(lines[:6])
    assert 'pip install -e ".[test]" && torchrun --nproc_per_node=2 -m fedrun' in head
    test_cmd = next(l for l in lines[:6] if "pytest" in l)
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()


def test_config_reference_lists_every_key_with_its_default():
    text = (ROOT / "README.md").read_text()
    missing = []
    for section, body in asdict(Config()).items():
        for key in body:
            if not re.search(rf"`{section}\.{key}`", text):
                missing.append(f"{section}.{key}")
    assert not missing, f"README config reference lacks: {missing}"
