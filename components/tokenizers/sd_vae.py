"""Stable Diffusion's KL autoencoder (SD-VAE, e.g. stabilityai/sd-vae-ft-ema) as a tokenizer.

Images (B, 3, S, S) in `data_range` -> VAE posterior MEAN (B, 4, S/8, S/8) ->
normalised (`LatentNormalization`: * 0.18215 for SD-VAE) -> patchified tokens.
The posterior mean, not a sample, makes encoding deterministic: pre-encoded shards
are reproducible and the same image always gives the same latent (the posterior's
std is tiny for SD-VAE, so sampling would only add a little noise).

Weights come from a local diffusers folder only (`config.json` +
`diffusion_pytorch_model.safetensors`, as `save_pretrained` or `hf download
--local-dir` writes it), with `local_files_only=True` and the hub offline; nothing
is ever downloaded. diffusers is imported on first use, so building a config costs
nothing. Loading is deferred too: the constructor checks the folder (one-line
FileNotFoundError that says where to put the files) and the weights are read on the
first encode/decode. Under a meta default device (`with torch.device("meta")`: a
config check of a large experiment) the constructor does not touch the disk at all.
The VAE is frozen (no gradients) and kept out of any nn.Module tree, so it never
enters an optimizer or a checkpoint.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from selfflow.components.pretrained import (  # noqa: F401 (WeightsNotFoundError: part of this API)
    WeightsNotFoundError,
    building_on_meta,
    check_data_range,
    hub_offline,
    read_local_config,
)
from selfflow.components.tokenizers.latents import LatentNormalization
from selfflow.components.tokenizers.patchify import Patchify

DEFAULT_SOURCE = "stabilityai/sd-vae-ft-ema"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def read_vae_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json after checking that weights sit beside it (one-line errors)."""
    config = read_local_config(folder, WEIGHT_FILES, "SD-VAE", DEFAULT_SOURCE)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{folder / 'config.json'} does not describe a diffusers AutoencoderKL")
    return config


class SDVAETokenizer:
    """Frozen diffusers AutoencoderKL from a local folder; encode: images -> tokens, decode: tokens -> images.

    weights_path: the diffusers folder (`~` expanded); subfolder: e.g. "vae" inside a pipeline folder.
    patch_size, image_size: the token grid is (image_size / 8 / patch)^2 (SiT-XL/2: 256 -> 32x32x4 -> 16x16).
    scaling_factor, shift_factor, latent_mean, latent_std: see LatentNormalization (SD-VAE: 0.18215, 0).
    data_range: the value range of the images it takes and returns (mapped to the VAE's [-1, 1]).
    latent_channels, downsample_factor: the VAE's (SD-VAE: 4, 8); checked against config.json,
        and needed up front so the latent shape is known before (or without) loading weights.
    dtype: "float32" | "bfloat16" | "float16" for the VAE's weights; device: where it runs.
    batch_size: most images per VAE call (decoding 1,000 sample-grid images at 256 px in one
        call would need tens of GB); larger inputs are processed in chunks.
    """

    def __init__(
        self,
        weights_path: str,
        patch_size: int = 2,
        image_size: int = 256,
        scaling_factor: float = 0.18215,
        shift_factor: float = 0.0,
        latent_mean: Sequence[float] | None = None,
        latent_std: Sequence[float] | None = None,
        data_range: tuple[float, float] = (-1.0, 1.0),
        latent_channels: int = 4,
        downsample_factor: int = 8,
        subfolder: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        for name, value in (("image_size", image_size), ("latent_channels", latent_channels),
                            ("downsample_factor", downsample_factor), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if image_size % downsample_factor:
            raise ValueError(f"image_size {image_size} is not divisible by the VAE's downsample_factor "
                             f"{downsample_factor}")
        if not isinstance(weights_path, (str, os.PathLike)) or not str(weights_path):
            raise ValueError(f"weights_path must name the local diffusers VAE folder, got {weights_path!r}")
        folder = Path(weights_path).expanduser()
        self.weights_dir = folder / subfolder if subfolder else folder
        self.image_size = image_size
        self.image_channels = 3
        self.downsample_factor = downsample_factor
        self.data_range = check_data_range(data_range)
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        self.batch_size = batch_size
        side = image_size // downsample_factor
        self.patchify = Patchify((latent_channels, side, side), patch_size)
        self.latent_shape = self.patchify.latent_shape
        self.token_shape = self.patchify.token_shape
        self.grid = self.patchify.grid
        self.normalization = LatentNormalization(latent_channels, scaling_factor, shift_factor, latent_mean, latent_std)
        self._vae = None
        self.checked = False
        if not building_on_meta():
            self._check_folder()

    # ----- weights ------------------------------------------------------------------------------

    def _check_folder(self) -> None:
        config = read_vae_config(self.weights_dir)
        channels = config.get("latent_channels")
        blocks = config.get("block_out_channels") or []
        factor = 2 ** (len(blocks) - 1) if blocks else None
        if channels != self.latent_shape[0] or factor != self.downsample_factor:
            raise ValueError(
                f"the VAE in {self.weights_dir} has {channels} latent channels and downsamples by {factor}; "
                f"the tokenizer was configured for {self.latent_shape[0]} and {self.downsample_factor}"
            )
        self.image_channels = int(config.get("in_channels", 3))
        stored_scale = config.get("scaling_factor")
        if isinstance(stored_scale, (int, float)) and abs(stored_scale - self.normalization.scaling_factor) > 1e-6:
            warnings.warn(f"SDVAETokenizer: scaling_factor {self.normalization.scaling_factor} differs from the "
                          f"VAE config's {stored_scale} ({self.weights_dir})", stacklevel=3)
        self.checked = True

    @property
    def vae(self) -> torch.nn.Module:
        """The AutoencoderKL, loaded on first use."""
        if self._vae is None:
            if building_on_meta():
                raise RuntimeError("SDVAETokenizer cannot load weights under a meta default device "
                                   "(that build is a config check): build it on a real device")
            if not self.checked:
                self._check_folder()
            with hub_offline():
                try:
                    from diffusers import AutoencoderKL  # lazy: a slow import the rest of the platform skips
                except ImportError as error:
                    raise ModuleNotFoundError(f"SDVAETokenizer needs the optional package diffusers ({error}): "
                                              f"pip install 'selfflow[sdvae]'") from None

                vae = AutoencoderKL.from_pretrained(str(self.weights_dir), local_files_only=True,
                                                    torch_dtype=self.dtype, low_cpu_mem_usage=False)
            vae.requires_grad_(False)
            self._vae = vae.eval().to(self.device)
        return self._vae

    # ----- images <-> raw latents ---------------------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (self.image_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"SDVAETokenizer takes images (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(images.shape)}")

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in data_range -> unnormalised posterior means (B, *latent_shape), float32."""
        self._check_images(images)
        low, high = self.data_range
        unit = (images.float() - low) / (high - low) * 2.0 - 1.0
        vae = self.vae
        means = [vae.encode(chunk.to(device=self.device, dtype=self.dtype)).latent_dist.mean.float().to(images.device)
                 for chunk in unit.split(self.batch_size)]
        return torch.cat(means)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unnormalised latents (B, *latent_shape) -> images in data_range (not clamped), float32."""
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected latents (B, {self.latent_shape}), got {tuple(latents.shape)}")
        vae = self.vae
        unit = torch.cat([vae.decode(chunk.to(device=self.device, dtype=self.dtype)).sample.float().to(latents.device)
                          for chunk in latents.split(self.batch_size)])
        low, high = self.data_range
        return ((unit + 1.0) / 2.0 * (high - low) + low).to(latents.device)

    # ----- the Tokenizer seam -------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.patchify(self.normalization.normalize(self.encode_latents(images)))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(self.normalization.denormalize(self.patchify.inverse(tokens.float())))

    def __repr__(self) -> str:
        return (f"SDVAETokenizer({str(self.weights_dir)!r}, image_size={self.image_size}, "
                f"latent_shape={self.latent_shape}, patch={self.patchify.patch}, {self.normalization!r})")
