"""`selfflow autoencoder`: train a conv autoencoder tokenizer on a dataset's train split
(tokenizers/conv_ae_*_train.gin); config/loaders.py's `conv_ae_from` loads what it writes."""
from __future__ import annotations

from pathlib import Path

import gin
import torch

from selfflow.components.tokenizers.conv_ae import ConvAutoencoder, fit_conv_autoencoder, save_conv_autoencoder
from selfflow.platform.config.configurable import configurable
from selfflow.platform.errors import UserError


@configurable(module="tokenizers")
class AutoencoderTraining:
    """Train a ConvAutoencoder on a dataset's train split; write it (with its latent statistics) to `out`.
    Audio data (ShardData.modality 'audio') gets the 1-D autoencoder over time, video the 3-D one
    over (frames, rows, cols)."""

    def __init__(self, data=gin.REQUIRED, latent_channels: int = 4, hidden_channels: int = 32, downsample: int = 1,
                 data_range: tuple = (0.0, 1.0), steps: int = 2000, lr: float = 1e-3, batch_size: int = 128,
                 latent_penalty: float = 1e-4, seed: int = 0, out: str = "runs/autoencoders/conv_ae_digits.pt"):
        if steps <= 0 or batch_size <= 0:
            raise UserError(f"AutoencoderTraining steps and batch_size must be positive, got {steps}, {batch_size}")
        self.data, self.steps, self.lr, self.batch_size = data, steps, lr, batch_size
        self.latent_channels, self.hidden_channels, self.downsample = latent_channels, hidden_channels, downsample
        self.data_range, self.latent_penalty, self.seed = tuple(data_range), latent_penalty, seed
        self.out = Path(out)

    def run(self) -> dict[str, float]:
        train_x, _ = self.data.arrays(self.data.train_split)
        test_x, _ = self.data.arrays(self.data.eval_split)
        train_x = torch.as_tensor(train_x, dtype=torch.float32)
        modality = getattr(self.data, "modality", "image")
        if modality == "audio":
            if train_x.dim() != 3:
                raise UserError(f"AutoencoderTraining needs waveforms (M, C, T) for audio, got {tuple(train_x.shape)}")
        elif modality == "video":
            if train_x.dim() != 5:
                raise UserError(f"AutoencoderTraining needs clips (M, C, T, H, W) for video, got {tuple(train_x.shape)}")
        else:
            if train_x.dim() == 3:
                train_x = train_x.unsqueeze(1)
            if train_x.dim() != 4 or train_x.shape[-1] != train_x.shape[-2]:
                raise UserError(f"AutoencoderTraining needs square images (M, C, S, S), got {tuple(train_x.shape)}")
        try:
            model = ConvAutoencoder(
                in_channels=int(train_x.shape[1]), image_size=[int(size) for size in train_x.shape[2:]],
                latent_channels=self.latent_channels, hidden_channels=self.hidden_channels,
                downsample=self.downsample, data_range=self.data_range, seed=self.seed, dims=train_x.dim() - 2,
            )
            metrics = fit_conv_autoencoder(
                model, train_x, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                generator=torch.Generator().manual_seed(self.seed), test_images=test_x,
                latent_penalty=self.latent_penalty,
            )
        except (TypeError, ValueError) as error:
            raise UserError(f"AutoencoderTraining: {error}") from None
        save_conv_autoencoder(model, self.out)
        metrics["parameters"] = float(sum(p.numel() for p in model.parameters()))
        self.latent_shape = model.latent_shape
        return metrics
