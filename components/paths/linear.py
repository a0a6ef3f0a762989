"""The linear (rectified-flow) probability path of this project.

    x_t = (1 - t) x0 + t eps,   t = 0 data, t = 1 noise,   v = dx_t/dt = eps - x0.

Given x_t and a velocity v (true or predicted), the path is inverted exactly:
    x_t = x0 + t v          =>  x0  = x_t - t v
    x_t = eps - (1 - t) v   =>  eps = x_t + (1 - t) v
With eps ~ N(0, I), x_t | x0 ~ N((1 - t) x0, t^2 I), so the score is
    grad log p_t(x) = -E[eps | x_t = x] / t = -(x + (1 - t) v(x, t)) / t   (t > 0),
where v(x, t) = E[eps - x0 | x_t = x] is the marginal velocity.
"""
from __future__ import annotations

import torch


class LinearPath:
    """Stateless helper for interpolation, targets and their inversions."""

    def expand_time(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """Reshape t so it broadcasts against x (B, N, P, ...) along its leading dims.

        t may be a scalar, (B,) per sample, (B, N) per token, or any tensor
        whose shape aligns with the leading dims of x.
        """
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim > x.ndim:
            raise ValueError(f"t has shape {tuple(t.shape)}, more dims than x {tuple(x.shape)}")
        t = t.reshape(tuple(t.shape) + (1,) * (x.ndim - t.ndim))
        try:
            broadcast = torch.broadcast_shapes(t.shape, x.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != x.shape:
            raise ValueError(
                f"t of shape {tuple(t.shape)} does not broadcast to x of shape {tuple(x.shape)}"
            )
        return t

    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps, with t per sample, per token or full-shaped."""
        if x0.shape != eps.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} differ in shape")
        t = self.expand_time(t, x0)
        return (1.0 - t) * x0 + t * eps

    def velocity_target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = eps - x0 (independent of t on this path)."""
        if x0.shape != eps.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} differ in shape")
        return eps - x0

    def x0_from_velocity(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """x0 = x_t - t v; with the marginal velocity this is E[x0 | x_t]."""
        return x_t - self.expand_time(t, x_t) * v

    def eps_from_velocity(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """eps = x_t + (1 - t) v; with the marginal velocity this is E[eps | x_t]."""
        return x_t + (1.0 - self.expand_time(t, x_t)) * v

    def score_from_velocity(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """grad log p_t(x_t) = -eps_hat / t; undefined at t = 0 (samplers avoid dividing)."""
        return -self.eps_from_velocity(x_t, v, t) / self.expand_time(t, x_t)

    def __repr__(self) -> str:
        return "LinearPath()"
