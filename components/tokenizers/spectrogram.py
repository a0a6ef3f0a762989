"""Log-magnitude STFT as an audio tokenizer, inverted by Griffin-Lim (no learned vocoder).

encode: waveform (B, C, T) in `data_range` -> mono in [-1, 1] -> STFT (Hann window `n_fft`, hop
`hop_length`, centred) -> log(floor + |X|) -> per-frequency normalisation (`LatentNormalization`,
one channel per frequency bin) -> tokens of `patch_size` frames x all bins along time.

Two edges are dropped so the latent has round sizes: the Nyquist bin (n_fft / 2) and the last
frame (a centred STFT of T samples has T / hop + 1 frames). decode restores both as silence
(log(floor)), undoes the log and runs torchaudio's Griffin-Lim (`griffin_lim_iters` iterations,
deterministic all-ones phase start: no random draw) back to T samples.

The magnitude is what a listener and the spectrogram evaluator hear; the phase is re-estimated, so
decode(encode(x)) is not x sample by sample, only in magnitude (checked in the tests).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from selfflow.components.audio import unit_mono
from selfflow.components.tokenizers.latents import LatentNormalization
from selfflow.components.tokenizers.patchify import Patchify


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class SpectrogramTokenizer:
    """Waveforms (B, 1, T) <-> tokens (B, T / hop / patch, n_fft / 2 * patch) of normalised log magnitudes.

    data_shape: (audio_channels, samples); channels are averaged to mono, decode writes them all alike.
    n_fft, hop_length: the STFT; samples must be a multiple of hop_length.
    floor: the log's offset, log(floor + |X|): the level silence maps to.
    latent_mean, latent_std: per-frequency statistics (n_fft / 2 values) of the log magnitudes, e.g.
        from `log_magnitude_statistics` on the training waveforms; None: 0 and 1.
    griffin_lim_iters: decode's Griffin-Lim iterations (torchaudio.transforms.GriffinLim).
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        n_fft: int = 256,
        hop_length: int = 64,
        patch_size: int = 2,
        floor: float = 1e-3,
        latent_mean: Sequence[float] | None = None,
        latent_std: Sequence[float] | None = None,
        data_range: Sequence[float] = (-1.0, 1.0),
        griffin_lim_iters: int = 32,
    ) -> None:
        data_shape = tuple(data_shape)
        if len(data_shape) != 2:
            raise ValueError(f"data_shape must be (audio_channels, samples), got {data_shape!r}")
        channels, samples = (_positive_int(name, v) for name, v in zip(("audio channels", "samples"), data_shape))
        _positive_int("n_fft", n_fft)
        _positive_int("hop_length", hop_length)
        _positive_int("griffin_lim_iters", griffin_lim_iters)
        if n_fft % 2 or hop_length > n_fft:
            raise ValueError(f"n_fft must be even and >= hop_length, got n_fft {n_fft}, hop_length {hop_length}")
        if samples % hop_length:
            raise ValueError(f"clips of {samples} samples are not a whole number of hops of {hop_length}")
        if not (isinstance(floor, (int, float)) and not isinstance(floor, bool) and floor > 0 and math.isfinite(floor)):
            raise ValueError(f"floor must be a positive number, got {floor!r}")
        low, high = (float(v) for v in data_range)
        if not high > low:
            raise ValueError(f"data_range must be (low, high) with high > low, got {tuple(data_range)}")
        self.data_shape, self.data_range = (channels, samples), (low, high)
        self.n_fft, self.hop_length, self.floor = n_fft, hop_length, float(floor)
        self.griffin_lim_iters = griffin_lim_iters
        bins, frames = n_fft // 2, samples // hop_length
        self.patchify = Patchify((bins, frames), patch_size)
        self.latent_shape = self.patchify.latent_shape
        self.token_shape = self.patchify.token_shape
        self.grid = self.patchify.grid
        self.normalization = LatentNormalization(bins, latent_mean=latent_mean, latent_std=latent_std)
        self._griffin_lim = None

    def _window(self, like: torch.Tensor) -> torch.Tensor:
        return torch.hann_window(self.n_fft, device=like.device, dtype=torch.float32)

    def log_magnitudes(self, audio: torch.Tensor) -> torch.Tensor:
        """Waveforms (B, *data_shape) -> raw log(floor + |STFT|) (B, n_fft / 2, samples / hop)."""
        if audio.dim() != 3 or tuple(audio.shape[1:]) != self.data_shape:
            raise ValueError(f"SpectrogramTokenizer takes waveforms (B, {', '.join(map(str, self.data_shape))}), "
                             f"got {tuple(audio.shape)}")
        mono = unit_mono(audio, self.data_range)
        spectrum = torch.stft(mono, self.n_fft, self.hop_length, window=self._window(mono), return_complex=True)
        bins, frames = self.latent_shape
        return (spectrum.abs()[:, :bins, :frames] + self.floor).log()

    def waveforms(self, log_magnitudes: torch.Tensor) -> torch.Tensor:
        """Raw log magnitudes (B, n_fft / 2, samples / hop) -> waveforms (B, *data_shape) by Griffin-Lim."""
        if tuple(log_magnitudes.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected log magnitudes (B, {self.latent_shape}), got {tuple(log_magnitudes.shape)}")
        silence = math.log(self.floor)
        full = torch.nn.functional.pad(log_magnitudes.float(), (0, 1, 0, 1), value=silence)  # Nyquist bin, last frame
        magnitude = (full.exp() - self.floor).clamp_min(0.0)
        mono = self._inverse()(magnitude.cpu()).to(log_magnitudes.device)
        low, high = self.data_range
        unit = mono[:, None, :].expand(-1, self.data_shape[0], -1)
        return unit * ((high - low) / 2) + (low + high) / 2

    def _inverse(self):
        if self._griffin_lim is None:
            from torchaudio.transforms import GriffinLim  # lazy: only decoding needs torchaudio

            # rand_init=False: the phase starts at zero, so decoding is deterministic and draws nothing.
            self._griffin_lim = GriffinLim(n_fft=self.n_fft, hop_length=self.hop_length, power=1.0,
                                           n_iter=self.griffin_lim_iters, length=self.data_shape[1],
                                           rand_init=False)
        return self._griffin_lim

    # ----- the Tokenizer seam -------------------------------------------------------------------

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        return self.patchify(self.normalization.normalize(self.log_magnitudes(audio)))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.waveforms(self.normalization.denormalize(self.patchify.inverse(tokens.float())))

    def __repr__(self) -> str:
        return (f"SpectrogramTokenizer(data_shape={self.data_shape}, n_fft={self.n_fft}, hop={self.hop_length}, "
                f"latent_shape={self.latent_shape}, patch={self.patchify.patch}, floor={self.floor}, "
                f"griffin_lim_iters={self.griffin_lim_iters})")


@torch.no_grad()
def log_magnitude_statistics(tokenizer: SpectrogramTokenizer, audio: torch.Tensor,
                             batch_size: int = 512) -> dict[str, list[float]]:
    """Per-frequency mean and std of the raw log magnitudes of `audio` (B, *data_shape), over clips and
    frames: the latent_mean / latent_std that make the tokens unit-variance per bin."""
    if audio.dim() != 3 or audio.shape[0] < 2:
        raise ValueError(f"need at least 2 waveforms (B, C, T) for statistics, got {tuple(audio.shape)}")
    logs = torch.cat([tokenizer.log_magnitudes(audio[start:start + batch_size].float())
                      for start in range(0, audio.shape[0], batch_size)])
    per_bin = logs.transpose(0, 1).reshape(logs.shape[1], -1).double()
    return {"latent_mean": per_bin.mean(dim=1).tolist(),
            "latent_std": per_bin.std(dim=1).clamp_min(1e-6).tolist()}
