"""EnCodec (Défossez et al. 2022) as an audio tokenizer: continuous latents before quantisation.

Waveforms (B, 1, samples) in `data_range` -> EnCodec's SEANet encoder output (B, 128, samples / 320)
for the 24 kHz model, 75 latent frames a second -> normalised (`LatentNormalization`) -> patchified
tokens along time. decode runs EnCodec's decoder on the denormalised latents. The residual vector
quantiser is never used: flow matching works on the continuous latents, as in the paper's audio runs.

The network is Meta's reference implementation, the `encodec` package (`EncodecModel.encodec_model_24khz`).
Weights come from a local folder only (`repository`), holding the checkpoint file Meta publishes under
its own name, `encodec_24khz-d7cc33bc.th`: the part after the dash is the start of the file's sha256,
checked before the file is read (the package's convention), and the file is read with
`torch.load(weights_only=True)`. Nothing is ever downloaded. The folder and file are checked in the
constructor (one-line errors that say where to put the file); the weights are read on the first
encode/decode; under a meta default device (a config check) nothing is read. `encodec` imports
torchaudio (a slow import): it is imported on first use.

`random_init_for_tests=True` builds the 24 kHz network with RANDOM weights (seeded, the global RNG
untouched), reads nothing and warns loudly: its latents mean nothing.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from selfflow.components.pretrained import WeightsNotFoundError, building_on_meta, check_data_range
from selfflow.components.tokenizers.latents import LatentNormalization
from selfflow.components.tokenizers.patchify import Patchify

__all__ = ["CHECKPOINTS", "EncodecCheckpoint", "EncodecTokenizer", "WeightsNotFoundError", "checkpoint_file",
           "build_encodec"]


@dataclass(frozen=True)
class EncodecCheckpoint:
    """A published EnCodec model: its checkpoint file name and the shapes it implies."""

    file: str
    sample_rate: int
    audio_channels: int
    latent_channels: int
    hop_length: int
    builder: str  # the EncodecModel constructor of this model


# What Meta publishes (encodec/model.py). Only the 24 kHz model: the 48 kHz one normalises each 1 s
# segment's loudness before its encoder, which continuous per-clip latents would have to carry along.
CHECKPOINTS = {
    "encodec_24khz": EncodecCheckpoint("encodec_24khz-d7cc33bc.th", 24000, 1, 128, 320, "encodec_model_24khz"),
}
_CHECKSUMMED_NAME = re.compile(r"[A-Za-z0-9_]+-([0-9a-f]{8,64})\.th")
RANDOM_INIT_WARNING = ("EncodecTokenizer: RANDOM weights (random_init_for_tests=True). Its latents and decodes mean "
                       "nothing: use it for tests only, never for an experiment")


def _sha256_prefix(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def checkpoint_file(repository: str | os.PathLike, file_name: str, verify: bool = True) -> Path:
    """`repository`/`file_name` after checking it exists and (verify) that its sha256 starts with the
    hex digits after the name's dash. One-line errors: WeightsNotFoundError for a missing folder or
    file, ValueError for a name without a checksum or a file whose checksum differs."""
    match = _CHECKSUMMED_NAME.fullmatch(str(file_name))
    if match is None:
        raise ValueError(f"EnCodec checkpoint name {file_name!r} carries no checksum: expected '<name>-<sha256 "
                         f"prefix>.th' as Meta publishes it (e.g. {CHECKPOINTS['encodec_24khz'].file})")
    folder = Path(repository).expanduser()
    hint = (f"copy Meta's published EnCodec checkpoint {file_name} (from the encodec package's download "
            f"location) into {folder} on a machine with internet")
    if not folder.is_dir():
        raise WeightsNotFoundError(f"EnCodec repository folder {folder} does not exist: {hint}")
    path = folder / file_name
    if not path.is_file():
        raise WeightsNotFoundError(f"EnCodec checkpoint {path} not found: {hint}")
    if verify:
        expected = match.group(1)
        actual = _sha256_prefix(path, len(expected))
        if actual != expected:
            raise ValueError(f"EnCodec checkpoint {path} fails its checksum: sha256 starts with {actual}, "
                             f"the name says {expected} (a partial or altered download?)")
    return path


def build_encodec(model: str = "encodec_24khz", repository: str | os.PathLike | None = None,
                  file_name: str | None = None, seed: int = 0) -> torch.nn.Module:
    """The `encodec` package's model, frozen, in eval mode: weights from `repository`/`file_name`
    (default: the published name), or RANDOM weights drawn from `seed` when repository is None."""
    from encodec import EncodecModel  # lazy: imports torchaudio

    if model not in CHECKPOINTS:
        raise ValueError(f"unknown EnCodec model {model!r}; available: {', '.join(CHECKPOINTS)}")
    builder = getattr(EncodecModel, CHECKPOINTS[model].builder)
    with torch.random.fork_rng(devices=[]):  # its layers initialise from the global RNG
        torch.manual_seed(seed)
        network = builder(pretrained=False)
    if repository is not None:
        path = checkpoint_file(repository, file_name or CHECKPOINTS[model].file)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{path} is not an {model} state dict: {str(error).splitlines()[0]}") from None
    network.requires_grad_(False)
    return network.eval()


class EncodecTokenizer:
    """Frozen EnCodec from a local folder; encode: waveforms -> tokens, decode: tokens -> waveforms.

    repository: the folder holding the checkpoint (`~` expanded); None only with random_init_for_tests.
    model: a name in CHECKPOINTS; checkpoint: its file name (default: the one Meta publishes).
    data_shape: (audio_channels, samples) of the clips, samples a multiple of the model's hop (320).
    patch_size: latent frames per token (1: one token per 13.3 ms at 24 kHz).
    scaling_factor, shift_factor, latent_mean, latent_std: see LatentNormalization; per-channel
        statistics of your data's latents make the tokens unit-variance (EnCodec's are not).
    data_range: the waveforms' value range (mapped to EnCodec's [-1, 1]).
    device: where EnCodec runs; batch_size: most clips per EnCodec call.
    """

    def __init__(
        self,
        repository: str | os.PathLike | None = "~/.cache/selfflow/encodec",
        data_shape: Sequence[int] = (1, 15360),
        model: str = "encodec_24khz",
        checkpoint: str | None = None,
        patch_size: int = 1,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        latent_mean: Sequence[float] | None = None,
        latent_std: Sequence[float] | None = None,
        data_range: tuple[float, float] = (-1.0, 1.0),
        device: str = "cpu",
        batch_size: int = 16,
        random_init_for_tests: bool = False,
    ) -> None:
        if model not in CHECKPOINTS:
            raise ValueError(f"unknown EnCodec model {model!r}; available: {', '.join(CHECKPOINTS)}")
        spec = CHECKPOINTS[model]
        data_shape = tuple(data_shape)
        if len(data_shape) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in data_shape):
            raise ValueError(f"data_shape must be (audio_channels, samples) of positive ints, got {data_shape!r}")
        if data_shape[0] != spec.audio_channels:
            raise ValueError(f"{model} takes {spec.audio_channels} audio channel(s), data_shape says {data_shape[0]}")
        if data_shape[1] % spec.hop_length:
            raise ValueError(f"clips of {data_shape[1]} samples are not a whole number of EnCodec frames "
                             f"(hop_length {spec.hop_length})")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.random_init = bool(random_init_for_tests)
        if not self.random_init and (not isinstance(repository, (str, os.PathLike)) or not str(repository)):
            raise ValueError(f"repository must name the local folder of the EnCodec checkpoint, got {repository!r}")
        self.repository = Path(repository).expanduser() if repository and not self.random_init else None
        self.model_name, self.checkpoint = model, checkpoint or spec.file
        self.data_shape, self.sample_rate, self.hop_length = data_shape, spec.sample_rate, spec.hop_length
        self.data_range = check_data_range(data_range)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.patchify = Patchify((spec.latent_channels, data_shape[1] // spec.hop_length), patch_size)
        self.latent_shape = self.patchify.latent_shape
        self.token_shape = self.patchify.token_shape
        self.grid = self.patchify.grid
        self.normalization = LatentNormalization(spec.latent_channels, scaling_factor, shift_factor,
                                                 latent_mean, latent_std)
        self._model = None
        if self.random_init:
            warnings.warn(RANDOM_INIT_WARNING, stacklevel=2)
        elif not building_on_meta():
            checkpoint_file(self.repository, self.checkpoint, verify=False)  # cheap: the checksum on first use

    @property
    def model(self) -> torch.nn.Module:
        """The `encodec` package's EncodecModel, loaded (or randomly built) on first use."""
        if self._model is None:
            if building_on_meta():
                raise RuntimeError("EncodecTokenizer cannot load weights under a meta default device "
                                   "(that build is a config check): build it on a real device")
            with torch.device("cpu"):
                network = build_encodec(self.model_name, self.repository, self.checkpoint)
            self._model = network.to(self.device)
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
        source = "RANDOM weights (tests only)" if self.random_init else repr(str(self.repository / self.checkpoint))
        return (f"EncodecTokenizer({self.model_name}, {source}, data_shape={self.data_shape}, "
                f"latent_shape={self.latent_shape}, patch={self.patchify.patch}, {self.normalization!r})")
