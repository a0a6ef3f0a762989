"""DiT size presets and a parameter count that allocates no memory."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from selfflow.components.backbones.dit import DiT


@dataclass(frozen=True)
class DiTSize:
    hidden_dim: int
    depth: int
    num_heads: int

    def as_kwargs(self) -> dict[str, int]:
        return asdict(self)


DIT_SIZES: dict[str, DiTSize] = {
    # tiny: for 8x8 digits (patch 2 -> 16 tokens of dim 4) on a CPU in minutes. About 1M parameters;
    # 96 = 4 heads x 24 dims; 96 splits evenly over 1, 2 or 3 grid axes in the position embedding;
    # depth 6 keeps the Self-Flow layer ratios distinct (student 0.3 D -> block 2, teacher 0.7 D -> block 4).
    "tiny": DiTSize(hidden_dim=96, depth=6, num_heads=4),
    "S": DiTSize(hidden_dim=384, depth=12, num_heads=6),
    "B": DiTSize(hidden_dim=768, depth=12, num_heads=12),
    "L": DiTSize(hidden_dim=1024, depth=24, num_heads=16),
    "XL": DiTSize(hidden_dim=1152, depth=28, num_heads=16),
}


def dit_size(size: str) -> DiTSize:
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
    return DIT_SIZES[size]


def dit_from_size(size: str, in_dim: int, grid: tuple[int, ...], num_classes: int = 0, **options: Any) -> DiT:
    """A DiT of a preset size; `options` are the remaining DiT arguments (mlp_ratio, qk_norm, ...)."""
    return DiT(in_dim=in_dim, grid=tuple(grid), num_classes=num_classes, **dit_size(size).as_kwargs(), **options)


def count_parameters(size: str, in_dim: int, grid: tuple[int, ...], num_classes: int) -> int:
    """Trainable parameters of a preset DiT, built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = dit_from_size(size, in_dim, grid, num_classes)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
