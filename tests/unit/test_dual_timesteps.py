"""Dual-Timestep Scheduling: marginals, mask statistics, teacher level, ablation modes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from selfflow.components.schedules.dual import DualTimesteps, DualTimestepScheduler
from selfflow.components.schedules.timesteps import LogitNormalTime, UniformTime

torch.set_num_threads(1)

BATCH, TOKENS = 4096, 16


def draw(seed: int = 0, batch: int = BATCH, tokens: int = TOKENS, **kwargs) -> DualTimesteps:
    kwargs.setdefault("time_dist", UniformTime())
    return DualTimestepScheduler(**kwargs).sample(batch, tokens, torch.Generator().manual_seed(seed))


def one_token_per_sample(token_t: torch.Tensor) -> np.ndarray:
    # Tokens of one sample share two levels, so pooling them all would break the KS test's
    # independence assumption: take token (b mod N) of sample b, independent across samples.
    rows = torch.arange(token_t.shape[0])
    return token_t[rows, rows % token_t.shape[1]].double().numpy()


@pytest.mark.parametrize("dist", [UniformTime(), LogitNormalTime(0.5, 1.2)], ids=["uniform", "logit_normal"])
def test_each_token_marginal_follows_p_t(dist) -> None:
    draws = draw(time_dist=dist, mask_ratio=0.5)
    cdf = lambda x: dist.cdf(torch.as_tensor(x)).numpy()  # noqa: E731
    assert stats.kstest(one_token_per_sample(draws.token_t), cdf).pvalue > 1e-3
    # Pooled over all tokens the law is the same: the statistic stays small.
    assert stats.kstest(draws.token_t.flatten().double().numpy(), cdf).statistic < 0.02
    # Masked and unmasked tokens separately follow p(t) too (t and s are both p(t) draws).
    assert stats.kstest(draws.t.double().numpy(), cdf).pvalue > 1e-3
    assert stats.kstest(draws.s.double().numpy(), cdf).pvalue > 1e-3


def test_sorted_variant_breaks_the_marginal() -> None:
    # The KS check above can fail: the public "sorted" variant shifts each token's law.
    draws = draw(mode="sorted", mask_ratio=0.25)
    assert stats.kstest(one_token_per_sample(draws.token_t), "uniform").pvalue < 1e-6
    assert stats.kstest(draws.t.double().numpy(), "uniform").pvalue < 1e-6  # min of two draws
    assert stats.kstest(draws.s.double().numpy(), "uniform").pvalue < 1e-6  # max of two draws
    masked = draws.token_t[draws.mask].numpy()
    assert stats.kstest(masked, "uniform").pvalue < 1e-6
    assert (draws.s >= draws.t).all()


def test_mask_fraction_matches_ratio() -> None:
    draws = draw(mask_ratio=0.25)
    assert abs(draws.mask.float().mean().item() - 0.25) < 0.01
    counts = draws.mask.sum(dim=1)
    assert counts.min() < counts.max()  # Bernoulli: counts vary per sample


def test_exact_count_masks_exactly_round_ratio_n() -> None:
    draws = draw(mask_ratio=0.3, exact_count=True, batch=256, tokens=10)
    assert (draws.mask.sum(dim=1) == 3).all()
    # Positions are random: every position is masked in some sample, not always the same ones.
    per_position = draws.mask.float().mean(dim=0)
    assert (per_position > 0.15).all() and (per_position < 0.45).all()


def test_token_levels_are_s_where_masked_else_t() -> None:
    draws = draw(batch=64)
    expected = torch.where(draws.mask, draws.s[:, None], draws.t[:, None])
    torch.testing.assert_close(draws.token_t, expected, rtol=0, atol=0)


def test_teacher_never_noisier_than_any_student_token() -> None:
    draws = draw(mask_ratio=0.25)
    assert (draws.teacher_t[:, None] <= draws.token_t).all()
    torch.testing.assert_close(draws.teacher_t, torch.minimum(draws.t, draws.s), rtol=0, atol=0)
    assert draws.teacher_t.shape == (BATCH,)


def test_t_and_s_are_not_sorted() -> None:
    draws = draw(batch=512)
    assert (draws.t < draws.s).any() and (draws.t > draws.s).any()
    # ... and independent: no correlation between the two draws.
    assert abs(np.corrcoef(draws.t.numpy(), draws.s.numpy())[0, 1]) < 0.05


def test_window_mode_respects_the_window() -> None:
    draws = draw(mode="window", window=0.2)
    assert (draws.s <= draws.t).all()
    assert (draws.s >= (draws.t - 0.2 - 1e-6).clamp(min=0.0)).all()
    assert (draws.s >= 0).all()
    assert (draws.t - draws.s).max() > 0.18  # the window is used, not a point
    wider = draw(mode="window", window=0.5)
    assert (wider.t - wider.s).max() > 0.4


def test_full_masking_puts_masked_tokens_at_one() -> None:
    draws = draw(mode="full_masking", batch=256)
    assert draws.mask.any()
    assert (draws.token_t[draws.mask] == 1.0).all()
    unmasked_levels = torch.where(draws.mask, torch.nan, draws.token_t)
    torch.testing.assert_close(torch.nanmean(unmasked_levels, dim=1)[~draws.mask.all(1)],
                               draws.t[~draws.mask.all(1)])
    torch.testing.assert_close(draws.teacher_t, draws.t)


def test_diffusion_forcing_gives_distinct_levels_per_token() -> None:
    draws = draw(mode="diffusion_forcing", batch=128)
    for row in draws.token_t:
        assert row.unique().numel() == TOKENS
    assert stats.kstest(draws.token_t.flatten().double().numpy(), "uniform").pvalue > 1e-3  # iid here
    torch.testing.assert_close(draws.teacher_t, draws.token_t.amin(dim=1))
    assert (draws.teacher_t[:, None] <= draws.token_t).all()
    same = draw(mode="diffusion_forcing", batch=128, teacher_time="same")
    torch.testing.assert_close(same.teacher_t, same.token_t)


def test_teacher_time_same_is_per_token() -> None:
    draws = draw(batch=32, teacher_time="same")
    assert draws.teacher_t.shape == (32, TOKENS)
    torch.testing.assert_close(draws.teacher_t, draws.token_t, rtol=0, atol=0)


def test_sra_teacher_time_is_slightly_cleaner_than_t() -> None:
    draws = draw(mask_ratio=0.0, teacher_time="sra", sra_gap=0.2)
    assert not draws.mask.any()
    assert (draws.token_t == draws.t[:, None]).all()
    gap = draws.t - draws.teacher_t
    assert (gap >= 0).all() and (gap <= 0.2 + 1e-6).all()
    assert (draws.teacher_t >= 0).all()
    assert gap.max() > 0.18


def test_same_seed_gives_same_draws_and_other_seed_differs() -> None:
    for kwargs in ({}, {"mode": "window"}, {"mode": "diffusion_forcing"}, {"teacher_time": "sra"},
                   {"exact_count": True}):
        first, second = draw(seed=7, batch=32, **kwargs), draw(seed=7, batch=32, **kwargs)
        for name in ("t", "s", "mask", "token_t", "teacher_t"):
            assert torch.equal(getattr(first, name), getattr(second, name)), (kwargs, name)
        assert not torch.equal(first.token_t, draw(seed=8, batch=32, **kwargs).token_t)


def test_draws_do_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    draw(batch=8)
    assert torch.equal(torch.rand(3), before)


@pytest.mark.parametrize("bad", [0.51, 1.0, -0.1])
def test_mask_ratio_out_of_range_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        DualTimestepScheduler(UniformTime(), mask_ratio=bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"mode": "sort"}, "mode"), ({"teacher_time": "max"}, "teacher_time"), ({"window": 0.0}, "window"),
     ({"sra_gap": 1.5}, "sra_gap"), ({"mode": "diffusion_forcing", "teacher_time": "sra"}, "sra")],
)
def test_bad_knobs_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DualTimestepScheduler(UniformTime(), **kwargs)


def test_boundary_mask_ratios() -> None:
    assert not draw(mask_ratio=0.0, batch=16).mask.any()
    assert abs(draw(mask_ratio=0.5).mask.float().mean().item() - 0.5) < 0.01
