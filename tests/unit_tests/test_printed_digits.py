"""data.name = "printed_digits": public digits rendered by fedrun the way UCI optdigits was made."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrun import printed_digits as pd
from fedrun.config import DataConfig
from fedrun.data import load_split


def test_optdigits_counts_on_pixels_per_4x4_block():
    bitmap = np.zeros((32, 32), dtype=bool)
    bitmap[0:4, 0:4] = True  # a full block: 16
    bitmap[5, 9] = True  # one pixel of block (1, 2): 1
    bitmap[28:32, 30] = True  # 4 pixels of block (7, 7)
    counts = pd.optdigits_counts(bitmap)
    expected = np.zeros((8, 8), dtype=np.int64)
    expected[0, 0], expected[1, 2], expected[7, 7] = 16, 1, 4
    assert np.array_equal(counts, expected)


def test_a_split_is_balanced_deterministic_and_shaped_like_the_handwritten_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRUN_CACHE_DIR", str(tmp_path))
    images, labels = pd.render("test")
    again, labels_again = pd.render("test")
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert images.shape == (pd.SIZES["test"], 1, 8, 8) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [pd.SIZES["test"] // 10] * 10
    # optdigits' values: counts 0..16 scaled by 255 / 16, as fedrun.data._digits scales load_digits
    assert set(np.unique(images)) <= {round(c * 255 / 16) for c in range(17)}
    # size-normalised as optdigits: every digit spans all 8 rows, and is centred
    on = images[:, 0] > 0
    assert on.any(axis=2).all()
    cols = on.any(axis=1)
    centre = np.array([np.nonzero(c)[0].mean() for c in cols])
    assert abs(centre.mean() - 3.5) < 0.5
    # the same pipeline as the handwritten digits: uint8 -> [-1, 1], resized to data.image_size
    cfg = DataConfig(name="printed_digits", image_size=16, channels=1)
    split = load_split(cfg, "test")
    hand = load_split(DataConfig(name="digits", image_size=16, channels=1), "test")
    assert split.images.shape == hand.images.shape and split.num_classes == hand.num_classes == 10
    assert torch.equal(split.images, load_split(cfg, "test").images)  # the cached copy is the same
    assert list(tmp_path.glob("data/printed_digits_*_test.npz"))


def test_without_freetype_the_bitmap_font_stands_in_and_says_so(monkeypatch):
    monkeypatch.setattr(pd, "has_freetype", lambda: False)
    assert pd.font_kind() == "bitmap"
    rng = np.random.default_rng(0)
    counts = [pd.render_one(d, rng) for d in range(10)]
    assert all(c.shape == (8, 8) and c.max() > 0 for c in counts)
    assert len({c.tobytes() for c in counts}) == 10  # ten different glyphs
    monkeypatch.setitem(pd.SIZES, "test", 10)
    with pytest.warns(UserWarning, match="no FreeType"):
        pd.render("test")


@pytest.mark.slow
def test_a_classifier_of_handwritten_digits_reads_most_printed_ones_but_not_all():
    """The public set is digits (far above chance for the handwritten digits' classifier), but
    not the private distribution (below the classifier's accuracy on handwritten test images)."""
    from fedrun.evaluation.classifier import classifier_accuracy, load_or_train_classifier
    hand = DataConfig(name="digits", image_size=16, channels=1)
    clf, info = load_or_train_classifier("digits", load_split(hand, "train"), load_split(hand, "test"))
    public = DataConfig(name="printed_digits", image_size=16, channels=1)
    printed = classifier_accuracy(clf, load_split(public, "test"))
    assert 0.3 < printed < info["test_acc"] - 0.1
