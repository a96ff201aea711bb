"""Model probes that explain a run after the fact (bench/norm_probe.py): attention maps and their
entropy, and what each norm sees."""

import math

import pytest
import torch

from models import DynamicTanh, ViT, attention_entropy, attention_maps, diagonal_attention_mass, norm_inputs


def _model(norm=DynamicTanh, seed=0, **kw):
    torch.manual_seed(seed)
    return ViT(dim=32, depth=2, heads=2, patch_size=8, norm_layer=norm, **kw)


def _images(n=8, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_attention_maps_reproduce_each_blocks_attention_output():
    model, images = _model(attn_init="mimetic"), _images()
    outputs = []
    hooks = [b.attn.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in model.blocks]
    model.eval()
    with torch.no_grad():
        model(images)
        tokens, maps = model.embed(images), attention_maps(model, images)
        for block, weights, expected in zip(model.blocks, maps, outputs):
            h, attn = block.norm1(tokens), block.attn
            B, N, C = h.shape
            v = attn.qkv(h).reshape(B, N, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
            assert weights.shape == (B, 2, N, N) and torch.allclose(weights.sum(-1), torch.ones(B, 2, N))
            mixed = (weights @ v).transpose(1, 2).reshape(B, N, C)
            torch.testing.assert_close(attn.proj(mixed), expected, rtol=1e-4, atol=1e-5)
            tokens = block(tokens)
    for h in hooks:
        h.remove()
    model.train()
    assert model.training and len(maps) == 2
    assert diagonal_attention_mass(model, images, block=1) == maps[1].diagonal(dim1=-2, dim2=-1).mean().item()
    assert model.training  # the probes restore the mode


def test_attention_entropy_is_one_for_uniform_attention_and_matches_a_reference():
    uniform = _model()
    for block in uniform.blocks:
        block.attn.qkv.weight.data.zero_()
        block.attn.qkv.bias.data.zero_()  # q = k = 0: every query spreads evenly over the 17 tokens
    assert attention_entropy(uniform, _images()) == [pytest.approx(1.0)] * 2
    model, images = _model(attn_init="mimetic"), _images()
    for block in model.blocks:
        block.attn.qkv.weight.data[:64] *= 8  # sharper queries and keys: attention far from uniform
    reference = [
        (torch.distributions.Categorical(probs=w).entropy().mean() / math.log(w.shape[-1])).item()
        for w in attention_maps(model, images)
    ]
    got = attention_entropy(model, images)
    assert got == [pytest.approx(r, rel=1e-5) for r in reference] and max(got) < 0.9


def test_norm_inputs_give_each_norms_input_and_output_size_and_dyts_squashed_share():
    model, images = _model(), _images()
    tokens = model.embed(images).detach()
    with torch.no_grad():
        model.blocks[0].norm1.alpha.fill_(1e6)  # every nonzero input lands far in tanh's flat part
        model.blocks[0].norm2.alpha.fill_(1e-6)  # every input stays on the straight part
        expected_out = model.blocks[0].norm1(tokens).pow(2).mean().sqrt().item()
    seen = norm_inputs(model, images)
    assert set(seen) == {"blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"}
    first = seen["blocks.0.norm1"]
    assert first["rms_in"] == pytest.approx(tokens.pow(2).mean().sqrt().item(), rel=1e-5)
    assert first["rms_out"] == pytest.approx(expected_out, rel=1e-5) and first["squashed"] == 1.0
    assert seen["blocks.0.norm2"]["squashed"] == 0.0
    assert seen["blocks.0.norm2"]["rms_out"] == pytest.approx(seen["blocks.0.norm2"]["rms_in"] * 1e-6, rel=1e-3)
    assert all(not m._forward_hooks for m in model.modules()) and model.training
    ln = norm_inputs(_model(torch.nn.LayerNorm), images)["blocks.0.norm1"]
    assert math.isnan(ln["squashed"]) and ln["rms_in"] == pytest.approx(first["rms_in"], rel=1e-5)
    assert ln["rms_out"] == pytest.approx(1.0, rel=1e-3)  # LayerNorm at init: unit weight, zero bias


def test_a_probe_that_fails_leaves_the_model_in_its_mode():
    model = _model()

    def broken(*_):
        raise RuntimeError("broken layer")

    model.blocks[1].attn.qkv.forward = broken
    for probe in (attention_maps, norm_inputs):
        with pytest.raises(RuntimeError, match="broken layer"):
            probe(model, _images())
        assert model.training and all(not m._forward_hooks for m in model.modules())
