"""Components with weights from a local file, as gin builds them: one clear line when the file is missing.

* `conv_ae_from(path)`: a platform-trained conv autoencoder as a tokenizer (`selfflow autoencoder` writes it).
* `autoencoder(tokenizer)`: the image autoencoder a tokenizer preset provides;
  `selfflow data images --tokenizer-gin FILE` pre-encodes image folders with it.
* `digit_encoder_from(path)`: a platform-trained REPA digit encoder (`selfflow encoder` writes it).
* `timm_encoder_from(...)`: REPA's pretrained timm encoder (DINOv2-B at ImageNet scale), safe to
  build on the meta device: a large experiment's config check then gets a weightless stand-in with
  the real grid and feature width instead of reading weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gin
import torch
from torch import nn

from selfflow.components.encoders.digit_encoder import load_digit_encoder
from selfflow.components.encoders.sequence_encoders import load_sequence_encoder
from selfflow.components.tokenizers.conv_ae import ConvAETokenizer, load_conv_autoencoder
from selfflow.components.tokenizers.sd_vae import building_on_meta
from selfflow.components.tokenizers.spectrogram import SpectrogramTokenizer, log_magnitude_statistics
from selfflow.platform.config.configurable import configurable
from selfflow.platform.errors import UserError

DEFAULT_AE_TRAINING_GIN = "tokenizers/conv_ae_digits_train.gin"


@configurable(module="tokenizers")
def conv_ae_from(path: str = gin.REQUIRED, patch_size: int = 1,
                 train_gin: str = DEFAULT_AE_TRAINING_GIN) -> ConvAETokenizer:
    """A trained conv autoencoder (frozen, with its latent statistics) as a tokenizer."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"conv autoencoder weights not found at {file}: train them with "
                        f"`selfflow autoencoder --gin_file {train_gin}` (writes that file)")
    try:
        return ConvAETokenizer(load_conv_autoencoder(file), patch_size=patch_size)
    except ValueError as error:
        raise UserError(f"cannot use the conv autoencoder {file}: {error}") from None


@configurable(module="tokenizers")
def spectrogram_from_shards(data=gin.REQUIRED, n_fft: int = 256, hop_length: int = 64, patch_size: int = 2,
                            floor: float = 1e-3, griffin_lim_iters: int = 32) -> SpectrogramTokenizer:
    """A SpectrogramTokenizer for `data`'s clips, normalised per frequency bin with the log-magnitude
    statistics of its train split (computed here, a second for thousands of clips). Under a meta default
    device (a config check) the shards are not read: the tokenizer has the shapes, not the statistics."""
    options = dict(n_fft=n_fft, hop_length=hop_length, patch_size=patch_size, floor=floor,
                   griffin_lim_iters=griffin_lim_iters)
    if building_on_meta():
        return SpectrogramTokenizer(tuple(data.data_shape), **options)
    train_x, _ = data.arrays(data.train_split)
    audio = torch.as_tensor(train_x, dtype=torch.float32, device="cpu")
    if audio.dim() != 3:
        raise UserError(f"spectrogram_from_shards needs waveforms (M, C, T), {data.root} holds {tuple(audio.shape)}")
    try:
        with torch.device("cpu"):  # real statistics even inside a meta-device config check
            plain = SpectrogramTokenizer(tuple(audio.shape[1:]), **options)
            statistics = log_magnitude_statistics(plain, audio)
    except ValueError as error:
        raise UserError(f"spectrogram_from_shards ({data.root}): {error}") from None
    return SpectrogramTokenizer(tuple(audio.shape[1:]), **options, **statistics)


@configurable(module="tokenizers")
def latent_tokenizer_from_shards(data=gin.REQUIRED, patch_size: int = 1, decoder: Any = None) -> Any:
    """A LatentTokenizer over pre-encoded latent shards (`selfflow data encode`), normalised per channel
    with the mean and std of `data`'s train-split latents; `decoder` (the autoencoder tokenizer that
    encoded them) turns samples back into waveforms or images. Under a meta default device (a config
    check) the shards are not read: the tokenizer has the shapes, not the statistics."""
    from selfflow.components.tokenizers.latents import LatentTokenizer
    from selfflow.platform.data.latent_shards import channel_statistics

    if building_on_meta():
        return LatentTokenizer(tuple(data.data_shape), patch_size, decoder=decoder)
    train_x, _ = data.arrays(data.train_split)
    try:
        statistics = channel_statistics(train_x)
        with torch.device("cpu"):
            return LatentTokenizer(tuple(train_x.shape[1:]), patch_size, decoder=decoder, **statistics)
    except (TypeError, ValueError) as error:
        raise UserError(f"latent_tokenizer_from_shards ({data.root}): {error}") from None


@configurable(module="tokenizers")
def autoencoder(tokenizer: Any = gin.REQUIRED) -> Any:
    """The image autoencoder of a tokenizer preset (needs encode_latents, latent_shape, data_range)."""
    return tokenizer


@configurable(module="encoders")
def digit_encoder_from(path: str = gin.REQUIRED):
    """A frozen, pre-trained digit encoder for REPA; one clear line when it is missing."""
    file = Path(path)
    if not file.is_file():
        size = file.stem.rsplit("_", 1)[-1]
        raise UserError(
            f"REPA encoder weights not found at {file}: train them with "
            f"`selfflow encoder --gin_file encoders/digits_{size}.gin` (writes that file)"
        )
    return load_digit_encoder(file)


class UnloadedPatchEncoder(nn.Module):
    """A weightless stand-in for a pretrained patch encoder in a meta-device config check.

    It has the real `grid` and `feature_dim` (so heads are built with the right width)
    but cannot encode: its only job is to let a large experiment build without weights.
    """

    def __init__(self, model_name: str, grid: tuple[int, int], feature_dim: int) -> None:
        super().__init__()
        self.model_name, self.grid, self.feature_dim = model_name, tuple(grid), int(feature_dim)

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.model_name!r} was built on the meta device without weights (a config check); "
                           f"build the experiment on a real device to encode")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_patches(images)


def _meta_patch_encoder(model_name: str, image_size: int, model_kwargs: dict) -> UnloadedPatchEncoder:
    import timm

    kwargs = {"pretrained": False, "num_classes": 0, **model_kwargs}
    try:
        model = timm.create_model(model_name, img_size=image_size, **kwargs)
    except TypeError as error:  # CNNs take no img_size
        if "img_size" not in str(error):
            raise
        model = timm.create_model(model_name, **kwargs)
    channels = int(model.pretrained_cfg.get("input_size", (3,))[0]) if getattr(model, "pretrained_cfg", None) else 3
    with torch.no_grad():
        probe = model.forward_features(torch.zeros(1, channels, image_size, image_size))
    if probe.dim() == 4:  # CNN map (B, C, H, W)
        return UnloadedPatchEncoder(model_name, (int(probe.shape[2]), int(probe.shape[3])), int(probe.shape[1]))
    num_patches = probe.shape[1] - int(getattr(model, "num_prefix_tokens", 0))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None or grid[0] * grid[1] != num_patches:
        side = round(num_patches ** 0.5)
        grid = (side, side)
    return UnloadedPatchEncoder(model_name, (int(grid[0]), int(grid[1])), int(probe.shape[-1]))


@configurable(module="encoders")
def sequence_encoder_from(path: str = gin.REQUIRED, train_gin: str = "encoders/spoken_digits_small.gin"):
    """A frozen, pre-trained spoken-digit or clip encoder for REPA; one clear line when it is missing."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"REPA encoder weights not found at {file}: train them with "
                        f"`selfflow encoder --gin_file {train_gin}` (writes that file)")
    try:
        return load_sequence_encoder(file)
    except ValueError as error:
        raise UserError(f"cannot use the REPA encoder {file}: {error}") from None


@configurable(module="encoders")
def timm_encoder_from(model_name: str = gin.REQUIRED, weights_path: str | None = None, cache_dir: str | None = None,
                      image_size: int = 224, input_range: tuple = (0.0, 1.0), mean: tuple | None = None,
                      std: tuple | None = None, model_kwargs: dict | None = None) -> nn.Module:
    """A frozen TimmEncoder from local weights (one line when they are missing); on meta, a stand-in."""
    from selfflow.components.encoders.timm_encoder import TimmEncoder

    if building_on_meta():
        return _meta_patch_encoder(model_name, image_size, dict(model_kwargs or {}))
    try:
        return TimmEncoder(model_name, weights_path=weights_path, cache_dir=cache_dir, image_size=image_size,
                           input_range=input_range, mean=mean, std=std, model_kwargs=model_kwargs)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
