"""Embeddings of a DiT: fixed sin-cos token positions, timestep levels, class labels."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

TIME_SCALE = 1000.0
"""t in [0, 1] is multiplied by this before the sinusoid, as DiT does with its integer steps."""


def sinusoid(positions: torch.Tensor, num_pairs: int, max_period: float = 10000.0) -> torch.Tensor:
    """(...,) positions -> (..., 2 * num_pairs) features [sin(p w_j), cos(p w_j)], w_j geometric in j."""
    exponents = torch.arange(num_pairs, dtype=torch.float64, device=positions.device) / max(num_pairs, 1)
    frequencies = max_period ** (-exponents)
    angles = positions.to(torch.float64).unsqueeze(-1) * frequencies
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def _check_grid(grid: Sequence[int]) -> tuple[int, ...]:
    grid = tuple(grid)
    if not 1 <= len(grid) <= 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in grid):
        raise ValueError(f"grid must be 1 to 3 positive ints, got {grid!r}")
    return grid


def sincos_position_embedding(grid: Sequence[int], dim: int) -> torch.Tensor:
    """Fixed positions of a 1-D, 2-D or 3-D token grid, shape (prod(grid), dim), float32.

    Tokens are ordered row-major (the last grid axis varies fastest), as a
    patchify that flattens (H/p, W/p) produces. Each axis gets its own block
    of sin/cos pairs; pairs that do not divide evenly go to the first axes.
    """
    grid = _check_grid(grid)
    if dim < 2 * len(grid) or dim % 2:
        raise ValueError(f"position embedding dim must be even and >= {2 * len(grid)}, got {dim}")
    total_pairs = dim // 2
    pairs_per_axis = [total_pairs // len(grid) + (axis < total_pairs % len(grid)) for axis in range(len(grid))]
    coordinates = torch.meshgrid(*[torch.arange(size, dtype=torch.float64) for size in grid], indexing="ij")
    blocks = [sinusoid(coord.reshape(-1), pairs) for coord, pairs in zip(coordinates, pairs_per_axis)]
    return torch.cat(blocks, dim=-1).to(torch.float32)


class TimestepEmbedder(nn.Module):
    """Noise level t in [0, 1] of any shape (...,) -> (..., hidden_dim): sinusoid of 1000 t, then an MLP."""

    def __init__(self, hidden_dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        if frequency_dim % 2:
            raise ValueError(f"frequency_dim must be even, got {frequency_dim}")
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Same [cos, sin] layout and period as DiT's timestep features.
        half = self.frequency_dim // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
        frequencies = torch.exp(-math.log(10000.0) * exponents)
        angles = (t.float() * TIME_SCALE).unsqueeze(-1) * frequencies
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Class labels must lie in [0, num_classes] (num_classes is the null class); ValueError otherwise."""
    if labels.numel() and (labels.min() < 0 or labels.max() > num_classes):
        bad = labels[(labels < 0) | (labels > num_classes)][0].item()
        raise ValueError(f"label {bad} out of range [0, {num_classes}] (null class is {num_classes})")


class LabelEmbedder(nn.Module):
    """Class labels (B,) in [0, num_classes] -> (B, hidden_dim); label num_classes is the CFG null class.

    Label dropout is not done here: objectives replace labels by the null class
    with their own generator, so the model stays deterministic.
    """

    def __init__(self, num_classes: int, hidden_dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelEmbedder needs num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} dtype {labels.dtype}"
            )
        # The value check reads the labels on the host: done for CPU tensors only, because on an
        # accelerator it would stall every forward (the trainer checks raw labels before moving them).
        # Not inside torch.compile either: a value-dependent branch would split the graph (the trainer
        # checks the raw labels of a compiled run too).
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():
            check_label_range(labels, self.num_classes)
        return self.table(labels.long())
