"""Accuracy levers: RandAugment's per-op probability, average pooling, mimetic attention init, EMA,
clean training accuracy and patch size 2, each reached from the config."""

import math

import pytest
import torch
from torch import nn

from conftest import QUIET, assert_same_run, rows, tiny, train_all
from data import normalize
from models import DynamicTanh, ViT, diagonal_attention_mass, gains, scale_mimetic_to_inputs_
from models.dyt import MIMETIC_QK, MIMETIC_VO, Attention, mimetic_init_
from randomaug import OPS, RandAugment
from recipe import build_model
from training import Trainer


def _images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- randaug_prob ------------------------------------------------------------------------------


def test_randaug_prob_skips_about_that_share_of_ops():
    aug = RandAugment(num_ops=1, prob=0.3)
    op, _, _ = aug.draw(20_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    applied = (op >= 0).float().mean().item()
    assert abs(applied - 0.3) < 0.02 and op.max() < len(OPS)
    assert (RandAugment(prob=1.0).draw(1000, torch.device("cpu"))[0] >= 0).all()


def test_skipped_ops_leave_the_sample_unchanged_in_both_paths():
    img = _images(64)
    aug = RandAugment(num_ops=1, prob=0.5)
    op, level, sign = aug.draw(64, img.device, torch.Generator().manual_seed(1))
    grouped = aug.apply(img, op, level, sign, grouped=True)
    masked = aug.apply(img, op, level, sign, grouped=False)
    assert torch.equal(grouped, masked)
    skipped = op < 0
    assert 10 < skipped.sum() < 54 and torch.equal(grouped[skipped], img[skipped])


def test_prob_zero_is_identity_and_bad_prob_is_refused():
    img = _images(8)
    assert torch.equal(RandAugment(prob=0.0)(img, torch.Generator().manual_seed(0)), img)
    with pytest.raises(ValueError, match="prob"):
        RandAugment(prob=1.5)


# --- pooling -----------------------------------------------------------------------------------


def test_gap_pooling_has_no_cls_token_and_reads_the_mean_of_final_norm_tokens():
    torch.manual_seed(0)
    model = ViT(dim=32, depth=2, heads=4, pool="gap").eval()
    assert model.cls_token is None and model.pos_embed.shape == (1, 64, 32)
    assert "cls_token" not in dict(model.named_parameters()) and model.no_weight_decay() == {"pos_embed"}
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 64, 32)
    torch.testing.assert_close(model(x), model.head(tokens.mean(dim=1)))
    cls = ViT(dim=32, depth=2, heads=4, pool="cls").eval()
    torch.testing.assert_close(cls(x), cls.head(cls.forward_features(x)[:, 0]))


# --- mimetic init ------------------------------------------------------------------------------


def test_mimetic_init_gives_the_promised_products():
    torch.manual_seed(0)
    dim = 64
    attn = Attention(dim, heads=1)  # one head of full width: the products are exactly the targets
    mimetic_init_(attn)
    q, k, v = attn.qkv.weight.view(3, dim, dim)
    qk = q.T @ k  # scores are x W_q^T W_k x^T
    vo = v.T @ attn.proj.weight.T  # the value-output map x -> x W_v^T W_o^T
    eye = torch.eye(dim)
    assert qk.diagonal().mean().item() == pytest.approx(MIMETIC_QK[1], abs=0.05)
    assert vo.diagonal().mean().item() == pytest.approx(-MIMETIC_VO[1], abs=0.05)
    # What is left is the random part alpha * Z, Z ~ N(0, 1/dim): its entries have std alpha / sqrt(dim).
    assert (qk - MIMETIC_QK[1] * eye).std().item() == pytest.approx(MIMETIC_QK[0] / math.sqrt(dim), rel=0.15)
    assert (vo + MIMETIC_VO[1] * eye).std().item() == pytest.approx(MIMETIC_VO[0] / math.sqrt(dim), rel=0.15)
    assert attn.qkv.bias.abs().sum() == 0 and attn.proj.bias.abs().sum() == 0


def test_mimetic_init_per_head_is_a_low_rank_piece_of_the_same_shape():
    torch.manual_seed(0)
    model = ViT(dim=48, depth=2, heads=3, attn_init="mimetic")
    attn = model.blocks[1].attn
    q, k, _ = attn.qkv.weight.view(3, 48, 48)
    for h in range(3):
        qk = q[h * 16 : (h + 1) * 16].T @ k[h * 16 : (h + 1) * 16]
        assert torch.linalg.matrix_rank(qk) == 16
        assert qk.diagonal().mean() > 3 * (qk - qk.diagonal().diag()).abs().mean()  # identity-like
    default = ViT(dim=48, depth=2, heads=3)
    dq, dk, _ = default.blocks[1].attn.qkv.weight.view(3, 48, 48)
    assert (dq.T @ dk).diagonal().mean().abs() < 0.01


def test_mimetic_init_under_dyt_attends_like_layernorms(cifar, tmp_path):
    # On 256 real CIFAR-10 test images (default config, seed 0) the diagonal mass was 0.358 for LayerNorm
    # and 0.149 for DyT with this scaling (0.015 without it; uniform 1/65 = 0.015): see docs/recipe.md. The
    # generated images here give 0.119 and 0.047: the same ratio.
    images = normalize(cifar.x_test)
    uniform = 1 / 65
    cfg = dict(dim=384, depth=1, heads=6, attn_init="mimetic")
    ln = Trainer(tiny(tmp_path / "ln", norm="ln", **cfg), cifar, **QUIET).model
    dyt = Trainer(tiny(tmp_path / "dyt", **cfg), cifar, **QUIET).model
    torch.manual_seed(0)
    unscaled = build_model(tiny(tmp_path, **cfg))  # mimetic init as LayerNorm wants it, under DyT
    ln_mass, dyt_mass = diagonal_attention_mass(ln, images), diagonal_attention_mass(dyt, images)
    assert ln_mass > 5 * uniform and dyt_mass > 2.5 * uniform and dyt_mass > 0.3 * ln_mass
    assert diagonal_attention_mass(unscaled, images) < 1.5 * uniform  # the query-key half did nothing
    torch.manual_seed(0)
    plain_ln = build_model(tiny(tmp_path, norm="ln", **cfg))
    assert all(torch.equal(a, b) for a, b in zip(plain_ln.parameters(), ln.parameters()))  # LayerNorm: as it was


def test_scaling_divides_queries_and_keys_by_the_measured_input_size():
    torch.manual_seed(0)
    model = ViT(dim=32, depth=2, heads=2, attn_init="mimetic")
    before = [b.attn.qkv.weight.clone() for b in model.blocks]
    images = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        first = model.blocks[0].norm1(model.embed(images)).pow(2).mean().sqrt().item()
    scales = scale_mimetic_to_inputs_(model, images)
    assert scales[0] == pytest.approx(first) and len(scales) == 2 and all(0 < r < 0.5 for r in scales)
    for block, w, r in zip(model.blocks, before, scales):
        torch.testing.assert_close(block.attn.qkv.weight[:64], w[:64] / r)
        assert torch.equal(block.attn.qkv.weight[64:], w[64:])  # values untouched
    assert model.training


# --- the patch embedding's init and each norm's gain --------------------------------------------


def test_patch_embedding_init_trunc_normal_or_pytorchs_own(cifar):
    images = normalize(cifar.x_test)
    torch.manual_seed(0)
    trunc = ViT(dim=64, depth=1, heads=2)
    torch.manual_seed(0)
    pytorch = ViT(dim=64, depth=1, heads=2, patch_embed_init="pytorch")
    fan_in = 3 * 4 * 4
    assert trunc.patch_embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert trunc.patch_embed.bias.abs().sum() == 0
    bound = 1 / math.sqrt(fan_in)  # nn.Conv2d's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert pytorch.patch_embed.weight.abs().max() <= bound and pytorch.patch_embed.bias.abs().max() <= bound
    assert pytorch.patch_embed.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    with torch.no_grad():
        ratio = (pytorch.patch_embed(images).pow(2).mean() / trunc.patch_embed(images).pow(2).mean()).sqrt().item()
    assert 3.0 < ratio < 5.5  # real CIFAR-10 test images: 0.601 / 0.146 = 4.1 (docs/recipe.md)
    assert pytorch.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)  # linear layers: timm's


def test_each_norms_gain_reaches_the_csv(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    with torch.no_grad():
        t.model.blocks[1].norm2.alpha.zero_()  # a collapsed alpha
    expected = {f"gain_{n}": (m.weight.abs() * m.alpha).mean().item() for n, m in t.model.named_modules()
                if isinstance(m, DynamicTanh)}  # fmt: skip
    assert gains(t.model)["blocks.1.norm2"] == 0.0
    t.resume()
    row = t.run_epoch(1)
    final = {f"gain_{n}": (m.weight.abs() * m.alpha).mean().item() for n, m in t.model.named_modules()
             if isinstance(m, DynamicTanh)}  # fmt: skip
    assert len(expected) == 5 and {k: row[k] for k in final} == pytest.approx(final)
    assert [c for c in rows(t.paths.csv)[0] if c.startswith("gain_")] == list(final)
    ln = Trainer(tiny(tmp_path / "ln", norm="ln"), cifar, **QUIET)
    assert gains(ln.model) == pytest.approx({n: 1.0 for n in ("blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1",
                                                              "blocks.1.norm2", "norm")})  # fmt: skip


# --- EMA and clean training accuracy -----------------------------------------------------------


def test_ema_follows_the_weights_with_its_decay(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1, ema_decay=0.5, clean_train_images=0), cifar, **QUIET)
    before = [p.detach().clone() for p in t.ema.module.parameters()]
    t.resume()
    x, y = next(iter(t.train_loader))
    x, targets = t.mixup(x, y)
    t.train_step(x, targets)  # first update: decay min(0.5, 1/10) = 0.1
    for e, b, p in zip(t.ema.module.parameters(), before, t.model.parameters()):
        torch.testing.assert_close(e, 0.1 * b + 0.9 * p.detach())


def test_ema_and_clean_accuracy_reach_the_csv_and_best_says_which_weights(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2, ema_decay=0.9, clean_train_images=64), cifar, **QUIET)
    train_all(t)
    table = rows(t.paths.csv)
    assert {"ema_test_loss", "ema_test_acc", "train_clean_acc"} <= set(table[0])
    best = max((float(r[c]), r["epoch"]) for r in table for c in ("test_acc", "ema_test_acc"))
    assert t.best.acc == pytest.approx(best[0])
    saved = torch.load(t.paths.best, weights_only=True)
    assert saved["best_source"] in ("raw", "ema") and saved["best_source"] == t.best.source
    model, info = t.best_model()
    acc = t.evaluator.confusion_matrix(model).diag().sum().item() / len(cifar.y_test)
    assert acc == pytest.approx(info["test_acc"]) and info["source"] == t.best.source
    # Clean accuracy is the model on the first 64 training images, unaugmented.
    logits, labels, _ = t.evaluator.predict(t.model, t.evaluator.clean_train_loader)
    assert len(labels) == 64
    assert float(table[-1]["train_clean_acc"]) == pytest.approx((logits.argmax(-1) == labels).float().mean().item())


def test_resume_with_ema_is_bitwise_exact(cifar, tmp_path, reference_runs):
    first = Trainer(tiny(tmp_path, **reference_runs.LEVERS), cifar, **QUIET)
    first.resume()
    first.run_epoch(1)
    del first
    second = Trainer(tiny(tmp_path, **reference_runs.LEVERS), cifar, **QUIET)
    train_all(second)
    assert_same_run(reference_runs.get("levers"), second)


# --- patch size 2 ------------------------------------------------------------------------------


def test_patch_size_2_runs_end_to_end(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1, patch_size=2, dim=16, heads=2), cifar, **QUIET)
    assert t.model.num_patches == 256 and t.model.pos_embed.shape == (1, 257, 16)
    train_all(t)
    assert math.isfinite(float(rows(t.paths.csv)[0]["test_loss"]))


def test_patch_size_2_compute_per_image():
    # The README's figure: forward multiply-adds of the design's model (dim 384, depth 6) at patch 4 and 2.
    from torch.utils.flop_counter import FlopCounterMode

    def gflops(patch):
        model = ViT(patch_size=patch, norm_layer=nn.LayerNorm).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, 32, 32))
        return counter.get_total_flops() / 1e9

    p4, p2 = gflops(4), gflops(2)
    assert p4 == pytest.approx(1.383, abs=0.005) and p2 == pytest.approx(5.459, abs=0.005)  # GFLOP (2 per MAC)


def test_alpha_lr_scale_puts_dyts_alphas_in_a_group_of_their_own_at_a_scaled_lr(cifar, tmp_path):
    from models import DynamicTanh

    plain = Trainer(tiny(tmp_path / "plain", epochs=1), cifar, **QUIET)
    assert len(plain.optimizer.param_groups) == 2  # the default: no third group
    slow = Trainer(tiny(tmp_path / "slow", epochs=1, alpha_lr_scale=0.1), cifar, **QUIET)
    decay, no_decay, alphas = slow.optimizer.param_groups
    dyts = [m for m in slow.model.modules() if isinstance(m, DynamicTanh)]
    assert {id(p) for p in alphas["params"]} == {id(m.alpha) for m in dyts} and alphas["weight_decay"] == 0.0
    assert not {id(p) for p in no_decay["params"]} & {id(p) for p in alphas["params"]}
    slow.parts.set_lr(2e-3)
    assert float(decay["lr"]) == 2e-3 and float(alphas["lr"]) == pytest.approx(2e-4)
    start = {id(m): m.alpha.item() for m in dyts}
    train_all(plain)
    train_all(slow)
    moved = lambda t: max(abs(m.alpha.item() - 0.5) for m in t.model.modules() if isinstance(m, DynamicTanh))  # noqa: E731
    assert all(v == 0.5 for v in start.values()) and 0 < moved(slow) < 0.5 * moved(plain)  # slower alphas
    with pytest.raises(ValueError, match=r"alpha_lr_scale must be a finite number in \(0, 1\]"):
        tiny(tmp_path, alpha_lr_scale=0.0)
