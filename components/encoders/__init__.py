"""Frozen external encoders for REPA: images -> patch features on a token grid.

Protocol (structural): `grid` (grid_h, grid_w), `feature_dim` C, and
`encode_patches(images (B, C_in, H, W)) -> (B, grid_h * grid_w, C)` with patches
in row-major order. Each encoder owns its input normalisation and resizing.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from selfflow.components.encoders.digit_encoder import (
    DIGIT_ENCODER_SIZES,
    DigitEncoder,
    fit_digit_encoder,
    load_digit_encoder,
)
from selfflow.components.encoders.timm_encoder import TimmEncoder


@runtime_checkable
class PatchEncoder(Protocol):
    grid: tuple[int, ...]
    feature_dim: int

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor: ...


__all__ = ["DIGIT_ENCODER_SIZES", "DigitEncoder", "PatchEncoder", "TimmEncoder", "fit_digit_encoder",
           "load_digit_encoder"]
