"""fedrun's cache folder: what is computed once and reused by every later run (the digits arrays,
proxy classifiers, reference statistics), and how it is written without ever leaving a
half-written file (several ranks may write the same entry at once; the last rename wins)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "FEDRUN_CACHE_DIR"


def resolve_cache_dir(cache_dir: str | os.PathLike = "") -> Path:
    """The argument, else $FEDRUN_CACHE_DIR, else ~/.cache/fedrun."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "fedrun"


def atomic_save(save: Callable[[Path], None], path: Path) -> None:
    """Write to a temporary name then rename: a killed job never leaves a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save(tmp)
    os.replace(tmp, path)
