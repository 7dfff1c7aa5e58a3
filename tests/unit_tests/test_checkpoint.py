"""Checkpoint integrity: checksummed, atomic, keep-last-K, weights-only, broken files skipped."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
import torch

from fedrun import checkpoint
from fedrun.checkpoint import MAGIC, CheckpointError


def state(round_: int) -> dict:
    g = torch.Generator().manual_seed(round_)
    return {"round": round_, "model": {"w": torch.randn(64, generator=g), "b": torch.zeros(3)},
            "server": {}, "config_hash": "abc", "config": {"fed": {"rounds": 9}},
            "rng": {"cpu": torch.get_rng_state()}}


def save_rounds(run_dir: Path, rounds, keep: int = 10) -> None:
    for r in rounds:
        checkpoint.save_checkpoint(run_dir, r, state(r), keep=keep)


def test_file_ends_with_the_sha256_of_its_payload_and_the_magic(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, 1, state(1), keep=3)
    blob = path.read_bytes()
    payload, digest, magic = blob[:-40], blob[-40:-8], blob[-8:]
    assert magic == MAGIC and digest == hashlib.sha256(payload).digest()
    loaded = torch.load(io.BytesIO(payload), weights_only=True)
    assert torch.equal(loaded["model"]["w"], state(1)["model"]["w"])
    assert checkpoint.load_verified(path)["round"] == 1


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 3] ^= 0x01  # one bit inside the payload: only the checksum can tell
    path.write_bytes(bytes(blob))


def drop_tail(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])  # the last byte of the magic is gone


@pytest.mark.parametrize("damage", [truncate, flip_byte, drop_tail], ids=lambda f: f.__name__)
def test_a_broken_newest_checkpoint_is_skipped_for_the_previous_good_one(tmp_path, damage):
    save_rounds(tmp_path, [1, 2, 3])
    newest = checkpoint.checkpoint_path(tmp_path, 3)
    damage(newest)
    with pytest.raises(CheckpointError):
        checkpoint.load_verified(newest)
    with pytest.warns(UserWarning, match=r"skipping unusable checkpoint .*round_0003\.pt"):
        found = checkpoint.load_latest(tmp_path)
    assert found is not None
    loaded, path = found
    assert path.name == "round_0002.pt" and loaded["round"] == 2
    assert torch.equal(loaded["model"]["w"], state(2)["model"]["w"])


def test_no_good_checkpoint_is_a_clear_error(tmp_path):
    save_rounds(tmp_path, [1, 2])
    for p in checkpoint.list_checkpoints(tmp_path):
        flip_byte(p)
    with pytest.warns(UserWarning), \
            pytest.raises(CheckpointError, match="every checkpoint in .* is unusable"):
        checkpoint.load_latest(tmp_path)
    assert checkpoint.load_latest(tmp_path / "fresh") is None  # no checkpoints at all: a fresh start


def test_newest_means_highest_round_not_newest_mtime(tmp_path):
    save_rounds(tmp_path, [9, 10, 2])  # round 2 written last (e.g. by hand)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)][:2] == ["round_0010.pt", "round_0009.pt"]
    assert checkpoint.load_latest(tmp_path)[0]["round"] == 10


def test_keep_last_k(tmp_path):
    save_rounds(tmp_path, range(1, 7), keep=3)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == \
        ["round_0006.pt", "round_0005.pt", "round_0004.pt"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["round_0004.pt", "round_0005.pt", "round_0006.pt"]


class DiskFull(OSError):
    pass


def test_a_failed_write_leaves_neither_a_partial_file_nor_a_damaged_old_one(tmp_path, monkeypatch):
    save_rounds(tmp_path, [1, 2])
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}

    def no_space(fd):
        raise DiskFull(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    with pytest.raises(DiskFull):
        checkpoint.save_checkpoint(tmp_path, 3, state(3), keep=10)
    with pytest.raises(DiskFull):  # rewriting an existing name must not damage it either
        checkpoint.save_atomic(state(99), checkpoint.checkpoint_path(tmp_path, 2))
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    assert after == before  # no round_0003.pt, no .tmp leftovers, round_0002.pt untouched
    assert checkpoint.load_latest(tmp_path)[0]["round"] == 2


def test_loading_is_weights_only_so_a_hostile_pickle_runs_no_code(tmp_path):
    witness = tmp_path / "code_ran"

    class Hostile:
        def __reduce__(self):
            return (open, (str(witness), "w"))

    checkpoint.save_atomic({"round": 1, "model": Hostile()}, checkpoint.checkpoint_path(tmp_path, 1))
    with pytest.raises(CheckpointError, match="weights_only"):
        checkpoint.load_verified(checkpoint.checkpoint_path(tmp_path, 1))
    assert not witness.exists()
    # and load_latest treats it as unusable instead of crashing
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="unusable"):
        checkpoint.load_latest(tmp_path)
    assert not witness.exists()
