"""A Vision Transformer for 32x32 images whose normalisation layers are Dynamic Tanh.

Dynamic Tanh (DyT; Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization", CVPR 2025,
arXiv 2503.10622) replaces every LayerNorm with an element-wise

    DyT(x) = weight * tanh(alpha * x) + bias

where ``alpha`` is one learnable scalar (init 0.5 for ViTs) and ``weight``/``bias`` are the usual
per-channel affine parameters. The norm is injected, so the same ``ViT`` class builds the
LayerNorm baseline (``norm_layer=nn.LayerNorm``) with a LayerNorm exactly where the DyT model has a DyT: two per
block plus the final one.

Read top-down: DynamicTanh -> DropPath -> Attention -> Mlp -> Block -> ViT.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_STYLES = ("prenorm", "cct")
POOLS = ("cls", "gap", "seq")
PATCH_EMBED_INITS = ("trunc_normal", "pytorch", "kaiming_normal")
EMBED_INITS = ("timm", "cct")
NormLayer = Callable[[int], nn.Module]  # dim -> norm module, e.g. nn.LayerNorm or partial(DynamicTanh, ...)


class DynamicTanh(nn.Module):
    """``weight * tanh(alpha * x) + bias`` over the last dimension: a drop-in for ``nn.LayerNorm``.

    Args:
        dim: size of the last dimension (what ``nn.LayerNorm(dim)`` would be given).
        alpha_init: initial value of the learnable scalar ``alpha``; must be > 0. The paper uses
            0.5 for ViTs.
    """

    def __init__(self, dim: int, alpha_init: float = 0.5):
        super().__init__()
        assert dim > 0 and alpha_init > 0, (dim, alpha_init)
        self.dim = dim
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.full((1,), self.alpha_init))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha_init={self.alpha_init}"


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
        qkv_bias: a bias on the query, key and value projections (Compact Transformers have none).
    """

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0, qkv_bias: bool = True):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = _dropout(proj_drop)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (B, N, D) -> queries, keys and values, each (B, heads, N, head_dim)."""
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights (B, heads, N, N) that ``forward`` applies to tokens ``x`` (without dropout)."""
        q, k, _ = self.split_heads(x)
        return (q @ k.transpose(-1, -2) / self.head_dim**0.5).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.split_heads(x)  # each (B, H, N, Dh)
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
    """Transformer block. ``"prenorm"`` (timm's ViT): ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.
    ``"cct"`` (Compact Transformers' encoder layer): ``x = norm2(x + attn(norm1(x)))`` then ``x + mlp(x)``,
    the second norm on the residual stream itself.

    Args:
        dim: token width.
        heads: attention heads.
        mlp_hidden: MLP hidden width.
        norm_layer: builds the two norms (DyT or LayerNorm) from the width.
        drop_path: stochastic-depth probability of this block.
        dropout: dropout in attention projection and MLP.
        attn_dropout: dropout on attention weights.
        qkv_bias: a bias on the query, key and value projections.
        style: ``"prenorm"`` or ``"cct"`` (see above).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_hidden: int,
        norm_layer: NormLayer,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        qkv_bias: bool = True,
        style: str = "prenorm",
    ):
        super().__init__()
        assert style in BLOCK_STYLES, style
        self.style = style
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, heads, attn_drop=attn_dropout, proj_drop=dropout, qkv_bias=qkv_bias)
        self.drop_path1 = _drop_path(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_hidden, drop=dropout)
        self.drop_path2 = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))  # (B, N, D)
        if self.style == "cct":
            x = self.norm2(x)
            return x + self.drop_path2(self.mlp(x))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


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
        norm_layer: the norm, as a callable ``dim -> nn.Module``: ``nn.LayerNorm`` or
            ``functools.partial(DynamicTanh, alpha_init=0.5)`` (the default).
        drop_path: stochastic depth of the last block, rising linearly from 0 in the first.
        dropout: dropout after the embedding, in the attention projection and the MLP.
        attn_dropout: dropout on the attention weights.
        pool: ``"cls"`` (a cls token, read by the head), ``"gap"`` (no cls token; the head reads the
            mean of the final-norm tokens) or ``"seq"`` (no cls token; sequence pooling of Compact
            Transformers: a softmax over tokens of a learned linear score weights their mean).
        attn_init: ``"default"`` (timm's truncated normal) or ``"mimetic"`` (``mimetic_init_``).
        patch_embed_init: ``"trunc_normal"`` (std 0.02 and a zero bias, like the linear layers),
            ``"pytorch"`` (``nn.Conv2d``'s own init, which timm's ViT and the DyT code leave alone:
            weights uniform with std 1/sqrt(3 * fan_in), about 4x larger tokens at patch 4) or
            ``"kaiming_normal"`` (Compact Transformers' tokenizer: He-normal weights, the bias at
            PyTorch's init).
        qkv_bias: a bias on the query, key and value projections.
        block_style: ``"prenorm"`` or ``"cct"`` (``Block``).
        embed_init: ``"timm"`` (positional embedding and cls token truncated normal, std 0.02) or
            ``"cct"`` (positional embedding std 0.2, cls token zeros).
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
        norm_layer: NormLayer = DynamicTanh,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        pool: str = "cls",
        attn_init: str = "default",
        patch_embed_init: str = "trunc_normal",
        qkv_bias: bool = True,
        block_style: str = "prenorm",
        embed_init: str = "timm",
    ):
        super().__init__()
        assert pool in POOLS and attn_init in ("default", "mimetic"), (pool, attn_init)
        assert patch_embed_init in PATCH_EMBED_INITS and embed_init in EMBED_INITS, (patch_embed_init, embed_init)
        self.patch_embed_init = patch_embed_init
        assert img_size % patch_size == 0 and dim % heads == 0 and mlp_ratio > 0, (img_size, patch_size, dim, heads)
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.pool = pool
        self.num_prefix_tokens = 1 if pool == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + self.num_prefix_tokens, dim))
        self.pos_drop = _dropout(dropout)
        mlp_hidden = int(round(dim * mlp_ratio))
        rates = [drop_path * i / (depth - 1) if depth > 1 else drop_path for i in range(depth)]
        self.blocks = nn.Sequential(
            *[Block(dim, heads, mlp_hidden, norm_layer, r, dropout, attn_dropout, qkv_bias, block_style) for r in rates]
        )
        self.norm = norm_layer(dim)
        self.attention_pool = nn.Linear(dim, 1) if pool == "seq" else None  # a score per token
        self.head = nn.Linear(dim, num_classes)
        self.apply(self._init_weights)
        if patch_embed_init == "kaiming_normal":
            nn.init.kaiming_normal_(self.patch_embed.weight)
        nn.init.trunc_normal_(self.pos_embed, std=0.2 if embed_init == "cct" else 0.02)
        if self.cls_token is not None and embed_init == "timm":  # "cct" leaves it at zeros
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if attn_init == "mimetic":
            for block in self.blocks:
                mimetic_init_(block.attn)

    def _init_weights(self, m: nn.Module) -> None:
        # timm's ViT: truncated normal (std 0.02) for linear weights, zero biases. The patch embedding
        # is a linear map on flattened patches: the same, unless it keeps PyTorch's own init.
        trunc = (nn.Linear, nn.Conv2d) if self.patch_embed_init == "trunc_normal" else nn.Linear
        if isinstance(m, trunc):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters with ndim >= 2 that must not be weight-decayed."""
        return {"pos_embed", "cls_token"} if self.cls_token is not None else {"pos_embed"}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the tokens the first block sees (B, N+prefix, D)."""
        x = self.patch_embed(x)  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N+1, D)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)  # (B, N+prefix, D)
        if self.pool == "seq":
            weights = F.softmax(self.attention_pool(x), dim=1)  # (B, N, 1)
            x = (weights.transpose(1, 2) @ x).squeeze(1)  # (B, D)
        else:
            x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)  # (B, D)
        return self.head(x)  # (B, num_classes)


# Mimetic initialization (Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers",
# ICML 2023, arXiv 2305.09828): attention starts out mixing tokens the way trained attention does.
MIMETIC_QK = (0.7, 0.7)  # (alpha1, beta1): W_q^T W_k ~ alpha1 * Z + beta1 * I
MIMETIC_VO = (0.4, 0.4)  # (alpha2, beta2): the value-output map ~ alpha2 * Z - beta2 * I


def _factor(dim: int, alpha: float, beta: float, rank: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """L (dim, rank), R (rank, dim) with L @ R the best rank-``rank`` approximation of
    ``alpha * Z + beta * I``, Z having i.i.d. N(0, 1/dim) entries (singular values split evenly)."""
    z = torch.randn(dim, dim, generator=generator) / math.sqrt(dim)
    u, s, vh = torch.linalg.svd(alpha * z + beta * torch.eye(dim))
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def mimetic_init_(attn: Attention, qk=MIMETIC_QK, vo=MIMETIC_VO, generator=None) -> None:
    """Set ``attn``'s weights so that, per head h, W_q[h]^T W_k[h] ~ alpha1 Z + beta1 I (each token
    attends to itself and similar tokens) and the value-output map W_o W_v ~ alpha2 Z - beta2 I,
    as ``nn.Linear`` maps x -> x W^T. Biases are zeroed."""
    dim, k = attn.proj.in_features, attn.head_dim
    q, kk, v = attn.qkv.weight.view(3, dim, dim).unbind(0)  # each (out = heads * k, in = dim)
    for h in range(attn.heads):
        left, right = _factor(dim, *qk, k, generator)  # left @ right ~ A1
        q[h * k : (h + 1) * k] = left.T.to(q.dtype)  # W_q[h]^T W_k[h] = left @ right
        kk[h * k : (h + 1) * k] = right.to(kk.dtype)
    left, right = _factor(dim, vo[0], -vo[1], dim, generator)  # left @ right ~ A2
    v.copy_(left.T)  # the map x -> x W_v^T W_o^T has matrix W_v^T W_o^T = left @ right
    attn.proj.weight.copy_(right.T)
    attn.qkv.bias.zero_()
    attn.proj.bias.zero_()


@torch.no_grad()
def scale_mimetic_to_inputs_(model: ViT, images: torch.Tensor) -> list[float]:
    """Fit mimetic init to the size of what attention sees. Its constants assume inputs of unit RMS,
    which LayerNorm gives; DyT's outputs follow its inputs (about 0.07 RMS at init), so the query-key
    logits come out ``r**2`` times smaller (r: the RMS of the block's first norm output) and attention
    stays uniform. Each block's W_q and W_k are divided by its r, measured on ``images`` (normalised,
    passed through the blocks before it), so W_q^T W_k gives the logits LayerNorm's inputs would.
    The value-output half is left as it is. Returns r per block."""
    was_training = model.training
    model.eval()
    tokens = model.embed(images)
    scales = []
    for block in model.blocks:
        r = block.norm1(tokens).float().pow(2).mean().sqrt().item()
        dim = block.attn.proj.in_features
        block.attn.qkv.weight[: 2 * dim] /= r  # the query and key rows
        scales.append(r)
        tokens = block(tokens)
    model.train(was_training)
    return scales


@torch.no_grad()
def attention_maps(model: ViT, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention weights, (B, heads, N, N) each, on normalised ``images``, computed with the
    model in eval mode (its mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        tokens, maps = model.embed(images), []
        for block in model.blocks:
            maps.append(block.attn.weights(block.norm1(tokens)))
            tokens = block(tokens)
    finally:
        model.train(was_training)
    return maps


def diagonal_attention_mass(model: ViT, images: torch.Tensor, block: int = 0) -> float:
    """Mean attention weight of each token on itself in ``block`` (uniform attention: 1 / tokens), with
    the model in eval mode: how much mimetic init's identity part shows in the attention maps."""
    return attention_maps(model, images)[block].diagonal(dim1=-2, dim2=-1).mean().item()


def attention_entropy(model: ViT, images: torch.Tensor) -> list[float]:
    """Per block, the mean entropy of a query's attention over the tokens, as a fraction of the uniform
    distribution's log(N): 1.0 is attention spread evenly, 0.0 every query on a single token."""
    entropies = []
    for weights in attention_maps(model, images):
        nats = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()
        entropies.append((nats / math.log(weights.shape[-1])).item())
    return entropies


@torch.no_grad()
def norm_inputs(model: nn.Module, images: torch.Tensor, saturation: float = 2.0) -> dict[str, dict[str, float]]:
    """What each norm sees and hands on, on normalised ``images`` (eval mode), keyed by module name:
    ``rms_in`` and ``rms_out``, the RMS of its input and output, and ``squashed``, for DyT the fraction of
    inputs with ``|alpha * x| > saturation``, where tanh's slope is under ``1 - tanh(saturation)**2``
    (0.07 at 2): the share DyT squashes rather than passes on (NaN for LayerNorm)."""
    found, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (DynamicTanh, nn.LayerNorm)):

            def record(module, args, output, name=name):
                x = args[0].float()
                squashed = math.nan
                if isinstance(module, DynamicTanh):
                    squashed = (module.alpha.float() * x).abs().gt(saturation).float().mean().item()
                rms_out = output.float().pow(2).mean().sqrt().item()
                found[name] = {"rms_in": x.pow(2).mean().sqrt().item(), "rms_out": rms_out, "squashed": squashed}

            hooks.append(m.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def gains(model: nn.Module) -> dict[str, float]:
    """How much each norm scales a small input, keyed by module name: for DyT the mean of
    ``|weight| * alpha`` (its slope at 0), for LayerNorm the mean ``|weight|``. A DyT whose alpha
    collapsed to 0 has gain 0: it passes on only its bias."""
    model = getattr(model, "_orig_mod", model)
    found = []
    for name, m in model.named_modules():
        if isinstance(m, DynamicTanh):
            found.append((name, (m.weight.detach().float().abs() * m.alpha.detach().float()).mean()))
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            found.append((name, m.weight.detach().float().abs().mean()))
    values = torch.stack([g for _, g in found]).tolist() if found else []  # one host sync
    return {name: v for (name, _), v in zip(found, values)}


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
    "mimetic_init_",
    "scale_mimetic_to_inputs_",
    "attention_maps",
    "diagonal_attention_mass",
    "attention_entropy",
    "norm_inputs",
    "gains",
    "alphas",
    "count_parameters",
]
