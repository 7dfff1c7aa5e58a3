"""Printed digits, made the way UCI optdigits (scikit-learn's ``load_digits``) was made: public
data for the digits default that fedrun renders itself (``data.name = "printed_digits"``).

Why printed and not a slice of the handwritten set: public data drawn from the private
distribution would overstate what private fine-tuning achieves. Why optdigits-style: the
makers of optdigits (Alpaydin and Kaynak, 1998) turned each size-normalised 32x32 binary
bitmap of a NIST digit into 8x8 counts of on-pixels in non-overlapping 4x4 blocks (0..16); the
same steps here turn a printed glyph into an image of the same kind, which then goes through
the same pipeline as ``data.name = "digits"`` (``* 255 / 16``, uint8, resized to
``data.image_size``).

One image: the glyph of its class in Pillow's built-in scalable font (Aileron Regular, Pillow
>= 10.1 with FreeType), rendered at ``RENDER_SIZE`` px with a random stroke width, rotated by a
random angle, blurred by a random Gaussian radius and thresholded to a binary bitmap (so blur
rounds and thickens the strokes); cropped to its bounding box and size-normalised the way the
optdigits bitmaps are (measured on scikit-learn's 1,797 digits: every digit spans all 8 rows,
most span 6 of the 8 columns whatever the class, centred): stretched to a random height of
90-100 % of 32 px and a random width of 18-24 px, centred with a random shift of up to 2 px,
binarised again, and counted in 4x4 blocks. Every parameter is drawn from
``numpy.random.default_rng(SEEDS[split])``: a fixed seed per split, independent of run.seed (the
set is the same in every run, so scores stay comparable; fedrun.seeding.RAW_SEED_USES lists it).
Classes are balanced: ``SIZES[split] / 10`` images each. Without FreeType, Pillow has only a
small bitmap font: it is upscaled instead (a warning says so) and the images differ; the cache
key names the font kind.
"""

from __future__ import annotations

import warnings

import numpy as np

RENDER_SIZE = 96  # px of the glyph before normalisation: fine steps of stroke width and blur
SIZES = {"train": 2000, "test": 360}  # test = the handwritten test split's size: FIDs compare
SEEDS = {"train": 20_240_601, "test": 20_240_602}  # fixed, one per split (module docstring)
ROTATION_DEG = 12.0  # uniform in [-12, 12] degrees
STROKE_PX = (0, 6)  # extra stroke width at RENDER_SIZE, uniform integer in [0, 6]
BLUR_PX = (0.0, 4.0)  # Gaussian blur radius at RENDER_SIZE before thresholding
HEIGHT = (0.9, 1.0)  # the glyph's height / 32 px after normalisation (optdigits: all 8 rows)
WIDTH_PX = (18.0, 24.0)  # its width after normalisation (optdigits: mostly 6 of 8 columns)
SHIFT_PX = 2.0  # uniform shift of the centre in [-2, 2] px, x and y (optdigits: centred)
VERSION = 1  # bump when the recipe changes: cached renderings are then ignored


def has_freetype() -> bool:
    """Can Pillow render its scalable default font (FreeType present, Pillow >= 10.1)?"""
    from PIL import features
    return bool(features.check("freetype2"))


def font_kind() -> str:
    """"aileron" (scalable, FreeType) or "bitmap" (Pillow's fallback font): part of the cache key."""
    return "aileron" if has_freetype() else "bitmap"


def _glyph(digit: int, stroke: int) -> np.ndarray:
    """The digit in white on black at about RENDER_SIZE px (uint8 [H, W]), before rotation."""
    from PIL import Image, ImageDraw, ImageFont
    canvas = 2 * RENDER_SIZE
    if has_freetype():
        font = ImageFont.load_default(size=RENDER_SIZE)
        img = Image.new("L", (canvas, canvas), 0)
        ImageDraw.Draw(img).text((canvas // 2, canvas // 2), str(digit), fill=255, font=font, anchor="mm",
                                 stroke_width=stroke, stroke_fill=255)
        return np.asarray(img)
    # Pillow's bitmap font (about 11 px high, no strokes): upscaled to RENDER_SIZE, thickened by
    # a max filter of the stroke's width
    from PIL import ImageFilter
    small = Image.new("L", (24, 24), 0)
    ImageDraw.Draw(small).text((8, 6), str(digit), fill=255, font=ImageFont.load_default())
    img = small.resize((canvas, canvas), Image.NEAREST)
    if stroke:
        img = img.filter(ImageFilter.MaxFilter(2 * (stroke // 2) + 1))
    return np.asarray(img)


def optdigits_counts(bitmap32: np.ndarray) -> np.ndarray:
    """A 32x32 binary bitmap -> 8x8 counts of on-pixels per non-overlapping 4x4 block (0..16)."""
    b = (np.asarray(bitmap32) > 0).astype(np.int64)
    if b.shape != (32, 32):
        raise ValueError(f"expected a 32x32 bitmap, got {b.shape}")
    return b.reshape(8, 4, 8, 4).sum(axis=(1, 3))


def render_one(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One optdigits-style 8x8 image (int64, 0..16) of ``digit``; draws its parameters from ``rng``
    in a fixed order (stroke, angle, blur, height, width, shift x, shift y)."""
    from PIL import Image, ImageFilter
    stroke = int(rng.integers(STROKE_PX[0], STROKE_PX[1] + 1))
    angle = float(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    blur = float(rng.uniform(*BLUR_PX))
    nh = round(32 * float(rng.uniform(*HEIGHT)))
    nw = round(float(rng.uniform(*WIDTH_PX)))
    dx, dy = (float(v) for v in rng.uniform(-SHIFT_PX, SHIFT_PX, size=2))
    img = Image.fromarray(_glyph(digit, stroke))
    img = img.rotate(angle, resample=Image.BICUBIC, expand=False, fillcolor=0)
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    binary = np.asarray(img) >= 128
    ys, xs = np.nonzero(binary)
    if len(ys) == 0:  # cannot happen with the ranges above; a blank image rather than a crash
        return np.zeros((8, 8), dtype=np.int64)
    crop = binary[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    # size normalisation to the box (not aspect-preserving: optdigits' widths do not follow the class)
    small = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((nw, nh), Image.BILINEAR))
    y0 = int(np.clip(round((32 - nh) / 2 + dy), 0, 32 - nh))
    x0 = int(np.clip(round((32 - nw) / 2 + dx), 0, 32 - nw))
    box = np.zeros((32, 32), dtype=np.uint8)
    box[y0:y0 + nh, x0:x0 + nw] = small
    return optdigits_counts(box >= 128)


def render(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 1, 8, 8] scaled as load_digits' * 255 / 16, labels int64 [N]) of a split:
    ``SIZES[split]`` images, balanced classes, in a seeded order."""
    if not has_freetype():
        warnings.warn("data.name = \"printed_digits\": this Pillow has no FreeType, so the digits are "
                      "rendered from Pillow's small bitmap font, upscaled (coarser glyphs than with "
                      "the scalable Aileron font); install Pillow >= 10.1 with FreeType (the PyPI "
                      "wheels have it) for the documented set", stacklevel=2)
    rng = np.random.default_rng(SEEDS[split])
    n = SIZES[split]
    labels = rng.permutation(np.repeat(np.arange(10), n // 10))
    counts = np.stack([render_one(int(d), rng) for d in labels])
    images = (counts * (255.0 / 16.0)).round().astype(np.uint8)[:, None]  # as fedrun.data._digits
    return images, labels.astype(np.int64)
