"""What a run is built from: ``build_run(cfg, data)`` makes, from the config and the data, everything one
run trains with (the model with its norm and init, the EMA of its weights, the optimizer and its
on-device learning rate, the schedule, the gradient scaler and autocast dtype, the augmentation, the
training loader and Mixup) and returns it as one ``RunParts``, which the ``Trainer`` (training.py) holds.
``norm_layer`` is the one place a norm name becomes a layer."""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

import utils
from config import Config
from data import CLASSES, CifarTensors, DeviceLoader, Mixup, TrainAugment, load_cifar10, normalize
from models import DynamicTanh, ViT, scale_mimetic_to_inputs_
from randomaug import OP_SETS, RandAugment

MAX_WARMUP_FRACTION = 0.1  # warmup (and cooldown) never takes more than this share of the run (short runs learn)
EMA_WARMUP = 10  # EMA decay ramps as (1 + n) / (EMA_WARMUP + n) over the first updates
MIMETIC_IMAGES = 256  # training images (unaugmented) that size mimetic init under DyT


def norm_layer(cfg: Config) -> Callable[[int], nn.Module]:
    """The norm the config names, as the layer factory ``ViT(norm_layer=...)`` takes."""
    if cfg.norm == "dyt":
        return functools.partial(DynamicTanh, alpha_init=cfg.alpha_init)
    return nn.LayerNorm


def training_macs(cfg: Config, images: int = 50_000) -> float:
    """Multiply-accumulates of the matrix products of a run's forward passes over ``images`` training
    images a epoch (projections, MLP, attention): a size to compare runs by on one machine, not a time."""
    tokens = (32 // cfg.patch_size) ** 2 + (cfg.pool == "cls")
    block = 4 * tokens * cfg.dim**2 + 2 * tokens * cfg.dim * cfg.mlp_hidden + 2 * tokens**2 * cfg.dim
    return float(cfg.depth * block * images * cfg.epochs)


def build_model(cfg: Config) -> ViT:
    return ViT(
        img_size=32,
        patch_size=cfg.patch_size,
        num_classes=len(CLASSES),
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        norm_layer=norm_layer(cfg),
        drop_path=cfg.drop_path,
        dropout=cfg.dropout,
        attn_dropout=cfg.attn_dropout,
        pool=cfg.pool,
        attn_init=cfg.attn_init,
        patch_embed_init=cfg.patch_embed_init,
        qkv_bias=cfg.qkv_bias,
        block_style=cfg.block_style,
        embed_init=cfg.embed_init,
    )


def build_augment(cfg: Config, compile: bool = False, repair: Optional[Callable] = None) -> TrainAugment:
    randaug = (
        RandAugment(
            cfg.randaug_ops,
            cfg.randaug_magnitude,
            cfg.randaug_magnitude_std,
            prob=cfg.randaug_prob,
            ops=OP_SETS[cfg.randaug_op_set],
            interpolation="bilinear" if cfg.randaug_op_set == "timm-inc1" else "nearest",  # timm: PIL, smooth
        )
        if cfg.randaugment and cfg.randaug_ops > 0
        else None
    )
    return TrainAugment(
        cfg.crop_padding,
        cfg.hflip,
        randaug,
        compile=compile,
        repair=repair,
        resized_crop_scale=cfg.resized_crop_scale,
        interpolation=cfg.resized_crop_interpolation,
        erase_prob=cfg.random_erasing,
    )


def load_data(cfg: Config) -> CifarTensors:
    """CIFAR-10 on the config's device, downloading it into ``data_dir`` if allowed and needed."""
    device = utils.resolve_device(cfg.device)
    return load_cifar10(
        cfg.data_dir,
        device,
        download=cfg.download,
        train_subset=cfg.train_subset,
        test_subset=cfg.test_subset,
        verify=cfg.verify_data,
    )


def param_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool = False, alpha_lr_scale: float = 1.0
) -> list[dict]:
    """Weight decay on weight matrices (ndim >= 2) only; not on biases, norms/DyT parameters, nor (unless
    ``decay_embeddings``, as timm's optimizer filter does for a model that names none) the positional
    embedding or the cls token. With ``alpha_lr_scale`` below 1, DyT's alphas form a third group (no
    decay) whose ``lr_scale`` the learning rate is multiplied by."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") and not decay_embeddings else set()
    scaled = {id(m.alpha) for m in model.modules() if isinstance(m, DynamicTanh)} if alpha_lr_scale != 1 else set()
    decay, no_decay, alphas = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (alphas if id(p) in scaled else decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups + ([{"params": alphas, "weight_decay": 0.0, "lr_scale": alpha_lr_scale}] if alphas else [])


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    kwargs = {"fused": True} if device.type == "cuda" else {}
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings, cfg.alpha_lr_scale)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), **kwargs)


def warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    """``warmup_epochs`` in steps, capped at ``MAX_WARMUP_FRACTION`` of the run (a 3-epoch trial
    would otherwise never leave a 10-epoch warmup)."""
    total = cfg.epochs * steps_per_epoch
    return round(min(cfg.warmup_epochs * steps_per_epoch, MAX_WARMUP_FRACTION * total))  # no round(inf)


def lr_at(
    step: int, total_steps: int, warmup_steps: int, peak: float, floor: float, start: float = 0.0, cooldown: int = 0
) -> float:
    """Linear warmup from ``start`` to ``peak`` over ``warmup_steps``, then cosine to ``floor`` at
    ``total_steps - cooldown``, then ``floor`` for the last ``cooldown`` steps (timm's cooldown epochs).

    A pure function of the global step: resuming needs only the step. Changing ``epochs`` changes
    ``total_steps``, which re-draws the cosine over the new length: raised before the run ends, it
    continues as if planned that long; raised after, the learning rate goes back up to the longer
    schedule's value at that step (a warm restart); lowered, the rest of the cosine is compressed.
    With ``start`` 0 the first step's rate is ``peak / warmup_steps``."""
    if step < warmup_steps:
        return start + (peak - start) * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - cooldown - warmup_steps, 1), 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere and later; torch reports bf16 "supported" on a T4 (7.5) by emulating it


def native_bf16(device: torch.device) -> bool:
    """Whether this CUDA device computes bf16 in hardware. ``torch.cuda.is_bf16_supported()`` is True on
    a T4 too, where bf16 is emulated and autocast runs several times slower than fp16."""
    return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def amp_dtype(cfg: Config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype. ``"auto"``: bf16 on CUDA cards that have it natively (compute capability 8.0
    and later: A100, L4, H100...), fp16 with a GradScaler on older ones (T4, V100); float32 elsewhere,
    since autocast on a CPU is slower than float32 unless it has native bf16."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not native_bf16(device)):
        return torch.float16
    return torch.bfloat16


class EMA:
    """An exponential moving average of a model's weights, updated on the device after every step.

    The decay ramps up as ``min(decay, (1 + n) / (EMA_WARMUP + n))`` after ``n`` updates, so the
    average is not dominated by the random initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = list(self.module.parameters())
        self._live = list(model.parameters())

    @torch.no_grad()
    def update(self, updates: int) -> None:
        decay = min(self.decay, (1 + updates) / (EMA_WARMUP + updates))
        torch._foreach_lerp_(self._ema, self._live, 1.0 - decay)


@dataclass(frozen=True)
class Schedule:
    """The learning rate as a pure function of the global step (``lr_at``): ``warmup_steps`` of linear
    warmup to ``peak``, then a cosine to ``floor`` at ``total_steps``."""

    peak: float
    floor: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    start: float = 0.0  # where the warmup starts (warmup_lr)
    cooldown_steps: int = 0  # at the floor after the cosine (cooldown_epochs)

    @classmethod
    def of(cls, cfg: Config, steps_per_epoch: int) -> Schedule:
        total = cfg.epochs * steps_per_epoch
        cooldown = round(min(cfg.cooldown_epochs * steps_per_epoch, MAX_WARMUP_FRACTION * total))  # as warmup
        return cls(
            cfg.lr, cfg.min_lr, steps_per_epoch, total, warmup_steps(cfg, steps_per_epoch), cfg.warmup_lr, cooldown
        )

    def at(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak, self.floor, self.start, self.cooldown_steps)


@dataclass
class RunParts:
    """Everything one run trains with, as ``build_run`` makes it from the config and the data."""

    model: ViT
    ema: Optional[EMA]  # None when ema_decay is 0
    optimizer: torch.optim.AdamW
    lr: torch.Tensor  # the learning rate on the device, every param group's; filled from ``schedule`` each step
    schedule: Schedule
    scaler: torch.amp.GradScaler  # enabled for fp16 autocast only
    amp_dtype: Optional[torch.dtype]  # autocast dtype; None: float32
    augment: TrainAugment
    train_loader: DeviceLoader
    mixup: Mixup

    def state_dict(self, device_type: str) -> dict:
        """The parts' share of a checkpoint: weights, optimizer, scaler and random streams (``device_type``:
        where the streams were drawn, so a resume on another device type knows they do not apply)."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "device_type": device_type,
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "loader": self.train_loader.state_dict(),
                "mixup": self.mixup.state_dict(),
            },
        }

    def set_lr(self, value: float) -> None:
        """The learning rate of the coming step: every group's, a scaled group's times its scale."""
        self.lr.fill_(value)
        for g in self.optimizer.param_groups:
            if "lr_scale" in g:
                g["lr"].fill_(value * g["lr_scale"])

    def load_state_dict(self, state: dict, reseed: int) -> str:
        """Restore a ``state_dict()``; returns a note when the random streams could not be restored
        exactly (a checkpoint from another device type: a GPU generator's state means nothing to a
        CPU one, so the loader is re-seeded with ``reseed`` instead)."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        live = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for g, tensor in zip(self.optimizer.param_groups, live):  # the saved lr is a copy: the live ones again
            g["lr"] = tensor
        if self.scaler.is_enabled() and state["scaler"]:  # an amp change (bf16 <-> fp16) starts a fresh scaler
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.mixup.load_state_dict(rng["mixup"])
        device_type = self.lr.device.type
        if rng.get("device_type") != device_type:  # None: written by the first version, which did not say
            self.train_loader.generator.manual_seed(reseed)
            written = (
                f"written on {rng['device_type']}" if rng.get("device_type") else "of an earlier version (no device)"
            )
            return (
                f"checkpoint {written}, resumed on {device_type}: the loader's random stream is re-seeded, "
                f"so batches differ from an uninterrupted run"
            )
        if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.train_loader.load_state_dict(rng["loader"])
        return ""


def build_run(cfg: Config, data: CifarTensors, compile: bool = False, repair: Optional[Callable] = None) -> RunParts:
    """A run's parts as a fresh run starts them, seeded from ``cfg.seed`` (the same config and data give
    bitwise the same parts). ``compile``: the augmentation is compiled too (with the training step);
    ``repair``: what a failed compile of it calls first (``step.CompileCache.repair``)."""
    device = data.x_train.device
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    if cfg.attn_init == "mimetic" and cfg.norm == "dyt":  # deterministic: draws no random numbers
        scale_mimetic_to_inputs_(model, normalize(data.x_train[:MIMETIC_IMAGES]))
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = build_optimizer(model, cfg, device)
    # The learning rate lives on the device; each step fills it from the schedule with a kernel (no copy,
    # no sync), so a compiled or captured optimizer step reads it instead of baking in a constant.
    # float64 on the CPU gives bit-identical steps to a Python-float lr (tests/test_step.py).
    lr = torch.full((), cfg.lr, dtype=torch.float64 if device.type == "cpu" else torch.float32).to(device)
    for g in optimizer.param_groups:  # a scaled group (alpha_lr_scale) has its own, filled with lr x scale
        g["lr"] = lr if "lr_scale" not in g else lr * g["lr_scale"]
    dtype = amp_dtype(cfg, device)
    augment = build_augment(cfg, compile=compile, repair=repair)
    loader = DeviceLoader(data.x_train, data.y_train, cfg.batch_size, train=True, augment=augment, seed=cfg.seed)
    mixup = Mixup(
        cfg.mixup_alpha,
        cfg.cutmix_alpha,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
        num_classes=len(CLASSES),
        seed=cfg.seed,
    )
    return RunParts(
        model=model,
        ema=ema,
        optimizer=optimizer,
        lr=lr,
        schedule=Schedule.of(cfg, len(data.x_train) // cfg.batch_size),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        amp_dtype=dtype,
        augment=augment,
        train_loader=loader,
        mixup=mixup,
    )
