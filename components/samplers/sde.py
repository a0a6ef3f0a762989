"""Euler-Maruyama for the reverse-time SDE that shares its marginals with the flow ODE.

Derivation in this project's convention (t = 1 noise -> t = 0 data):
  * The probability-flow ODE dx = v(x, t) dt transports the marginals p_t.
  * Running time backwards, for any w(t) >= 0 the SDE
        dx = [v(x, t) - w(t) * score(x, t)] dt + sqrt(2 w(t)) dW,   dt < 0,
    has the same marginals: in reversed time s = 1 - t its Fokker-Planck equation
    gains -div(p w score) + w lap(p) = 0, since p * score = grad p.
  * On the linear path score = -eps_hat / t with eps_hat = x + (1 - t) v
    (LinearPath.eps_from_velocity). With SiT's "sigma" diffusion form,
    w(t) = diffusion_scale * t (the noise level), the 1/t cancels:
        x_next = x + dt * (v + diffusion_scale * eps_hat)
                   + sqrt(2 * diffusion_scale * t * |dt|) * z.
    This matches REPA's linear-path SDE sampler (diffusion 2t) for scale 1;
    diffusion_scale = 0 is exactly the Euler ODE sampler.

Last step (`last_step`):
  * "mean" (default): deterministic probability-flow Euler step. When the grid
    ends at 0 it lands on x - t v = E[x0 | x_t], the posterior mean.
  * "drift": the SDE drift without noise, SiT / REPA's "Mean" last step; it also
    subtracts diffusion_scale * t * eps_hat, slightly over-denoising with a large jump.
  * "sde": a plain Euler-Maruyama step, noise included.
"""
from __future__ import annotations

import math

import torch

from selfflow.components.paths.linear import LinearPath
from selfflow.components.samplers.ode import CountedVelocity, GridSampler, VelocityFn

LAST_STEPS = ("mean", "drift", "sde")


class EulerMaruyamaSampler(GridSampler):
    """Reverse-SDE sampler with diffusion w(t) = diffusion_scale * t. One NFE per step.

    Noise is drawn only from the `generator` passed to the call (required when
    diffusion_scale > 0), on the state's device and dtype.
    """

    def __init__(self, diffusion_scale: float = 1.0, last_step: str = "mean") -> None:
        if isinstance(diffusion_scale, bool) or not isinstance(diffusion_scale, (int, float)):
            raise TypeError(f"diffusion_scale must be a real number, got {diffusion_scale!r}")
        if not math.isfinite(diffusion_scale) or diffusion_scale < 0:
            raise ValueError(f"diffusion_scale must be finite and >= 0, got {diffusion_scale!r}")
        if last_step not in LAST_STEPS:
            raise ValueError(f"last_step must be one of {LAST_STEPS}, got {last_step!r}")
        self.diffusion_scale = float(diffusion_scale)
        self.last_step = last_step
        self.path = LinearPath()

    def __call__(
        self,
        velocity: VelocityFn,
        noise: torch.Tensor,
        grid: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        return_trajectory: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if generator is None and self.diffusion_scale > 0:
            raise ValueError("EulerMaruyamaSampler needs a torch.Generator for its noise, got None")
        return super().__call__(velocity, noise, grid, generator, return_trajectory=return_trajectory)

    def _step(
        self,
        velocity: CountedVelocity,
        x: torch.Tensor,
        t: float,
        t_next: float,
        is_last: bool,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        dt = t_next - t
        v = velocity(x, t)
        if is_last and self.last_step == "mean":
            return x + dt * v
        if self.diffusion_scale == 0.0:
            return x + dt * v
        eps_hat = self.path.eps_from_velocity(x, v, t)
        x_mean = x + dt * (v + self.diffusion_scale * eps_hat)
        if is_last and self.last_step == "drift":
            return x_mean
        # Drawn on the generator's device, then moved: a CPU generator drives a GPU run too.
        z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        return x_mean + math.sqrt(2.0 * self.diffusion_scale * t * -dt) * z

    def __repr__(self) -> str:
        return f"EulerMaruyamaSampler(diffusion_scale={self.diffusion_scale}, last_step={self.last_step!r})"
