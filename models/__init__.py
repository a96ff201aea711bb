"""Models: the DyT Vision Transformer (LayerNorm through the same class)."""

from models.dyt import Attention, Block, DropPath, DynamicTanh, Mlp, ViT, alphas, count_parameters, make_norm_factory

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "DynamicTanh",
    "Mlp",
    "ViT",
    "alphas",
    "count_parameters",
    "make_norm_factory",
]
