"""Decreasing sampling time grids (t = 1 noise -> t = 0 data)."""
from __future__ import annotations

import math

import torch

from selfflow.components.schedules.timesteps import shift_time, shift_time_inverse


def _check_unit_interval(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def time_grid(steps: int, shift: float = 1.0, t_max: float = 1.0, t_min: float = 0.0) -> torch.Tensor:
    """`steps + 1` strictly decreasing times from t_max to t_min (float32).

    Points are uniform in the un-shifted time, then mapped with shift_time, so
    the endpoints are exactly t_max and t_min and shift > 1 packs more steps
    near noise (the SD3-style sampling shift).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    t_max = _check_unit_interval("t_max", t_max)
    t_min = _check_unit_interval("t_min", t_min)
    if not t_min < t_max:
        raise ValueError(f"need t_min < t_max, got t_min={t_min!r}, t_max={t_max!r}")
    start = shift_time_inverse(t_max, shift)
    stop = shift_time_inverse(t_min, shift)
    uniform = torch.linspace(start, stop, steps + 1, dtype=torch.float64)
    grid = shift_time(uniform, shift)
    # Pin the endpoints against round-off of the map and its inverse.
    grid[0], grid[-1] = t_max, t_min
    return grid.to(torch.float32)


def time_grid_with_final_jump(steps: int, final_jump: float = 0.04, shift: float = 1.0) -> torch.Tensor:
    """`steps` intervals: steps - 1 from 1 down to final_jump, then one jump to 0.

    This is the SiT / REPA SDE layout (250 steps, last step of 0.04 taken as a
    deterministic "mean" step by the Euler-Maruyama sampler).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    final_jump = _check_unit_interval("final_jump", final_jump)
    if not 0.0 < final_jump < 1.0:
        raise ValueError(f"final_jump must lie in (0, 1), got {final_jump!r}")
    head = time_grid(steps - 1, shift=shift, t_max=1.0, t_min=final_jump)
    return torch.cat([head, torch.zeros(1, dtype=head.dtype)])


def check_grid(grid: torch.Tensor) -> list[float]:
    """Validate a sampling grid and return it as Python floats (one device sync)."""
    if not isinstance(grid, torch.Tensor):
        raise TypeError(f"grid must be a torch.Tensor, got {type(grid).__name__}")
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least 2 times, got shape {tuple(grid.shape)}")
    times = [float(t) for t in grid.detach().cpu().tolist()]
    if not all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in times):
        raise ValueError(f"grid times must be finite and in [0, 1], got {times}")
    if any(later >= earlier for earlier, later in zip(times, times[1:])):
        raise ValueError(f"grid must be strictly decreasing (1 -> 0), got {times}")
    return times
