"""Generation with a trained backbone: noise -> sampler -> tokenizer.decode."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfflow.components.core import module_device
from selfflow.components.protocols import Backbone, Sampler, Tokenizer
from selfflow.components.samplers.grids import time_grid
from selfflow.components.samplers.guidance import classifier_free_guidance
from selfflow.components.samplers.ode import EulerSampler
from selfflow.platform.errors import ConfigError


@dataclass
class SamplingConfig:
    """How the EMA model generates: sampler, grid, guidance."""

    sampler: Sampler | None = None  # None: Euler
    steps: int = 32
    shift: float = 1.0
    cfg_scale: float = 1.0
    cfg_interval: tuple = (0.0, 1.0)
    per_class: int = 8
    seed: int = 1234

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError(f"SamplingConfig.steps must be positive, got {self.steps}")
        if self.shift <= 0:
            raise ConfigError(f"SamplingConfig.shift must be positive, got {self.shift}")
        if self.per_class <= 0:
            raise ConfigError(f"SamplingConfig.per_class must be positive, got {self.per_class}")


def model_velocity(model: nn.Module):
    """(x, t (B,), cond) -> velocity: the backbone seen as a plain velocity field."""

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return model(x, t, cond).velocity

    return velocity


@torch.no_grad()
def generate(
    model: Backbone,
    tokenizer: Tokenizer,
    config: SamplingConfig,
    labels: torch.Tensor | None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample raw data (decoded, on the CPU) for the given labels (or unconditionally).

    Integration runs on the model's device; the noise (and an SDE's noise) is drawn on the
    generator's, so a CPU generator gives the same samples on any device up to arithmetic.
    """
    was_training = model.training
    model.eval()
    device = module_device(model)
    count = labels.shape[0] if labels is not None else int(num_samples or 1)
    labels = labels.to(device) if labels is not None else None
    generator = generator or torch.Generator().manual_seed(config.seed)
    noise = torch.randn((count, *tokenizer.token_shape), generator=generator, device=generator.device).to(device)
    grid = time_grid(config.steps, shift=config.shift)
    base = model_velocity(model)
    num_classes = int(getattr(model, "num_classes", 0))
    if labels is not None and num_classes > 0 and config.cfg_scale != 1.0:
        null = torch.full_like(labels, num_classes)
        velocity = classifier_free_guidance(base, labels, null, config.cfg_scale, tuple(config.cfg_interval))
    else:
        def velocity(x, t):
            return base(x, t, labels)
    sampler = config.sampler or EulerSampler()
    tokens = sampler(velocity, noise, grid, generator=generator)
    model.train(was_training)
    return tokenizer.decode(tokens).cpu()


def class_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Row c of the grid holds `per_class` samples of class c."""
    return torch.arange(num_classes).repeat_interleave(per_class)
