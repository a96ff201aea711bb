"""recipe.py: the one call that builds a run from its config and data, and the norm-name mapping."""

import functools

import pytest
import torch
from torch import nn

from conftest import tiny
from models import DynamicTanh
from recipe import RunParts, Schedule, build_run, lr_at, norm_layer


def test_norm_layer_is_the_one_mapping_from_names_to_layers(tmp_path):
    dyt = norm_layer(tiny(tmp_path, norm="dyt", alpha_init=0.3))
    assert isinstance(dyt, functools.partial) and dyt.func is DynamicTanh
    layer = dyt(8)
    assert isinstance(layer, DynamicTanh) and layer.alpha.item() == pytest.approx(0.3)
    assert norm_layer(tiny(tmp_path, norm="ln")) is nn.LayerNorm


def test_build_run_makes_every_part_from_the_config(cifar, tmp_path):
    cfg = tiny(tmp_path, ema_decay=0.9, amp="fp16", lr=2e-3, min_lr=1e-4, epochs=4, batch_size=25)
    parts = build_run(cfg, cifar)
    assert isinstance(parts, RunParts)
    assert parts.ema is not None and parts.ema.decay == 0.9 and parts.ema.module is not parts.model
    assert all(g["lr"] is parts.lr for g in parts.optimizer.param_groups)  # one on-device lr, every group
    assert parts.lr.dtype == torch.float64 and parts.lr.item() == 2e-3  # float64 on a CPU: exact steps
    assert parts.amp_dtype == torch.float16 and parts.scaler.is_enabled()  # fp16 needs the scaler
    assert parts.train_loader.batch_size == 25 and parts.train_loader.augment is parts.augment
    assert parts.mixup.mixup_alpha == cfg.mixup_alpha and parts.mixup.label_smoothing == cfg.label_smoothing
    steps = len(cifar.x_train) // 25
    assert parts.schedule == Schedule(2e-3, 1e-4, steps, 4 * steps, parts.schedule.warmup_steps)
    assert [parts.schedule.at(s) for s in range(4 * steps)] == [
        lr_at(s, 4 * steps, parts.schedule.warmup_steps, 2e-3, 1e-4) for s in range(4 * steps)
    ]
    assert build_run(tiny(tmp_path, ema_decay=0.0), cifar).ema is None


def test_build_run_is_seeded_and_mimetic_scaling_happens_there(cifar, tmp_path):
    cfg = tiny(tmp_path, attn_init="mimetic", norm="dyt", seed=3)
    a, b = build_run(cfg, cifar), build_run(cfg, cifar)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same config and data: bitwise the same parts
    unscaled = build_run(tiny(tmp_path, attn_init="mimetic", norm="ln", seed=3), cifar).model
    q = a.model.blocks[0].attn.qkv.weight  # scaled to DyT's measured input size: not LayerNorm's init
    assert not torch.equal(q, unscaled.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize(
    "card, capability, expected",
    [
        ("T4", (7, 5), torch.float16),  # torch calls bf16 supported there (emulated): fp16 + GradScaler
        ("V100", (7, 0), torch.float16),
        ("A100", (8, 0), torch.bfloat16),
        ("L4", (8, 9), torch.bfloat16),
        ("H100", (9, 0), torch.bfloat16),
    ],
)
def test_amp_auto_picks_bf16_only_on_cards_that_have_it_natively(monkeypatch, tmp_path, card, capability, expected):
    from recipe import amp_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what torch says on all five
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert amp_dtype(tiny(tmp_path, amp="auto"), cuda) == expected, card
    assert amp_dtype(tiny(tmp_path, amp="bf16"), cuda) == torch.bfloat16  # asked for explicitly: as asked
    assert amp_dtype(tiny(tmp_path, amp="auto"), torch.device("cpu")) is None
