"""model.init_from: a run starts from another run's weights (its EMA where it has one), the init's
checksum is in every checkpoint, and a resume against another init is refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from fedrun import checkpoint
from fedrun.config import load_config
from fedrun.errors import CheckpointError
from fedrun.init_from import read_init, state_sha256
from fedrun.models import build
from fedrun.train import train

from helpers import fp32_sum_bound, max_abs_diff, model_at, tiny_overrides

ONE = {"fed__clients_per_round": 1}  # a quarter of the digits per round: cheap rounds


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """A tiny run with an EMA (another seed than the runs that start from it)."""
    out = tmp_path_factory.mktemp("public")
    cfg = load_config(None, tiny_overrides(out, "public", run__seed=7, fed__rounds=2, ema__sigma_rel="0.1",
                                           **ONE))
    train(cfg)
    return cfg.run_dir


def test_the_init_is_the_ema_where_the_checkpoint_has_one(public, tmp_path):
    init = read_init(load_config(None, tiny_overrides(tmp_path, model__init_from=str(public))), 10)
    state = checkpoint.load_verified(checkpoint.checkpoint_path(public, 2))
    assert init.weights == "ema" and init.round == 2 and init.path.name == "round_0002.pt"
    flat = torch.cat([t.reshape(-1).float() for t in init.state.values() if t.is_floating_point()])
    assert torch.equal(flat, state["ema"]["flat"])
    assert not torch.equal(flat, torch.cat([t.reshape(-1).float() for t in state["model"].values()]))
    # a checkpoint file names its own weights, the same rules
    same = read_init(load_config(None, tiny_overrides(tmp_path, model__init_from=str(init.path))), 10)
    assert same.sha256 == init.sha256 == state_sha256(init.state)


@pytest.mark.parametrize("mode", ["fedavg", pytest.param("centralized", marks=pytest.mark.slow)])
def test_a_run_starts_from_the_init_and_checkpoints_its_checksum(public, tmp_path, mode):
    # lr 1e-20: a round moves no fp32 weight of the size these have, so round 1 is the init (FedAvg:
    # up to the rounding of its weighted average)
    cfg = load_config(None, tiny_overrides(tmp_path, "tuned", run__mode=mode, fed__rounds=1,
                                           optim__lr="1e-20", model__init_from=str(public),
                                           **(ONE if mode == "fedavg" else {})))
    init = read_init(cfg, 10)
    train(cfg)
    tuned = model_at(cfg.run_dir, 1)
    assert max_abs_diff(tuned, init.state) <= (fp32_sum_bound(tuned, init.state) if mode == "fedavg" else 0)
    seeded, _ = build(cfg, 10, torch.device("cpu"))  # what the run would have started from
    assert max_abs_diff(seeded.state_dict(), init.state) > 1e-2
    state = checkpoint.load_verified(checkpoint.checkpoint_path(cfg.run_dir, 1))
    assert state["identity"] == {"model.init_from": f"an init of SHA-256 {init.sha256[:16]}"}


def test_resume_against_another_init_is_refused_unless_forced(public, tmp_path):
    source = tmp_path / "public"
    shutil.copytree(public, source)
    over = dict(fed__rounds=1, model__init_from=str(source), **ONE)
    train(load_config(None, tiny_overrides(tmp_path, "tuned", **over)))
    started = checkpoint.load_verified(checkpoint.checkpoint_path(tmp_path / "tuned", 1))["identity"]
    # the public run trained on: its newest checkpoint, hence the init, is another one now
    state = checkpoint.load_verified(checkpoint.checkpoint_path(source, 2))
    state["ema"]["flat"] = state["ema"]["flat"] * 1.001
    checkpoint.save_checkpoint(source, 3, state, keep=3)
    again = load_config(None, tiny_overrides(tmp_path, "tuned", **{**over, "fed__rounds": 2}))
    with pytest.raises(CheckpointError, match=r"^model\.init_from: .*round_0001\.pt continues a run started "
                                              r"with an init of SHA-256 [0-9a-f]{16}, this config gives an "
                                              r"init of SHA-256 [0-9a-f]{16}.*--checkpoint\.resume force"):
        train(again)
    assert not checkpoint.checkpoint_path(again.run_dir, 2).exists()
    again.checkpoint.resume = "force"
    train(again)
    resumed = checkpoint.load_verified(checkpoint.checkpoint_path(again.run_dir, 2))["identity"]
    assert resumed != started  # forced: the run goes on from the new init's identity


def test_the_checksum_ignores_the_memory_layout_and_sees_every_bit():
    a = {"w": torch.arange(24.0).reshape(1, 2, 3, 4), "b": torch.zeros(2)}
    b = {"w": a["w"].to(memory_format=torch.channels_last), "b": torch.zeros(2)}
    assert state_sha256(a) == state_sha256(b)
    c = {"w": a["w"].clone(), "b": torch.tensor([0.0, -0.0])}  # one sign bit
    assert state_sha256(a) != state_sha256(c)


def test_an_image_folder_serves_as_public_data(tmp_path):
    from PIL import Image
    for c in range(10):  # 10 classes, as the digits: the class embedding fits
        (tmp_path / "imgs" / str(c)).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (12, 12), 20 * c + 7 * i).save(tmp_path / "imgs" / str(c) / f"{i}.png")
    public = load_config(None, tiny_overrides(tmp_path, "folder", run__mode="centralized", fed__rounds=1,
                                              data__name="image_folder", data__root=tmp_path / "imgs"))
    train(public)  # 12x12 images, resized to data.image_size = 16: the size the private run uses
    tuned = load_config(None, tiny_overrides(tmp_path, "tuned", fed__rounds=1, optim__lr="1e-20",
                                             model__init_from=str(public.run_dir), **ONE))
    train(tuned)
    a, b = model_at(tuned.run_dir, 1), model_at(public.run_dir, 1)
    assert max_abs_diff(a, b) <= fp32_sum_bound(a, b)
