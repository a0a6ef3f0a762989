"""Pixel tokenizer: affine normalisation then patchify (no learned weights)."""
from __future__ import annotations

from typing import Sequence

import torch

from selfflow.components.tokenizers.patchify import Patchify


class PixelTokenizer:
    """Raw data in [low, high] -> tokens in roughly [-1, 1].

    Owns its normalisation: x_norm = (x - shift) / scale with shift, scale chosen
    from the declared data range, so decode inverts encode exactly.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        patch_size: int | Sequence[int] = 2,
        data_range: tuple[float, float] = (0.0, 1.0),
    ):
        low, high = (float(v) for v in data_range)
        if not high > low:
            raise ValueError(f"data_range must be (low, high) with high > low, got {data_range}")
        self.patchify = Patchify(data_shape, patch_size)
        self.latent_shape = self.patchify.latent_shape
        self.token_shape = self.patchify.token_shape
        self.grid = self.patchify.grid
        self.data_range = (low, high)
        self._shift = (low + high) / 2
        self._scale = (high - low) / 2

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.patchify((x.float() - self._shift) / self._scale)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.patchify.inverse(tokens) * self._scale + self._shift

    def __repr__(self) -> str:
        return f"PixelTokenizer(latent_shape={self.latent_shape}, patch={self.patchify.patch}, range={self.data_range})"
