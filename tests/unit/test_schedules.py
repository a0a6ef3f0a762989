"""Timestep distributions p(t): exact laws (KS), analytic moments, shift map, reproducibility."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from selfflow.components.schedules import (
    LogitNormalTime,
    ShiftedTime,
    UniformTime,
    shift_time,
    shift_time_inverse,
)

torch.set_num_threads(1)

N_KS = 4000
N_MOMENTS = 20000


def draw(dist, n: int, seed: int = 0) -> np.ndarray:
    return dist.sample((n,), torch.Generator().manual_seed(seed)).double().numpy()


def cdf_fn(dist):
    return lambda x: dist.cdf(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def shifted_uniform_cdf(t: np.ndarray, a: float) -> np.ndarray:
    # u = a t' / (1 + (a - 1) t')  =>  t' = u / (a - (a - 1) u); F(t) = P(U <= s^{-1}(t)).
    return t / (a - (a - 1.0) * t)


def logit_normal_pdf(t: float, mu: float, sigma: float) -> float:
    z = (math.log(t / (1.0 - t)) - mu) / sigma
    return math.exp(-0.5 * z * z) / (sigma * math.sqrt(2.0 * math.pi) * t * (1.0 - t))


DISTRIBUTIONS = [
    UniformTime(),
    LogitNormalTime(),
    LogitNormalTime(mu=-0.8, sigma=1.6),
    ShiftedTime(UniformTime(), shift=3.0),
    ShiftedTime(LogitNormalTime(mu=0.5, sigma=0.7), shift=0.4),
]


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=repr)
def test_samples_follow_own_cdf_ks(dist):
    samples = draw(dist, N_KS, seed=1)
    assert samples.min() >= 0.0 and samples.max() <= 1.0
    assert stats.kstest(samples, cdf_fn(dist)).pvalue > 0.01


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=repr)
def test_samples_are_float32_with_requested_shape(dist):
    out = dist.sample((3, 5), torch.Generator().manual_seed(0))
    assert out.shape == (3, 5) and out.dtype == torch.float32


def test_ks_has_power_against_a_wrong_law():
    # The same KS check must reject a law the samples do not follow.
    samples = draw(LogitNormalTime(), N_KS, seed=1)
    assert stats.kstest(samples, cdf_fn(UniformTime())).pvalue < 1e-6
    shifted = draw(ShiftedTime(UniformTime(), 3.0), N_KS, seed=1)
    assert stats.kstest(shifted, cdf_fn(ShiftedTime(UniformTime(), 2.0))).pvalue < 1e-6


def test_uniform_moments():
    samples = draw(UniformTime(), N_MOMENTS, seed=2)
    mean_se = math.sqrt((1 / 12) / N_MOMENTS)
    var_se = math.sqrt((1 / 80 - 1 / 144) / N_MOMENTS)  # (mu4 - sigma^4) / n for U[0, 1]
    assert abs(samples.mean() - 0.5) < 4 * mean_se
    assert abs(samples.var() - 1 / 12) < 4 * var_se


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (-0.8, 1.6), (1.2, 0.5)])
def test_logit_normal_mean_matches_numerical_integral(mu, sigma):
    first, _ = integrate.quad(lambda t: t * logit_normal_pdf(t, mu, sigma), 0.0, 1.0)
    second, _ = integrate.quad(lambda t: t * t * logit_normal_pdf(t, mu, sigma), 0.0, 1.0)
    mass, _ = integrate.quad(lambda t: logit_normal_pdf(t, mu, sigma), 0.0, 1.0)
    assert mass == pytest.approx(1.0, abs=1e-6)
    samples = draw(LogitNormalTime(mu, sigma), N_MOMENTS, seed=3)
    se = math.sqrt((second - first**2) / N_MOMENTS)
    assert abs(samples.mean() - first) < 4 * se


def test_logit_normal_cdf_matches_scipy():
    mu, sigma = 0.3, 1.4
    t = np.linspace(0.01, 0.99, 25)
    expected = stats.norm.cdf((np.log(t / (1 - t)) - mu) / sigma)
    np.testing.assert_allclose(cdf_fn(LogitNormalTime(mu, sigma))(t), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_shifted_uniform_cdf_is_analytic_inverse_shift(shift):
    dist = ShiftedTime(UniformTime(), shift)
    t = np.linspace(0.0, 1.0, 41)
    np.testing.assert_allclose(cdf_fn(dist)(t), shifted_uniform_cdf(t, shift), rtol=1e-12, atol=1e-12)
    samples = draw(dist, N_KS, seed=4)
    assert stats.kstest(samples, lambda x: shifted_uniform_cdf(x, shift)).pvalue > 0.01


def test_shifted_uniform_mean():
    a = 3.0
    expected, _ = integrate.quad(lambda u: a * u / (1 + (a - 1) * u), 0.0, 1.0)
    samples = draw(ShiftedTime(UniformTime(), a), N_MOMENTS, seed=5)
    second, _ = integrate.quad(lambda u: (a * u / (1 + (a - 1) * u)) ** 2, 0.0, 1.0)
    se = math.sqrt((second - expected**2) / N_MOMENTS)
    assert abs(samples.mean() - expected) < 4 * se
    assert expected > 0.5  # shift > 1 moves mass toward noise


def test_shift_map_properties():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for a in (0.25, 1.0, 3.0, 10.0):
        s = shift_time(t, a)
        assert s[0] == 0.0 and s[-1] == 1.0
        assert torch.all(s[1:] > s[:-1])
        torch.testing.assert_close(shift_time_inverse(s, a), t)
        torch.testing.assert_close(s, a * t / (1 + (a - 1) * t))
    torch.testing.assert_close(shift_time(t, 1.0), t)
    assert torch.all(shift_time(t, 3.0)[1:-1] > t[1:-1])
    assert torch.all(shift_time(t, 0.5)[1:-1] < t[1:-1])


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=repr)
def test_same_seed_same_draws_and_global_rng_untouched(dist):
    state = torch.get_rng_state()
    a = dist.sample((64,), torch.Generator().manual_seed(7))
    b = dist.sample((64,), torch.Generator().manual_seed(7))
    c = dist.sample((64,), torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


def test_repr_names_parameters():
    assert repr(UniformTime()) == "UniformTime()"
    assert repr(LogitNormalTime(0.5, 2)) == "LogitNormalTime(mu=0.5, sigma=2.0)"
    assert repr(ShiftedTime(UniformTime(), 3)) == "ShiftedTime(base=UniformTime(), shift=3.0)"


@pytest.mark.parametrize(
    "build,error",
    [
        (lambda: LogitNormalTime(sigma=0.0), ValueError),
        (lambda: LogitNormalTime(sigma=-1.0), ValueError),
        (lambda: LogitNormalTime(mu=float("nan")), ValueError),
        (lambda: LogitNormalTime(mu="0"), TypeError),
        (lambda: ShiftedTime(UniformTime(), 0.0), ValueError),
        (lambda: ShiftedTime(UniformTime(), -2.0), ValueError),
        (lambda: ShiftedTime(UniformTime(), float("inf")), ValueError),
        (lambda: ShiftedTime(object(), 2.0), TypeError),
        (lambda: shift_time(0.5, 0.0), ValueError),
    ],
)
def test_bad_parameters_raise(build, error):
    with pytest.raises(error):
        build()


def test_bad_sample_arguments_raise():
    with pytest.raises(TypeError):
        UniformTime().sample((3,), None)
    with pytest.raises(ValueError):
        UniformTime().sample((3, -1), torch.Generator())
