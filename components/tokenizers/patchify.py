"""Patchify: a (B, C, *spatial) latent <-> (B, N, C * prod(patch)) token sequence.

Works for 1-D (audio), 2-D (image) and 3-D (video) latents. Tokens are ordered
row-major over the patch grid; each token's features are (C, *patch) flattened.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class Patchify:
    def __init__(self, latent_shape: Sequence[int], patch_size: int | Sequence[int]):
        latent_shape = tuple(int(d) for d in latent_shape)
        if len(latent_shape) not in (2, 3, 4):
            raise ValueError(f"latent_shape must be (C, T), (C, H, W) or (C, F, H, W), got {latent_shape}")
        spatial = latent_shape[1:]
        patch = (int(patch_size),) * len(spatial) if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        if len(patch) != len(spatial):
            raise ValueError(f"patch_size {patch} does not match the {len(spatial)}-D latent {latent_shape}")
        for size, p in zip(spatial, patch):
            if p <= 0 or size % p:
                raise ValueError(f"patch size {p} must be positive and divide the latent size {size} ({latent_shape})")
        self.latent_shape = latent_shape
        self.patch = patch
        self.grid = tuple(size // p for size, p in zip(spatial, patch))
        self.token_dim = latent_shape[0] * math.prod(patch)
        self.token_shape = (math.prod(self.grid), self.token_dim)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected latents of shape (B, {self.latent_shape}), got {tuple(latents.shape)}")
        batch, channels, dims = latents.shape[0], self.latent_shape[0], len(self.grid)
        # (B, C, g1, p1, g2, p2, ...) -> (B, g1, g2, ..., C, p1, p2, ...)
        split = [batch, channels]
        for g, p in zip(self.grid, self.patch):
            split += [g, p]
        x = latents.reshape(split)
        grid_axes = [2 + 2 * i for i in range(dims)]
        patch_axes = [3 + 2 * i for i in range(dims)]
        x = x.permute(0, *grid_axes, 1, *patch_axes)
        return x.reshape(batch, self.token_shape[0], self.token_dim)

    def inverse(self, tokens: torch.Tensor) -> torch.Tensor:
        if tuple(tokens.shape[1:]) != self.token_shape:
            raise ValueError(f"expected tokens of shape (B, {self.token_shape}), got {tuple(tokens.shape)}")
        batch, channels, dims = tokens.shape[0], self.latent_shape[0], len(self.grid)
        x = tokens.reshape(batch, *self.grid, channels, *self.patch)
        # (B, g1, g2, ..., C, p1, p2, ...) -> (B, C, g1, p1, g2, p2, ...)
        order = [0, 1 + dims]
        for i in range(dims):
            order += [1 + i, 2 + dims + i]
        return x.permute(order).reshape(batch, *self.latent_shape)

    def tokens_to_grid_values(self, per_token: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-token value (B, N) onto the latent layout (B, C, *spatial)."""
        expanded = per_token[..., None].expand(*per_token.shape, self.token_dim)
        return self.inverse(expanded)
