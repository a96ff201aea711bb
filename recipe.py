"""What a run is built from its config: the model, the data, the augmentation, the optimizer, the
learning-rate schedule, the EMA of the weights and the autocast dtype. The ``Trainer`` (training.py)
puts them together."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import utils
from config import Config, norm_layer
from data import CLASSES, CifarTensors, TrainAugment, load_cifar10
from models import ViT
from randomaug import RandAugment

MAX_WARMUP_FRACTION = 0.1  # warmup never takes more than this share of the run (short runs still learn)
EMA_WARMUP = 10  # EMA decay ramps as (1 + n) / (EMA_WARMUP + n) over the first updates


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
        pool=cfg.pool,
        attn_init=cfg.attn_init,
        patch_embed_init=cfg.patch_embed_init,
    )


def build_augment(cfg: Config, compile: bool = False) -> TrainAugment:
    randaug = (
        RandAugment(cfg.randaug_ops, cfg.randaug_magnitude, cfg.randaug_magnitude_std, prob=cfg.randaug_prob)
        if cfg.randaugment and cfg.randaug_ops > 0
        else None
    )
    return TrainAugment(cfg.crop_padding, cfg.hflip, randaug, compile=compile)


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


def warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    """``warmup_epochs`` in steps, capped at ``MAX_WARMUP_FRACTION`` of the run (a 3-epoch trial
    would otherwise never leave a 10-epoch warmup)."""
    total = cfg.epochs * steps_per_epoch
    return round(min(cfg.warmup_epochs * steps_per_epoch, MAX_WARMUP_FRACTION * total))  # no round(inf)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup to ``peak`` over ``warmup_steps``, then cosine to ``floor`` at ``total_steps``.

    A pure function of the global step: resuming needs only the step. Changing ``epochs`` changes
    ``total_steps``, which re-draws the cosine over the new length: raised before the run ends, it
    continues as if planned that long; raised after, the learning rate goes back up to the longer
    schedule's value at that step (a warm restart); lowered, the rest of the cosine is compressed."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(cfg: Config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype. ``"auto"``: bf16 on CUDA where supported, else fp16 (with a GradScaler);
    float32 elsewhere, since autocast on a CPU is slower than float32 unless it has native bf16."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
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
