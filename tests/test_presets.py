"""Published recipes as presets (config.RECIPES): Compact Transformers' CVT-7/4 and ViT-Lite-7/4 built with
their published size and compute, the model parts they need checked against their reference behaviour,
and a preset reachable by name from Python, the sweep command line and the notebook."""

import json
import math

import pytest
import torch
from torch import nn

from config import RECIPES, Config, config_from_parameters, recipe_config
from conftest import tiny
from models.dyt import Block, ViT
from recipe import build_model, build_optimizer, lr_at

# Published in the Compact Transformers README (CIFAR-10 table): parameters and MACs (in G).
PUBLISHED = {"cvt-7/4": (3_717_000, 0.236), "vit-lite-7/4": (3_717_000, 0.239)}


def macs_of_layers(model: nn.Module, image: torch.Tensor) -> int:
    """Multiply-accumulates of the linear and convolution layers of one forward pass, as the published
    figures count them (layer by layer; the attention's own matrix products are not layers)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() // output.shape[-1] * module.in_features * module.out_features
        else:
            total += output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model.eval()(image)
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("name", ["cvt-7/4", "vit-lite-7/4"])
@pytest.mark.parametrize("norm", ["ln", "dyt"])
def test_a_preset_has_the_published_size_and_compute(name, norm):
    cfg = recipe_config(name, {"norm": norm})
    model = build_model(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    published_parameters, published_gmacs = PUBLISHED[name]
    extra = 15 if norm == "dyt" else 0  # one alpha per norm: 2 per block, 7 blocks, the final one
    assert abs(parameters - extra - published_parameters) / published_parameters < 0.005, parameters
    gmacs = macs_of_layers(model, torch.zeros(1, 3, 32, 32)) / 1e9
    assert abs(gmacs - published_gmacs) / published_gmacs < 0.005, gmacs
    assert cfg.recipe == name and cfg.norm == norm


def test_a_preset_is_a_plain_dict_and_explicit_values_win():
    assert RECIPES["default"] == {} and recipe_config("default") == Config()
    assert isinstance(RECIPES["cvt-7/4"], dict) and RECIPES["cvt-7/4"]["pool"] == "seq"
    cfg = recipe_config("cvt-7/4", {"lr": 1e-3, "epochs": 20, "cooldown_epochs": 2})
    assert (cfg.lr, cfg.epochs, cfg.dim, cfg.pool, cfg.recipe) == (1e-3, 20, 256, "seq", "cvt-7/4")
    with pytest.raises(ValueError, match=r"unknown recipe 'cvt-7' \(did you mean 'cvt-7/4'\?\)"):
        recipe_config("cvt-7")
    with pytest.raises(ValueError, match="choose the preset with the recipe parameter"):
        recipe_config("cvt-7/4", {"recipe": "default"})


def test_the_notebooks_parameters_keep_the_presets_values_unless_changed(tmp_path):
    defaults = Config()
    parameters = dict(recipe="cvt-7/4", epochs=defaults.epochs, dim=defaults.dim, lr=defaults.lr, seed=3)  # as the cell
    cfg = config_from_parameters(parameters, {"drop_path": 0.2}, tmp_path)
    assert (cfg.epochs, cfg.dim, cfg.lr, cfg.seed, cfg.drop_path) == (310, 256, 5.5e-4, 3, 0.2)
    assert config_from_parameters(dict(recipe="cvt-7/4", dim=128), None, tmp_path).dim == 128  # changed: wins


def test_sequence_pooling_is_a_softmax_weighted_mean_of_the_final_tokens():
    torch.manual_seed(0)
    model = ViT(dim=32, depth=1, heads=2, pool="seq", norm_layer=nn.LayerNorm).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)  # (B, N, D), no cls token
    assert tokens.shape[1] == 64
    weights = torch.softmax(tokens @ model.attention_pool.weight.T + model.attention_pool.bias, dim=1)  # (B, N, 1)
    pooled = (weights * tokens).sum(dim=1)
    torch.testing.assert_close(model(x), model.head(pooled))


def test_the_cct_block_puts_the_second_norm_on_the_residual_stream():
    torch.manual_seed(0)
    block = Block(16, 2, 32, nn.LayerNorm, style="cct", qkv_bias=False).eval()
    x = torch.randn(2, 5, 16)
    # Compact Transformers' TransformerEncoderLayer.forward, written out with this block's modules:
    src = x + block.attn(block.norm1(x))
    src = block.norm2(src)
    expected = src + block.mlp(src)
    torch.testing.assert_close(block(x), expected)
    assert block.attn.qkv.bias is None


def test_cct_embeddings_and_tokenizer_are_initialised_as_published():
    torch.manual_seed(0)
    cvt = build_model(recipe_config("vit-lite-7/4", {"norm": "ln"}))
    assert torch.count_nonzero(cvt.cls_token) == 0  # zeros
    assert 0.17 < cvt.pos_embed.std().item() < 0.2  # truncated normal, std 0.2 (cut at +-2)
    fan_in = 3 * 4 * 4
    assert abs(cvt.patch_embed.weight.std().item() - math.sqrt(2 / fan_in)) < 0.01  # He normal
    assert cvt.patch_embed.bias.abs().max().item() <= 1 / math.sqrt(fan_in)  # PyTorch's own bias init


def test_decay_embeddings_decays_the_positional_embedding_and_cls_token_as_timm_does():
    model = build_model(recipe_config("vit-lite-7/4", {"norm": "ln"}))
    decay, no_decay = build_optimizer(model, recipe_config("vit-lite-7/4"), torch.device("cpu")).param_groups
    assert any(p is model.pos_embed for p in decay["params"]) and any(p is model.cls_token for p in decay["params"])
    assert decay["weight_decay"] == 0.06 and all(p.ndim == 1 for p in no_decay["params"])
    default = build_model(Config())
    decay, _ = build_optimizer(default, Config(), torch.device("cpu")).param_groups
    assert not any(p is default.pos_embed for p in decay["params"])


def test_warmup_from_a_rate_then_cosine_then_cooldown_at_the_floor():
    total, warmup, cooldown = 310, 10, 10  # epochs as steps, the CVT schedule
    lrs = [lr_at(s, total, warmup, 5.5e-4, 1e-5, start=1e-5, cooldown=cooldown) for s in range(total)]
    assert lrs[0] == pytest.approx(1e-5 + (5.5e-4 - 1e-5) / 10) and lrs[warmup - 1] == pytest.approx(5.5e-4)
    assert lrs[warmup] == pytest.approx(5.5e-4)  # the cosine starts at the peak
    assert lrs[total - cooldown - 1] == pytest.approx(1e-5, abs=2e-7) and set(lrs[total - cooldown :]) == {1e-5}
    mid = warmup + (total - cooldown - warmup) // 2
    assert lrs[mid] == pytest.approx((5.5e-4 + 1e-5) / 2)
    assert lr_at(0, 100, 10, 1e-3, 1e-5) == 1e-4  # start 0, no cooldown: the schedule as before
    from recipe import Schedule

    short = Schedule.of(recipe_config("cvt-7/4", {"epochs": 20}), steps_per_epoch=100)
    assert (short.warmup_steps, short.cooldown_steps) == (200, 200)  # a short trial: both capped at 10%
    full = Schedule.of(recipe_config("cvt-7/4"), steps_per_epoch=100)
    assert (full.warmup_steps, full.cooldown_steps, full.start) == (1000, 1000, 1e-5)  # the published 10 + 10


def test_mixup_is_switched_off_after_mixup_off_epoch(cifar, tmp_path):
    from training import Trainer

    t = Trainer(tiny(tmp_path, epochs=3, mixup_alpha=0.8, cutmix_alpha=1.0, mixup_off_epoch=2), cifar, progress="off")
    seen = []
    for epoch in t.remaining_epochs():
        t.train_epoch()
        seen.append((epoch, t.mixup.enabled))
        t.epoch = epoch
    assert [e for e, on in seen if not on] == [3] and [e for e, on in seen if on] == [1, 2]
    x, y = cifar.x_train[:4].float(), cifar.y_train[:4]
    images, targets = t.mixup(x, y)
    assert torch.equal(images, x) and torch.equal(targets, t.mixup.smooth_one_hot(y))  # off: nothing mixed


def test_every_preset_trains_two_epochs_with_either_norm(cifar, tmp_path):
    from conftest import train_all
    from training import Trainer

    for name in ("cvt-7/4", "vit-lite-7/4"):
        for norm in ("dyt", "ln"):
            small = {"norm": norm, "epochs": 2, "warmup_epochs": 1, "dim": 32, "heads": 2,
                     "depth": 2, "batch_size": 50, "eval_batch_size": 50, "device": "cpu", "verify_data": False,
                     "compile_cache": False, "clean_train_images": 0, "checkpoint_dir": str(tmp_path / "ck"),
                     "log_dir": str(tmp_path / "log"), "plot_dir": str(tmp_path / "plots"),
                     "run_name": f"{name.replace('/', '-')}_{norm}"}  # fmt: skip
            t = Trainer(recipe_config(name, small), cifar, progress="off")
            train_all(t)
            t.close()
            saved = json.loads(t.paths.config.read_text())
            assert saved["recipe"] == name and saved["pool"] == RECIPES[name]["pool"] and t.epoch == 2


# --- the augmentation the presets add -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resized_crop_equals_crop_then_interpolate_on_each_image(mode):
    import torch.nn.functional as F

    from data import resized_crop

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    top, left = torch.tensor([0, 3, 5, 0, 10, 1]), torch.tensor([0, 2, 7, 4, 0, 9])
    h, w = torch.tensor([32, 29, 27, 28, 22, 23]), torch.tensor([32, 30, 25, 28, 31, 20])
    bicubic = torch.full((6,), mode == "bicubic")
    out = resized_crop(x, top, left, h, w, bicubic)
    for b in range(6):
        crop = x[b : b + 1, :, top[b] : top[b] + h[b], left[b] : left[b] + w[b]].float()
        reference = F.interpolate(crop, size=(32, 32), mode=mode, align_corners=False)
        expected = reference.round().clamp(0, 255).to(torch.uint8)[0]
        assert (out[b].int() - expected.int()).abs().max() <= 1, b  # float sums in another order: at most 1 level
        assert (out[b] != expected).float().mean() < 0.01
    assert torch.equal(resized_crop(x[:1], top[:1], left[:1], h[:1], w[:1], bicubic[:1]), x[:1])  # whole: itself


def test_resized_crop_draws_torchvisions_distribution():
    from torchvision.transforms import RandomResizedCrop

    from data import draw_resized_crop

    n = 20_000
    top, left, h, w = draw_resized_crop(n, 32, 0.8, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert ((h >= 1) & (h <= 32) & (w >= 1) & (w <= 32)).all()
    assert ((top >= 0) & (top + h <= 32) & (left >= 0) & (left + w <= 32)).all()
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32)
    reference = torch.tensor([RandomResizedCrop.get_params(image, (0.8, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
    ours = torch.stack([top, left, h, w], 1).double()
    for k, what in enumerate(("top", "left", "height", "width")):
        a, b = ours[:, k], reference[:, k].double()
        assert abs(a.mean() - b.mean()) < 0.05 and abs(a.std() - b.std()) < 0.05, what  # same distribution
        assert a.min() == b.min() and a.max() == b.max(), what


def _timm_erasing_reference(rng, prob: float, h: int = 32, w: int = 32):
    """timm's RandomErasing._erase for one image, mode "pixel", count 1: the rectangle it erases (or None)."""
    if rng.random() > prob:
        return None
    for _ in range(10):
        target = rng.uniform(0.02, 1 / 3) * h * w
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            return rng.randint(0, h - eh), rng.randint(0, w - ew), eh, ew
    return None


def test_random_erasing_draws_timms_distribution_and_fills_with_noise():
    import random

    from data import draw_erase, erase_rectangles

    n = 20_000
    drawn = draw_erase((n, 3, 32, 32), 0.25, torch.device("cpu"), torch.Generator().manual_seed(0))
    rng = random.Random(0)
    reference = [_timm_erasing_reference(rng, 0.25) for _ in range(n)]
    erased = [r for r in reference if r is not None]
    assert abs(drawn["erase"].float().mean().item() - len(erased) / n) < 0.01  # 25% of the images
    ours = torch.stack([drawn[k][drawn["erase"]] for k in ("top", "left", "h", "w")], 1).double()
    theirs = torch.tensor(erased, dtype=torch.float64)
    for k, what in enumerate(("top", "left", "height", "width")):
        assert abs(ours[:, k].mean() - theirs[:, k].mean()) < 0.3 and abs(ours[:, k].std() - theirs[:, k].std()) < 0.3
        assert ours[:, k].min() >= theirs[:, k].min() - 1 and ours[:, k].max() <= theirs[:, k].max() + 1, what
    small = {k: v[:64] for k, v in drawn.items()}
    x = torch.full((64, 3, 32, 32), 7.0)
    out = erase_rectangles(x, small)
    for b in range(64):
        changed = (out[b] != 7.0).any(0)
        if small["erase"][b]:
            t, le, eh, ew = (int(small[k][b]) for k in ("top", "left", "h", "w"))
            box = torch.zeros(32, 32, dtype=torch.bool)
            box[t : t + eh, le : le + ew] = True
            assert torch.equal(changed, box)  # exactly the rectangle, per pixel and channel
        else:
            assert not changed.any()
    noise = out[out != 7.0]
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1  # standard normal values


def test_the_cvt_augmentation_runs_in_timms_order(cifar):
    from recipe import build_augment

    augment = build_augment(recipe_config("cvt-7/4"))
    g = torch.Generator().manual_seed(0)
    out = augment(cifar.x_train[:64], g)
    assert out.dtype == torch.float32 and out.shape == (64, 3, 32, 32)
    params = augment.draw(cifar.x_train[:64], torch.Generator().manual_seed(0))
    assert params["resized"] is not None and params["erase"] is not None and augment.padding == 0
    assert 0 < params["resized"][4].float().mean() < 1  # "random": bilinear for some, bicubic for others


def test_a_preset_named_anywhere_applies_its_values_or_is_refused(tmp_path):
    import dataclasses

    from sweeps.runs import expand

    # Config(recipe=...) applies the preset under the fields given; from_dict of a partial dict does too
    assert Config(recipe="cvt-7/4", norm="ln") == recipe_config("cvt-7/4", {"norm": "ln"})
    assert Config.from_dict({"recipe": "vit-lite-7/4", "seed": 2}) == recipe_config("vit-lite-7/4", {"seed": 2})
    # a whole config relabelled (dataclasses.replace passes every field) is refused, not trained as the default
    with pytest.raises(ValueError, match=r"labelled recipe 'cvt-7/4' but holds none of its 27 own values"):
        dataclasses.replace(Config(), recipe="cvt-7/4")
    # a run of a sweep that names a recipe gets its values, with the sweep's shared fields kept on top, even a
    # shared field equal to the old preset's value (epochs 200 is the default recipe's)
    shared = {"epochs": 200, "lr": 2e-3}
    runs = expand(recipe_config("default", shared), [{}], {"recipe": ["default", "cvt-7/4"]}, shared)
    (default, _), (cvt, _) = runs
    assert (default.recipe, default.dim, default.pool, default.epochs, default.lr) == ("default", 384, "cls", 200, 2e-3)
    assert (cvt.recipe, cvt.dim, cvt.pool, cvt.epochs, cvt.lr) == ("cvt-7/4", 256, "seq", 200, 2e-3)
    assert cvt == recipe_config("cvt-7/4", {**shared, "run_name": "dyt_cifar10_recipe-cvt-7-4"})
    # back from a preset to the default: what was set on top of cvt-7/4 carries over, the rest is the default's
    ((back, _),) = expand(recipe_config("cvt-7/4", {"seed": 4}), [{"recipe": "default"}])
    assert back == Config(seed=4, run_name="dyt_cifar10_recipe-default")
    with pytest.raises(ValueError, match="unknown recipe 'cvt'"):
        expand(Config(), [{"recipe": "cvt"}])
    # the notebook: a recipe in overrides applies when the recipe parameter is left at "default", else is refused
    cfg = config_from_parameters(dict(recipe="default", seed=1), {"recipe": "cvt-7/4"}, tmp_path)
    assert (cfg.recipe, cfg.dim, cfg.epochs, cfg.seed) == ("cvt-7/4", 256, 310, 1)
    with pytest.raises(ValueError, match="set the preset in one place"):
        config_from_parameters(dict(recipe="vit-lite-7/4"), {"recipe": "cvt-7/4"}, tmp_path)


def test_a_recipe_in_the_sweeps_grid_trains_that_presets_model(tmp_path, capsys):
    import pandas as pd

    from sweeps.__main__ import main as sweeps_main

    shared = {"checkpoint_dir": str(tmp_path / "ck"), "log_dir": str(tmp_path / "log"), "plot_dir": str(tmp_path)}
    sweeps_main(["--grid", '{"recipe": ["default", "cvt-7/4"]}', "--overrides", json.dumps(shared),
                 "--name", "recipes", "--table-only"])  # fmt: skip
    table = pd.read_csv(tmp_path / "log" / "recipes_runs.csv")
    assert list(table["recipe"]) == ["default", "cvt-7/4"] and list(table["status"]) == ["not run"] * 2
    assert list(table["planned_epochs"]) == [200, 310]  # each preset's own schedule, not the label alone
