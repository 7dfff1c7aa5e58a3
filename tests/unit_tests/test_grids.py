"""PNG figures: sizes, class order, colour-strip widths, partition bars."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fedrun.evaluation import grids


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_class_grid_has_one_row_per_class_and_expected_size(tmp_path):
    counts = {0: 4, 3: 2, 7: 3}  # unsorted on purpose below
    labels = torch.tensor([c for c, n in counts.items() for _ in range(n)])[[8, 0, 4, 1, 5, 2, 6, 3, 7]]
    images = (labels.float() / 7 * 2 - 1).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    path = grids.save_class_grid(images, labels, tmp_path / "g" / "class.png", padding=2)
    png = _png(path)
    assert png.shape == (3 * (8 + 2) + 2, 4 * (8 + 2) + 2, 3)
    for row, c in enumerate(sorted(counts)):
        y = 2 + row * 10 + 4
        expected = round(c / 7 * 255)
        for col in range(4):
            pixel = png[y, 2 + col * 10 + 4]
            if col < counts[c]:
                assert abs(int(pixel[0]) - expected) <= 1, (c, col, pixel)
            else:
                assert (pixel == 255).all()  # blank cell


def test_class_grid_scale_and_nrow(tmp_path):
    images = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    png = _png(grids.save_class_grid(images, labels, tmp_path / "c.png", nrow=2, padding=1, scale=3))
    assert png.shape[:2] == (2 * (12 + 1) + 1, 2 * (12 + 1) + 1)


def test_bar_widths_sum_to_width_and_follow_shares():
    shares = np.array([0.41, 0.33, 0.17, 0.09])
    for width in (7, 50, 173):
        w = grids.bar_widths(shares, width)
        assert sum(w) == width
        assert all(abs(a - s * width) < 1 for a, s in zip(w, shares, strict=True))


def test_client_grid_strip_matches_cluster_shares(tmp_path):
    # 10 images of 3 pure colours: pixel shares exactly 0.5 red, 0.3 green, 0.2 blue
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    which = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)[order]
    images = colours[which].view(10, 3, 1, 1).expand(10, 3, 6, 6).contiguous()
    path = tmp_path / "client.png"
    palette = grids.save_client_grid(images, path, k=3, nrow=5, padding=2, strip_height=7)
    np.testing.assert_allclose(palette.shares, [0.5, 0.3, 0.2], atol=1e-9)
    assert palette.colours.tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]

    png = _png(path)
    grid_w, grid_h = 5 * (6 + 2) + 2, 2 * (6 + 2) + 2
    assert png.shape == (7 + 2 + grid_h, grid_w, 3)
    # run lengths of the strip's colours, read back from the file
    row = png[3]
    runs, start = [], 0
    for x in range(1, grid_w + 1):
        if x == grid_w or (row[x] != row[start]).any():
            runs.append((tuple(row[start].tolist()), x - start))
            start = x
    assert [c for c, _ in runs] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    widths = [n for _, n in runs]
    assert widths == grids.bar_widths(palette.shares, grid_w)
    assert all(abs(n - s * grid_w) < 1 for n, s in zip(widths, [0.5, 0.3, 0.2], strict=True))
    assert (png[7:9] == 255).all()  # white gap between strip and grid


def test_client_grid_with_fewer_colours_than_k(tmp_path):
    images = torch.full((4, 1, 5, 5), 0.2)  # one grey
    palette = grids.save_client_grid(images, tmp_path / "grey.png", k=5)
    assert len(palette.shares) == 1 and palette.shares[0] == pytest.approx(1.0)


def test_partition_histogram_bar_heights_follow_counts(tmp_path):
    counts = np.array([[5, 0], [0, 10], [3, 3]])
    path = grids.save_partition_histogram(counts, tmp_path / "hist.png", plot_height=200)
    png = _png(path)
    c0, c1 = grids.class_colours(2)
    legend = 11 * 11  # one swatch per class in the legend

    def area(colour) -> int:
        return int((png == np.array(colour, dtype=np.uint8)).all(-1).sum()) - legend

    # client 1 (10 of class 1) is the peak; client 2 stacks 3 + 3 on top of each other
    bar_w = 40
    assert area(c1) == pytest.approx(bar_w * (200 + 60), abs=2 * bar_w)
    assert area(c0) == pytest.approx(bar_w * (100 + 60), abs=2 * bar_w)
    with pytest.raises(ValueError):
        grids.save_partition_histogram(np.array([1, 2, 3]), tmp_path / "bad.png")
