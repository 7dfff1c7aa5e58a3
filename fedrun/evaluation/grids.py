"""PNG figures: class-ordered sample grids, per-client grids with a colour strip, partition bars.

Drawn with torchvision's ``make_grid``/``save_image`` and PIL only (no plotting library), so
they work on any headless node. Images come in as float [-1, 1] or uint8, NCHW, 1 or 3 channels.

The colour strip (as in the paper's Figs. 4/5) summarises what a client's model generates:
k-means over the pixel colours of its samples, drawn as one horizontal bar per cluster whose
width is the cluster's share of the pixels and whose colour is the cluster centre. Under a
skewed (non-IID) partition, local models drift towards the colours of their own classes, which
the strips make visible at a glance.
"""

from __future__ import annotations

import colorsys
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# torchvision.utils is imported where a grid is drawn: importing torchvision costs ~2 s per
# process (it pulls in torch._dynamo), which every rank would pay at start for a final grid.

WHITE = 1.0  # separators and empty cells


def _unit(images: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """float [-1,1] or uint8 NCHW -> float [0,1] on the CPU, optionally upscaled (nearest)."""
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    x = images.detach().cpu()
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float().add(1).div(2).clamp(0, 1)
    if scale > 1:  # tiny images (16x16 digits) are unreadable at 1:1
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    return x


def _save(canvas: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from torchvision.utils import save_image
    save_image(canvas, path)
    return path


# --------------------------------------------------------------------------------------------
# Class-ordered grid


def save_class_grid(images: torch.Tensor, labels: torch.Tensor, path: str | Path,
                    nrow: int | None = None, padding: int = 2, scale: int = 1) -> Path:
    """One row per class (ascending label), up to ``nrow`` images per row (default: as many as
    the largest class has). Classes with fewer images leave blank cells, so columns line up.

    PNG size: width = nrow * (W*scale + padding) + padding, height likewise with one row per class.
    """
    x = _unit(images, scale)
    labels = torch.as_tensor(labels).cpu().long()
    if len(labels) != len(x) or len(x) == 0:
        raise ValueError(f"need as many labels as images (got {len(labels)} and {len(x)}), at least one")
    classes = torch.unique(labels).tolist()
    per_row = nrow or max(int((labels == c).sum()) for c in classes)
    blank = torch.full_like(x[0], WHITE)
    cells = []
    for c in classes:
        row = list(x[labels == c][:per_row])
        cells += row + [blank] * (per_row - len(row))
    from torchvision.utils import make_grid
    grid = make_grid(torch.stack(cells), nrow=per_row, padding=padding, pad_value=WHITE)
    return _save(grid, path)


# --------------------------------------------------------------------------------------------
# Client grid with its colour strip


@dataclass
class Palette:
    colours: np.ndarray  # uint8 [k, 3], cluster centres, largest share first
    shares: np.ndarray  # float [k], fraction of pixels per cluster, sums to 1


def colour_clusters(images: torch.Tensor, k: int = 5, seed: int = 0,
                    max_pixels: int = 20_000) -> Palette:
    """k-means (scikit-learn, seeded, fixed n_init) over the RGB colours of all pixels.

    At most ``max_pixels`` pixels (a seeded random subset) are clustered: the shares are
    estimates anyway and KMeans on 10^6 pixels would take longer than sampling the images.
    Fewer distinct colours than ``k`` give fewer clusters.
    """
    from sklearn.cluster import KMeans

    x = _unit(images)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3).numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    if len(pixels) > max_pixels:
        pixels = pixels[rng.choice(len(pixels), max_pixels, replace=False)]
    n_clusters = min(k, len(np.unique(pixels, axis=0)))
    with warnings.catch_warnings():  # near-duplicate colours make KMeans warn; harmless here
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit(pixels)
    shares = np.bincount(km.labels_, minlength=n_clusters) / len(pixels)
    order = np.argsort(-shares, kind="stable")
    colours = (np.clip(km.cluster_centers_[order], 0, 1) * 255).round().astype(np.uint8)
    return Palette(colours, shares[order])


def bar_widths(shares: np.ndarray, width: int) -> list[int]:
    """Integer bar widths summing to ``width``, each as close to share * width as rounding
    allows (largest-remainder rounding, so the strip has no gap or overflow)."""
    exact = np.asarray(shares, dtype=np.float64) / np.sum(shares) * width
    out = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - out), kind="stable")[: width - out.sum()]:
        out[i] += 1
    return out.tolist()


def save_client_grid(images: torch.Tensor, path: str | Path, k: int = 5, nrow: int | None = None,
                     padding: int = 2, scale: int = 1, strip_height: int | None = None,
                     seed: int = 0) -> Palette:
    """A square-ish grid of one client's samples under a strip of its ``k`` dominant colours.

    Layout (top to bottom): strip (``strip_height`` px, default grid width / 10, at least 6),
    a white gap of ``padding`` px, the ``make_grid`` grid. Returns the palette drawn.
    """
    x = _unit(images, scale)
    nrow = nrow or math.ceil(math.sqrt(len(x)))
    from torchvision.utils import make_grid
    grid = make_grid(x, nrow=nrow, padding=padding, pad_value=WHITE)  # 1 channel -> 3
    palette = colour_clusters(images, k=k, seed=seed)
    width = grid.shape[-1]
    strip_h = strip_height or max(6, width // 10)
    strip = torch.empty(3, strip_h, width)
    left = 0
    for colour, w in zip(palette.colours, bar_widths(palette.shares, width), strict=True):
        strip[:, :, left:left + w] = torch.from_numpy(colour.astype(np.float32) / 255).view(3, 1, 1)
        left += w
    gap = torch.full((3, padding, width), WHITE)
    _save(torch.cat([strip, gap, grid], dim=1), path)
    return palette


# --------------------------------------------------------------------------------------------
# Partition histogram (client x class stacked bars)

# matplotlib's "tab10" colours, then evenly spaced hues for data sets with more classes
_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def class_colours(n: int) -> list[tuple[int, int, int]]:
    if n <= len(_TAB10):
        return [tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in _TAB10[:n]]
    return [tuple(int(255 * v) for v in colorsys.hsv_to_rgb(i / n, 0.65, 0.9)) for i in range(n)]


def save_partition_histogram(counts: np.ndarray, path: str | Path, plot_height: int = 240) -> Path:
    """Stacked bars, one per client, one coloured segment per class (bottom = class 0), with the
    client index under each bar, the largest client size on the y axis and a class legend."""
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.size == 0 or (counts < 0).any():
        raise ValueError(f"counts must be a non-negative [clients, classes] array, got shape {counts.shape}")
    clients, classes = counts.shape
    font = ImageFont.load_default()
    colours = class_colours(classes)
    bar = int(np.clip(480 // clients, 6, 40))
    gap = max(2, bar // 3)
    left, right, top, bottom = 56, 12, 44, 36
    plot_w = clients * (bar + gap) + gap
    legend_w = classes * 34 + 60
    width = left + max(plot_w, legend_w) + right
    height = top + plot_height + bottom
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)

    # legend: one swatch per class along the top
    draw.text((left, 6), "class", fill="black", font=font)
    for c in range(classes):
        x0 = left + 40 + c * 34
        draw.rectangle([x0, 8, x0 + 10, 18], fill=colours[c])
        draw.text((x0 + 13, 6), str(c), fill="black", font=font)

    # bars
    base_y = top + plot_height
    peak = max(1, int(counts.sum(1).max()))
    for i in range(clients):
        x0 = left + gap + i * (bar + gap)
        y = float(base_y)
        for c in range(classes):
            h = counts[i, c] / peak * plot_height
            if round(y - h) < round(y):  # segments thinner than half a pixel are not drawn
                draw.rectangle([x0, round(y - h), x0 + bar - 1, round(y) - 1], fill=colours[c])
            y -= h
        if clients <= 40 or i % math.ceil(clients / 40) == 0:
            draw.text((x0 + bar // 2, base_y + 4), str(i), fill="black", font=font, anchor="mt")

    # axes: y from 0 to the largest client, x labelled "client"
    draw.line([left - 1, top, left - 1, base_y], fill="black")
    draw.line([left - 1, base_y, left + plot_w, base_y], fill="black")
    for value, y in ((peak, top), (0, base_y)):
        draw.line([left - 5, y, left - 1, y], fill="black")
        draw.text((left - 8, y), str(value), fill="black", font=font, anchor="rm")
    draw.text((left - 8, top + plot_height // 2), "images", fill="black", font=font, anchor="rm")
    draw.text((left + plot_w // 2, height - 4), "client", fill="black", font=font, anchor="mb")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
