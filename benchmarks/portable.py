"""Results name files relative to the repository, never a machine's absolute paths.

``portable(text)`` rewrites what a study or benchmark is about to commit: the checkout's own
path (or that of a worktree of it, named in ``also``) becomes relative, a temporary folder
becomes ``<tmp>``. tests/unit_tests/test_readme.py checks the committed results.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def portable(text: str, also: tuple[Path, ...] = ()) -> str:
    """``text`` with every absolute path of this checkout (and of ``also``) made relative to it,
    and every path in the temporary folder shortened to ``<tmp>/...``."""
    for root in (ROOT, *also):
        text = text.replace(f"{root}/", "").replace(str(root), ".")
    tmp = re.escape(tempfile.gettempdir().rstrip("/"))
    return re.sub(tmp + r"/[\w.-]+", "<tmp>", text)
