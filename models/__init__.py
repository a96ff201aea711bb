"""Models: the DyT Vision Transformer (LayerNorm through the same class)."""

from models.dyt import (
    Attention,
    Block,
    DropPath,
    DynamicTanh,
    Mlp,
    ViT,
    alphas,
    attention_entropy,
    attention_maps,
    count_parameters,
    diagonal_attention_mass,
    gains,
    norm_inputs,
    scale_mimetic_to_inputs_,
)

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "DynamicTanh",
    "Mlp",
    "ViT",
    "alphas",
    "attention_entropy",
    "attention_maps",
    "count_parameters",
    "diagonal_attention_mass",
    "gains",
    "norm_inputs",
    "scale_mimetic_to_inputs_",
]
