"""REPA's external encoders trained by the platform itself (so the baseline runs offline).

`selfflow encoder --gin_file encoders/digits_small.gin` trains a digit encoder on
the digits train split and writes it where the REPA presets look for it; audio data
(encoders/spoken_digits_*.gin) gets a spoken-digit encoder, video data (encoders/clips_*.gin)
a clip encoder (components/encoders/sequence_encoders.py). config/loaders.py loads them.
"""
from __future__ import annotations

from pathlib import Path

import gin
import torch

from selfflow.components.encoders.digit_encoder import DigitEncoder, fit_digit_encoder
from selfflow.components.encoders.sequence_encoders import (
    ClipEncoder,
    SpokenDigitEncoder,
    fit_sequence_encoder,
    save_sequence_encoder,
)
from selfflow.platform.config.configurable import configurable
from selfflow.platform.errors import UserError


def _train_sequence_encoder(job: "EncoderTraining", modality: str) -> dict[str, float]:
    """Audio (waveforms) -> SpokenDigitEncoder, video (clips) -> ClipEncoder, trained like the digit one."""
    train_x, train_y = job.data.arrays(job.data.train_split)
    test_x, test_y = job.data.arrays(job.data.eval_split)
    try:
        if modality == "audio":
            encoder = SpokenDigitEncoder(job.size, samples=int(train_x.shape[-1]), seed=job.seed)
        else:
            encoder = ClipEncoder(job.size, clip_shape=tuple(train_x.shape[1:]), seed=job.seed)
        metrics = fit_sequence_encoder(
            encoder, torch.as_tensor(train_x), torch.as_tensor(train_y), steps=job.steps, lr=job.lr,
            batch_size=job.batch_size, generator=torch.Generator().manual_seed(job.seed),
            test_inputs=torch.as_tensor(test_x), test_labels=torch.as_tensor(test_y),
        )
    except (TypeError, ValueError) as error:
        raise UserError(f"EncoderTraining: {error}") from None
    save_sequence_encoder(encoder, job.out)
    metrics["parameters"] = float(sum(p.numel() for p in encoder.parameters()))
    return metrics


@configurable(module="encoders")
class EncoderTraining:
    """What to train and where to write it."""

    def __init__(self, data=gin.REQUIRED, size: str = "small", steps: int = 1500, lr: float = 1e-3,
                 batch_size: int = 128, seed: int = 0, out: str = "runs/encoders/digit_encoder_small.pt"):
        if steps <= 0 or batch_size <= 0:
            raise UserError(f"EncoderTraining steps and batch_size must be positive, got {steps}, {batch_size}")
        self.data, self.size, self.steps, self.lr = data, size, steps, lr
        self.batch_size, self.seed, self.out = batch_size, seed, Path(out)

    def run(self) -> dict[str, float]:
        modality = getattr(self.data, "modality", "image")
        if modality in ("audio", "video"):
            return _train_sequence_encoder(self, modality)
        train_x, train_y = self.data.arrays(self.data.train_split)
        test_x, test_y = self.data.arrays(self.data.eval_split)
        torch.manual_seed(self.seed)
        encoder = DigitEncoder(self.size, seed=self.seed)
        metrics = fit_digit_encoder(
            encoder, torch.as_tensor(train_x), torch.as_tensor(train_y), steps=self.steps, lr=self.lr,
            batch_size=self.batch_size, generator=torch.Generator().manual_seed(self.seed),
            test_images=torch.as_tensor(test_x), test_labels=torch.as_tensor(test_y),
        )
        encoder.save_encoder(self.out)
        metrics["parameters"] = float(sum(p.numel() for p in encoder.parameters()))
        return metrics
