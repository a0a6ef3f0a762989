"""EnCodec (Défossez et al. 2022) as an audio tokenizer: continuous latents before quantisation.

Waveforms (B, channels, samples) in `data_range` -> EnCodec's encoder output (B, 128, samples / 320)
for the 24 kHz model, 75 latent frames a second -> normalised (`LatentNormalization`) -> patchified
tokens along time. decode runs EnCodec's decoder on the denormalised latents. The residual vector
quantiser is never used: flow matching works on the continuous latents, as in the paper's audio runs.

The network is transformers' `EncodecModel` (the `encodec` package imports torchaudio, which has no
build for this torch). Weights come from a local folder only (`config.json` + `model.safetensors`,
as `hf download facebook/encodec_24khz --local-dir DIR` writes it), read with `local_files_only=True`
and the hub offline; nothing is ever downloaded. transformers is imported on first use, the folder is
checked in the constructor (one-line error that says where to put the files) and the weights are read
on the first encode/decode; under a meta default device (a config check) nothing is read.

`random_init_for_tests=True` builds the 24 kHz network (transformers' default EncodecConfig) with
RANDOM weights, reads nothing and warns loudly: its latents mean nothing.
"""
from __future__ import annotations

import math
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

DEFAULT_SOURCE = "facebook/encodec_24khz"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
RANDOM_INIT_WARNING = ("EncodecTokenizer: RANDOM weights (random_init_for_tests=True). Its latents and decodes mean "
                       "nothing: use it for tests only, never for an experiment")


def read_encodec_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json after checking that weights sit beside it (one-line errors)."""
    config = read_local_config(folder, WEIGHT_FILES, "EnCodec", DEFAULT_SOURCE)
    if config.get("model_type") != "encodec":
        raise ValueError(f"{folder / 'config.json'} does not describe a transformers EnCodec model (model_type 'encodec')")
    return config


class EncodecTokenizer:
    """Frozen EnCodec from a local folder; encode: waveforms -> tokens, decode: tokens -> waveforms.

    weights_path: the transformers folder (`~` expanded). data_shape: (audio_channels, samples) of
        the clips, samples a multiple of the model's hop length (320 at 24 kHz).
    patch_size: latent frames per token (1: one token per 13.3 ms at 24 kHz).
    sample_rate, latent_channels, hop_length: the model's (24 kHz model: 24000, 128, 320); checked
        against config.json and needed up front so shapes are known before (or without) loading.
    scaling_factor, shift_factor, latent_mean, latent_std: see LatentNormalization; measure the
        per-channel statistics on your data (EnCodec latents are not unit-variance).
    data_range: the waveforms' value range (mapped to EnCodec's [-1, 1]).
    device: where EnCodec runs; batch_size: most clips per EnCodec call.
    """

    def __init__(
        self,
        weights_path: str | None = "~/.cache/selfflow/encodec_24khz",
        data_shape: Sequence[int] = (1, 15360),
        patch_size: int = 1,
        sample_rate: int = 24000,
        latent_channels: int = 128,
        hop_length: int = 320,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        latent_mean: Sequence[float] | None = None,
        latent_std: Sequence[float] | None = None,
        data_range: tuple[float, float] = (-1.0, 1.0),
        device: str = "cpu",
        batch_size: int = 16,
        random_init_for_tests: bool = False,
    ) -> None:
        data_shape = tuple(data_shape)
        if len(data_shape) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in data_shape):
            raise ValueError(f"data_shape must be (audio_channels, samples) of positive ints, got {data_shape!r}")
        for name, value in (("sample_rate", sample_rate), ("latent_channels", latent_channels),
                            ("hop_length", hop_length), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if data_shape[1] % hop_length:
            raise ValueError(f"clips of {data_shape[1]} samples are not a whole number of EnCodec frames "
                             f"(hop_length {hop_length})")
        if not random_init_for_tests and (not isinstance(weights_path, (str, os.PathLike)) or not str(weights_path)):
            raise ValueError(f"weights_path must name the local EnCodec folder, got {weights_path!r}")
        self.weights_dir = Path(weights_path).expanduser() if weights_path else None
        self.random_init = bool(random_init_for_tests)
        self.data_shape, self.sample_rate, self.hop_length = data_shape, sample_rate, hop_length
        self.data_range = check_data_range(data_range)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.patchify = Patchify((latent_channels, data_shape[1] // hop_length), patch_size)
        self.latent_shape = self.patchify.latent_shape
        self.token_shape = self.patchify.token_shape
        self.grid = self.patchify.grid
        self.normalization = LatentNormalization(latent_channels, scaling_factor, shift_factor, latent_mean, latent_std)
        self._model = None
        if self.random_init:
            warnings.warn(RANDOM_INIT_WARNING, stacklevel=2)
        if not building_on_meta() and not self.random_init:
            self._check(read_encodec_config(self.weights_dir), str(self.weights_dir))

    # ----- weights ------------------------------------------------------------------------------

    def _check(self, config: dict[str, Any], where: str) -> None:
        found = {"sampling_rate": config.get("sampling_rate"), "hidden_size": config.get("hidden_size"),
                 "hop_length": math.prod(config.get("upsampling_ratios") or [0]),
                 "audio_channels": config.get("audio_channels", 1)}
        wanted = {"sampling_rate": self.sample_rate, "hidden_size": self.latent_shape[0],
                  "hop_length": self.hop_length, "audio_channels": self.data_shape[0]}
        wrong = {key: (found[key], wanted[key]) for key in wanted if found[key] != wanted[key]}
        if wrong:
            details = ", ".join(f"{key} {have} (configured {want})" for key, (have, want) in wrong.items())
            raise ValueError(f"the EnCodec model in {where} does not match the tokenizer: {details}")

    @property
    def model(self) -> torch.nn.Module:
        """transformers' EncodecModel, loaded (or randomly built) on first use."""
        if self._model is None:
            if building_on_meta():
                raise RuntimeError("EncodecTokenizer cannot load weights under a meta default device "
                                   "(that build is a config check): build it on a real device")
            with hub_offline():
                from transformers import EncodecConfig, EncodecModel  # lazy: a slow import

                if self.random_init:
                    config = EncodecConfig()
                    self._check(config.to_dict(), "transformers' default EncodecConfig")
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(0)
                        model = EncodecModel(config)
                else:
                    self._check(read_encodec_config(self.weights_dir), str(self.weights_dir))
                    model = EncodecModel.from_pretrained(str(self.weights_dir), local_files_only=True)
            model.requires_grad_(False)
            self._model = model.eval().to(self.device)
        return self._model

    # ----- waveforms <-> raw latents ------------------------------------------------------------

    @torch.no_grad()
    def encode_latents(self, audio: torch.Tensor) -> torch.Tensor:
        """Waveforms (B, *data_shape) in data_range -> EnCodec encoder outputs (B, *latent_shape), float32."""
        if audio.dim() != 3 or tuple(audio.shape[1:]) != self.data_shape:
            raise ValueError(f"EncodecTokenizer takes waveforms (B, {', '.join(map(str, self.data_shape))}), "
                             f"got {tuple(audio.shape)}")
        low, high = self.data_range
        unit = (audio.float() - (low + high) / 2) / ((high - low) / 2)
        encoder = self.model.encoder
        return torch.cat([encoder(chunk.to(self.device)).float().to(audio.device)
                          for chunk in unit.split(self.batch_size)])

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, *latent_shape) -> waveforms (B, *data_shape) in data_range (not clamped)."""
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected latents (B, {self.latent_shape}), got {tuple(latents.shape)}")
        decoder = self.model.decoder
        unit = torch.cat([decoder(chunk.to(self.device)).float().to(latents.device)
                          for chunk in latents.float().split(self.batch_size)])
        low, high = self.data_range
        return unit[..., :self.data_shape[1]] * ((high - low) / 2) + (low + high) / 2

    @torch.no_grad()
    def latent_statistics(self, audio: torch.Tensor) -> dict[str, list[float]]:
        """Per-channel mean and std of the raw latents of `audio` (B, *data_shape): the values to bind
        as latent_mean / latent_std so that tokens are unit-variance."""
        latents = self.encode_latents(audio)
        flat = latents.transpose(0, 1).reshape(self.latent_shape[0], -1)
        return {"latent_mean": flat.mean(dim=1).tolist(), "latent_std": flat.std(dim=1).clamp_min(1e-6).tolist()}

    # ----- the Tokenizer seam -------------------------------------------------------------------

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        return self.patchify(self.normalization.normalize(self.encode_latents(audio)))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(self.normalization.denormalize(self.patchify.inverse(tokens.float())))

    def __repr__(self) -> str:
        source = "RANDOM weights (tests only)" if self.random_init else repr(str(self.weights_dir))
        return (f"EncodecTokenizer({source}, data_shape={self.data_shape}, latent_shape={self.latent_shape}, "
                f"patch={self.patchify.patch}, {self.normalization!r})")
