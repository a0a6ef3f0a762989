"""Backbones: transformer velocity models with per-token timestep conditioning."""
from selfflow.components.backbones.dit import DiT, DiTBlock, FinalLayer
from selfflow.components.backbones.embeddings import (
    LabelEmbedder,
    TimestepEmbedder,
    sincos_position_embedding,
)
from selfflow.components.backbones.sizes import DIT_SIZES, DiTSize, count_parameters, dit_from_size, dit_size

__all__ = [
    "DIT_SIZES",
    "DiT",
    "DiTBlock",
    "DiTSize",
    "FinalLayer",
    "LabelEmbedder",
    "TimestepEmbedder",
    "count_parameters",
    "dit_from_size",
    "dit_size",
    "sincos_position_embedding",
]
