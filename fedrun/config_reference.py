"""The config reference and ``fedrun --help``'s list of methods, both read from the config's
fields and the methods' registries (fedrun.registry), never written by hand.

``python -m fedrun.config_reference`` writes docs/config.md; tests/unit_tests/test_docs.py checks
that the committed page is what this module writes now.
"""

from __future__ import annotations

import json
import sys
import textwrap
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from . import config as C
from .registry import Key, field_docs, registries

_SECTIONS = list(typing.get_type_hints(C.Config))


def _toml(value: Any) -> str:
    """A default as TOML writes it (what a user types in a config file)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section_rows(name: str, cls: type) -> list[str]:
    docs = field_docs(cls)
    rows = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        rows.append(f"| `{name}.{f.name}` | `{_toml(default)}` | {_cell(docs.get(f.name, ''))} |")
    return rows


def _registered_rows(keys: list[Key]) -> list[str]:
    rows = []
    for key in keys:
        where = "" if not key.users else f" *({', '.join(key.users)})*"
        rows.append(f"| `{key.dotted}` | `{_toml(key.default)}` | {_cell(key.doc)}{where} |")
    return rows


def reference_markdown() -> str:
    """docs/config.md: every key with its default and its docstring, section by section; the
    keys a method brings are listed under their section with the choices that read them."""
    out = ["# Config reference", "",
           "Every key, its default and what it does, generated from the config's fields and the methods' "
           "registries by `python -m fedrun.config_reference` (do not edit by hand: "
           "tests/unit_tests/test_docs.py checks that this page is current). A TOML file lists what differs "
           "from these defaults; `--section.key VALUE` overrides a key on the command line. A key in "
           "*(italics)* after its text is read only by those choices of its method.", ""]
    hints = typing.get_type_hints(C.Config)
    by_section: dict[str, list[Key]] = {}
    for reg in registries():
        by_section.setdefault(reg.section, []).extend(reg.keys())
    for name, cls in hints.items():
        out += [f"## [{name}]", "", _cell(cls.__doc__ or ""), "", "| key | default | what it does |",
                "|---|---|---|"]
        out += _section_rows(name, cls) + _registered_rows(by_section.get(name, [])) + [""]
    return "\n".join(out)


def methods_help() -> str:
    """``fedrun --help``'s list of methods: each registry's key, its choices with their one-line
    summaries, and the keys each choice reads."""
    lines = ["methods (each one class, registered with its keys; docs/config.md has every key):"]
    indent = " " * 20
    for reg in sorted(registries(), key=lambda r: _SECTIONS.index(r.section)):
        lines.append(f"  --{reg.key} {' | '.join(reg.names())}   (default {reg.default})")
        keys = {key.name: key for key in reg.keys()[1:]}
        for choice in reg.choices.values():
            own = [f"--{key.dotted}" for key in keys.values() if choice.name in key.users]
            lines += textwrap.wrap(choice.summary, 100, initial_indent=f"      {choice.name:<13} ",
                                   subsequent_indent=indent)
            if own:
                lines += textwrap.wrap("keys: " + " ".join(own), 100, initial_indent=indent,
                                       subsequent_indent=indent + "      ")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "docs" / "config.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(reference_markdown() + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
