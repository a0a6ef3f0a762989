"""Value types shared by components (the data that crosses the seams).

Time convention, used everywhere in the project:
    x_t = (1 - t) * x0 + t * eps,   t = 0 is data, t = 1 is pure noise,
    velocity target v = eps - x0,   sampling integrates from t = 1 down to t = 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Batch:
    """One training batch in token space.

    x0: clean tokens (B, N, P) produced by a tokenizer.
    cond: class labels (B,) int64, or None for unconditional data. The null
        class used for classifier-free guidance is `num_classes`.
    modality: in a modality mixture, the name of the batch's modality (objectives may
        set per-modality knobs from it); None otherwise.
    """

    x0: torch.Tensor
    cond: torch.Tensor | None = None
    modality: str | None = None

    @property
    def size(self) -> int:
        return self.x0.shape[0]


@dataclass
class BackboneOutput:
    """What a backbone forward returns.

    velocity: (B, N, P) predicted velocity, or None when the forward stopped
        early (`stop_at`).
    hidden: block index (1-based: the output of block k) -> (B, N, D).
    """

    velocity: torch.Tensor | None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossTerms:
    """Named loss terms of one objective call.

    terms: name -> scalar tensor (each with its graph).
    weights: name -> float multiplier; the trainer optimises
        sum(weights[k] * terms[k]) and logs every term on its own.
    diagnostics: name -> detached scalar (logged, never optimised).
    """

    terms: dict[str, torch.Tensor]
    weights: dict[str, float]
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)

    def total(self) -> torch.Tensor:
        missing = set(self.terms) - set(self.weights)
        if missing:
            raise ValueError(f"loss terms without a weight: {sorted(missing)}")
        return sum(self.weights[name] * value for name, value in self.terms.items())


def module_device(module: nn.Module) -> torch.device:
    """Where a module computes: the device of its first parameter or buffer (the CPU if it has none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def has_spare_cpu_threads(device: torch.device) -> bool:
    """On the CPU with more than one intra-op thread: where a tiny config leaves a core partly idle,
    so a CPU fast path (the bmm attention kernel, the teacher thread) may use it."""
    return device.type == "cpu" and torch.get_num_threads() > 1
