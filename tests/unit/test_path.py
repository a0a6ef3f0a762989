"""The linear path: interpolation element by element, targets, exact inversions, score."""
from __future__ import annotations

import pytest
import torch

from selfflow.components.paths import LinearPath

torch.set_num_threads(1)

B, N, P = 3, 4, 2


def tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, N, P, generator=g, dtype=torch.float64)
    eps = torch.randn(B, N, P, generator=g, dtype=torch.float64)
    return x0, eps


def test_interpolate_per_sample_elementwise():
    x0, eps = tensors()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x_t = LinearPath().interpolate(x0, eps, t)
    for b in range(B):
        for n in range(N):
            for p in range(P):
                expected = (1 - t[b]) * x0[b, n, p] + t[b] * eps[b, n, p]
                assert x_t[b, n, p].item() == pytest.approx(expected.item(), abs=1e-12)


def test_interpolate_per_token_uses_each_tokens_level():
    x0, eps = tensors(1)
    t = torch.rand(B, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_t = LinearPath().interpolate(x0, eps, t)
    for b in range(B):
        for n in range(N):
            expected = (1 - t[b, n]) * x0[b, n] + t[b, n] * eps[b, n]
            torch.testing.assert_close(x_t[b, n], expected)
    # A token with a different level than its neighbours really differs from the per-sample result.
    per_sample = LinearPath().interpolate(x0, eps, t[:, 0])
    assert not torch.allclose(per_sample[:, 1:], x_t[:, 1:])
    torch.testing.assert_close(per_sample[:, 0], x_t[:, 0])


def test_interpolate_full_shape_and_scalar_time():
    x0, eps = tensors(3)
    t_full = torch.rand(B, N, P, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(LinearPath().interpolate(x0, eps, t_full), (1 - t_full) * x0 + t_full * eps)
    torch.testing.assert_close(LinearPath().interpolate(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps)


def test_endpoints():
    x0, eps = tensors(5)
    path = LinearPath()
    torch.testing.assert_close(path.interpolate(x0, eps, torch.zeros(B, dtype=torch.float64)), x0)
    torch.testing.assert_close(path.interpolate(x0, eps, torch.ones(B, N, dtype=torch.float64)), eps)


def test_velocity_target_is_time_derivative_of_path():
    x0, eps = tensors(6)
    path = LinearPath()
    torch.testing.assert_close(path.velocity_target(x0, eps), eps - x0)
    t, h = torch.full((B,), 0.3, dtype=torch.float64), 1e-6
    finite_diff = (path.interpolate(x0, eps, t + h) - path.interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(finite_diff, path.velocity_target(x0, eps), atol=1e-8, rtol=0)


@pytest.mark.parametrize("time_shape", [(B,), (B, N), (B, N, P)])
def test_recovery_from_state_and_velocity_is_exact(time_shape):
    x0, eps = tensors(7)
    t = torch.rand(time_shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    t[0] = 0.0  # endpoints included: no division anywhere
    t[-1] = 1.0
    path = LinearPath()
    x_t = path.interpolate(x0, eps, t)
    v = path.velocity_target(x0, eps)
    torch.testing.assert_close(path.x0_from_velocity(x_t, v, t), x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(path.eps_from_velocity(x_t, v, t), eps, atol=1e-12, rtol=0)


def test_score_from_marginal_velocity_matches_gaussian_score():
    # x0 ~ N(m, s^2), eps ~ N(0, 1): x_t ~ N((1-t) m, (1-t)^2 s^2 + t^2) with a known score,
    # and the marginal velocity E[eps - x0 | x_t] is closed-form (derived in test_samplers.py).
    m, s = 0.7, 0.4
    x = torch.linspace(-3, 3, 13, dtype=torch.float64).reshape(1, 13, 1)
    path = LinearPath()
    for t_value in (0.05, 0.5, 1.0):
        mean, var = (1 - t_value) * m, (1 - t_value) ** 2 * s**2 + t_value**2
        v = -m + (t_value - (1 - t_value) * s**2) / var * (x - mean)
        score = path.score_from_velocity(x, v, torch.tensor([t_value], dtype=torch.float64))
        torch.testing.assert_close(score, -(x - mean) / var)


def test_expand_time_shapes_and_errors():
    x = torch.zeros(B, N, P)
    path = LinearPath()
    assert path.expand_time(torch.zeros(B), x).shape == (B, 1, 1)
    assert path.expand_time(torch.zeros(B, N), x).shape == (B, N, 1)
    assert path.expand_time(torch.zeros(B, N, P), x).shape == (B, N, P)
    assert path.expand_time(0.5, x).dtype == x.dtype
    with pytest.raises(ValueError):
        path.expand_time(torch.zeros(B + 1), x)
    with pytest.raises(ValueError):
        path.expand_time(torch.zeros(B, N + 1), x)
    with pytest.raises(ValueError):
        path.expand_time(torch.zeros(B, N, P, 1), x)
    with pytest.raises(ValueError):
        path.interpolate(x, torch.zeros(B, N, P + 1), torch.zeros(B))
