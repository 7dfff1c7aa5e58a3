"""The embedded digits set: a fixed stratified split, cached after the first load, and a damaged
cache file is reloaded from scikit-learn rather than trusted."""

from __future__ import annotations

import torch

from fedrun.config import DataConfig
from fedrun.data import load_split, to_uint8

CFG = DataConfig(name="digits", image_size=16, channels=1)


def test_split_sizes_classes_and_range(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRUN_CACHE_DIR", str(tmp_path))
    train, test = load_split(CFG, "train"), load_split(CFG, "test")
    assert (len(train), len(test)) == (1437, 360) and train.images.shape[1:] == (1, 16, 16)
    assert torch.bincount(test.labels).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]  # stratified
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert to_uint8(train.images).max() == 255


def test_cache_is_written_reused_and_a_damaged_one_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRUN_CACHE_DIR", str(tmp_path))
    first = load_split(CFG, "train")
    (cached,) = (tmp_path / "data").iterdir()
    stamp = cached.stat().st_mtime_ns
    again = load_split(CFG, "train")
    assert cached.stat().st_mtime_ns == stamp  # read, not rewritten
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    cached.write_bytes(b"PK\x03\x04 not a zip any more")
    repaired = load_split(CFG, "train")
    assert torch.equal(first.images, repaired.images)
    assert cached.read_bytes()[:4] == b"PK\x03\x04" and cached.stat().st_size > 10_000
