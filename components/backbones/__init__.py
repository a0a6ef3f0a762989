"""Backbones: transformer velocity models with per-token timestep conditioning."""
from selfflow.components.backbones.dit import DiT, DiTBlock, FinalLayer, TokenRoute
from selfflow.components.backbones.embeddings import (
    LabelEmbedder,
    TimestepEmbedder,
    sincos_position_embedding,
)
from selfflow.components.backbones.multimodal import MultiModalDiT, modality_layouts
from selfflow.components.backbones.sizes import DIT_SIZES, DiTSize, count_parameters, dit_from_size, dit_size

__all__ = [
    "DIT_SIZES",
    "DiT",
    "DiTBlock",
    "DiTSize",
    "FinalLayer",
    "LabelEmbedder",
    "MultiModalDiT",
    "TimestepEmbedder",
    "TokenRoute",
    "count_parameters",
    "dit_from_size",
    "dit_size",
    "modality_layouts",
    "sincos_position_embedding",
]
