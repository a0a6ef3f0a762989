"""Training timestep distributions p(t) on [0, 1] (t = 0 data, t = 1 noise).

Each distribution is a small immutable value object with
`sample(shape, generator) -> float32 Tensor` and `cdf(t) -> Tensor`.
Draws land on the generator's device and never touch the global RNG.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class TimeDistribution(Protocol):
    """What `ShiftedTime` (and any scheduler) needs from a base distribution."""

    def sample(self, shape: Sequence[int] | int, generator: torch.Generator) -> torch.Tensor: ...

    def cdf(self, t: torch.Tensor) -> torch.Tensor: ...


def _check_shift(shift: float) -> float:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)):
        raise TypeError(f"shift must be a real number, got {shift!r}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be finite and > 0, got {shift!r}")
    return float(shift)


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The time-shift map s_a(t) = a t / (1 + (a - 1) t).

    Monotone on [0, 1] with s_a(0) = 0 and s_a(1) = 1; a = 1 is the identity,
    a > 1 moves mass toward noise (t = 1). Its inverse is s_{1/a}.
    """
    a = _check_shift(shift)
    return a * t / (1.0 + (a - 1.0) * t)


def shift_time_inverse(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Inverse of `shift_time(., shift)`: t / (a - (a - 1) t) = s_{1/a}(t)."""
    return shift_time(t, 1.0 / _check_shift(shift))


def _shape_tuple(shape: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(shape)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"shape must be a sequence of non-negative ints, got {shape!r}")
    return shape


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _as_float64(t: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


@dataclass(frozen=True)
class UniformTime:
    """t ~ U[0, 1]."""

    def sample(self, shape: Sequence[int] | int, generator: torch.Generator) -> torch.Tensor:
        _check_generator(generator)
        return torch.rand(
            _shape_tuple(shape), generator=generator, device=generator.device, dtype=torch.float32
        )

    def cdf(self, t: torch.Tensor | float) -> torch.Tensor:
        return _as_float64(t).clamp(0.0, 1.0)


@dataclass(frozen=True)
class LogitNormalTime:
    """t = sigmoid(mu + sigma * z), z ~ N(0, 1) (the SD3 / SiT training default)."""

    mu: float = 0.0
    sigma: float = 1.0

    def __post_init__(self) -> None:
        for name in ("mu", "sigma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"LogitNormalTime.{name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"LogitNormalTime.{name} must be finite, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.sigma <= 0:
            raise ValueError(f"LogitNormalTime.sigma must be > 0, got {self.sigma!r}")

    def sample(self, shape: Sequence[int] | int, generator: torch.Generator) -> torch.Tensor:
        _check_generator(generator)
        z = torch.randn(
            _shape_tuple(shape), generator=generator, device=generator.device, dtype=torch.float32
        )
        return torch.sigmoid(self.mu + self.sigma * z)

    def cdf(self, t: torch.Tensor | float) -> torch.Tensor:
        # P(sigmoid(mu + sigma z) <= t) = Phi((logit(t) - mu) / sigma); logit(0|1) = -/+inf.
        t = _as_float64(t).clamp(0.0, 1.0)
        return torch.special.ndtr((torch.logit(t) - self.mu) / self.sigma)


@dataclass(frozen=True)
class ShiftedTime:
    """t = shift_time(u, shift) with u ~ base: any p(t) pushed through the shift map."""

    base: TimeDistribution
    shift: float

    def __post_init__(self) -> None:
        if not (callable(getattr(self.base, "sample", None)) and callable(getattr(self.base, "cdf", None))):
            raise TypeError(
                f"ShiftedTime.base must have sample() and cdf(), got {type(self.base).__name__}"
            )
        object.__setattr__(self, "shift", _check_shift(self.shift))

    def sample(self, shape: Sequence[int] | int, generator: torch.Generator) -> torch.Tensor:
        base = self.base.sample(shape, generator)
        # Clamp guards float32 rounding just above 1.
        return shift_time(base, self.shift).clamp(0.0, 1.0)

    def cdf(self, t: torch.Tensor | float) -> torch.Tensor:
        # The map is increasing, so P(s(u) <= t) = F_base(s^{-1}(t)).
        t = _as_float64(t).clamp(0.0, 1.0)
        return self.base.cdf(shift_time_inverse(t, self.shift))
