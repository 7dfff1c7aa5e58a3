"""The cache folder as evaluation uses it: see ``fedrun.cache`` (one owner, in the core)."""

from ..cache import CACHE_ENV, atomic_save, resolve_cache_dir

__all__ = ["CACHE_ENV", "atomic_save", "resolve_cache_dir"]
