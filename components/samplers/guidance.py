"""Classifier-free guidance with a guidance interval, as a velocity-function wrapper."""
from __future__ import annotations

import math
from typing import Callable

import torch

ModelVelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x (B, ...), t (B,), cond (B, ...)) -> velocity of x's shape."""


def classifier_free_guidance(
    model_velocity: ModelVelocityFn,
    cond: torch.Tensor,
    null_cond: torch.Tensor | int,
    scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return velocity(x, t) = v_null + scale * (v_cond - v_null) where t is in `interval`.

    Samples whose t lies outside the closed interval [lo, hi] get the plain
    conditional velocity; scale = 1 is exactly no guidance (and skips the null
    pass). Conditional and null passes share one forward on a doubled batch.
    null_cond: a tensor shaped like cond, or an int label (the null class).
    """
    if not callable(model_velocity):
        raise TypeError(f"model_velocity must be callable, got {type(model_velocity).__name__}")
    if not isinstance(cond, torch.Tensor) or cond.ndim < 1:
        raise TypeError(f"cond must be a tensor of shape (B, ...), got {type(cond).__name__}")
    if isinstance(null_cond, bool):
        raise TypeError(f"null_cond must be a tensor or an int, got {null_cond!r}")
    if isinstance(null_cond, int):
        null_cond = torch.full_like(cond, null_cond)
    if not isinstance(null_cond, torch.Tensor) or null_cond.shape != cond.shape:
        got = tuple(null_cond.shape) if isinstance(null_cond, torch.Tensor) else type(null_cond).__name__
        raise ValueError(f"null_cond must match cond's shape {tuple(cond.shape)}, got {got}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(f"interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {interval!r}")
    lo, hi = float(interval[0]), float(interval[1])
    scale = float(scale)
    both_cond = torch.cat([cond, null_cond])

    def guided_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != cond.shape[0] or t.shape != (x.shape[0],):
            raise ValueError(
                f"x {tuple(x.shape)} and t {tuple(t.shape)} must share cond's batch size {cond.shape[0]}"
            )
        inside = (t >= lo) & (t <= hi)
        if scale == 1.0 or not bool(inside.any()):
            return model_velocity(x, t, cond)
        v_both = model_velocity(torch.cat([x, x]), torch.cat([t, t]), both_cond)
        v_cond, v_null = v_both.chunk(2)
        v_guided = v_null + scale * (v_cond - v_null)
        mask = inside.reshape((-1,) + (1,) * (x.ndim - 1))
        return torch.where(mask, v_guided, v_cond)

    return guided_velocity
