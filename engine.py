"""Training engine: one typed config, the AMP loop, exact resume, checkpoints, CSV/text logs, plots.

The notebook drives it as a short loop::

    trainer = Trainer(cfg, data)
    trainer.resume()
    for epoch in trainer.remaining_epochs():
        trainer.run_epoch(epoch)

Everything a resumed run needs is in ``checkpoint/<run>_latest.pth``: model, optimizer, scaler,
step, epoch, best accuracy, config and every RNG state the run uses. The learning rate is a pure
function of the global step, so nothing else is needed to continue exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

import utils
from data import CIFAR10, CLASSES, DeviceLoader, Mixup, TrainAugment, load_cifar10
from models import ViT, alphas, count_parameters
from randomaug import RandAugment

CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    """Everything a run depends on. Defaults are the seed configuration and the recipe below.

    Recipe sources: Lee, Lee & Song 2021 ("Vision Transformer for Small-Size Datasets",
    arXiv 2112.13492; plain ViT 93.6% on CIFAR-10): AdamW, lr 1e-3, weight decay 0.05, 10 warmup
    epochs, cosine decay, label smoothing 0.1, stochastic depth 0.1. RandAugment N=2, M=9 with
    magnitude noise 0.5 is timm's/DeiT's ``rand-m9-mstd0.5``; mixup 0.2 is the seed's.
    """

    # --- run ---
    epochs: int = 200  # total training epochs; raise it and re-run to train an existing run longer
    seed: int = 0  # seeds the model init, the loader permutation/augmentation and mixup
    run_name: str = ""  # names checkpoints/logs/plots; "" -> f"{norm}_cifar10"
    # --- data ---
    data_dir: str = "./data"  # holds cifar-10-batches-py/ (downloaded there when missing)
    download: bool = True  # download CIFAR-10 with torchvision when it is not in data_dir
    train_subset: int = 0  # use only the first N training images (0 = all 50,000)
    test_subset: int = 0  # use only the first N test images (0 = all 10,000)
    batch_size: int = 256  # training images per step
    eval_batch_size: int = 1000  # test images per forward pass (10 passes for the test set)
    # --- augmentation ---
    crop_padding: int = 4  # random crop from the image zero-padded by this many pixels (0 = off)
    hflip: bool = True  # random horizontal flip
    randaugment: bool = True  # batched per-sample RandAugment (randomaug.py)
    randaug_ops: int = 2  # RandAugment N: ops per image
    randaug_magnitude: float = 9.0  # RandAugment M on [0, 10] (randomaug.py's table)
    randaug_magnitude_std: float = 0.5  # per-image Gaussian noise on M (timm's mstd)
    mixup_alpha: float = 0.2  # Beta(alpha, alpha) mixup; 0 = off
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) CutMix; 0 = off; with mixup: half the batches each
    label_smoothing: float = 0.1  # probability mass spread over all classes
    # --- model ---
    norm: str = "dyt"  # "dyt" (Dynamic Tanh) or "ln" (LayerNorm), everywhere a ViT has a norm
    alpha_init: float = 0.5  # DyT's initial alpha (the paper's value for ViTs)
    dim: int = 384  # token width
    depth: int = 6  # transformer blocks
    heads: int = 6  # attention heads (dim must divide)
    patch_size: int = 4  # 4 -> 8x8 = 64 patch tokens on 32x32 images
    mlp_ratio: float = 4.0  # MLP hidden width / dim (1536 at dim 384)
    drop_path: float = 0.1  # stochastic depth of the last block (linear from 0)
    dropout: float = 0.0  # dropout in embedding, attention projection and MLP
    # --- optimisation ---
    lr: float = 1e-3  # peak learning rate after warmup (AdamW)
    min_lr: float = 1e-5  # learning rate at the end of the cosine
    weight_decay: float = 0.05  # AdamW decoupled weight decay, on weight matrices only
    warmup_epochs: float = 10.0  # linear warmup from ~0 to lr (a shorter run stops part-way up)
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    amp: str = "auto"  # "auto": bf16 on CUDA if supported, else fp16 + GradScaler, fp32 off CUDA; "bf16"/"fp16"/"off"
    compile: Optional[bool] = None  # torch.compile the model; None = on for CUDA, off elsewhere
    device: str = "auto"  # "auto" (cuda > mps > cpu), or e.g. "cuda:1", "cpu"
    # --- outputs ---
    checkpoint_dir: str = "checkpoint"  # <run>_latest.pth (every epoch), <run>_best.pth
    log_dir: str = "log"  # <run>.csv, <run>.log, <run>_config.json
    plot_dir: str = "plots"  # <run>_training.png

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f.name, getattr(self, f.name))
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if 32 % self.patch_size:
            raise ValueError(f"patch_size must divide the image side 32, got {self.patch_size}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")

    @property
    def name(self) -> str:
        return self.run_name or f"{self.norm}_cifar10"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**d)


_INT_MIN = {
    "epochs": 1,
    "seed": 0,
    "train_subset": 0,
    "test_subset": 0,
    "batch_size": 1,
    "eval_batch_size": 1,
    "crop_padding": 0,
    "randaug_ops": 0,
    "dim": 1,
    "depth": 1,
    "heads": 1,
    "patch_size": 1,
}
_FLOAT_RULES = {  # name: (accepts, description)
    "randaug_magnitude": (lambda v: 0 <= v <= 10, "in [0, 10]"),
    "randaug_magnitude_std": (lambda v: v >= 0, ">= 0"),
    "mixup_alpha": (lambda v: v >= 0, ">= 0"),
    "cutmix_alpha": (lambda v: v >= 0, ">= 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "alpha_init": (lambda v: v > 0, "> 0"),
    "mlp_ratio": (lambda v: v > 0, "> 0"),
    "drop_path": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lr": (lambda v: v > 0, "> 0"),
    "min_lr": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0 = off)"),
}
_CHOICES = {"norm": ("dyt", "ln"), "amp": ("auto", "bf16", "fp16", "off")}
_BOOLS = ("download", "hflip", "randaugment")
_PATHS = ("data_dir", "checkpoint_dir", "log_dir", "plot_dir")


def _check_field(name: str, value) -> None:
    if name in _INT_MIN:
        if isinstance(value, bool) or not isinstance(value, int) or value < _INT_MIN[name]:
            raise ValueError(f"{name} must be an integer >= {_INT_MIN[name]}, got {value!r}")
    elif name in _FLOAT_RULES:
        accepts, description = _FLOAT_RULES[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (number and accepts(value)):
            raise ValueError(f"{name} must be a finite number {description}, got {value!r}")
    elif name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r}")
    elif name in _BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    elif name in _PATHS:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty path string, got {value!r}")
    elif name == "run_name":
        if not isinstance(value, str) or any(c in value for c in "/\\:"):
            raise ValueError(f"run_name must be a string without path separators, got {value!r}")
    elif name == "compile":
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"compile must be True, False or None (auto), got {value!r}")
    elif name == "device":
        if not isinstance(value, str):
            raise ValueError(f"device must be a string such as 'auto', 'cuda' or 'cpu', got {value!r}")
        if value != "auto":
            try:
                torch.device(value)
            except RuntimeError as e:
                raise ValueError(f"device must be 'auto' or a torch device string, got {value!r}") from e
    else:  # a field without a rule is a bug in this file
        raise AssertionError(f"no validation rule for config field {name!r}")


# Fields that may differ between a checkpoint and the current config: where things live, how
# fast they run, and how long the run is (epochs: see ``lr_at``). Anything else is another run.
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "data_dir",
        "download",
        "checkpoint_dir",
        "log_dir",
        "plot_dir",
        "eval_batch_size",
        "amp",
        "compile",
        "device",
    }
)


class ConfigMismatchError(ValueError):
    """A checkpoint was written by a run with another model/data/recipe config."""


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read."""


def config_differences(saved: dict, current: Config) -> dict[str, tuple]:
    """Fields (other than ``RESUMABLE_CHANGES``) whose saved value differs: name -> (saved, current)."""
    now = current.to_dict()
    names = (set(saved) | set(now)) - RESUMABLE_CHANGES
    return {
        n: (saved.get(n, "<missing>"), now.get(n, "<missing>"))
        for n in sorted(names)
        if saved.get(n, "<missing>") != now.get(n, "<missing>")
    }


def check_same_run(state: dict, cfg: Config, path: str | Path) -> None:
    """Raise ``ConfigMismatchError`` naming each field in which checkpoint ``state`` differs from ``cfg``."""
    diff = config_differences(state["config"], cfg)
    if diff:
        lines = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ConfigMismatchError(
            f"{path} belongs to a run with another config ({lines}). Set those values back to use it, "
            f"or give this run another run_name (or checkpoint_dir) to start a new one."
        )


# ---------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# ---------------------------------------------------------------------------------------------


def build_model(cfg: Config) -> ViT:
    return ViT(
        img_size=32,
        patch_size=cfg.patch_size,
        num_classes=len(CLASSES),
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        norm=cfg.norm,
        alpha_init=cfg.alpha_init,
        drop_path=cfg.drop_path,
        dropout=cfg.dropout,
    )


def build_augment(cfg: Config, compile: bool = False) -> TrainAugment:
    randaug = (
        RandAugment(cfg.randaug_ops, cfg.randaug_magnitude, cfg.randaug_magnitude_std)
        if cfg.randaugment and cfg.randaug_ops > 0
        else None
    )
    return TrainAugment(cfg.crop_padding, cfg.hflip, randaug, compile=compile)


def load_data(cfg: Config) -> CIFAR10:
    """CIFAR-10 on the config's device, downloading it into ``data_dir`` if allowed and needed."""
    device = utils.resolve_device(cfg.device)
    return load_cifar10(
        cfg.data_dir, device, download=cfg.download, train_subset=cfg.train_subset, test_subset=cfg.test_subset
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices (ndim >= 2) only; not on biases, norms/DyT parameters,
    the positional embedding or the cls token."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), **kwargs)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup to ``peak`` over ``warmup_steps``, then cosine to ``floor`` at ``total_steps``.

    A pure function of the global step: resuming needs only the step. Raising ``epochs`` raises
    ``total_steps``, which stretches the cosine over the new length: a run extended before it
    finished continues as if planned that long; one extended after it finished resumes at the
    learning rate the longer schedule has at that step (a warm restart)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with probability targets (mixup + label smoothing), computed in float32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def amp_dtype(cfg: Config, device: torch.device) -> Optional[torch.dtype]:
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically write ``state`` (a temp file in the same folder, then ``os.replace``)."""
    utils.atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, best_path: Optional[str | Path] = None) -> dict:
    """Load a checkpoint with ``weights_only=True``; a corrupt or truncated file raises
    ``CheckpointError`` that says what to do (and never touches ``best_path``)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load raises RuntimeError, EOFError, UnpicklingError, zipfile errors ...
        keep = f" The best checkpoint {best_path} is untouched." if best_path and Path(best_path).exists() else ""
        raise CheckpointError(
            f"{path} cannot be read: corrupt, truncated or not a plain checkpoint ({type(e).__name__}: {e})."
            f"{keep} Move it away to start this run "
            f"afresh, or put a good checkpoint in its place to resume from it."
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "config" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (format {CHECKPOINT_FORMAT}).")
    return state


# ---------------------------------------------------------------------------------------------
# Logs and plots
# ---------------------------------------------------------------------------------------------

BASE_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds", "images_per_second")


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_csv(path: str | Path, row: dict) -> None:
    """Append one row, writing the header first when the file is new or empty."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_csv(path: str | Path, last_epoch: int) -> int:
    """Drop rows with epoch > ``last_epoch`` (atomically); returns how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    keep = [r for r in rows if int(r["epoch"]) <= last_epoch]
    if len(keep) == len(rows):
        return 0

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(keep)

    utils.atomic_write(path, write)
    return len(rows) - len(keep)


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure  # no pyplot: works headless, no global state

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def plot_run(csv_path: str | Path, out_path: str | Path, title: str = ""):
    """Loss, accuracy, learning rate and DyT alpha per layer, from the CSV alone. Returns the figure."""
    import pandas as pd
    from matplotlib import colormaps

    df = pd.read_csv(csv_path)
    fig, ax = _figure(2, 2, (11, 7.5))
    a = ax[0, 0]
    a.plot(df.epoch, df.train_loss, label="train (mixup, smoothed)")
    a.plot(df.epoch, df.test_loss, label="test")
    a.set(title="loss", xlabel="epoch")
    a.legend()
    a = ax[0, 1]
    a.plot(df.epoch, 100 * df.train_acc, label="train (vs dominant mixup label)")
    a.plot(df.epoch, 100 * df.test_acc, label=f"test (best {100 * df.test_acc.max():.2f}%)")
    a.set(title="accuracy (%)", xlabel="epoch")
    a.legend()
    a.grid(alpha=0.3)
    a = ax[1, 0]
    a.plot(df.epoch, df.lr)
    a.set(title="learning rate (end of epoch)", xlabel="epoch")
    a = ax[1, 1]
    alpha_cols = [c for c in df.columns if c.startswith("alpha_")]
    colors = colormaps["viridis"]
    for i, c in enumerate(alpha_cols):  # first layer dark, last (the final norm) light
        a.plot(df.epoch, df[c], label=c[len("alpha_") :], color=colors(i / max(len(alpha_cols) - 1, 1)))
    if alpha_cols:
        a.legend(fontsize=7, ncol=2)
        a.set(title="DyT alpha per layer", xlabel="epoch")
    else:
        a.set(title="no DyT layers (LayerNorm run)")
    fig.suptitle(title or Path(csv_path).stem)
    _save(fig, out_path)
    return fig


def plot_comparison(csv_paths: dict[str, str | Path], out_path: str | Path, title: str = "DyT vs LayerNorm"):
    """Overlay several runs (label -> CSV): test accuracy, test loss and train loss per epoch."""
    import pandas as pd

    fig, ax = _figure(1, 3, (15, 4.5))
    for label, path in csv_paths.items():
        df = pd.read_csv(path)
        best = 100 * df.test_acc.max()
        ax[0, 0].plot(df.epoch, 100 * df.test_acc, label=f"{label} (best {best:.2f}%)")
        ax[0, 1].plot(df.epoch, df.test_loss, label=label)
        ax[0, 2].plot(df.epoch, df.train_loss, label=label)
    for a, t in zip(ax[0], ("test accuracy (%)", "test loss", "train loss")):
        a.set(title=t, xlabel="epoch")
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, out_path)
    return fig


def plot_images(images: torch.Tensor, labels: torch.Tensor, out_path: Optional[str | Path] = None, cols: int = 8):
    """A grid of images (B, 3, H, W), uint8 or normalised float, titled with class names."""
    from data import CIFAR10_MEAN, CIFAR10_STD

    x = images.detach().float().cpu()
    if images.dtype != torch.uint8:
        x = (x * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) * 255
    x = x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rows = -(-len(x) // cols)
    fig, ax = _figure(rows, cols, (1.4 * cols, 1.55 * rows))
    for i, a in enumerate(ax.flat):
        a.axis("off")
        if i < len(x):
            a.imshow(x[i])
            a.set_title(CLASSES[int(labels[i])], fontsize=8)
    if out_path is not None:
        _save(fig, out_path)
    return fig


def plot_confusion(matrix: torch.Tensor, out_path: Optional[str | Path] = None, title: str = ""):
    """Row-normalised confusion matrix (true class per row) with per-class accuracy on the diagonal."""
    m = matrix.double()
    norm = (m / m.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig, ax = _figure(1, 1, (7, 6))
    a = ax[0, 0]
    im = a.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    a.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    a.set_yticks(range(len(CLASSES)), CLASSES)
    a.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix (row-normalised)")
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            a.text(
                j,
                i,
                f"{norm[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=a)
    if out_path is not None:
        _save(fig, out_path)
    return fig


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Owns the model, optimizer, loaders and run state of one config on one dataset.

    Args:
        cfg: the run's config.
        data: CIFAR-10 on the training device (``data.load_cifar10``).
        quiet: no progress bars or printed lines (logs are still written).
    """

    def __init__(self, cfg: Config, data: CIFAR10, quiet: bool = False):
        self.cfg = cfg
        self.device = data.x_train.device
        self.quiet = quiet
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        use_compile = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # the few float32 matmuls (loss, head under fp16)
            torch.backends.cudnn.allow_tf32 = True
        self.net = torch.compile(self.model, dynamic=False) if use_compile else self.model  # 2 shapes: train, eval
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.amp_dtype = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.augment = build_augment(cfg, compile=use_compile)
        self.train_loader = DeviceLoader(
            data.x_train, data.y_train, cfg.batch_size, shuffle=True, augment=self.augment, seed=cfg.seed
        )
        self.test_loader = DeviceLoader(data.x_test, data.y_test, cfg.eval_batch_size, shuffle=False)
        self.mixup = Mixup(
            cfg.mixup_alpha,
            cfg.cutmix_alpha,
            label_smoothing=cfg.label_smoothing,
            num_classes=len(CLASSES),
            seed=cfg.seed,
        )
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self.best_acc = 0.0
        self.best_epoch = 0
        self.paths = {
            "latest": Path(cfg.checkpoint_dir) / f"{cfg.name}_latest.pth",
            "best": Path(cfg.checkpoint_dir) / f"{cfg.name}_best.pth",
            "csv": Path(cfg.log_dir) / f"{cfg.name}.csv",
            "log": Path(cfg.log_dir) / f"{cfg.name}.log",
            "config": Path(cfg.log_dir) / f"{cfg.name}_config.json",
            "plot": Path(cfg.plot_dir) / f"{cfg.name}_training.png",
        }
        for p in self.paths.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        self._session_started = False

    # --- state -------------------------------------------------------------------------------

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "rng": {
                "device_type": self.device.type,
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "loader": self.train_loader.state_dict(),
                "mixup": self.mixup.state_dict(),
            },
            "torch_version": str(torch.__version__),
        }

    def load_state_dict(self, state: dict) -> str:
        """Restore a ``state_dict()``; returns a note when the random streams could not be restored
        exactly (a checkpoint from another device type: a GPU generator's state means nothing to a
        CPU one, so the loader is re-seeded from the seed and epoch instead)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_acc, self.best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.mixup.load_state_dict(rng["mixup"])
        if rng["device_type"] != self.device.type:
            self.train_loader.generator.manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
            return (
                f"checkpoint written on {rng['device_type']}, resumed on {self.device.type}: "
                f"the loader's random stream is re-seeded, so batches differ from an uninterrupted run"
            )
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.train_loader.load_state_dict(rng["loader"])
        return ""

    def resume(self) -> Optional[int]:
        """Continue from ``<run>_latest.pth`` if it exists: returns its epoch, or None for a fresh start.

        Refuses (``ConfigMismatchError``) a checkpoint of another config, naming the fields; a
        corrupt file raises ``CheckpointError``. Rows of the CSV past the checkpoint's epoch (an
        epoch trained but not checkpointed before a crash) are dropped so none is duplicated."""
        if self._session_started:  # already resumed or trained in this session: state is current
            return self.epoch or None
        path = self.paths["latest"]
        if not path.exists():
            stale = self._set_aside_stale_csv()
            self._log_session(f"fresh start (no {path})" + (f"; earlier CSV moved to {stale}" if stale else ""))
            return None
        state = load_checkpoint(path, self.paths["best"])
        check_same_run(state, self.cfg, path)
        if int(state["step"]) != int(state["epoch"]) * self.steps_per_epoch:
            raise ConfigMismatchError(
                f"{path} has {state['step']} steps for {state['epoch']} epochs, but this data "
                f"gives {self.steps_per_epoch} steps per epoch (different dataset size?)"
            )
        note = self.load_state_dict(state)
        dropped = truncate_csv(self.paths["csv"], self.epoch)
        self._log_session(
            f"resumed from {path} at epoch {self.epoch}/{self.cfg.epochs} (best test acc "
            f"{100 * self.best_acc:.2f}% at epoch {self.best_epoch})"
            + (f"; dropped {dropped} CSV rows past it" if dropped else "")
            + (f"; {note}" if note else "")
        )
        if note and not self.quiet:
            print(f"note: {note}")
        return self.epoch

    def _set_aside_stale_csv(self) -> Optional[Path]:
        """A CSV with rows but no checkpoint belongs to a run that cannot be continued: keep it
        under another name (nothing is deleted) so the new run's CSV starts empty."""
        csv_path = self.paths["csv"]
        if not csv_path.exists() or not read_csv(csv_path):
            return None
        stale = csv_path.with_name(f"{csv_path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.orphaned.csv")
        csv_path.replace(stale)
        return stale

    def remaining_epochs(self) -> Iterator[int]:
        """1-based numbers of the epochs still to train (resuming first if ``resume`` was not called,
        so a trainer built anew can never overwrite a run's checkpoint from epoch 0)."""
        if not self._session_started:
            self.resume()
        return iter(range(self.epoch + 1, self.cfg.epochs + 1))

    @property
    def finished(self) -> bool:
        return self.epoch >= self.cfg.epochs

    # --- one epoch -----------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_step(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a prepared batch (soft targets); returns logits and loss, unsynced."""
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.cfg.lr, self.cfg.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with self._autocast():
            logits = self.net(x)
        loss = soft_cross_entropy(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, self.cfg.grad_clip, foreach=self.device.type == "cuda")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return logits, loss

    def train_epoch(self) -> dict:
        """One pass over the training set; metrics are accumulated on the device (no per-step sync)."""
        self.net.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        bar = (
            None
            if self.quiet
            else utils.progress_bar(self.steps_per_epoch, f"epoch {self.epoch + 1}", leave=False, unit="step")
        )
        start = time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader):
            x, targets = self.mixup(x, y)
            logits, loss = self.train_step(x, targets)
            seen += len(y)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(-1) == targets.argmax(-1)).sum()
            if bar is not None:
                bar.update(1)
                if (i + 1) % 50 == 0 or i + 1 == self.steps_per_epoch:  # the only host syncs
                    rate = seen / (time.perf_counter() - start)
                    bar.set_postfix(
                        loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}", img_s=f"{rate:,.0f}"
                    )
        train_loss, train_acc = (loss_sum / seen).item(), (correct / seen).item()
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        return {
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_acc": train_acc,
            "epoch_seconds": seconds,
            "images_per_second": seen / seconds,
        }

    @torch.no_grad()
    def predict(self, model: Optional[nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (float32) and labels of the whole test set, and the summed cross-entropy, of
        ``model`` (default: the model being trained).

        Every forward pass has ``eval_batch_size`` rows (the last batch is zero-padded), so a
        compiled model sees one shape."""
        net = self.net if model is None else model
        net.eval()
        outs, labels = [], []
        bs = self.cfg.eval_batch_size
        for x, y in self.test_loader:
            n = len(x)
            if n < bs:
                x = torch.cat([x, x.new_zeros((bs - n,) + x.shape[1:])])
            with self._autocast():
                outs.append(net(x)[:n].float())
            labels.append(y)
        logits, labels = torch.cat(outs), torch.cat(labels)
        return logits, labels, F.cross_entropy(logits, labels, reduction="sum")

    def evaluate(self) -> dict:
        logits, labels, loss_sum = self.predict()
        n = len(labels)
        return {"test_loss": loss_sum.item() / n, "test_acc": (logits.argmax(-1) == labels).sum().item() / n}

    def confusion_matrix(self, model: Optional[nn.Module] = None) -> torch.Tensor:
        """(10, 10) counts, true class per row, of ``model`` (default: the trained one) on the test set."""
        logits, labels, _ = self.predict(model)
        k = len(CLASSES)
        idx = labels * k + logits.argmax(-1)
        return torch.bincount(idx, minlength=k * k).reshape(k, k).cpu()

    def run_epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (must be the next one), evaluate, log, checkpoint; returns the CSV row."""
        if epoch != self.epoch + 1:
            raise ValueError(f"epoch {epoch} is not the next one (completed: {self.epoch})")
        if not self._session_started:
            raise RuntimeError("call resume() (or iterate remaining_epochs()) before run_epoch()")
        stats = self.train_epoch()
        stats.update(self.evaluate())
        self.epoch = epoch
        row = {"epoch": epoch}
        row.update({k: stats[k] for k in BASE_COLUMNS if k != "epoch"})
        row.update({f"alpha_{name}": v for name, v in alphas(self.model).items()})
        improved = stats["test_acc"] > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = stats["test_acc"], epoch
        append_csv(self.paths["csv"], row)
        line = (
            f"epoch {epoch:4d}/{self.cfg.epochs} lr {stats['lr']:.2e} train loss {stats['train_loss']:.4f} "
            f"acc {100 * stats['train_acc']:.2f}% | test loss {stats['test_loss']:.4f} acc "
            f"{100 * stats['test_acc']:.2f}% (best {100 * self.best_acc:.2f}% @ {self.best_epoch}) | "
            f"{stats['epoch_seconds']:.1f}s {stats['images_per_second']:,.0f} img/s"
        )
        self._write_log(line)
        if not self.quiet:
            utils.tqdm.write(line)
        if improved:
            save_checkpoint(
                self.paths["best"],
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": self.cfg.to_dict(),
                    "model": self.model.state_dict(),
                    "epoch": epoch,
                    "test_acc": self.best_acc,
                },
            )
        save_checkpoint(self.paths["latest"], self.state_dict())
        return row

    def fit(self) -> None:
        """Train all remaining epochs (the notebook spells this loop out)."""
        for epoch in self.remaining_epochs():
            self.run_epoch(epoch)

    def best_model(self) -> tuple[ViT, dict]:
        """A separate copy of the model with the best checkpoint's weights (the model being trained
        is left alone, so training can continue), and that checkpoint's epoch and accuracy."""
        state = load_checkpoint(self.paths["best"])
        check_same_run(state, self.cfg, self.paths["best"])
        model = build_model(self.cfg).to(self.device)
        model.load_state_dict(state["model"])
        return model.eval(), {"epoch": state["epoch"], "test_acc": state["test_acc"]}

    def plot(self):
        return plot_run(
            self.paths["csv"],
            self.paths["plot"],
            title=f"{self.cfg.name}: {self.cfg.norm.upper()} ViT "
            f"(dim {self.cfg.dim}, depth {self.cfg.depth}) on CIFAR-10",
        )

    # --- text log ------------------------------------------------------------------------------

    def _write_log(self, line: str) -> None:
        with open(self.paths["log"], "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def _log_session(self, how: str) -> None:
        if self._session_started:
            return
        self._session_started = True
        utils.atomic_write(
            self.paths["config"], lambda tmp: Path(tmp).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        )
        env = utils.environment_report(self.device)
        self._write_log(f"=== session: {how}")
        self._write_log("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
        self._write_log(
            f"model: {self.cfg.norm} ViT, {self.num_parameters:,} parameters, compiled="
            f"{self.net is not self.model}, amp={self.amp_dtype}, steps/epoch={self.steps_per_epoch}"
        )
        self._write_log("config: " + json.dumps(self.cfg.to_dict()))
