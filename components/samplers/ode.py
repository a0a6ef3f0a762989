"""Deterministic samplers for the probability-flow ODE dx/dt = v(x, t), t from 1 down to 0.

A sampler sees only a velocity callable `velocity(x, t_batch) -> v` (t_batch of
shape (B,)) and an explicit decreasing grid; it counts velocity evaluations
(`last_nfe`) and can return every intermediate state.
"""
from __future__ import annotations

from typing import Callable

import torch

from selfflow.components.samplers.grids import check_grid

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x of shape (B, ...), t of shape (B,)) -> velocity of x's shape."""


class CountedVelocity:
    """Calls a VelocityFn at one scalar time, checks its output and counts calls."""

    def __init__(self, velocity: VelocityFn) -> None:
        if not callable(velocity):
            raise TypeError(f"velocity must be callable, got {type(velocity).__name__}")
        self.velocity = velocity
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        v = self.velocity(x, t_batch)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"velocity returned {shape}, expected a tensor of shape {tuple(x.shape)}")
        self.calls += 1
        return v


class GridSampler:
    """Shared driver: validates inputs, walks the grid, records NFE and the trajectory.

    Subclasses implement `_step(velocity, x, t, t_next, is_last, generator)`.
    Integration runs under `torch.no_grad()`.
    """

    last_nfe: int = 0

    def __call__(
        self,
        velocity: VelocityFn,
        noise: torch.Tensor,
        grid: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        return_trajectory: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.ndim < 1:
            got = f"{noise.dtype} {tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise TypeError(f"noise must be a floating tensor of shape (B, ...), got {got}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        times = check_grid(grid)
        counted = CountedVelocity(velocity)
        x = noise
        trajectory = [x]
        last = len(times) - 2
        with torch.no_grad():
            for i, (t, t_next) in enumerate(zip(times, times[1:])):
                x = self._step(counted, x, t, t_next, i == last, generator)
                if return_trajectory:
                    trajectory.append(x)
        self.last_nfe = counted.calls
        return (x, trajectory) if return_trajectory else x

    def _step(
        self,
        velocity: CountedVelocity,
        x: torch.Tensor,
        t: float,
        t_next: float,
        is_last: bool,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        raise NotImplementedError


class EulerSampler(GridSampler):
    """First-order explicit Euler: x <- x + (t_next - t) v(x, t). One NFE per step."""

    def _step(self, velocity, x, t, t_next, is_last, generator):
        return x + (t_next - t) * velocity(x, t)

    def __repr__(self) -> str:
        return "EulerSampler()"


class HeunSampler(GridSampler):
    """Second-order Heun (explicit trapezoid): Euler predictor, then average the slopes.

    A step that ends exactly at t = 0 skips the corrector by default (plain Euler,
    as EDM and REPA do). At t = 0 the input is the clean x0 and the training target
    eps - x0 contains noise the input says nothing about, while the usual p(t)
    (logit-normal, shifted) almost never trains there: the evaluation is the least
    reliable one of the whole trajectory. One Euler step keeps the method
    second-order overall and saves an NFE. `correct_at_zero=True` restores it.
    NFE: 2 per step, minus 1 when the last step lands on 0 uncorrected.
    """

    def __init__(self, correct_at_zero: bool = False) -> None:
        if not isinstance(correct_at_zero, bool):
            raise TypeError(f"correct_at_zero must be a bool, got {correct_at_zero!r}")
        self.correct_at_zero = correct_at_zero

    def _step(self, velocity, x, t, t_next, is_last, generator):
        dt = t_next - t
        v = velocity(x, t)
        x_euler = x + dt * v
        if t_next == 0.0 and not self.correct_at_zero:
            return x_euler
        v_next = velocity(x_euler, t_next)
        return x + dt * 0.5 * (v + v_next)

    def __repr__(self) -> str:
        return f"HeunSampler(correct_at_zero={self.correct_at_zero})"
