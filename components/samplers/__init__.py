"""Samplers: integrate a velocity field along an explicit decreasing time grid (1 -> 0)."""
from selfflow.components.samplers.grids import check_grid, time_grid, time_grid_with_final_jump
from selfflow.components.samplers.guidance import classifier_free_guidance
from selfflow.components.samplers.ode import EulerSampler, GridSampler, HeunSampler, VelocityFn
from selfflow.components.samplers.sde import EulerMaruyamaSampler

__all__ = [
    "EulerMaruyamaSampler",
    "EulerSampler",
    "GridSampler",
    "HeunSampler",
    "VelocityFn",
    "check_grid",
    "classifier_free_guidance",
    "time_grid",
    "time_grid_with_final_jump",
]
