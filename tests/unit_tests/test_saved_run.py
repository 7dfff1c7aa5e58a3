"""Opening a finished run (fedrun/saved_run.py): which checkpoint, which weights, which shards,
and one clear error for each way a run directory cannot be opened."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrun import checkpoint
from fedrun.__main__ import main
from fedrun.config import load_config
from fedrun.data import load_split
from fedrun.errors import CheckpointError, ConfigError
from fedrun.flat import flatten
from fedrun.models import build
from fedrun.partition import client_shards, partition
from fedrun.saved_run import open_run

from helpers import same_bits, tiny_overrides


def make_run(tmp_path: Path, rounds: tuple[int, ...] = (1, 2), ema: str = "half", **extra: object) -> Path:
    """A run directory as training leaves it: config.toml and one checkpoint per round, each
    with the model moved by the round number and an EMA (half the weights, or of another size)."""
    cfg = load_config(None, tiny_overrides(tmp_path, "saved", **extra))
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.toml").write_text(cfg.to_toml())
    model, _ = build(cfg, 10, torch.device("cpu"))
    for r in rounds:
        state = {k: v + r if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        flat = {"half": flatten(model) * 0.5, "wrong": torch.zeros(7), "none": None}[ema]
        checkpoint.save_checkpoint(cfg.run_dir, r, {"round": r, "model": model.state_dict(),
                                                    "ema": {} if flat is None else {"flat": flat}}, keep=5)
    return cfg.run_dir


def test_the_newest_checkpoint_and_its_ema(tmp_path):
    run_dir = make_run(tmp_path)
    run = open_run(run_dir, device="cpu")
    assert run.round == 2 and run.checkpoint.name == "round_0002.pt" and run.weights == "ema"
    saved = checkpoint.load_verified(run.checkpoint)
    assert torch.equal(flatten(run.model), saved["ema"]["flat"])
    assert run.cfg.run_dir == run_dir and run.test is not None and not run.model.training


def test_an_ema_of_another_size_leaves_the_model(tmp_path):
    run = open_run(make_run(tmp_path, ema="wrong"), device="cpu")
    assert run.weights == "model"
    assert same_bits(run.model.state_dict(), checkpoint.load_verified(run.checkpoint)["model"])
    assert open_run(make_run(tmp_path / "off", ema="none"), device="cpu").weights == "model"


def test_a_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    run_dir = make_run(tmp_path)
    newest = checkpoint.checkpoint_path(run_dir, 2)
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        run = open_run(run_dir, device="cpu", test_split=False)
    assert run.round == 1 and run.checkpoint.name == "round_0001.pt" and run.test is None
    # asked for by name, a broken checkpoint is an error, not a fallback
    with pytest.raises(CheckpointError, match="--checkpoint: .*truncated"):
        open_run(run_dir, newest, device="cpu")
    first = open_run(run_dir, checkpoint.checkpoint_path(run_dir, 1), device="cpu")
    assert first.round == 1


@pytest.mark.slow  # ~6 s: trains, then scores twice
def test_fedrun_eval_scores_the_newest_valid_checkpoint(tmp_path):
    """`fedrun eval` opens the run this way: a newest checkpoint cut short by a crash is skipped
    with a warning (as resume and `fedrun audit` skip it) and the one before it is scored."""
    run_dir = make_run(tmp_path, ema="none")
    newest = checkpoint.checkpoint_path(run_dir, 2)
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="skipping unusable checkpoint .*round_0002.pt"):
        code = main(["eval", str(run_dir), "--eval.feature_extractor", "classifier", "--eval.num_samples",
                     "20", "--eval.batch_size", "20", "--eval.per_class", "false", "--eval.prdc_k", "0",
                     "--eval.kid", "false"])
    assert code == 0
    row = json.loads((run_dir / "eval" / "round_0001_n20.json").read_text())  # tagged by the sample count
    assert row["round"] == 1 and row["checkpoint"] == str(checkpoint.checkpoint_path(run_dir, 1))
    assert row["num_samples"] == 20 and row["weights"] == "model" and row["fid_test"] > 0
    assert not list((run_dir / "eval").glob("round_0002*"))


def test_each_unusable_run_dir_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no config.toml"):
        open_run(tmp_path / "nowhere")
    run_dir = make_run(tmp_path, rounds=())
    with pytest.raises(CheckpointError, match="holds no checkpoint; train the run first"):
        open_run(run_dir)
    with pytest.raises(CheckpointError, match="--checkpoint: no file at"):
        open_run(run_dir, run_dir / "checkpoints" / "round_0009.pt")
    run_dir = make_run(tmp_path / "broken", rounds=(1, 2))
    for path in checkpoint.list_checkpoints(run_dir):
        path.write_bytes(b"cut")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="every checkpoint .* restore"):
        open_run(run_dir)
    # a checkpoint whose weights do not fit the config (another model.* in the overrides)
    run_dir = make_run(tmp_path / "other")
    with pytest.raises(CheckpointError, match="do not fit the model"):
        open_run(run_dir, overrides={"model.base_channels": "16"}, device="cpu")


def test_client_shards_are_the_runs_partition(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, fed__alpha=0.3, run__seed=4))
    labels = load_split(cfg.data, "train").labels.numpy()
    f = cfg.fed
    drawn = partition(labels, f.num_clients, f.partition, f.alpha, 4, f.min_client_size, f.max_resample)
    shards = client_shards(cfg, labels)
    assert len(shards) == 4 and all(np.array_equal(a, b) for a, b in zip(shards, drawn, strict=True))
    central = load_config(None, tiny_overrides(tmp_path, run__mode="centralized"))
    (everything,) = client_shards(central, labels)
    assert np.array_equal(everything, np.arange(len(labels)))


def test_a_centralized_run_has_one_shard_and_no_clients(tmp_path):
    run = open_run(make_run(tmp_path, run__mode="centralized"), device="cpu", test_split=False)
    assert run.clients is None and len(run.shards) == 1 and len(run.shards[0]) == len(run.train)
    fed = open_run(make_run(tmp_path / "fed"), device="cpu", test_split=False)
    assert fed.clients is fed.shards and len(fed.shards) == fed.cfg.fed.num_clients
