"""Latent tokenizers: normalisation of autoencoder latents, and tokens over pre-encoded latents.

`LatentNormalization` is the one place the latent scale is defined:
    z_norm = ((z - latent_mean) / latent_std - shift_factor) * scaling_factor
with per-channel `latent_mean` / `latent_std` (default 0 / 1) and scalar
`shift_factor` / `scaling_factor` (diffusers' convention: SD-VAE uses shift 0 and
scale 0.18215). Give per-channel statistics with scaling 1 and shift 0 for
unit-variance latents; the two kinds compose and neither is ever ignored.

`LatentTokenizer` serves experiments that read latents pre-encoded by
`selfflow data images` (the shards hold the autoencoder's raw, unnormalised
latents). encode(latents) = patchify(normalise(latents)). decode(tokens) gives the
raw latents back, or, when a `decoder` (an autoencoder tokenizer with
`decode_latents`) is attached, the decoded images: that is what sample grids and
REPA's image encoder need. Without explicit statistics the tokenizer takes the
decoder's normalisation, so the autoencoder stays the owner of its latent scale.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from selfflow.components.tokenizers.patchify import Patchify


def _channel_values(name: str, values: Sequence[float] | None, channels: int, default: float) -> torch.Tensor:
    if values is None:
        return torch.full((channels,), default, dtype=torch.float32, device="cpu")
    result = torch.as_tensor(values, dtype=torch.float32, device="cpu").flatten()
    if result.numel() == 1:
        result = result.expand(channels).clone()
    if result.numel() != channels:
        raise ValueError(f"{name} must have 1 or {channels} values (one per latent channel), got {list(values)}")
    if not torch.isfinite(result).all():
        raise ValueError(f"{name} must be finite, got {result.tolist()}")
    return result


class LatentNormalization:
    """z_norm = ((z - latent_mean) / latent_std - shift_factor) * scaling_factor, channel axis 1."""

    def __init__(
        self,
        channels: int,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        latent_mean: Sequence[float] | None = None,
        latent_std: Sequence[float] | None = None,
    ) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        for name, value in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if scaling_factor == 0:
            raise ValueError("scaling_factor must be non-zero (decode divides by it)")
        self.channels = channels
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.mean = _channel_values("latent_mean", latent_mean, channels, 0.0)
        self.std = _channel_values("latent_std", latent_std, channels, 1.0)
        if not (self.std > 0).all():
            raise ValueError(f"latent_std must be positive, got {self.std.tolist()}")

    def _per_channel(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() < 2 or like.shape[1] != self.channels:
            raise ValueError(f"expected latents (B, {self.channels}, ...), got {tuple(like.shape)}")
        shape = (1, self.channels) + (1,) * (like.dim() - 2)
        return values.to(device=like.device, dtype=like.dtype).view(shape)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._per_channel(self.mean, latents), self._per_channel(self.std, latents)
        return ((latents - mean) / std - self.shift_factor) * self.scaling_factor

    def denormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        mean, std = self._per_channel(self.mean, normalized), self._per_channel(self.std, normalized)
        return (normalized / self.scaling_factor + self.shift_factor) * std + mean

    def as_dict(self) -> dict[str, Any]:
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "latent_mean": self.mean.tolist(), "latent_std": self.std.tolist()}

    def __repr__(self) -> str:
        return (f"LatentNormalization(scale={self.scaling_factor}, shift={self.shift_factor}, "
                f"mean={[round(v, 4) for v in self.mean.tolist()]}, std={[round(v, 4) for v in self.std.tolist()]})")


class LatentTokenizer:
    """Pre-encoded latents (B, *latent_shape) <-> tokens (B, N, C * prod(patch)).

    latent_shape: (C, H, W) (or (C, T) / (C, F, H, W)) of the stored latents.
    patch_size: patch of the token grid (SiT-XL/2: 2 on 32x32x4 latents -> 256 tokens of 16).
    scaling_factor, shift_factor, latent_mean, latent_std: see LatentNormalization. All None
        (the default) takes the decoder's normalisation, or the identity without a decoder.
    decoder: optional autoencoder tokenizer (`decode_latents`, `latent_shape`, `data_range`)
        whose decode_latents turns raw latents into images; decode() then returns images.
    """

    def __init__(
        self,
        latent_shape: Sequence[int],
        patch_size: int | Sequence[int] = 2,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        latent_mean: Sequence[float] | None = None,
        latent_std: Sequence[float] | None = None,
        decoder: Any = None,
    ) -> None:
        self.patchify = Patchify(latent_shape, patch_size)
        self.latent_shape = self.patchify.latent_shape
        self.token_shape = self.patchify.token_shape
        self.grid = self.patchify.grid
        if decoder is not None:
            if not callable(getattr(decoder, "decode_latents", None)):
                raise TypeError(f"decoder must have decode_latents(latents) -> images, got {type(decoder).__name__}")
            decoder_shape = tuple(getattr(decoder, "latent_shape", self.latent_shape))
            if decoder_shape != self.latent_shape:
                raise ValueError(f"latent_shape {self.latent_shape} differs from the decoder's latent shape "
                                 f"{decoder_shape} ({type(decoder).__name__})")
        self.decoder = decoder
        explicit = any(v is not None for v in (scaling_factor, shift_factor, latent_mean, latent_std))
        if explicit or decoder is None or getattr(decoder, "normalization", None) is None:
            self.normalization = LatentNormalization(
                self.latent_shape[0],
                1.0 if scaling_factor is None else scaling_factor,
                0.0 if shift_factor is None else shift_factor,
                latent_mean, latent_std,
            )
        else:
            self.normalization = decoder.normalization
        # Sample grids scale decoded images with this range; raw latents have no fixed range.
        self.data_range = tuple(getattr(decoder, "data_range", (-1.0, 1.0)))

    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.patchify(self.normalization.normalize(latents.float()))

    def decode_to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> raw (unnormalised) latents, whatever the decoder."""
        return self.normalization.denormalize(self.patchify.inverse(tokens))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        latents = self.decode_to_latents(tokens)
        return latents if self.decoder is None else self.decoder.decode_latents(latents)

    def __repr__(self) -> str:
        decoder = type(self.decoder).__name__ if self.decoder is not None else None
        return (f"LatentTokenizer(latent_shape={self.latent_shape}, patch={self.patchify.patch}, "
                f"{self.normalization!r}, decoder={decoder})")
