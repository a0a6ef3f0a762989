"""SpectrogramTokenizer: tokens re-derived from torch.stft, per-bin statistics, the Griffin-Lim round
trip in magnitude, shapes and one-line errors."""
import math

import pytest
import torch

from selfflow.components.tokenizers.patchify import Patchify
from selfflow.components.tokenizers.spectrogram import SpectrogramTokenizer, log_magnitude_statistics

SHAPE = (1, 2048)


def chirps(count: int, seed: int = 0) -> torch.Tensor:
    """Speech-like test clips: a few harmonics of a drawn pitch under a smooth envelope, silence after."""
    generator = torch.Generator().manual_seed(seed)
    time = torch.arange(SHAPE[1]) / 8000.0
    pitch = 100 + 150 * torch.rand(count, 1, generator=generator)
    envelope = torch.sin(math.pi * (time / 0.15).clamp(max=1.0)) ** 2
    wave = sum(torch.sin(2 * math.pi * k * pitch * time) / k for k in (1, 2, 3, 5))
    return (0.3 * wave * envelope)[:, None, :]


def test_tokens_are_normalised_log_magnitudes_of_torch_stft():
    mean, std = torch.linspace(-3, 1, 64), torch.linspace(0.5, 2, 64)
    tokenizer = SpectrogramTokenizer(SHAPE, n_fft=128, hop_length=32, patch_size=4,
                                     latent_mean=mean.tolist(), latent_std=std.tolist(), floor=1e-3)
    audio = chirps(3)
    spectrum = torch.stft(audio[:, 0], 128, 32, window=torch.hann_window(128), return_complex=True).abs()
    assert spectrum.shape[1:] == (65, 2048 // 32 + 1)
    expected = ((spectrum[:, :64, :64] + 1e-3).log() - mean[:, None]) / std[:, None]
    assert tokenizer.latent_shape == (64, 64) and tokenizer.token_shape == (16, 256) and tokenizer.grid == (16,)
    assert torch.allclose(tokenizer.encode(audio), Patchify((64, 64), 4)(expected), atol=1e-5)


def test_data_range_maps_to_unit_waveforms_and_channels_average():
    plain = SpectrogramTokenizer(SHAPE, n_fft=128, hop_length=32)
    shifted = SpectrogramTokenizer((2, SHAPE[1]), n_fft=128, hop_length=32, data_range=(0.0, 2.0))
    audio = chirps(2)
    stereo = torch.cat([audio, audio], dim=1) + 1.0  # the same clip on both channels, in [0, 2]
    assert torch.allclose(shifted.encode(stereo), plain.encode(audio), atol=1e-3)  # log(1e-3 + |X|) near silence


def test_statistics_are_per_bin_mean_and_std_over_clips_and_frames():
    tokenizer = SpectrogramTokenizer(SHAPE, n_fft=128, hop_length=32)
    audio = chirps(5, seed=1)
    stats = log_magnitude_statistics(tokenizer, audio, batch_size=2)
    logs = tokenizer.log_magnitudes(audio)  # (5, 64, 64)
    per_bin = logs.permute(1, 0, 2).reshape(64, -1)
    assert torch.allclose(torch.tensor(stats["latent_mean"]).float(), per_bin.mean(1), atol=1e-5)
    assert torch.allclose(torch.tensor(stats["latent_std"]).float(), per_bin.std(1), atol=1e-5)
    normalised = SpectrogramTokenizer(SHAPE, n_fft=128, hop_length=32, **stats).encode(audio)
    flat = Patchify((64, 64), 2).inverse(normalised).permute(1, 0, 2).reshape(64, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(64), atol=1e-4)
    assert torch.allclose(flat.std(1), torch.ones(64), atol=1e-4)


def test_griffin_lim_round_trip_restores_the_magnitudes():
    tokenizer = SpectrogramTokenizer(SHAPE, n_fft=128, hop_length=32, griffin_lim_iters=64)
    audio = chirps(2)
    decoded = tokenizer.decode(tokenizer.encode(audio))
    assert decoded.shape == audio.shape
    target = tokenizer.log_magnitudes(audio).exp()
    rebuilt = tokenizer.log_magnitudes(decoded).exp()
    convergence = (rebuilt - target).norm() / target.norm()  # spectral convergence
    assert convergence < 0.15
    # Decoding draws nothing: the same tokens give the same waveform.
    assert torch.equal(tokenizer.decode(tokenizer.encode(audio)), decoded)


def test_bad_shapes_fail_in_one_line():
    with pytest.raises(ValueError, match="not a whole number of hops"):
        SpectrogramTokenizer((1, 2000), n_fft=128, hop_length=64)
    with pytest.raises(ValueError, match="data_shape must be"):
        SpectrogramTokenizer((2048,))
    with pytest.raises(ValueError, match=r"waveforms \(B, 1, 2048\)"):
        SpectrogramTokenizer(SHAPE, n_fft=128, hop_length=32).encode(torch.zeros(2, 2048))
    with pytest.raises(ValueError, match="floor must be"):
        SpectrogramTokenizer(SHAPE, floor=0.0)
