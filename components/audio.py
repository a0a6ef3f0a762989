"""Waveform helpers shared by the audio evaluator and the sample writers."""
from __future__ import annotations

from typing import Sequence

import torch


def unit_mono(waveforms: torch.Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
    """(B, C, T) waveforms in `value_range` -> (B, T) mono in [-1, 1] (channels averaged)."""
    low, high = (float(v) for v in value_range)
    return ((waveforms.float() - (low + high) / 2) / ((high - low) / 2)).mean(dim=1)
