"""CIFAR-10 held on the training device, batched by index, augmented per sample on the device.

The whole dataset is 180 MB of uint8, so it lives on the GPU; an epoch is a ``torch.randperm``
and a loop of index slices. Augmentation (random crop with padding, horizontal flip, batched
RandAugment, normalisation) runs on whole batches, and mixup/CutMix return soft targets that
already carry label smoothing. All randomness comes from generators whose state is saved in
checkpoints, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

import utils
from randomaug import RandAugment

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCH_FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)


class DatasetNotFoundError(FileNotFoundError):
    """CIFAR-10 is neither on disk nor downloadable."""


class CorruptDatasetError(ValueError):
    """A CIFAR-10 batch file cannot be read or has the wrong content."""


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR batch holds (dicts, lists, strings, numbers and numpy arrays): a file
    whose pickle names anything else (``os.system`` in a ``__reduce__``) is refused before it runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one python-format CIFAR batch: images (N, 3, 32, 32) uint8 and labels (N,) int64.
    Nothing in the file can run code (``_BatchUnpickler``)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CorruptDatasetError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}). Delete the folder "
            f"{path.parent} and run again to download a fresh copy."
        ) from e
    if not isinstance(entry, dict) or "data" not in entry or not ({"labels", "fine_labels"} & entry.keys()):
        raise CorruptDatasetError(f"{path} is not a CIFAR batch (expected a dict with 'data' and 'labels').")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise CorruptDatasetError(
            f"{path} has data {data.dtype} {data.shape} and {len(labels)} labels; expected uint8 (N, 3072) "
            f"and N labels."
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise CorruptDatasetError(f"{path} has labels outside 0..9.")
    return data.reshape(-1, 3, 32, 32), labels


def published_md5s() -> dict[str, str]:
    """The md5 of each official CIFAR-10 batch file, as torchvision publishes them."""
    from torchvision.datasets import CIFAR10

    return dict(CIFAR10.train_list + CIFAR10.test_list)


def verify_batch(path: Path) -> None:
    """Raise ``CorruptDatasetError`` if ``path`` is not byte for byte the published CIFAR-10 file."""
    expected = published_md5s()[path.name]
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise CorruptDatasetError(
            f"{path} is not the published CIFAR-10 file (md5 {digest.hexdigest()}, expected {expected}). If it is "
            f"a CIFAR-format data set of your own, set verify_data=False. Otherwise it was changed or damaged on "
            f"disk: delete the folder {path.parent} and run again to download a fresh copy (or put {ARCHIVE} "
            f"in {path.parent.parent})."
        )


def _batch_files_present(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TRAIN_FILES + TEST_FILES)


def ensure_cifar10(root: str | Path, download: bool = True) -> Path:
    """Return the ``cifar-10-batches-py`` folder under ``root``, extracting or downloading it if
    needed with torchvision's md5-checked helpers. Raises ``DatasetNotFoundError`` saying where to
    put the data when it is absent and cannot be downloaded."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            f"data_dir {root} is a file, not a folder. Point data_dir at the folder that holds (or should "
            f"hold) {BATCH_FOLDER}/ or {ARCHIVE}."
        )
    folder = root / BATCH_FOLDER
    if _batch_files_present(folder):
        return folder
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive, extract_archive

    archive = root / ARCHIVE
    how = (
        f"Put CIFAR-10 there: either the archive {archive} (from {URL}) or its extracted folder "
        f"{folder}/ with data_batch_1..5 and test_batch."
    )
    if archive.is_file():
        if not check_integrity(str(archive), ARCHIVE_MD5):
            raise CorruptDatasetError(
                f"{archive} fails its md5 check (truncated download?). Delete it and run again. {how}"
            )
        extract_archive(str(archive), str(root))
    elif download:
        try:
            root.mkdir(parents=True, exist_ok=True)
            download_and_extract_archive(URL, str(root), filename=ARCHIVE, md5=ARCHIVE_MD5)
        except (OSError, RuntimeError) as e:  # URLError, ssl errors, torchvision's md5 failure
            raise DatasetNotFoundError(
                f"CIFAR-10 is not in {root} and downloading it failed ({type(e).__name__}: {e}). {how}"
            ) from e
    if not _batch_files_present(folder):
        missing = [n for n in TRAIN_FILES + TEST_FILES if not (folder / n).is_file()]
        raise DatasetNotFoundError(
            f"CIFAR-10 not found in {root} (missing {', '.join(missing)} in {folder}; "
            f"download={'on' if download else 'off'}). {how}"
        )
    return folder


@dataclass
class CifarTensors:
    """Train and test images (N, 3, 32, 32) uint8 and labels (N,) int64, on one device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_cifar10(
    root: str | Path,
    device: str | torch.device = "cpu",
    download: bool = True,
    train_subset: int = 0,
    test_subset: int = 0,
    verify: bool = True,
) -> CifarTensors:
    """Load CIFAR-10 onto ``device``; ``*_subset > 0`` keeps only the first that many images.
    ``verify``: check each batch file against its published md5 first (``verify_batch``)."""
    folder = ensure_cifar10(root, download=download)

    def read(names: tuple[str, ...], limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        for n in names if verify else ():
            verify_batch(folder / n)
        parts = [read_batch(folder / n) for n in names]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        if limit:
            x, y = x[:limit], y[:limit]
        return torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(y).to(device)

    x_train, y_train = read(TRAIN_FILES, train_subset)
    x_test, y_test = read(TEST_FILES, test_subset)
    return CifarTensors(x_train, y_train, x_test, y_test)


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


_NORMALIZE_CONSTANTS: dict = {}  # (mean, std, device) -> tensors, made once per device


def normalize(x: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised with per-channel mean/std.

    The constants are copied to the device once, not per call (each copy would block the host)."""

    def constants():
        return tuple(torch.tensor(v, device=x.device).view(1, -1, 1, 1) * 255.0 for v in (mean, std))

    key = (tuple(mean), tuple(std), x.device)
    if torch.compiler.is_compiling():  # traced code builds its constants (no guard on the cache)
        m, s = constants()
    else:
        m, s = _NORMALIZE_CONSTANTS[key] = _NORMALIZE_CONSTANTS.get(key) or constants()
    return (x.to(torch.float32) - m) / s


def draw_crop_flip(
    batch: int, padding: int, flip: bool, device: torch.device, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets (dy, dx) in [0, 2 * padding] and flip flags, each of shape (B,)."""
    dy = torch.randint(0, 2 * padding + 1, (batch,), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch,), device=device, generator=generator)
    mirrored = torch.rand(batch, device=device, generator=generator) < 0.5 if flip else torch.zeros_like(dy, dtype=bool)
    return dy, dx, mirrored


def crop_flip(
    x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor, mirrored: torch.Tensor
) -> torch.Tensor:
    """Crop each image of the zero-padded uint8 batch at (dy, dx) and mirror it where ``mirrored``,
    as one gather (no per-image Python)."""
    B, C, H, W = x.shape
    dev = x.device
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
    cols = torch.arange(W, device=dev)
    cols = torch.where(mirrored[:, None], cols.flip(0)[None, :], cols[None, :])  # (B, W)
    rows = dy[:, None] + torch.arange(H, device=dev)[None, :]  # (B, H)
    cols = dx[:, None] + cols  # (B, W)
    b = torch.arange(B, device=dev)[:, None, None, None]
    c = torch.arange(C, device=dev)[None, :, None, None]
    return x[b, c, rows[:, None, :, None], cols[:, None, None, :]]


INTERPOLATIONS = ("bilinear", "bicubic", "random")  # of the resized crop; "random": either, per image (timm)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's and timm's aspect-ratio range
RESIZED_CROP_ATTEMPTS = 10  # torchvision's tries before its centre-crop fallback
BICUBIC_A = -0.75  # the cubic kernel of F.interpolate(mode="bicubic")


def draw_resized_crop(
    batch: int, size: int, scale_min: float, device: torch.device, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (top, left, height, width) as ``torchvision.transforms.RandomResizedCrop.get_params``
    draws them on a ``size`` x ``size`` image: area fraction uniform in [scale_min, 1], log aspect ratio
    uniform in [3/4, 4/3], the first of 10 tries that fits, else the centre crop; each of shape (B,)."""
    u = torch.rand(batch, RESIZED_CROP_ATTEMPTS, 2, device=device, generator=generator, dtype=torch.float64)
    area = size * size * (scale_min + (1.0 - scale_min) * u[..., 0])
    lo, hi = math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    w = torch.where(found, w.gather(1, first)[:, 0], float(size)).long()  # a square image: the whole image
    h = torch.where(found, h.gather(1, first)[:, 0], float(size)).long()
    pick = torch.rand(batch, 2, device=device, generator=generator, dtype=torch.float64)
    top = (pick[:, 0] * (size - h + 1)).floor().long()
    left = (pick[:, 1] * (size - w + 1)).floor().long()
    return top, left, h, w


def _axis_weights(start: torch.Tensor, length: torch.Tensor, size: int, bicubic: torch.Tensor) -> torch.Tensor:
    """(B, size, size): row k holds the weights of the input pixels that output pixel k of a resize of
    the span [start, start + length) to ``size`` reads, as ``F.interpolate`` (align_corners=False) reads
    the cropped image: bilinear, or bicubic (a = -0.75) where ``bicubic``, the taps clamped to the span."""
    B, dev = start.shape[0], start.device
    scale = (length.double() / size)[:, None]  # (B, 1)
    src = (torch.arange(size, device=dev, dtype=torch.float64)[None, :] + 0.5) * scale - 0.5  # (B, size)
    last = (length - 1)[:, None]
    weights = torch.zeros(B, size, size, dtype=torch.float64, device=dev)
    lin = src.clamp(min=0.0)
    i0 = lin.floor()
    lam = lin - i0
    i0 = i0.long().minimum(last)
    for tap, w in ((i0, 1.0 - lam), ((i0 + 1).minimum(last), lam)):
        weights.scatter_add_(2, (start[:, None] + tap)[..., None], torch.where(bicubic[:, None], 0.0, w)[..., None])
    j0 = src.floor()
    t = src - j0
    a = BICUBIC_A
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    for offset, w in ((-1, far(t + 1)), (0, near(t)), (1, near(1 - t)), (2, far(2 - t))):
        tap = (j0.long() + offset).clamp(min=0).minimum(last)
        weights.scatter_add_(2, (start[:, None] + tap)[..., None], torch.where(bicubic[:, None], w, 0.0)[..., None])
    return weights


def resized_crop(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor, bicubic: torch.Tensor
) -> torch.Tensor:
    """Each uint8 image's crop (top, left, h, w) resized back to the image's size, bilinear or bicubic per
    sample, as two batched matrix products (no per-image Python); rounded back to uint8."""
    B, C, H, W = x.shape
    rows = _axis_weights(top, h, H, bicubic).float()  # (B, H_out, H)
    cols = _axis_weights(left, w, W, bicubic).float()  # (B, W_out, W)
    out = rows[:, None] @ x.to(torch.float32) @ cols.transpose(1, 2)[:, None]  # (B, C, H, W)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def draw_erase(shape: tuple, prob: float, device: torch.device, generator: Optional[torch.Generator] = None) -> dict:
    """timm's ``RandomErasing(probability=prob, mode="pixel")`` draws for a batch of ``shape`` (B, C, H, W):
    each image, with probability ``prob``, one rectangle (area 2%-33% of the image, aspect ratio 0.3-3.3,
    the first of 10 tries that fits, at a uniform position) and standard normal noise to fill it."""
    B, C, H, W = shape
    u = torch.rand(B, 10, 2, device=device, generator=generator, dtype=torch.float64)
    area = H * W * (0.02 + (1 / 3 - 0.02) * u[..., 0])
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    h, w = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w < W) & (h < H)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    erase = (torch.rand(B, device=device, generator=generator) < prob) & fits.any(dim=1)
    h, w = h.gather(1, first)[:, 0].long(), w.gather(1, first)[:, 0].long()
    pick = torch.rand(B, 2, device=device, generator=generator, dtype=torch.float64)
    top = (pick[:, 0] * (H - h + 1)).floor().long()  # random.randint(0, H - h): both ends included
    left = (pick[:, 1] * (W - w + 1)).floor().long()
    noise = torch.randn(shape, device=device, generator=generator)
    return {"erase": erase, "top": top, "left": left, "h": h, "w": w, "noise": noise}


def erase_rectangles(x: torch.Tensor, drawn: dict) -> torch.Tensor:
    """Apply ``draw_erase``'s rectangles to a normalised float batch."""
    H, W = x.shape[-2:]
    r, c = torch.arange(H, device=x.device)[None, :], torch.arange(W, device=x.device)[None, :]
    top, left = drawn["top"][:, None], drawn["left"][:, None]
    rows = (r >= top) & (r < top + drawn["h"][:, None])  # (B, H)
    cols = (c >= left) & (c < left + drawn["w"][:, None])  # (B, W)
    inside = rows[:, :, None] & cols[:, None, :] & drawn["erase"][:, None, None]  # (B, H, W)
    return torch.where(inside[:, None], drawn["noise"].to(x.dtype), x)


class TrainAugment:
    """Crop (zero padding) -> flip -> RandAugment -> normalise, on a uint8 batch on any device.

    All random choices are drawn first (a handful of small kernels); the transform itself is a
    pure function of the batch and those choices, so it can be compiled into a few fused kernels.

    Args:
        padding: crop padding in pixels (0 with ``flip=False`` disables crop and flip).
        flip: random horizontal flip.
        randaugment: a ``RandAugment`` or ``None``.
        compile: run the transform through ``torch.compile`` (falls back to eager, with a
            warning, if compilation fails).
    """

    def __init__(
        self,
        padding: int = 4,
        flip: bool = True,
        randaugment: Optional[RandAugment] = None,
        compile: bool = False,
        repair: Optional[Callable[[BaseException], str]] = None,
        resized_crop_scale: float = 0.0,
        interpolation: str = "bilinear",
        erase_prob: float = 0.0,
    ):
        assert interpolation in INTERPOLATIONS, interpolation
        self.padding = padding
        self.flip = flip
        self.randaugment = randaugment
        self.resized_crop_scale = resized_crop_scale  # > 0: RandomResizedCrop instead of the padded crop
        self.interpolation = interpolation
        self.erase_prob = erase_prob
        self.compiled = torch.compile(self.transform, dynamic=False) if compile else None
        self.repair = repair  # after a failed compile: repairs the kernel cache once (a note), or "" to fall back
        self.failure = ""  # why the compiled transform failed, once it has (then it runs eagerly)
        self.repaired = ""  # what the repair said, when a failure led to one

    def draw(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict:
        """The batch's random choices, as tensors."""
        B = x.shape[0]
        params = {"crop": None, "layers": [], "resized": None, "erase": None}
        if self.resized_crop_scale > 0:
            box = draw_resized_crop(B, x.shape[-1], self.resized_crop_scale, x.device, generator)
            coin = torch.rand(B, device=x.device, generator=generator) < 0.5  # timm's "random": either one
            bicubic = coin if self.interpolation == "random" else torch.full_like(coin, self.interpolation == "bicubic")
            params["resized"] = (*box, bicubic)
        if self.padding or self.flip:
            params["crop"] = draw_crop_flip(B, self.padding if params["resized"] is None else 0, self.flip, x.device,
                                            generator)  # fmt: skip
        if self.randaugment is not None:
            params["layers"] = [self.randaugment.draw(B, x.device, generator) for _ in range(self.randaugment.num_ops)]
        if self.erase_prob > 0:
            params["erase"] = draw_erase(tuple(x.shape), self.erase_prob, x.device, generator)
        return params

    def transform(self, x: torch.Tensor, crop, layers, resized=None, erase=None) -> torch.Tensor:
        """Apply drawn choices to a uint8 batch and normalise: float32 (B, C, H, W). The order is timm's:
        (resized) crop, flip, RandAugment, normalise, random erasing."""
        if resized is not None:
            x = resized_crop(x, *resized)
        if crop is not None:
            x = crop_flip(x, self.padding if resized is None else 0, *crop)
        for op, level, sign in layers:
            x = self.randaugment.apply(x, op, level, sign)
        x = normalize(x)
        return x if erase is None else erase_rectangles(x, erase)

    def notes(self) -> list[str]:
        """What its compile came to, to say once: a repaired kernel cache, a fallback to eager."""
        failed = f"the compiled augmentation failed ({self.failure}); it runs eagerly, and the attempt counts as "
        return [self.repaired, self.failure and failed + "compile time"]

    def __call__(
        self, x: torch.Tensor, generator: Optional[torch.Generator] = None, params: Optional[dict] = None
    ) -> torch.Tensor:
        """Augment a uint8 batch (``params``: choices drawn already, when a failed compile retries)."""
        params = self.draw(x, generator) if params is None else params
        if self.compiled is not None:
            try:
                return self.compiled(x, **params)
            except Exception as e:  # an Inductor/Triton failure must not stop training
                self.repaired = self.repair(e) if self.repair is not None and not self.repaired else ""
                if self.repaired:  # a damaged kernel cache, moved aside: compile once more, afresh
                    self.compiled = torch.compile(self.transform, dynamic=False)
                    return self(x, generator=None, params=params)
                self.failure = utils.first_line(e)
                warnings.warn(f"compiled augmentation failed ({self.failure}); running it eagerly", stacklevel=2)
                self.compiled = None
        return self.transform(x, **params)


class Mixup:
    """Batch-wise mixup / CutMix returning soft targets that include label smoothing.

    One lambda per batch (timm's default "batch" mode) from ``Beta(alpha, alpha)``; each sample is
    paired with the sample at the mirrored position of the batch, which is a random pairing because
    batches are drawn from a random permutation. With both alphas > 0 each batch uses CutMix with
    probability ``switch_prob``. Lambdas and boxes come from a seeded ``random.Random`` whose state
    is saved with checkpoints.

    Args:
        mixup_alpha: Beta parameter of mixup; 0 disables mixup.
        cutmix_alpha: Beta parameter of CutMix; 0 disables CutMix.
        switch_prob: probability of CutMix when both are enabled.
        label_smoothing: mass spread uniformly over all classes.
        num_classes: number of classes.
        seed: seed of the lambda/box generator.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 0.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 10,
        seed: int = 0,
    ):
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.rng = random.Random(seed)
        self.enabled = True  # False: labels smoothed, images not mixed (timm's mixup_off_epoch)
        self._weights: Optional[torch.Tensor] = None  # device buffer: (lambda, 1 - lambda) of the batch

    def smooth_one_hot(self, y: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_classes
        t = torch.full((y.shape[0], self.num_classes), off, device=y.device)
        return t.scatter_(1, y[:, None], 1.0 - self.label_smoothing + off)

    def draw(self, height: int, width: int) -> tuple[float, Optional[tuple[int, int, int, int]]]:
        """Next batch's lambda and CutMix box (y0, y1, x0, x1), or ``None`` for mixup."""
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < self.switch_prob)
        if use_cutmix:
            lam = self.rng.betavariate(self.cutmix_alpha, self.cutmix_alpha)
            cut = (1.0 - lam) ** 0.5
            ch, cw = int(height * cut), int(width * cut)
            cy, cx = self.rng.randrange(height), self.rng.randrange(width)
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
            return 1.0 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1)
        if self.mixup_alpha > 0:
            return self.rng.betavariate(self.mixup_alpha, self.mixup_alpha), None
        return 1.0, None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return x, self.smooth_one_hot(y)
        lam, box = self.draw(x.shape[-2], x.shape[-1])
        if lam >= 1.0:
            return self.mix(x, y, lam, box)
        # lam and 1 - lam go to the device as tensors filled by kernels (no copy, no sync): the values
        # the float path uses, so the same images, and a traced or captured step does not bake them in.
        if self._weights is None or self._weights.device != x.device:
            self._weights = torch.zeros(2, device=x.device)
        self._weights[0].fill_(lam)
        self._weights[1].fill_(1.0 - lam)
        return self._mix(x, y, self._weights[0], self._weights[1], box)

    def mix(self, x: torch.Tensor, y: torch.Tensor, lam: float, box=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix with a given lambda (and box): ``lam`` weighs the original sample and its label."""
        if lam >= 1.0:
            return x, self.smooth_one_hot(y)
        return self._mix(x, y, lam, 1.0 - lam, box)

    def _mix(self, x, y, keep, other, box) -> tuple[torch.Tensor, torch.Tensor]:
        """``keep`` (lambda) and ``other`` (1 - lambda): floats, or 0-d tensors holding the same values."""
        targets = self.smooth_one_hot(y)
        partner = x.flip(0)
        if box is None:
            x = x * keep + partner * other
        else:
            y0, y1, x0, x1 = box
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        return x, targets * keep + targets.flip(0) * other

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


class DeviceLoader:
    """Batches of a device-resident dataset by index.

    Training (``train=True``): a new permutation every epoch from ``generator``, full batches
    only (the remainder of the permutation is dropped, so every batch has the same shape and
    ``torch.compile`` sees one). Evaluation: the data in order, the last batch smaller.

    Args:
        x: uint8 images (N, C, H, W) on the device.
        y: int64 labels (N,).
        batch_size: images per batch.
        train: training batches (a permutation per epoch, the incomplete last batch dropped), or
            evaluation batches (in order, all images).
        augment: callable ``(uint8 batch, generator) -> float batch``; ``normalize`` when ``None``.
        seed: seed of the loader's generator (permutation and augmentation).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, train: bool, augment=None, seed: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if train and len(x) < batch_size:
            raise ValueError(
                f"only {len(x)} training images for batch_size {batch_size}: lower batch_size or raise train_subset"
            )
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.train = train
        self.augment = augment
        self.generator = torch.Generator(device=x.device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.train:
            order = torch.randperm(n, device=self.x.device, generator=self.generator)
        for i in range(len(self)):
            if self.train:
                idx = order[i * self.batch_size : (i + 1) * self.batch_size]
                xb, yb = self.x[idx], self.y[idx]
            else:
                xb = self.x[i * self.batch_size : (i + 1) * self.batch_size]
                yb = self.y[i * self.batch_size : (i + 1) * self.batch_size]
            xb = self.augment(xb, self.generator) if self.augment is not None else normalize(xb)
            yield xb, yb

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
