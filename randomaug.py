"""RandAugment on a whole batch, on any device, with per-sample ops and magnitudes.

Each sample of a ``(B, C, H, W)`` uint8 batch draws its own ``num_ops`` operations (uniformly, with
replacement, as torchvision and timm do), its own magnitude and its own signs. Nothing loops over
images. On a GPU every op is computed for the whole batch with per-sample parameters and each
sample keeps the result of the op it drew (``torch.where``): shapes never depend on the data, there
is no host synchronisation, and ``torch.compile`` fuses it into a few kernels. On a CPU the samples
of each op are gathered and only they are transformed (least work). Both give the same images; all
geometric ops of a layer share one ``grid_sample``.

Every op mirrors ``torchvision.transforms.v2.functional`` on uint8 tensors (tests compare them op
by op): the pixel ops agree exactly, the geometric ops use the same inverse-affine matrix, grid and
fill rule.

Magnitude scale (timm's): ``m`` in [0, 10], each op reaching its maximum at ``m = 10``; with
``magnitude_std > 0`` each sample draws ``m ~ N(magnitude, magnitude_std)`` clipped to [0, 10].
With ``f = m / 10`` and a random sign ``s = ±1`` for the signed ops, on an image of side ``S``:

=============  =====================================  ======================
op             parameter                              at m = 10 (S = 32)
=============  =====================================  ======================
identity       -                                      -
autocontrast   -                                      -
equalize       -                                      -
rotate         angle ``s * 30 f`` degrees             ±30°
solarize       invert pixels >= ``255 (1 - f)``       threshold 0 (invert)
color          saturation factor ``1 + s * 0.9 f``    0.1 or 1.9
posterize      keep ``8 - round(4 f)`` bits           4 bits
contrast       factor ``1 + s * 0.9 f``               0.1 or 1.9
brightness     factor ``1 + s * 0.9 f``               0.1 or 1.9
sharpness      factor ``1 + s * 0.9 f``               0.1 or 1.9
shear_x/y      ``s * 0.3 f`` (tangent), about (0, 0)  ±0.3 (16.7°)
translate_x/y  ``s * int(f * S * 10/32)`` pixels      ±10 px
=============  =====================================  ======================

Translation is sized for small images (torchvision's default reaches 150/331 of the side, 14 px
on 32 px images; kentaroy47/vision-transformers-cifar10 reached 47 px, a blank image).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

DEFAULT_OPS: tuple[str, ...] = (
    "identity",
    "autocontrast",
    "equalize",
    "rotate",
    "solarize",
    "color",
    "posterize",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
# timm's "inc1" RandAugment (rand_augment_ops with _RAND_INCREASING_TRANSFORMS): no identity; invert and
# solarize-add; posterize and solarize stronger as m grows; translation relative to the side (0.45 at m = 10).
TIMM_INC1_OPS: tuple[str, ...] = (
    "autocontrast",
    "equalize",
    "invert",
    "rotate",
    "posterize_increasing",
    "solarize_increasing",
    "solarize_add",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x_rel",
    "translate_y_rel",
)
OP_SETS = {"default": DEFAULT_OPS, "timm-inc1": TIMM_INC1_OPS}
OPS: tuple[str, ...] = DEFAULT_OPS + tuple(op for op in TIMM_INC1_OPS if op not in DEFAULT_OPS)  # every op known
GEOMETRIC_OPS = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y", "translate_x_rel",
                           "translate_y_rel"})  # fmt: skip
SIGNED_OPS = frozenset(
    {"rotate", "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
     "translate_x_rel", "translate_y_rel"}
)  # fmt: skip
TRANSLATE_REL_FRACTION = 0.45  # timm's translate_pct: of the side, at m = 10, in fractional pixels
SOLARIZE_ADD_MAX = 110  # timm: added to values below 128, at m = 10
MAX_MAGNITUDE = 10.0
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_ENHANCE = 0.9
MAX_POSTERIZE_DROP_BITS = 4
TRANSLATE_FRACTION = 10.0 / 32.0  # of the image side, at m = 10
CIFAR10_MEAN_UINT8 = (125, 123, 114)  # fill for geometric ops: normalises to about zero


def _per_sample(value: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting over (B, C, H, W)."""
    return value.reshape(value.shape[0], *([1] * (ndim - 1)))


def _check_uint8(img: torch.Tensor) -> None:
    if img.dtype != torch.uint8 or img.ndim != 4:
        raise ValueError(f"expected a uint8 batch of shape (B, C, H, W), got {img.dtype} {tuple(img.shape)}")


# ---------------------------------------------------------------------------------------------
# Pixel ops. Each takes a uint8 batch (B, C, H, W) and per-sample parameters of shape (B,).
# ---------------------------------------------------------------------------------------------


def _blend(img: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``img * f + degenerate * (1 - f)``, clamped and truncated to uint8 (torchvision's ``_blend``)."""
    f = _per_sample(factor.to(torch.float32))
    alpha = _per_sample((1.0 - factor.double()).float())
    # torchvision computes img * f, then adds degenerate * alpha in one fused multiply-add;
    # float64 holds that product exactly, so this rounds once, as the fused op does.
    out = ((img.to(torch.float32) * f).double() + degenerate.double() * alpha.double()).float()
    return out.clamp_(0, 255).to(torch.uint8)


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma as float, floored like torchvision does for integer images: (B, 1, H, W)."""
    r, g, b = img.to(torch.float32).unbind(dim=-3)
    gray = r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)
    return gray.floor_().unsqueeze(-3)


def brightness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale intensities by ``factor`` (per sample)."""
    out = img.to(torch.float32) * _per_sample(factor.to(torch.float32))
    return out.clamp_(0, 255).to(torch.uint8)


def color(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Saturation: blend with the image's grayscale (factor 0: gray, 1: unchanged)."""
    return _blend(img, _grayscale(img), factor)


def contrast(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean gray level of each image."""
    mean = _grayscale(img).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(img, mean, factor)


def sharpness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a 3x3 smoothed image (1s around a 5, /13) inside a 1-pixel border kept as is."""
    C = img.shape[1]
    x = img.to(torch.float32)
    kernel = torch.ones(C, 1, 3, 3, dtype=torch.float32, device=img.device)
    kernel[:, :, 1, 1] = 5.0
    # Integer weights keep the convolution exact; (sum / 13) is never k + 1/2, so its rounding
    # equals the rounding of torchvision's convolution with weights 1/13 and 5/13.
    blurred = (F.conv2d(x, kernel, groups=C) / 13.0).round_()  # (B, C, H-2, W-2)
    inner = x[..., 1:-1, 1:-1]
    keep = _per_sample((1.0 - factor.double()).float())
    out = x.clone()
    # torchvision: inner + keep * (blurred - inner) as one fused multiply-add (see ``_blend``).
    out[..., 1:-1, 1:-1] = (inner.double() + (blurred - inner).double() * keep.double()).float()
    return out.clamp_(0, 255).to(torch.uint8)


def posterize(img: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` most significant bits of each channel value (bits in 0..8)."""
    shift = _per_sample((8 - bits.to(torch.int32)).clamp(0, 8))
    mask = ((255 << shift) & 255).to(torch.uint8)
    return img & mask


def solarize(img: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert every value ``>= threshold`` (per sample)."""
    thr = _per_sample(threshold.to(torch.float32))
    return torch.where(img >= thr, 255 - img, img)


def autocontrast(img: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to the full [0, 255] range."""
    x = img.to(torch.float32)
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(hi), (hi - lo) * (1.0 / 255.0))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) / scale).clamp_(0, 255).to(torch.uint8)


def equalize(img: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel of each image, with PIL's lookup table."""
    B, C, H, W = img.shape
    flat = img.reshape(B * C, H * W).to(torch.int64)
    hist = torch.zeros(B * C, 256, dtype=torch.int32, device=img.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.int32))
    cum = hist.cumsum(dim=1, dtype=torch.int32)
    last_nonzero = cum.argmax(dim=1, keepdim=True)  # first index reaching the total count
    step = (H * W - hist.gather(1, last_nonzero)).div(255, rounding_mode="floor")  # (BC, 1)
    lut = (cum[:, :-1] + step // 2).div(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], dim=1).to(torch.uint8)  # (BC, 256)
    out = lut.gather(1, flat).reshape(B, C, H, W)
    return torch.where(step.reshape(B, C, 1, 1).ne(0), out, img)  # a flat channel stays as is


# ---------------------------------------------------------------------------------------------
# Geometric ops: one per-sample inverse affine matrix, one grid_sample for the batch.
# ---------------------------------------------------------------------------------------------


def inverse_affine_matrix(
    angle: torch.Tensor,
    translate: tuple[torch.Tensor, torch.Tensor],
    shear: tuple[torch.Tensor, torch.Tensor],
    center: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Per-sample inverse of ``T * C * R(angle) * Shear * C^-1`` as torchvision builds it: (B, 2, 3).

    Angles and shears in degrees, all arguments of shape (B,), ``center`` relative to the image
    centre (torchvision's convention inside ``affine_image``). Computed in float64.
    """
    rot = torch.deg2rad(angle.double())
    sx, sy = torch.deg2rad(shear[0].double()), torch.deg2rad(shear[1].double())
    cx, cy = center[0].double(), center[1].double()
    tx, ty = translate[0].double(), translate[1].double()
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a  # det [[a, b], [c, d]] == 1
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).reshape(-1, 2, 3)


def affine(
    img: torch.Tensor,
    matrix: torch.Tensor,
    interpolation: str = "nearest",
    fill: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Warp each image of a uint8 batch by its own inverse affine ``matrix`` (B, 2, 3), as
    torchvision's ``affine_image`` does for one image: pixel-centred grid, ``grid_sample`` with
    zero padding, then areas from outside the image set to ``fill`` (zeros when ``None``)."""
    B, C, H, W = img.shape
    dev = img.device
    theta = matrix.to(torch.float32) / torch.tensor([[0.5 * W], [0.5 * H]], dtype=torch.float32, device=dev)
    # Pixel-centred coordinates of the output grid, relative to the image centre.
    xs = torch.linspace((1.0 - W) * 0.5, (W - 1.0) * 0.5, steps=W, device=dev).view(1, 1, W)
    ys = torch.linspace((1.0 - H) * 0.5, (H - 1.0) * 0.5, steps=H, device=dev).view(1, H, 1)
    t = theta.view(B, 6, 1, 1)
    grid = torch.stack(
        [xs * t[:, 0] + ys * t[:, 1] + t[:, 2], xs * t[:, 3] + ys * t[:, 4] + t[:, 5]], dim=-1
    )  # (B, H, W, [x, y]) in grid_sample's [-1, 1] units
    x = img.to(torch.float32)
    if fill is not None:
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    x = F.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    if fill is not None:
        x, mask = x[:, :-1], x[:, -1:].expand(-1, C, -1, -1)
        fill_img = torch.tensor([float(v) for v in fill], dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        if interpolation == "nearest":
            x = torch.where(mask < 0.5, fill_img.expand_as(x), x)
        else:
            x = (x - fill_img) * mask + fill_img
    return x.round_().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# RandAugment
# ---------------------------------------------------------------------------------------------


class RandAugment:
    """Batched RandAugment: every sample draws its own ``num_ops`` ops and magnitude.

    Args:
        num_ops: ops applied in sequence to each sample (N).
        magnitude: M on the [0, 10] scale of the module docstring's table.
        magnitude_std: per-sample Gaussian noise on M (timm's ``mstd``); 0 for a fixed M.
        prob: probability that each drawn op is applied (timm's ``p``, 0.5 in its ``rand-m9-mstd0.5``);
            a skipped op leaves the sample as it is. 1.0 applies all ``num_ops``.
        ops: the op names to draw from (a subset of ``OPS``).
        interpolation: ``"nearest"`` (torchvision's default) or ``"bilinear"``.
        fill: per-channel value for areas moved in from outside the image.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        prob: float = 1.0,
        ops: Sequence[str] = DEFAULT_OPS,
        interpolation: str = "nearest",
        fill: Sequence[float] = CIFAR10_MEAN_UINT8,
    ):
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be a non-negative integer, got {num_ops!r}")
        if not isinstance(magnitude, (int, float)) or not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"magnitude must be in [0, {MAX_MAGNITUDE:g}], got {magnitude!r}")
        if not isinstance(magnitude_std, (int, float)) or magnitude_std < 0:
            raise ValueError(f"magnitude_std must be >= 0, got {magnitude_std!r}")
        if not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}")
        unknown = [op for op in ops if op not in OPS]
        if unknown or not ops:
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got unknown {unknown!r}")
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
        self.num_ops = num_ops
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.prob = float(prob)
        self.ops = tuple(ops)
        self.interpolation = interpolation
        self.fill = tuple(float(v) for v in fill)

    def __repr__(self) -> str:
        return (
            f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
            f"magnitude_std={self.magnitude_std}, prob={self.prob}, ops={len(self.ops)}, "
            f"interpolation={self.interpolation!r})"
        )

    def __call__(self, img: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_uint8(img)
        for _ in range(self.num_ops):
            op, level, sign = self.draw(img.shape[0], img.device, generator)
            img = self.apply(img, op, level, sign)
        return img

    def draw(self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None):
        """One layer's random choices: op index (B,), level f = m/10 in [0, 1] (B,), sign ±1 (B,).
        A sample whose op is skipped (probability ``1 - prob``) gets op index -1, which matches no op."""
        op = torch.randint(len(self.ops), (batch,), device=device, generator=generator)
        if self.prob < 1:
            op = torch.where(torch.rand(batch, device=device, generator=generator) < self.prob, op, -1)
        m = torch.full((batch,), self.magnitude, device=device)
        if self.magnitude_std > 0:
            m = m + self.magnitude_std * torch.randn(batch, device=device, generator=generator)
        level = m.clamp(0, MAX_MAGNITUDE) / MAX_MAGNITUDE
        sign = torch.where(torch.rand(batch, device=device, generator=generator) < 0.5, -1.0, 1.0)
        return op, level, sign

    def apply(
        self, img: torch.Tensor, op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor, grouped=None
    ) -> torch.Tensor:
        """Apply op ``self.ops[op[i]]`` at ``level[i]``, ``sign[i]`` to sample ``i``, for all i.

        Two ways, with identical results: ``grouped`` gathers the samples of each op and runs the
        op on them only (least work; shapes depend on the data, which costs host syncs on a GPU),
        masked (``grouped=False``) runs every op on the whole batch and keeps each sample's own
        with ``torch.where`` (fixed shapes, no syncs, compilable into a few kernels). The default
        groups on CPU and masks elsewhere or while compiling."""
        if grouped is None:
            grouped = img.device.type == "cpu" and not torch.compiler.is_compiling()
        level = level.double()  # op parameters in float64, as torchvision computes them in Python
        sign = sign.double()
        return self._apply_grouped(img, op, level, sign) if grouped else self._apply_masked(img, op, level, sign)

    def _apply_grouped(self, img, op, level, sign) -> torch.Tensor:
        out = img.clone()
        geometric = self._is_geometric(op)
        idx = geometric.nonzero().squeeze(1)
        if len(idx):  # one warp for the samples of all geometric ops
            out.index_copy_(0, idx, self._warp(img.index_select(0, idx), op[idx], level[idx], sign[idx]))
        for i, name in enumerate(self.ops):
            if name == "identity" or name in GEOMETRIC_OPS:
                continue
            idx = (op == i).nonzero().squeeze(1)
            if len(idx):
                out.index_copy_(0, idx, self._op(name, img.index_select(0, idx), level[idx], sign[idx]))
        return out

    def _apply_masked(self, img, op, level, sign) -> torch.Tensor:
        out = img
        if GEOMETRIC_OPS.intersection(self.ops):
            out = torch.where(_per_sample(self._is_geometric(op)), self._warp(img, op, level, sign), out)
        for i, name in enumerate(self.ops):
            if name != "identity" and name not in GEOMETRIC_OPS:
                out = torch.where(_per_sample(op == i), self._op(name, img, level, sign), out)
        return out

    def _is_geometric(self, op: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(op, dtype=torch.bool)
        for i, name in enumerate(self.ops):
            if name in GEOMETRIC_OPS:
                mask = mask | (op == i)
        return mask

    def _warp(self, img, op, level, sign) -> torch.Tensor:
        """One warp of the whole batch, each sample by its own geometric op (identity for samples
        whose op is not geometric), with the parameters torchvision's RandAugment passes: rotate
        gives the matrix -angle, shears pivot on the top-left corner, translations are whole pixels."""
        H, W = img.shape[-2:]
        zero = torch.zeros_like(level)
        chosen = {name: op == i for i, name in enumerate(self.ops) if name in GEOMETRIC_OPS}

        def only(name: str, value: torch.Tensor) -> torch.Tensor:
            return torch.where(chosen[name], value, zero) if name in chosen else zero

        shear = torch.rad2deg(torch.atan(sign * MAX_SHEAR * level))
        shearing = only("shear_x", zero + 1) + only("shear_y", zero + 1)
        matrix = inverse_affine_matrix(
            angle=only("rotate", -sign * MAX_ROTATE_DEGREES * level),
            translate=(
                only("translate_x", sign * torch.trunc(level * TRANSLATE_FRACTION * W))
                + only("translate_x_rel", sign * level * TRANSLATE_REL_FRACTION * W),
                only("translate_y", sign * torch.trunc(level * TRANSLATE_FRACTION * H))
                + only("translate_y_rel", sign * level * TRANSLATE_REL_FRACTION * H),
            ),
            shear=(only("shear_x", shear), only("shear_y", shear)),
            center=(shearing * (-0.5 * W), shearing * (-0.5 * H)),
        )
        return affine(img, matrix, self.interpolation, self.fill)

    def _op(self, name: str, img: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """Pixel op ``name`` on every sample of ``img`` with per-sample float64 ``level`` and ``sign``
        (geometric ops go through ``_warp``)."""
        enhance = 1.0 + sign * MAX_ENHANCE * level
        if name == "autocontrast":
            return autocontrast(img)
        if name == "equalize":
            return equalize(img)
        if name == "solarize":
            return solarize(img, 255.0 * (1.0 - level))
        if name == "posterize":
            return posterize(img, 8 - torch.round(MAX_POSTERIZE_DROP_BITS * level))
        if name == "color":
            return color(img, enhance)
        if name == "contrast":
            return contrast(img, enhance)
        if name == "brightness":
            return brightness(img, enhance)
        if name == "sharpness":
            return sharpness(img, enhance)
        if name == "identity":
            return img
        if name == "invert":
            return 255 - img
        if name == "posterize_increasing":  # timm: 4 - int(4 f) bits kept, 0 at m = 10
            return posterize(img, MAX_POSTERIZE_DROP_BITS - torch.floor(MAX_POSTERIZE_DROP_BITS * level))
        if name == "solarize_increasing":  # timm: invert values >= 256 - int(256 f)
            return solarize(img, 256.0 - torch.floor(256.0 * level))
        if name == "solarize_add":  # timm: values below 128 raised by int(110 f), saturating at 255
            add = _per_sample(torch.floor(SOLARIZE_ADD_MAX * level)).to(torch.int32)
            return torch.where(img < 128, (img.to(torch.int32) + add).clamp_(max=255).to(torch.uint8), img)
        raise ValueError(f"unknown op {name!r}")


def magnitude_table(magnitude: float = MAX_MAGNITUDE, side: int = 32, ops: Sequence[str] = DEFAULT_OPS) -> dict:
    """Human-readable strength of each of ``ops`` at ``magnitude`` on ``side``-pixel images."""
    f = min(max(magnitude, 0.0), MAX_MAGNITUDE) / MAX_MAGNITUDE
    e = MAX_ENHANCE * f
    table = {
        "identity": "-",
        "autocontrast": "-",
        "equalize": "-",
        "rotate": f"±{MAX_ROTATE_DEGREES * f:.1f}°",
        "solarize": f"threshold {255 * (1 - f):.0f}",
        "color": f"factor {1 - e:.2f} or {1 + e:.2f}",
        "posterize": f"{8 - round(MAX_POSTERIZE_DROP_BITS * f)} bits",
        "contrast": f"factor {1 - e:.2f} or {1 + e:.2f}",
        "brightness": f"factor {1 - e:.2f} or {1 + e:.2f}",
        "sharpness": f"factor {1 - e:.2f} or {1 + e:.2f}",
        "shear_x": f"±{MAX_SHEAR * f:.2f} ({math.degrees(math.atan(MAX_SHEAR * f)):.1f}°)",
        "shear_y": f"±{MAX_SHEAR * f:.2f} ({math.degrees(math.atan(MAX_SHEAR * f)):.1f}°)",
        "translate_x": f"±{int(f * TRANSLATE_FRACTION * side)} px",
        "translate_y": f"±{int(f * TRANSLATE_FRACTION * side)} px",
        "invert": "-",
        "posterize_increasing": f"{4 - int(4 * f)} bits",
        "solarize_increasing": f"threshold {256 - int(256 * f)}",
        "solarize_add": f"+{int(SOLARIZE_ADD_MAX * f)} below 128",
        "translate_x_rel": f"±{TRANSLATE_REL_FRACTION * f * side:.1f} px",
        "translate_y_rel": f"±{TRANSLATE_REL_FRACTION * f * side:.1f} px",
    }
    return {op: table[op] for op in ops}
