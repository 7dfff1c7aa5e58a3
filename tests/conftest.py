"""Fixtures every test gets. Helpers that tests import live in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Classifiers and reference statistics are cached once per test session, never in ~/.cache;
# subprocesses inherit this.
os.environ.setdefault("FEDRUN_CACHE_DIR", tempfile.mkdtemp(prefix="fedrun-test-cache-"))


@pytest.fixture(autouse=True)
def _own_working_dir(tmp_path, monkeypatch):
    """Every test runs in its own empty working directory, and so does every process it starts
    (they inherit it): a relative path (the default ``run.out_dir = "runs"``, ``data/``) never
    meets what a user's run left in the checkout, and no test writes there. Tests name the
    checkout's files through ``helpers.ROOT``."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """In-process training in tests uses one thread, as the subprocesses do (OMP_NUM_THREADS=1):
    the same kernels, the same reduction order, and no oversubscription of a 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
