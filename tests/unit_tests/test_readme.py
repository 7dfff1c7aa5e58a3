"""The README and docs/ are part of the interface: the README's two lines are what CI runs, its
links lead somewhere, and the config reference is what the code generates now."""

import re
import subprocess
from pathlib import Path

from fedrun.config_reference import reference_markdown

from helpers import ROOT

README = ROOT / "README.md"


def _first_bash_block(text: str) -> list[str]:
    block = text[text.index("```bash\n") + len("```bash\n"):]
    return block[:block.index("```")].strip().splitlines()


def test_the_readme_opens_with_its_two_lines_and_ci_runs_exactly_those(tmp_path):
    lines = _first_bash_block(README.read_text())
    assert lines == ['pip install -e ".[test]" && torchrun --nproc_per_node=2 -m fedrun',
                     'pip install -e ".[test]" && ruff check . && python -m pytest -q -m "not slow"']
    # .ci/run extracts the block with awk: the same two lines, in order
    ci = (ROOT / ".ci" / "run").read_text()
    awk = re.search(r"awk '([^']+)' README\.md", ci)
    assert awk is not None and 'bash -c "$line"' in ci
    out = subprocess.run(["awk", awk.group(1), str(README)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == lines


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert "TIME" not in text, "a placeholder figure was left in the README"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_docs_link_to_files_that_exist():
    for page in sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists() or (ROOT / target).exists(), (page.name, target)


def test_the_config_reference_is_what_the_code_generates():
    written = (ROOT / "docs" / "config.md").read_text()
    stale = "docs/config.md is stale: run python -m fedrun.config_reference"
    assert written == reference_markdown() + "\n", stale


def test_committed_results_carry_no_machine_paths():
    """Results name files relative to the repository: no absolute path of a machine."""
    found = []
    for path in sorted((ROOT / "benchmarks" / "results").iterdir()):
        if path.suffix in (".json", ".md"):
            for hit in re.findall(r"(?:/work/|/home/|/root/|/tmp/)[\w./-]*", path.read_text()):
                found.append(f"{path.name}: {hit}")
    assert not found, found[:10]


def test_docs_pages_exist_in_reading_order():
    text = README.read_text()
    pages = re.findall(r"^\d+\. \[docs/(\w+)\.md\]", text, flags=re.M)
    assert pages == ["guide", "architecture", "methods", "privacy", "communication", "systems", "evaluation",
                     "diffusers", "studies", "config"]
    assert all(Path(ROOT / "docs" / f"{p}.md").is_file() for p in pages)
