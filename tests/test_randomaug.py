"""Batched RandAugment: every op against torchvision.transforms.v2.functional, per-sample randomness."""

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import randomaug as ra
from randomaug import OPS, RandAugment

FILL = list(ra.CIFAR10_MEAN_UINT8)
LEVELS = [0.0, 0.3, 0.7, 1.0]


def _images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    img[: n // 4] = img[: n // 4] // 3 + 70  # low contrast: autocontrast/equalize have work to do
    img[n // 4] = 90  # one flat image (degenerate cases of autocontrast/equalize)
    return img


def _reference(name, img, f, s, interpolation):
    """torchvision's op for one image at level f (m/10) and sign s, per randomaug's table."""
    mode = TF.InterpolationMode(interpolation)
    e = 1.0 + s * 0.9 * f
    if name == "identity":
        return img
    if name == "autocontrast":
        return TF.autocontrast(img)
    if name == "equalize":
        return TF.equalize(img)
    if name == "rotate":
        return TF.rotate(img, angle=s * 30.0 * f, interpolation=mode, fill=FILL)
    if name == "solarize":
        return TF.solarize(img, threshold=255.0 * (1.0 - f))
    if name == "posterize":
        return TF.posterize(img, bits=8 - round(4 * f))
    if name == "color":
        return TF.adjust_saturation(img, e)
    if name == "contrast":
        return TF.adjust_contrast(img, e)
    if name == "brightness":
        return TF.adjust_brightness(img, e)
    if name == "sharpness":
        return TF.adjust_sharpness(img, e)
    if name in ("shear_x", "shear_y"):
        deg = math.degrees(math.atan(s * 0.3 * f))
        shear = [deg, 0.0] if name == "shear_x" else [0.0, deg]
        return TF.affine(
            img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=mode, fill=FILL, center=[0, 0]
        )
    if name in ("translate_x", "translate_y"):
        t = int(s * f * 10)
        translate = [t, 0] if name == "translate_x" else [0, t]
        return TF.affine(
            img, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=mode, fill=FILL
        )
    # timm's "inc1" ops (timm/data/auto_augment.py), as its level functions give their arguments:
    if name == "invert":
        return TF.invert(img)
    if name == "posterize_increasing":
        return TF.posterize(img, bits=4 - int(f * 4))
    if name == "solarize_increasing":  # threshold 256 at m = 0: nothing inverted (PIL's table)
        threshold = 256 - int(f * 256)
        return img if threshold > 255 else TF.solarize(img, threshold=threshold)
    if name == "solarize_add":  # PIL lookup table: i + add for i < 128, capped at 255
        lut = torch.tensor([min(255, i + int(f * 110)) if i < 128 else i for i in range(256)], dtype=torch.uint8)
        return lut[img.long()]
    if name in ("translate_x_rel", "translate_y_rel"):
        t = s * f * 0.45 * 32  # a fraction of the side, not rounded to pixels
        translate = [t, 0.0] if name == "translate_x_rel" else [0.0, t]
        return TF.affine(
            img, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=mode, fill=FILL
        )
    raise AssertionError(name)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("name", OPS)
def test_each_op_matches_torchvision(name, interpolation):
    img = _images()
    n = len(img)
    aug = RandAugment(interpolation=interpolation, ops=OPS)  # every op this module knows
    op = torch.full((n,), OPS.index(name))
    level = torch.tensor(LEVELS * (n // len(LEVELS)), dtype=torch.float32)
    sign = torch.tensor([1.0, -1.0] * (n // 2))
    ours = aug.apply(img, op, level, sign)
    ref = torch.stack([_reference(name, img[i], float(level[i]), float(sign[i]), interpolation) for i in range(n)])
    assert ours.dtype == torch.uint8 and ours.shape == img.shape
    diff = (ours.int() - ref.int()).abs()
    if name in ra.GEOMETRIC_OPS and (interpolation == "bilinear" or name.endswith("_rel")):
        # Same matrix and grid; float rounding may move a value that lands on .5 by one level.
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    else:
        assert torch.equal(ours, ref), f"{name}: {int((diff > 0).sum())} pixels differ"


def test_magnitudes_change_the_image():
    # Guard against an op that silently does nothing at the top magnitude.
    img = _images()[:8]  # low-contrast images and one flat one
    aug = RandAugment(ops=OPS)
    for name in OPS:
        if name == "identity":
            continue
        out = aug.apply(img, torch.full((8,), OPS.index(name)), torch.ones(8), torch.ones(8))
        assert not torch.equal(out, img), name


def test_samples_draw_their_own_ops():
    img = _images(1).expand(64, -1, -1, -1).contiguous()  # one image, 64 times
    aug = RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    g = torch.Generator().manual_seed(0)
    op, level, sign = aug.draw(64, img.device, g)
    assert len(op.unique()) >= 10 and level.std() > 0.01 and set(sign.tolist()) == {-1.0, 1.0}
    out = aug(img, torch.Generator().manual_seed(1))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 32  # same input, different per-sample results


def test_same_seed_same_batch_other_seed_other_batch():
    img = _images()
    aug = RandAugment()
    a = aug(img, torch.Generator().manual_seed(5))
    b = aug(img, torch.Generator().manual_seed(5))
    c = aug(img, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_magnitude_noise_is_clipped_to_scale():
    aug = RandAugment(magnitude=10, magnitude_std=5)
    _, level, _ = aug.draw(1000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert level.min() >= 0 and level.max() <= 1 and (level == 1).any()


def test_identity_only_keeps_batch():
    img = _images()
    assert torch.equal(RandAugment(ops=("identity",))(img), img)


def test_op_subset_and_zero_ops():
    img = _images()
    assert torch.equal(RandAugment(num_ops=0)(img), img)
    out = RandAugment(num_ops=1, ops=("solarize",), magnitude=10, magnitude_std=0)(img)
    assert torch.equal(out, 255 - img)  # threshold 0 inverts everything


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_ops=-1), "num_ops"),
        (dict(magnitude=11), "magnitude"),
        (dict(magnitude_std=-1), "magnitude_std"),
        (dict(ops=("blur",)), "ops"),
        (dict(interpolation="bicubic"), "interpolation"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RandAugment(**kwargs)


def test_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        RandAugment()(torch.rand(2, 3, 32, 32))


def test_translate_is_sized_for_small_images():
    table = ra.magnitude_table(10, 32)
    assert table["translate_x"] == "±10 px" and table["rotate"] == "±30.0°"
    # At the top magnitude a translated image still shows two thirds of itself.
    img = _images(4)
    out = RandAugment().apply(img, torch.full((4,), OPS.index("translate_x")), torch.ones(4), torch.ones(4))
    assert torch.equal(out[..., 10:], img[..., :-10])


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_grouped_and_masked_execution_agree(interpolation):
    img = _images(64)
    aug = RandAugment(interpolation=interpolation)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        op, level, sign = aug.draw(64, img.device, g)
        grouped = aug.apply(img, op, level, sign, grouped=True)
        masked = aug.apply(img, op, level, sign, grouped=False)
        assert torch.equal(grouped, masked)
        img = grouped


def test_the_timm_inc1_set_is_timms_op_list_and_the_default_set_is_unchanged():
    assert ra.OP_SETS["timm-inc1"] == (
        "autocontrast", "equalize", "invert", "rotate", "posterize_increasing", "solarize_increasing",
        "solarize_add", "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
        "translate_x_rel", "translate_y_rel",
    )  # fmt: skip
    assert RandAugment().ops == ra.DEFAULT_OPS and len(ra.DEFAULT_OPS) == 14 and "identity" in ra.DEFAULT_OPS
    table = ra.magnitude_table(9, ops=ra.TIMM_INC1_OPS)
    assert table["posterize_increasing"] == "1 bits" and table["solarize_increasing"] == "threshold 26"
    assert table["translate_x_rel"] == "±13.0 px" and list(table) == list(ra.TIMM_INC1_OPS)


def test_grouped_and_masked_execution_agree_for_timms_op_set():
    img = _images(64)
    aug = RandAugment(ops=ra.TIMM_INC1_OPS, interpolation="bilinear", prob=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        op, level, sign = aug.draw(64, img.device, g)
        grouped = aug.apply(img, op, level, sign, grouped=True)
        assert torch.equal(grouped, aug.apply(img, op, level, sign, grouped=False))
        img = grouped
