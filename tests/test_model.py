"""The DyT ViT: DyT's formula, attention against a reference, norm injection, init, validation."""

import functools
import math

import pytest
import torch
from torch import nn

from models import Attention, DropPath, DynamicTanh, ViT, alphas, count_parameters

TINY = dict(dim=32, depth=2, heads=4)


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 16), (2, 4, 7, 12)])
def test_dyt_matches_formula(shape):
    torch.manual_seed(0)
    dyt = DynamicTanh(shape[-1], alpha_init=0.7)
    with torch.no_grad():
        dyt.weight.normal_()
        dyt.bias.normal_()
    x = torch.randn(shape) * 3
    expected = dyt.weight * torch.tanh(0.7 * x) + dyt.bias
    torch.testing.assert_close(dyt(x), expected, rtol=0, atol=0)
    assert dyt.alpha.shape == (1,) and dyt.weight.shape == (shape[-1],)


def test_dyt_initial_state_and_repr():
    dyt = DynamicTanh(6)
    assert dyt.alpha.item() == 0.5
    assert torch.equal(dyt.weight, torch.ones(6)) and torch.equal(dyt.bias, torch.zeros(6))
    assert repr(dyt) == "DynamicTanh(6, alpha_init=0.5)"


def test_dyt_gradients_reach_all_parameters():
    dyt = DynamicTanh(4)
    x = torch.randn(3, 4)
    dyt(x).pow(2).sum().backward()
    for p in (dyt.alpha, dyt.weight, dyt.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # d/d alpha of sum(w * tanh(a x) + b)^2 at w=1, b=0: sum 2 tanh(a x) (1 - tanh^2(a x)) x
    t = torch.tanh(0.5 * x)
    torch.testing.assert_close(dyt.alpha.grad, (2 * t * (1 - t**2) * x).sum().reshape(1))


@pytest.mark.parametrize("bad", [0, -1.0])
def test_dyt_asserts_a_positive_alpha(bad):
    # Users' values are validated once, by Config (tests/test_config.py); the layer states its invariant.
    with pytest.raises(AssertionError):
        DynamicTanh(4, alpha_init=bad)


def test_dyt_stands_in_for_layernorm():
    # Built positionally with the dim only, as `nn.LayerNorm(dim)` is.
    assert DynamicTanh(8)(torch.randn(2, 8)).shape == nn.LayerNorm(8)(torch.randn(2, 8)).shape


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(dim=24, heads=3).eval()
    x = torch.randn(2, 7, 24)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 3, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    ref = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("depth", [1, 3])
def test_norm_injection_module_counts(depth):
    dyt = ViT(dim=32, depth=depth, heads=4, norm_layer=DynamicTanh)
    ln = ViT(dim=32, depth=depth, heads=4, norm_layer=nn.LayerNorm)
    assert _count(dyt, DynamicTanh) == 2 * depth + 1 and _count(dyt, nn.LayerNorm) == 0
    assert _count(ln, nn.LayerNorm) == 2 * depth + 1 and _count(ln, DynamicTanh) == 0
    # A LayerNorm exactly where the DyT model has a DyT.
    dyt_names = [n for n, m in dyt.named_modules() if isinstance(m, DynamicTanh)]
    ln_names = [n for n, m in ln.named_modules() if isinstance(m, nn.LayerNorm)]
    assert dyt_names == ln_names
    # Same parameters except one alpha per DyT.
    assert count_parameters(dyt) - count_parameters(ln) == 2 * depth + 1


def test_custom_norm_factory():
    model = ViT(**TINY, norm_layer=nn.RMSNorm)
    assert _count(model, nn.RMSNorm) == 2 * TINY["depth"] + 1


def test_seed_configuration_parameter_count():
    model = ViT()  # dim 384, depth 6, heads 6, patch 4, 10 classes, DyT
    assert count_parameters(model) == 10_695_575  # documented in the README
    assert model.blocks[0].mlp.fc1.out_features == 1536


def test_disabled_features_are_identity():
    model = ViT(**TINY)
    assert isinstance(model.pos_drop, nn.Identity)
    for block in model.blocks:
        assert isinstance(block.drop_path1, nn.Identity) and isinstance(block.mlp.drop1, nn.Identity)
    model = ViT(**TINY, drop_path=0.2, dropout=0.1)
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)  # rate rises linearly from 0
    assert isinstance(model.blocks[1].drop_path1, DropPath) and model.blocks[1].drop_path1.p == pytest.approx(0.2)
    assert isinstance(model.pos_drop, nn.Dropout)


def test_drop_path_scales_kept_samples_and_is_identity_in_eval():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(1000, 3)
    y = dp(x)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert 0.4 < (y[:, 0] == 0).float().mean() < 0.6
    assert torch.equal(dp.eval()(x), x)


def test_init_follows_timm():
    torch.manual_seed(0)
    model = ViT()
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002
    # The patch embedding is a linear map on patches: same init, not PyTorch's conv default (std ~0.08).
    assert abs(model.patch_embed.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002


def test_forward_shape_finite_and_deterministic():
    torch.manual_seed(1)
    a = ViT(**TINY, num_classes=7)
    torch.manual_seed(1)
    b = ViT(**TINY, num_classes=7)
    x = torch.randn(3, 3, 32, 32)
    out = a(x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    assert torch.equal(out, b(x))


def test_alphas_reports_each_dyt():
    model = ViT(**TINY, norm_layer=functools.partial(DynamicTanh, alpha_init=0.3))
    got = alphas(model)
    assert list(got) == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"]
    assert all(v == pytest.approx(0.3) for v in got.values())
    assert alphas(ViT(**TINY, norm_layer=nn.LayerNorm)) == {}


@pytest.mark.parametrize("kwargs", [dict(dim=30, heads=4), dict(img_size=30, patch_size=4), dict(pool="max")])
def test_model_asserts_its_invariants(kwargs):
    # The messages users see for these come from Config (tests/test_config.py).
    with pytest.raises(AssertionError):
        ViT(**{**TINY, **kwargs})


def test_forward_has_no_graph_breaks():
    # The whole forward must trace as one graph (no Python-data-dependent control flow).
    torch._dynamo.reset()
    model = ViT(**TINY, drop_path=0.1)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
