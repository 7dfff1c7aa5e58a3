"""Data sets as in-memory tensors: a registry, the resize/normalise step, on-device augmentation.

Every data set the paper uses is small (at most 73k images of 32x32), so each split is loaded
once into one float tensor in [-1, 1] and moved to the training device; batches are index
lookups and the random flip runs on the device. No DataLoader workers, no per-image Python.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cache import atomic_save, resolve_cache_dir
from .config import DataConfig
from .errors import DataError


@dataclass
class ImageSet:
    images: torch.Tensor  # float32 [N, C, H, W] in [-1, 1]
    labels: torch.Tensor  # int64 [N]
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.num_classes)


def _finish(images_uint8: np.ndarray | torch.Tensor, labels, num_classes: int, cfg: DataConfig) -> ImageSet:
    """uint8 NCHW -> float [-1, 1], resized to cfg.image_size, with cfg.channels channels.

    Same order as the authors' ToTensor -> Resize -> Normalize(0.5, 0.5).
    """
    x = torch.as_tensor(np.asarray(images_uint8)).float().div_(255.0)
    if x.shape[1] != cfg.channels:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        else:  # RGB -> luminance (ITU-R 601), for channels = 1
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                          antialias=True, align_corners=False).clamp_(0, 1)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return ImageSet(x.mul_(2).sub_(1).contiguous(), y, num_classes)


def _torchvision(factory: Callable, what: str, folder: str, cfg: DataConfig, **kwargs):
    root = Path(cfg.root)
    try:
        return factory(root=str(root), download=cfg.download, **kwargs)
    except RuntimeError as exc:
        if cfg.download:
            raise DataError(f"data.root: downloading {what} to {root} failed ({exc}); check the "
                            f"network, or copy the files there by hand") from None
        raise DataError(f"data.root: {what} not found under {root} (expected {folder}); set "
                        f"data.download = true on a machine with internet, or copy the files "
                        f"there and point data.root at them") from None


def _cifar10(cfg: DataConfig, split: str) -> ImageSet:
    from torchvision.datasets import CIFAR10
    ds = _torchvision(CIFAR10, "CIFAR-10", "cifar-10-batches-py/", cfg, train=split == "train")
    return _finish(ds.data.transpose(0, 3, 1, 2), ds.targets, 10, cfg)


def _fashion_mnist(cfg: DataConfig, split: str) -> ImageSet:
    from torchvision.datasets import FashionMNIST
    ds = _torchvision(FashionMNIST, "Fashion-MNIST", "FashionMNIST/raw/", cfg, train=split == "train")
    return _finish(ds.data.unsqueeze(1), ds.targets, 10, cfg)


def _svhn(cfg: DataConfig, split: str) -> ImageSet:
    from torchvision.datasets import SVHN
    ds = _torchvision(SVHN, "SVHN", "train_32x32.mat / test_32x32.mat", cfg, split=split)
    return _finish(ds.data, ds.labels, 10, cfg)


def _image_folder(cfg: DataConfig, split: str) -> ImageSet:
    """One sub-folder per class (e.g. the SARS-CoV-2 CT scans: COVID/, non-COVID/).

    If ``root/train`` and ``root/test`` exist they are the splits; otherwise the whole folder
    serves as both, as the authors scored the CT model against the whole set.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder; point data.root at a folder with "
                        f"one sub-folder of images per class")
    if (root / "train").is_dir() and (root / "test").is_dir():
        root = root / split
    try:
        ds = ImageFolder(str(root), loader=lambda p: p)  # paths only; decoded below
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data.root: no images found under {root} ({exc}); expected "
                        f"{root}/<class>/<image>.png|jpg") from None
    if len(ds.classes) < 2:
        raise DataError(f"data.root: {root} holds {len(ds.classes)} class folder(s); a "
                        f"class-conditional model needs at least 2 (one sub-folder per class)")
    mode = "L" if cfg.channels == 1 else "RGB"
    size = (cfg.image_size, cfg.image_size)
    images = np.empty((len(ds), cfg.channels, *size), dtype=np.uint8)
    for i, (path, _) in enumerate(ds.samples):
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert(mode).resize(size, Image.BILINEAR))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"data.root: cannot read image {path} ({exc}); remove or replace "
                            f"the file") from None
        images[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return _finish(images, ds.targets, len(ds.classes), cfg)


def _digits(cfg: DataConfig, split: str) -> ImageSet:
    """scikit-learn's bundled UCI handwritten digits: 1,797 real 8x8 images, no download.

    A fixed stratified 80/20 split (independent of run.seed, so scores stay comparable). The
    uint8 arrays and the split are cached (``<cache>/data/``) after the first load: importing
    scikit-learn costs every rank ~1.3 s of start-up, the cached arrays a few milliseconds.
    """
    path = resolve_cache_dir() / "data" / f"digits_sklearn-{_version('scikit-learn')}_v1.npz"
    try:
        with np.load(path) as z:
            images, target, idx = z["images"], z["target"], z[split]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # not cached, or damaged
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]
        target = d.target
        idx_train, idx_test = train_test_split(np.arange(len(d.target)), test_size=0.2,
                                               stratify=d.target, random_state=0)

        def save(tmp: Path) -> None:
            with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, images=images, target=target, train=idx_train, test=idx_test)
        atomic_save(save, path)
        idx = idx_train if split == "train" else idx_test
    return _finish(images[idx], target[idx], 10, cfg)


def _printed_digits(cfg: DataConfig, split: str) -> ImageSet:
    """Public printed digits made like the handwritten ones (fedrun/printed_digits.py): 2,000
    train and 360 test images, balanced classes, the same pipeline as ``_digits`` after 8x8.
    Rendered once per Pillow version and font kind, then cached (``<cache>/data/``)."""
    from . import printed_digits as pd
    name = f"printed_digits_pillow-{_version('pillow')}_{pd.font_kind()}_v{pd.VERSION}_{split}.npz"
    path = resolve_cache_dir() / "data" / name
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # not cached, or damaged
        images, labels = pd.render(split)

        def save(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.savez(f, images=images, labels=labels)
        atomic_save(save, path)
    return _finish(images, labels, 10, cfg)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _synthetic(cfg: DataConfig, split: str) -> ImageSet:
    """Random class-coloured blobs, for benchmarks: the pixels do not matter, the shapes do."""
    n = cfg.synthetic_size if split == "train" else max(1, cfg.synthetic_size // 5)
    g = torch.Generator().manual_seed(1234 if split == "train" else 4321)
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    base = torch.rand(cfg.num_classes, cfg.channels, 1, 1, generator=g)
    noise = torch.rand(n, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    x = (0.7 * base[labels] + 0.3 * noise) * 255
    return _finish(x.round().to(torch.uint8).numpy(), labels, cfg.num_classes, cfg)


REGISTRY: dict[str, Callable[[DataConfig, str], ImageSet]] = {
    "cifar10": _cifar10,
    "fashion_mnist": _fashion_mnist,
    "svhn": _svhn,
    "image_folder": _image_folder,
    "digits": _digits,
    "printed_digits": _printed_digits,
    "synthetic": _synthetic,
}


def load_split(cfg: DataConfig, split: str) -> ImageSet:
    """The whole ``split`` ("train" or "test") of ``cfg.name`` as float tensors on the CPU."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return REGISTRY[cfg.name](cfg, split)


def dataset_key(cfg: DataConfig) -> str:
    """Cache key of a data set's pixels: the set's name, plus a short hash of what else makes
    them differ (``image_folder``'s root, ``synthetic``'s size and classes), so two different
    folders never share cached reference statistics or classifiers."""
    detail = {"image_folder": lambda: str(Path(cfg.root).resolve()),
              "synthetic": lambda: f"{cfg.synthetic_size}-{cfg.num_classes}"}.get(cfg.name)
    if detail is None:
        return cfg.name
    return f"{cfg.name}-{hashlib.sha256(detail().encode()).hexdigest()[:8]}"


def to_uint8(images: torch.Tensor, rgb: bool = False) -> torch.Tensor:
    """float [-1, 1] (or uint8) NCHW -> uint8 [0, 255], the inverse of loading; ``rgb`` repeats
    one channel to three. Rounds half up, as torchvision's ``save_image`` does, so scored images
    are exactly the pixels a PNG of them would hold.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = images.detach().float().add(1).mul(127.5).add(0.5).clamp(0, 255).to(torch.uint8)
    if rgb and images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip each image left-right with probability 1/2, on x's device, from the seeded RNG."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)
