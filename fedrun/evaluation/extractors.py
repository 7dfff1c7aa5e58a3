"""Feature extractors for FID/IS: clean-fid's Inception and the data set's own proxy classifier.

Each extractor maps images (float [-1, 1] or uint8, NCHW) to features [N, D] for the Frechet
distance and class logits [N, K] for IS, through clean-fid's ``get_batch_features``:

* ``"inception"``: clean-fid's TorchScript Inception-v3 (``inception-2015-12-05.pt``, the
  StyleGAN2-ADA export) in clean-fid's "clean" mode: PIL bicubic resize to 299x299 outside the
  network. Pool features (2048) give FID; logits of the same pass (1008 classes, without the
  output bias, as StyleGAN2-ADA's IS) give IS. The paper's numbers are of this kind. The file is
  never downloaded here: compute nodes often have no internet, and a missing file must fail
  loudly rather than yield a made-up score.
* ``"classifier"``: a small CNN trained (seeded) on the data set's own train split
  (``classifier.py``). It needs no download and suits sets Inception knows nothing about (16x16
  digits, CT scans); its numbers are comparable between runs of this repo only.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageSet, to_uint8
from ..errors import MetricsError
from .classifier import CLASSIFIER_VERSION, load_or_train_classifier

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_ENV = "FEDRUN_INCEPTION_WEIGHTS"
EXTRACTORS = ("inception", "classifier")


def inception_url() -> str:
    """Where clean-fid itself downloads the file from (for the error message only)."""
    from cleanfid.downloads_helper import inception_url as url
    return url


@dataclass
class Extractor:
    name: str  # "inception" | "classifier"
    tag: str  # cache tag of the reference statistics it produces
    rgb: bool  # wants 3 channels
    feature_dim: int
    fn: Callable[[torch.Tensor], torch.Tensor]  # [B,C,H,W] in [0,255] -> [B, feature_dim + classes]
    device: torch.device
    resize: Callable[[np.ndarray], np.ndarray] | None = None  # clean-fid per-image HWC resizer
    info: dict[str, Any] | None = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """Features [N, D] (float64) and logits [N, K] of images in [-1,1] or uint8."""
        from cleanfid.fid import get_batch_features  # ~0.7 s to import: only when scoring
        feats, logits = [], []
        for start in range(0, len(images), batch_size):
            batch = to_uint8(images[start:start + batch_size], rgb=self.rgb).cpu()
            batch = self._resized(batch) if self.resize is not None else batch.float()
            out = get_batch_features(batch, self.fn, self.device)
            feats.append(out[:, :self.feature_dim])
            logits.append(out[:, self.feature_dim:])
        return np.concatenate(feats).astype(np.float64), np.concatenate(logits)

    def _resized(self, batch: torch.Tensor) -> torch.Tensor:
        # clean-fid's "clean" resize works on one HWC float image at a time (PIL, per channel);
        # PIL releases the GIL while resampling, so threads help (~1.5x on 2 cores).
        arrays = batch.permute(0, 2, 3, 1).numpy().astype(np.float32)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            out = list(pool.map(self.resize, arrays))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def inception_weights_path(weights: str | os.PathLike = "") -> Path:
    """Where the Inception file must be: the argument, else $FEDRUN_INCEPTION_WEIGHTS, else the
    folder clean-fid itself downloads it to (/tmp, or ./ on Windows). A folder means the file of
    the standard name inside it. Raises MetricsError when the file is not there."""
    if weights:
        where, source = Path(weights), "eval.inception_weights"
    elif os.environ.get(INCEPTION_ENV):
        where, source = Path(os.environ[INCEPTION_ENV]), f"${INCEPTION_ENV}"
    else:
        where = Path("./" if platform.system() == "Windows" else "/tmp")
        source = "clean-fid's default location"
    where = where.expanduser()
    path = where / INCEPTION_FILE if where.is_dir() else where
    if not path.is_file():
        raise MetricsError(
            f"Inception weights not found at {path} ({source}): on a machine with internet fetch "
            f"{inception_url()} and copy it there, or set {INCEPTION_ENV} / eval.inception_weights to "
            f"the file (or use eval.feature_extractor = \"classifier\")")
    return path


def inception_extractor(weights: str | os.PathLike = "", device: str | torch.device = "cpu") -> Extractor:
    """clean-fid's TorchScript Inception on ``device`` only.

    clean-fid's own ``build_feature_extractor`` downloads when the file is missing and wraps the
    net in DataParallel (which claims every visible GPU), so the network is loaded here instead,
    with the same input normalisation as clean-fid's ``InceptionV3W`` in "clean" mode.
    """
    path = inception_weights_path(weights)
    device = torch.device(device)
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
        layers, out_weight = net.layers, net.output.weight
    except Exception as exc:  # a truncated download, an HTML error page saved as .pt, ...
        raise MetricsError(f"{path} is not clean-fid's Inception TorchScript file ({exc}); "
                           f"fetch {inception_url()} again") from None

    def fn(x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (299, 299), "clean mode resizes to 299x299 before the network"
        feats = layers.forward((x - 128) / 128).reshape(len(x), 2048)
        logits = F.linear(feats, out_weight)  # no output bias, as StyleGAN2-ADA's IS
        return torch.cat([feats, logits], dim=1)

    from cleanfid.resize import build_resizer
    return Extractor("inception", "inception", rgb=True, feature_dim=2048, fn=fn, device=device,
                     resize=build_resizer("clean"), info={"weights": str(path)})


def classifier_extractor(key: str, train_set: ImageSet, test_set: ImageSet | None = None,
                         cache_dir: str | os.PathLike = "", seed: int = 0,
                         device: str | torch.device = "cpu") -> Extractor:
    """The proxy classifier as a clean-fid style extractor (input: [0,255] floats, native size)."""
    device = torch.device(device)
    model, info = load_or_train_classifier(key, train_set, test_set, cache_dir, seed, device)

    def fn(x: torch.Tensor) -> torch.Tensor:
        feats = model.features(x / 127.5 - 1)  # back to the [-1, 1] range it was trained on
        return torch.cat([feats, model.head(feats)], dim=1)

    # The weights' hash goes into the statistics' tag: a classifier retrained after its cache
    # file was deleted (same seed, other hardware) differs slightly, and must not be scored
    # against statistics of the old one.
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    tag = f"classifier-seed{seed}-v{CLASSIFIER_VERSION}-{digest.hexdigest()[:8]}"
    return Extractor("classifier", tag, rgb=False, feature_dim=model.feature_dim, fn=fn,
                     device=device, info=info)
