"""Samplers on a Gaussian target whose marginal velocity field is known in closed form.

Derivation. Per dimension x0 ~ N(m, s^2), eps ~ N(0, 1) independent, and
x_t = (1 - t) x0 + t eps is Gaussian with mean mu_t = (1 - t) m and variance
var_t = (1 - t)^2 s^2 + t^2. Jointly Gaussian conditioning gives
    E[x0  | x_t = x] = m + (1 - t) s^2 / var_t * (x - mu_t)
    E[eps | x_t = x] = t / var_t * (x - mu_t)
so the marginal velocity E[eps - x0 | x_t = x] is
    v(x, t) = -m + (t - (1 - t) s^2) / var_t * (x - mu_t).
Its ODE flow is x_t = mu_t + sqrt(var_t) z: from x1 = z ~ N(0, 1) at t = 1 the
exact endpoint is m + s z, which gives a per-sample error for the ODE samplers.
"""
from __future__ import annotations

import math

import pytest
import torch

from selfflow.components.samplers import (
    EulerMaruyamaSampler,
    EulerSampler,
    HeunSampler,
    classifier_free_guidance,
    time_grid,
    time_grid_with_final_jump,
)
from selfflow.components.schedules import shift_time

torch.set_num_threads(1)

BATCH, TOKENS, DIMS = 4000, 2, 3
MEAN = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 1.5, -0.5]], dtype=torch.float64)
STD = torch.tensor([[0.3, 1.0, 0.6], [0.8, 0.4, 1.2]], dtype=torch.float64)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    assert t.shape == (x.shape[0],)
    t = t.reshape(-1, 1, 1).to(x.dtype)
    mean_t = (1 - t) * MEAN
    var_t = (1 - t) ** 2 * STD**2 + t**2
    return -MEAN + (t - (1 - t) * STD**2) / var_t * (x - mean_t)


def exact_marginal_state(noise: torch.Tensor, t: float) -> torch.Tensor:
    return (1 - t) * MEAN + torch.sqrt((1 - t) ** 2 * STD**2 + t**2) * noise


def start_noise(seed: int = 0, batch: int = BATCH) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TOKENS, DIMS, generator=g, dtype=torch.float64)


def ode_error(samples: torch.Tensor, noise: torch.Tensor) -> float:
    return (samples - (MEAN + STD * noise)).abs().mean().item()


def assert_matches_target(samples: torch.Tensor, mean_tol: float = 0.05, var_rtol: float = 0.08) -> None:
    mean_err = (samples.mean(0) - MEAN).abs()
    var_err = (samples.var(0) / STD**2 - 1).abs()
    assert mean_err.max().item() < mean_tol, f"mean errors {mean_err}"
    assert var_err.max().item() < var_rtol, f"relative variance errors {var_err}"


# ---------------------------------------------------------------- grids


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_grid_decreases_from_one_to_zero(shift):
    grid = time_grid(10, shift=shift)
    assert grid.shape == (11,) and grid.dtype == torch.float32
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert torch.all(grid[1:] < grid[:-1])
    uniform = torch.linspace(1, 0, 11, dtype=torch.float64)
    torch.testing.assert_close(grid, shift_time(uniform, shift).float())


def test_grid_shift_spends_more_steps_near_noise():
    plain, shifted = time_grid(10), time_grid(10, shift=3.0)
    assert torch.all(shifted[1:-1] > plain[1:-1])
    assert (shifted > 0.5).sum() > (plain > 0.5).sum()


def test_grid_keeps_requested_endpoints_under_shift():
    grid = time_grid(8, shift=3.0, t_max=0.9, t_min=0.1)
    assert grid[0].item() == pytest.approx(0.9) and grid[-1].item() == pytest.approx(0.1)
    assert torch.all(grid[1:] < grid[:-1])


def test_grid_with_final_jump():
    grid = time_grid_with_final_jump(250, final_jump=0.04)
    assert grid.shape == (251,)
    assert grid[0].item() == 1.0 and grid[-2].item() == pytest.approx(0.04) and grid[-1].item() == 0.0
    assert torch.all(grid[1:] < grid[:-1])


@pytest.mark.parametrize(
    "kwargs", [dict(steps=0), dict(steps=4, shift=0.0), dict(steps=4, t_min=0.5, t_max=0.5), dict(steps=4, t_max=1.5)]
)
def test_bad_grid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        time_grid(**kwargs)


@pytest.mark.parametrize("grid", [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5, 0.5, 0.0]), torch.tensor([1.0])])
def test_samplers_reject_bad_grids(grid):
    with pytest.raises(ValueError):
        EulerSampler()(gaussian_velocity, start_noise(batch=4), grid)


# ---------------------------------------------------------------- ODE samplers


def test_euler_many_steps_reaches_target():
    noise = start_noise(1)
    sampler = EulerSampler()
    samples = sampler(gaussian_velocity, noise, time_grid(400))
    assert sampler.last_nfe == 400
    assert_matches_target(samples)
    assert ode_error(samples, noise) < 5e-3


def test_heun_few_steps_reaches_target():
    noise = start_noise(2)
    sampler = HeunSampler()
    samples = sampler(gaussian_velocity, noise, time_grid(20))
    assert sampler.last_nfe == 2 * 20 - 1
    assert_matches_target(samples)
    assert ode_error(samples, noise) < 5e-3


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_heun_beats_euler_at_equal_steps(steps):
    noise = start_noise(3, batch=500)
    grid = time_grid(steps)
    euler_error = ode_error(EulerSampler()(gaussian_velocity, noise, grid), noise)
    heun_error = ode_error(HeunSampler()(gaussian_velocity, noise, grid), noise)
    assert heun_error < euler_error / 4


def test_convergence_orders():
    noise = start_noise(4, batch=500)
    euler = [ode_error(EulerSampler()(gaussian_velocity, noise, time_grid(k)), noise) for k in (20, 40)]
    heun = [ode_error(HeunSampler()(gaussian_velocity, noise, time_grid(k)), noise) for k in (20, 40)]
    assert 1.6 < euler[0] / euler[1] < 2.5  # first order
    assert heun[0] / heun[1] > 3.2  # second order


def test_heun_nfe_and_final_corrector_option():
    noise = start_noise(5, batch=200)
    to_zero, to_tenth = time_grid(6), time_grid(6, t_min=0.1)
    sampler = HeunSampler()
    sampler(gaussian_velocity, noise, to_zero)
    assert sampler.last_nfe == 11
    sampler(gaussian_velocity, noise, to_tenth)
    assert sampler.last_nfe == 12
    corrected = HeunSampler(correct_at_zero=True)
    out = corrected(gaussian_velocity, noise, to_zero)
    assert corrected.last_nfe == 12
    assert ode_error(out, noise) < ode_error(sampler(gaussian_velocity, noise, to_zero), noise)


def test_trajectory_follows_exact_marginal_states():
    noise = start_noise(6, batch=300)
    grid = time_grid(200)
    out, trajectory = EulerSampler()(gaussian_velocity, noise, grid, return_trajectory=True)
    assert len(trajectory) == 201
    assert trajectory[0] is noise and torch.equal(trajectory[-1], out)
    for index in (50, 100, 150):
        t = grid[index].item()
        err = (trajectory[index] - exact_marginal_state(noise, t)).abs().max().item()
        assert err < 0.02, f"t={t}: {err}"


def test_velocity_sees_batch_times_from_the_grid():
    seen = []

    def recording(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    grid = torch.tensor([1.0, 0.6, 0.2, 0.0])
    EulerSampler()(recording, start_noise(batch=4).float(), grid)
    assert [s.shape for s in seen] == [(4,)] * 3
    torch.testing.assert_close(torch.stack([s[0] for s in seen]), grid[:-1])


def test_wrong_velocity_shape_raises():
    with pytest.raises(ValueError):
        EulerSampler()(lambda x, t: x[:, :1], start_noise(batch=4), time_grid(2))


# ---------------------------------------------------------------- SDE sampler


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_euler_maruyama_reaches_target(scale):
    sampler = EulerMaruyamaSampler(diffusion_scale=scale)
    samples = sampler(gaussian_velocity, start_noise(7), time_grid(250), torch.Generator().manual_seed(11))
    assert sampler.last_nfe == 250
    assert_matches_target(samples)


def test_euler_maruyama_official_layout_reaches_target():
    sampler = EulerMaruyamaSampler()
    grid = time_grid_with_final_jump(250, final_jump=0.04)
    samples = sampler(gaussian_velocity, start_noise(8), grid, torch.Generator().manual_seed(12))
    assert_matches_target(samples)


def test_euler_maruyama_is_not_the_ode():
    # Diffusion really injects noise: the map from x1 to x0 is no longer the ODE's.
    noise = start_noise(9)
    samples = EulerMaruyamaSampler()(gaussian_velocity, noise, time_grid(250), torch.Generator().manual_seed(0))
    assert ode_error(samples, noise) > 0.1


def test_euler_maruyama_zero_diffusion_is_euler():
    noise, grid = start_noise(10, batch=100), time_grid(30)
    sde = EulerMaruyamaSampler(diffusion_scale=0.0)(gaussian_velocity, noise, grid)
    assert torch.equal(sde, EulerSampler()(gaussian_velocity, noise, grid))


def test_euler_maruyama_reproducible_and_uses_only_its_generator():
    noise, grid = start_noise(11, batch=100), time_grid(20)
    sampler = EulerMaruyamaSampler()
    state = torch.get_rng_state()
    first = sampler(gaussian_velocity, noise, grid, torch.Generator().manual_seed(3))
    second = sampler(gaussian_velocity, noise, grid, torch.Generator().manual_seed(3))
    other = sampler(gaussian_velocity, noise, grid, torch.Generator().manual_seed(4))
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)
    assert torch.equal(torch.get_rng_state(), state)


def test_euler_maruyama_final_step_modes_single_step():
    # One step from t = 1 to 0. At t = 1: eps_hat = x, and E[x0 | x_1] = m.
    noise, grid = start_noise(12, batch=50), torch.tensor([1.0, 0.0])
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    mean = EulerMaruyamaSampler(2.0, last_step="mean")(gaussian_velocity, noise, grid, g())
    torch.testing.assert_close(mean, MEAN.expand_as(noise))
    drift = EulerMaruyamaSampler(2.0, last_step="drift")(gaussian_velocity, noise, grid, g())
    torch.testing.assert_close(drift, MEAN - 2.0 * noise)
    z = torch.randn(noise.shape, generator=g(), dtype=noise.dtype)
    sde = EulerMaruyamaSampler(2.0, last_step="sde")(gaussian_velocity, noise, grid, g())
    torch.testing.assert_close(sde, MEAN - 2.0 * noise + math.sqrt(2 * 2.0 * 1.0 * 1.0) * z)


def test_euler_maruyama_trajectory_and_last_step_deterministic():
    noise, grid = start_noise(13, batch=100), time_grid(10)
    sampler = EulerMaruyamaSampler()
    out, trajectory = sampler(gaussian_velocity, noise, grid, torch.Generator().manual_seed(1), return_trajectory=True)
    assert len(trajectory) == 11 and torch.equal(trajectory[-1], out)
    before_last, t = trajectory[-2], grid[-2].item()
    v = gaussian_velocity(before_last, torch.full((100,), t, dtype=torch.float64))
    torch.testing.assert_close(out, before_last - t * v)


def test_euler_maruyama_bad_arguments():
    with pytest.raises(ValueError):
        EulerMaruyamaSampler(diffusion_scale=-1.0)
    with pytest.raises(ValueError):
        EulerMaruyamaSampler(last_step="tweedie")
    with pytest.raises(ValueError):
        EulerMaruyamaSampler()(gaussian_velocity, start_noise(batch=4), time_grid(3), None)


# ---------------------------------------------------------------- classifier-free guidance


class RecordingModel:
    """v = x * (1 + t) + offset[cond]; records the batch size of every forward."""

    def __init__(self) -> None:
        self.offsets = torch.tensor([[0.5], [-1.0], [2.0], [0.0]])  # last row: null class 3
        self.batch_sizes: list[int] = []

    def __call__(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        return x * (1 + t.reshape(-1, 1, 1)) + self.offsets[cond].reshape(-1, 1, 1)


def cfg_inputs():
    x = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([0, 1, 2])
    return x, cond


def test_cfg_scale_one_is_conditional_velocity_with_one_pass():
    x, cond = cfg_inputs()
    model = RecordingModel()
    t = torch.full((3,), 0.5)
    guided = classifier_free_guidance(model, cond, 3, scale=1.0)(x, t)
    torch.testing.assert_close(guided, model(x, t, cond))
    assert model.batch_sizes == [3, 3]


def test_cfg_inside_interval_is_guided_in_one_batched_forward():
    x, cond = cfg_inputs()
    model = RecordingModel()
    t = torch.full((3,), 0.5)
    guided = classifier_free_guidance(model, cond, torch.full_like(cond, 3), scale=4.0, interval=(0.2, 0.7))(x, t)
    assert model.batch_sizes == [6]
    v_cond, v_null = model(x, t, cond), model(x, t, torch.full_like(cond, 3))
    torch.testing.assert_close(guided, v_null + 4.0 * (v_cond - v_null))
    assert not torch.allclose(guided, v_cond)


def test_cfg_outside_interval_is_conditional_velocity():
    x, cond = cfg_inputs()
    model = RecordingModel()
    velocity = classifier_free_guidance(model, cond, 3, scale=4.0, interval=(0.2, 0.7))
    for t_value in (0.1, 0.9):
        t = torch.full((3,), t_value)
        torch.testing.assert_close(velocity(x, t), model(x, t, cond))
    # Mixed times in one batch: guidance only where t is inside.
    t = torch.tensor([0.1, 0.5, 0.9])
    mixed = velocity(x, t)
    v_cond, v_null = model(x, t, cond), model(x, t, torch.full_like(cond, 3))
    torch.testing.assert_close(mixed[[0, 2]], v_cond[[0, 2]])
    torch.testing.assert_close(mixed[1], (v_null + 4.0 * (v_cond - v_null))[1])


def test_cfg_inside_a_sampler():
    x, cond = cfg_inputs()
    model = RecordingModel()
    velocity = classifier_free_guidance(model, cond, 3, scale=2.0, interval=(0.0, 0.5))
    EulerSampler()(velocity, x, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert model.batch_sizes == [3, 3, 6, 6]


def test_cfg_bad_arguments():
    x, cond = cfg_inputs()
    model = RecordingModel()
    with pytest.raises(ValueError):
        classifier_free_guidance(model, cond, torch.zeros(2, dtype=torch.long), 2.0)
    with pytest.raises(ValueError):
        classifier_free_guidance(model, cond, 3, 2.0, interval=(0.8, 0.2))
    with pytest.raises(ValueError):
        classifier_free_guidance(model, cond, 3, float("nan"))
    with pytest.raises(ValueError):
        classifier_free_guidance(model, cond, 3, 2.0)(x[:2], torch.full((2,), 0.5))
