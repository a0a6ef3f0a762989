"""Samples as files: image grids, film strips and GIFs for clips, spectrograms and wav for audio."""
from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import torch

from selfflow.components.audio import unit_mono
from selfflow.components.files import atomic_path


def film_strips(clips: torch.Tensor, gap_value: float = 0.5) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, C, H, F * (W + 1) - 1): frames side by side, a 1-pixel gap between."""
    batch, channels, frames, height, width = clips.shape
    gap = clips.new_full((batch, channels, frames, height, 1), gap_value)
    strips = torch.cat([clips, gap], dim=-1).permute(0, 1, 3, 2, 4).reshape(batch, channels, height, -1)
    return strips[..., :-1]


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int, value_range=(0.0, 1.0)) -> Path:
    """Write a PNG grid atomically (temp file + rename): never a half-written image."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    low, high = value_range
    scaled = ((images.float() - low) / (high - low)).clamp(0, 1)
    if scaled.dim() == 3:  # (B, H, W) -> (B, 1, H, W)
        scaled = scaled[:, None]
    if scaled.dim() == 5:  # clips (B, C, F, H, W): each becomes a film strip, frames left to right
        scaled = film_strips(scaled)
    scaled = _readable(scaled)
    with atomic_path(path, suffix=".png") as temp:
        save_image(scaled, temp, nrow=nrow, padding=2, pad_value=0.5)
    return path


def _readable(scaled: torch.Tensor) -> torch.Tensor:
    """Upscale tiny images (8x8 digits, 16-pixel frames) so a grid is readable."""
    if min(scaled.shape[-2:]) < 32:
        factor = max(1, 32 // min(scaled.shape[-2:]))
        scaled = torch.nn.functional.interpolate(scaled, scale_factor=factor, mode="nearest")
    return scaled


def save_clip_gif(clips: torch.Tensor, path: str | os.PathLike, nrow: int, value_range=(0.0, 1.0),
                  frame_ms: int = 125) -> Path:
    """Clips (B, C, F, H, W) -> an animated GIF whose frame f is the grid of every clip's frame f
    (looping), written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid

    low, high = value_range
    scaled = ((clips.float() - low) / (high - low)).clamp(0, 1)
    frames = []
    for index in range(scaled.shape[2]):
        grid = make_grid(_readable(scaled[:, :, index]), nrow=nrow, padding=2, pad_value=0.5)
        pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        frames.append(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".gif") as temp:
        frames[0].save(temp, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return path


def spectrogram_images(waveforms: torch.Tensor, value_range=(-1.0, 1.0), n_fft: int = 256,
                       hop: int = 64) -> torch.Tensor:
    """(B, C, T) waveforms -> (B, 1, n_fft // 2 + 1, frames) log-magnitude images in [0, 1], low
    frequencies at the bottom (a fixed 80 dB window, so grids of different steps compare)."""
    spectrum = torch.stft(unit_mono(waveforms, value_range), n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs()
    decibels = 20 * torch.log10(spectrum / (n_fft / 4) + 1e-8)
    return ((decibels + 80.0) / 80.0).clamp(0, 1).flip(1)[:, None]


def write_wav(waveforms: torch.Tensor, path: str | os.PathLike, sample_rate: int, gap_seconds: float = 0.25,
              value_range=(-1.0, 1.0)) -> Path:
    """All waveforms (B, C, T) one after another, `gap_seconds` of silence between, as one 16-bit wav
    (channels averaged to mono), written atomically."""
    mono = unit_mono(waveforms, value_range).clamp(-1, 1)
    gap = torch.zeros(mono.shape[0], int(gap_seconds * sample_rate))
    audio = torch.cat([mono, gap], dim=1).flatten()
    pcm = (audio.numpy() * 32767).round().astype("<i2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".wav") as temp:
        with wave.open(str(temp), "wb") as handle:
            handle.setnchannels(1)
            handle.setsampwidth(2)
            handle.setframerate(int(sample_rate))
            handle.writeframes(np.ascontiguousarray(pcm).tobytes())
    return path


def save_sample_grid(samples: torch.Tensor, path: str | os.PathLike, nrow: int, value_range=(0.0, 1.0),
                     sample_rate: int = 0) -> list[Path]:
    """Images -> one PNG grid. Clips (B, C, F, H, W) -> a PNG grid of film strips and the same grid
    animated as a GIF beside it. Waveforms (B, C, T) -> a PNG grid of their spectrograms, and, given
    the sample rate, the same samples in grid order as a wav beside it."""
    path = Path(path)
    if samples.dim() == 5:
        return [save_image_grid(samples, path, nrow, value_range),
                save_clip_gif(samples, path.with_suffix(".gif"), nrow, value_range)]
    if samples.dim() != 3 or samples.shape[1] > 4 or samples.shape[2] <= 64:  # not (B, C, T) audio
        return [save_image_grid(samples, path, nrow, value_range)]
    written = [save_image_grid(spectrogram_images(samples, value_range), path, nrow)]
    if sample_rate > 0:
        written.append(write_wav(samples, path.with_suffix(".wav"), sample_rate, value_range=value_range))
    return written
