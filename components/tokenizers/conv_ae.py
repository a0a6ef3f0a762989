"""A small trainable convolutional autoencoder and its tokenizer (the laptop-scale latent space).

Digits: 8x8x1 images -> 4x4x4 latents (one stride-2 stage) -> 16 tokens of 4 values
at patch 1, the same token count and width as pixels with patch 2, so pixel and
latent runs compare like for like.

`fit_conv_autoencoder` trains it in pure torch (MSE reconstruction plus a small
latent L2 penalty that keeps the latent scale bounded), then measures the
per-channel mean and std of the training latents and stores them in the model's
buffers: the normalisation statistics belong to the autoencoder and travel with
its weights (`save_conv_autoencoder` / `load_conv_autoencoder`, atomic write,
weights-only load). `ConvAETokenizer` applies them: tokens are unit-variance latents.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.components.files import atomic_path
from selfflow.components.tokenizers.latents import LatentNormalization
from selfflow.components.tokenizers.patchify import Patchify

FORMAT_VERSION = 1


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ConvAutoencoder(nn.Module):
    """images (B, in_channels, S, S) in data_range <-> latents (B, latent_channels, S / 2^downsample, ...);
    with dims=1, waveforms (B, in_channels, S) <-> latents (B, latent_channels, S / 2^downsample);
    with dims=3, clips (B, in_channels, T, H, W) <-> latents (B, latent_channels, T / 2^d, H / 2^d, W / 2^d).

    Encoder: conv3x3 -> [conv4x4 stride 2] x downsample -> conv3x3 -> conv1x1 to latent_channels.
    Decoder: the mirror with transposed convolutions. SiLU between layers, linear output.
    dims=1 uses the same layers in 1-D (kernel 3, 4 and 1 along time), dims=3 in 3-D (time, rows, cols).
    image_size: one size for every axis, or one per axis (e.g. (frames, rows, cols) for clips).
    Buffers latent_mean / latent_std (per channel) are set by fit_conv_autoencoder.
    seed: parameter initialisation (a private RNG; the global one is untouched).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int | Sequence[int] = 8,
        latent_channels: int = 4,
        hidden_channels: int = 32,
        downsample: int = 1,
        data_range: Sequence[float] = (0.0, 1.0),
        seed: int = 0,
        dims: int = 2,
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3) or isinstance(dims, bool):
            raise ValueError(f"dims must be 1 (waveforms), 2 (images) or 3 (clips), got {dims!r}")
        sizes = (image_size,) * dims if isinstance(image_size, int) else tuple(image_size)
        if len(sizes) != dims:
            raise ValueError(f"image_size must be an int or {dims} sizes (one per axis), got {image_size!r}")
        for name, value in (("in_channels", in_channels), *(("image_size", size) for size in sizes),
                            ("latent_channels", latent_channels), ("hidden_channels", hidden_channels)):
            _positive_int(name, value)
        if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 0:
            raise ValueError(f"downsample must be an int >= 0, got {downsample!r}")
        if any(size % (2 ** downsample) for size in sizes):
            raise ValueError(f"image_size {image_size} is not divisible by 2^downsample = {2 ** downsample}")
        low, high = (float(v) for v in data_range)
        if not high > low:
            raise ValueError(f"data_range must be (low, high) with high > low, got {tuple(data_range)}")
        self.config = {"in_channels": in_channels, "image_size": image_size if isinstance(image_size, int) else list(sizes),
                       "latent_channels": latent_channels,
                       "hidden_channels": hidden_channels, "downsample": downsample,
                       "data_range": [low, high], "seed": seed, "dims": dims}
        self.dims = dims
        self.image_shape = (in_channels, *sizes)
        self.latent_shape = (latent_channels, *(size // 2 ** downsample for size in sizes))
        self.data_range = (low, high)
        width = hidden_channels
        conv, transposed = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d),
                            3: (nn.Conv3d, nn.ConvTranspose3d)}[dims]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            down = [layer for _ in range(downsample)
                    for layer in (conv(width, width, 4, stride=2, padding=1), nn.SiLU())]
            self.encoder = nn.Sequential(
                conv(in_channels, width, 3, padding=1), nn.SiLU(), *down,
                conv(width, width, 3, padding=1), nn.SiLU(), conv(width, latent_channels, 1),
            )
            up = [layer for _ in range(downsample)
                  for layer in (transposed(width, width, 4, stride=2, padding=1), nn.SiLU())]
            self.decoder = nn.Sequential(
                conv(latent_channels, width, 3, padding=1), nn.SiLU(), *up,
                conv(width, width, 3, padding=1), nn.SiLU(), conv(width, in_channels, 3, padding=1),
            )
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    def _check(self, tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        if tensor.dim() != 2 + self.dims or tuple(tensor.shape[1:]) != shape:
            raise ValueError(f"ConvAutoencoder expects {what} (B, {', '.join(map(str, shape))}), "
                             f"got {tuple(tensor.shape)}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in data_range -> raw latents (unnormalised)."""
        self._check(images, self.image_shape, "images")
        low, high = self.data_range
        return self.encoder((images.float() - low) / (high - low) * 2.0 - 1.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> images in data_range (not clamped)."""
        self._check(latents, self.latent_shape, "latents")
        low, high = self.data_range
        return (self.decoder(latents) + 1.0) / 2.0 * (high - low) + low

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def freeze(self) -> "ConvAutoencoder":
        self.requires_grad_(False)
        return self.eval()


def save_conv_autoencoder(model: ConvAutoencoder, path: str | os.PathLike) -> Path:
    """Writes {format_version, config, state_dict (with the latent statistics)} atomically."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "config": dict(model.config),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return path


def load_conv_autoencoder(path: str | os.PathLike) -> ConvAutoencoder:
    """A frozen ConvAutoencoder (eval mode) from a file written by save_conv_autoencoder."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"conv autoencoder weights not found at {path}: train one with "
                                f"fit_conv_autoencoder and save it there with save_conv_autoencoder")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a ConvAutoencoder file (format_version {FORMAT_VERSION})")
    with torch.device("cpu"):  # real weights even inside a meta-device config check
        model = ConvAutoencoder(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model.freeze()


def _as_images(images: Any, model: ConvAutoencoder, name: str) -> torch.Tensor:
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.dim() == 1 + model.dims and model.image_shape[0] == 1:
        images = images.unsqueeze(1)
    if images.dim() != 2 + model.dims or tuple(images.shape[1:]) != model.image_shape or images.shape[0] == 0:
        raise ValueError(f"{name} must be (M, {', '.join(map(str, model.image_shape))}) with M > 0, "
                         f"got {tuple(images.shape)}")
    return images


@torch.no_grad()
def _reconstruction_mse(model: ConvAutoencoder, images: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        total += F.mse_loss(model(chunk), chunk, reduction="sum").item()
    return total / images.numel()


@torch.no_grad()
def latent_statistics(model: ConvAutoencoder, images: torch.Tensor, batch_size: int = 256
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the raw latents of `images` (over samples and positions)."""
    latents = torch.cat([model.encode(images[start:start + batch_size])
                         for start in range(0, images.shape[0], batch_size)])
    per_channel = latents.transpose(0, 1).reshape(latents.shape[1], -1)
    return per_channel.mean(dim=1), per_channel.std(dim=1).clamp_min(1e-6)


def fit_conv_autoencoder(
    model: ConvAutoencoder,
    images: Any,
    steps: int = 1000,
    lr: float = 1e-3,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    test_images: Any = None,
    latent_penalty: float = 1e-4,
    weight_decay: float = 0.0,
) -> dict[str, float]:
    """Train by reconstruction (AdamW, MSE in data units + latent_penalty * mean z^2).

    images: (M, C, S, S) in the model's data_range (or (M, S, S) for one channel).
    Minibatch indices come from `generator` (required). Afterwards the model's
    latent_mean / latent_std hold the training latents' per-channel statistics and
    the model is frozen. Returns final_loss, train_mse and (with test_images) test_mse.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    _positive_int("steps", steps)
    _positive_int("batch_size", batch_size)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not latent_penalty >= 0:
        raise ValueError(f"latent_penalty must be >= 0, got {latent_penalty!r}")
    images = _as_images(images, model, "images")
    device = next(model.parameters()).device
    images = images.to(device)

    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss = torch.zeros(())
    for _ in range(steps):
        index = torch.randint(images.shape[0], (batch_size,), generator=generator,
                              device=generator.device).to(device)
        batch = images[index]
        latents = model.encode(batch)
        loss = F.mse_loss(model.decode(latents), batch) + latent_penalty * latents.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.freeze()

    mean, std = latent_statistics(model, images)
    model.latent_mean.copy_(mean)
    model.latent_std.copy_(std)
    metrics = {"final_loss": float(loss.item()), "train_mse": _reconstruction_mse(model, images, 256)}
    if test_images is not None:
        test = _as_images(test_images, model, "test_images").to(device)
        metrics["test_mse"] = _reconstruction_mse(model, test, 256)
    return metrics


class ConvAETokenizer:
    """A trained ConvAutoencoder as a tokenizer: images <-> normalised, patchified latents.

    encode(images) = patchify((z - latent_mean) / latent_std) with z = autoencoder.encode(images);
    decode inverts it through the decoder. encode_latents / decode_latents work on raw
    latents (what `selfflow data images` stores). The autoencoder is frozen.
    """

    def __init__(self, autoencoder: ConvAutoencoder, patch_size: int | Sequence[int] = 1) -> None:
        if not isinstance(autoencoder, ConvAutoencoder):
            raise TypeError(f"autoencoder must be a ConvAutoencoder, got {type(autoencoder).__name__}")
        self.autoencoder = autoencoder.freeze()
        self.patchify = Patchify(autoencoder.latent_shape, patch_size)
        self.latent_shape = self.patchify.latent_shape
        self.token_shape = self.patchify.token_shape
        self.grid = self.patchify.grid
        self.data_range = autoencoder.data_range
        self.image_size = autoencoder.image_shape[-1]
        self.image_channels = autoencoder.image_shape[0]
        self.normalization = LatentNormalization(
            self.latent_shape[0], latent_mean=autoencoder.latent_mean.tolist(),
            latent_std=autoencoder.latent_std.tolist(),
        )

    def _device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(images.to(self._device())).to(images.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents.float().to(self._device())).to(latents.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.patchify(self.normalization.normalize(self.encode_latents(images)))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(self.normalization.denormalize(self.patchify.inverse(tokens.float())))

    def __repr__(self) -> str:
        return (f"ConvAETokenizer(image={self.autoencoder.image_shape}, latent_shape={self.latent_shape}, "
                f"patch={self.patchify.patch}, {self.normalization!r})")
