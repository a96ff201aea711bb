"""A Vision Transformer for 32x32 images whose normalisation layers are Dynamic Tanh.

Dynamic Tanh (DyT; Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization", CVPR 2025,
arXiv 2503.10622) replaces every LayerNorm with an element-wise

    DyT(x) = weight * tanh(alpha * x) + bias

where ``alpha`` is one learnable scalar (init 0.5 for ViTs) and ``weight``/``bias`` are the usual
per-channel affine parameters. The norm is injected, so the same ``ViT`` class builds the
LayerNorm baseline (``norm="ln"``) with a LayerNorm exactly where the DyT model has a DyT: two per
block plus the final one.

Read top-down: DynamicTanh -> DropPath -> Attention -> Mlp -> Block -> ViT.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[int], nn.Module]
NormSpec = Union[str, NormFactory]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


class DynamicTanh(nn.Module):
    """``weight * tanh(alpha * x) + bias`` over the last dimension: a drop-in for ``nn.LayerNorm``.

    Args:
        dim: size of the last dimension (what ``nn.LayerNorm(dim)`` would be given).
        alpha_init: initial value of the learnable scalar ``alpha``; must be > 0. The paper uses
            0.5 for ViTs.
    """

    def __init__(self, dim: int, alpha_init: float = 0.5):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        if isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float)) or not alpha_init > 0:
            raise ValueError(f"alpha_init must be a number > 0, got {alpha_init!r}")
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.full((1,), self.alpha_init))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha_init={self.alpha_init}"


def make_norm_factory(norm: NormSpec, alpha_init: float = 0.5) -> NormFactory:
    """Turn ``"dyt"``, ``"ln"`` or a callable ``dim -> nn.Module`` into a norm factory."""
    if callable(norm):
        return norm
    if norm == "dyt":
        if isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float)) or not alpha_init > 0:
            raise ValueError(f"alpha_init must be a number > 0, got {alpha_init!r}")
        return lambda dim: DynamicTanh(dim, alpha_init=alpha_init)
    if norm == "ln":
        return lambda dim: nn.LayerNorm(dim)
    raise ValueError(f"norm must be 'dyt', 'ln' or a callable dim -> nn.Module, got {norm!r}")


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability ``p`` (training only).

    Args:
        p: drop probability in (0, 1). Use ``nn.Identity`` instead for p = 0.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _drop_path(p: float) -> nn.Module:
    return DropPath(p) if p > 0 else nn.Identity()


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    Args:
        dim: token width; must be divisible by ``heads``.
        heads: number of attention heads.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = _dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, with optional dropout after each.

    Args:
        dim: token width.
        hidden: hidden width.
        drop: dropout probability.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = _dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = _dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Args:
        dim: token width.
        heads: attention heads.
        mlp_hidden: MLP hidden width.
        norm_factory: builds the two norms (DyT or LayerNorm).
        drop_path: stochastic-depth probability of this block.
        dropout: dropout in attention projection and MLP.
        attn_dropout: dropout on attention weights.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_hidden: int,
        norm_factory: NormFactory,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = norm_factory(dim)
        self.attn = Attention(dim, heads, attn_drop=attn_dropout, proj_drop=dropout)
        self.drop_path1 = _drop_path(drop_path)
        self.norm2 = norm_factory(dim)
        self.mlp = Mlp(dim, mlp_hidden, drop=dropout)
        self.drop_path2 = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))  # (B, N, D)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class ViT(nn.Module):
    """Vision Transformer for small images with an injected norm (DyT by default).

    Args:
        img_size: side of the square input image; must be divisible by ``patch_size``.
        patch_size: side of a square patch (4 on 32x32 gives 64 tokens plus the cls token).
        in_chans: input channels.
        num_classes: output classes.
        dim: token width; must be divisible by ``heads``.
        depth: number of blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        norm: ``"dyt"``, ``"ln"`` or a callable ``dim -> nn.Module``.
        alpha_init: DyT's initial alpha (used with ``norm="dyt"``); must be > 0.
        drop_path: stochastic depth of the last block, rising linearly from 0 in the first.
        dropout: dropout after the embedding, in the attention projection and the MLP.
        attn_dropout: dropout on the attention weights.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        dim: int = 384,
        depth: int = 6,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        norm: NormSpec = "dyt",
        alpha_init: float = 0.5,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in [
            ("img_size", img_size),
            ("patch_size", patch_size),
            ("in_chans", in_chans),
            ("num_classes", num_classes),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
        ]:
            _positive_int(name, value)
        if img_size % patch_size:
            raise ValueError(
                f"img_size must be divisible by patch_size, got img_size={img_size}, patch_size={patch_size}"
            )
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        drop_path = _probability("drop_path", drop_path)
        dropout = _probability("dropout", dropout)
        attn_dropout = _probability("attn_dropout", attn_dropout)
        norm_factory = make_norm_factory(norm, alpha_init)

        self.num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        self.pos_drop = _dropout(dropout)
        mlp_hidden = int(round(dim * mlp_ratio))
        rates = [drop_path * i / (depth - 1) if depth > 1 else drop_path for i in range(depth)]
        self.blocks = nn.Sequential(
            *[
                Block(dim, heads, mlp_hidden, norm_factory, drop_path=r, dropout=dropout, attn_dropout=attn_dropout)
                for r in rates
            ]
        )
        self.norm = norm_factory(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # timm's ViT: truncated normal (std 0.02) for linear weights, zero biases. The patch
        # embedding is a linear map on flattened patches, so it gets the same.
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters with ndim >= 2 that must not be weight-decayed."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N+1, D)
        x = self.blocks(self.pos_drop(x))
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)  # (B, N+1, D)
        return self.head(x[:, 0])  # (B, num_classes)


def alphas(model: nn.Module) -> dict[str, float]:
    """Current alpha of every DynamicTanh in ``model``, keyed by module name (empty for LayerNorm)."""
    model = getattr(model, "_orig_mod", model)
    found = [(name, m.alpha) for name, m in model.named_modules() if isinstance(m, DynamicTanh)]
    if not found:
        return {}
    values = torch.cat([a.detach().float().reshape(1) for _, a in found]).tolist()  # one host sync
    return {name: v for (name, _), v in zip(found, values)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "DynamicTanh",
    "DropPath",
    "Attention",
    "Mlp",
    "Block",
    "ViT",
    "make_norm_factory",
    "alphas",
    "count_parameters",
]
