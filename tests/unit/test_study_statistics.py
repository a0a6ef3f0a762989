"""The statistics of a study report, each checked against its formula worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from selfflow.platform.tracking import statistics as st
from selfflow.platform.tracking.study_store import StudyStore, TrialRun, metric_name


def t_quantile_df2(q: float) -> float:
    """Student's t with 2 degrees of freedom has a closed-form quantile: t = u sqrt(2 / (1 - u^2)),
    u = 2q - 1."""
    u = 2 * q - 1
    return u * math.sqrt(2 / (1 - u * u))


def test_paired_comparison_matches_the_t_formulas_for_three_seeds():
    a = {"0": 1.0, "1": 2.0, "2": 4.0}  # lower is better: A beats B by 1, 0.5, 1.5
    b = {"0": 2.0, "1": 2.5, "2": 5.5}
    diff = st.compare_cells(a, b, "min")
    # differences d = B - A = (1, 0.5, 1.5): mean 1, sd 0.5, n 3
    half = t_quantile_df2(0.975) * 0.5 / math.sqrt(3)
    t = 1.0 / (0.5 / math.sqrt(3))
    p = 1 - t / math.sqrt(2 + t * t)  # two-sided, from the df=2 CDF 1/2 + t / (2 sqrt(2 + t^2))
    assert diff.test == "paired t" and diff.n_a == diff.n_b == 3
    assert diff.improvement == pytest.approx(1.0)
    assert (diff.low, diff.high) == (pytest.approx(1.0 - half), pytest.approx(1.0 + half))
    assert diff.p_value == pytest.approx(p, rel=1e-9)
    assert diff.effect_name == "d_z" and diff.effect_size == pytest.approx(1.0 / 0.5)
    assert (diff.mean_a, diff.mean_b) == (pytest.approx(7 / 3), pytest.approx(10 / 3))


def test_higher_is_better_flips_the_sign_of_the_improvement():
    a = {"0": 0.9, "1": 0.8, "2": 0.85}
    b = {"0": 0.7, "1": 0.75, "2": 0.65}
    assert st.compare_cells(a, b, "max").improvement == pytest.approx(0.15)
    assert st.compare_cells(a, b, "min").improvement == pytest.approx(-0.15)


def test_welch_comparison_when_seeds_differ():
    a = {"0": 1.0, "1": 2.0, "2": 3.0}  # mean 2, variance 1
    b = {"0": 2.0, "1": 4.0, "2": 6.0, "3": 8.0}  # mean 5, variance 20/3
    diff = st.compare_cells(a, b, "max")
    va, vb, na, nb = 1.0, 20 / 3, 3, 4
    se2 = va / na + vb / nb
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(se2)
    t = -3.0 / math.sqrt(se2)
    pooled = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    assert diff.test == "Welch t"
    assert diff.improvement == pytest.approx(-3.0)
    assert (diff.low, diff.high) == (pytest.approx(-3.0 - half), pytest.approx(-3.0 + half))
    assert diff.p_value == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert diff.effect_name == "g"
    assert diff.effect_size == pytest.approx(-3.0 / pooled * (1 - 3 / (4 * (na + nb) - 9)))


def test_one_seed_or_non_finite_values_give_no_test():
    diff = st.compare_cells({"0": 1.0}, {"0": 2.0, "1": math.nan}, "min")
    assert not diff.defined and st.verdict("better", diff) == st.CANNOT_TELL


def difference(low: float, high: float, mean_b: float = 10.0) -> st.Difference:
    return st.Difference("paired t", 3, 3, math.nan, mean_b, (low + high) / 2, low, high, 0.5, 0.0, "d_z")


@pytest.mark.parametrize("kind, low, high, margin, expected", [
    ("better", 0.1, 2.0, 0.0, st.HOLDS),
    ("better", -0.1, 2.0, 0.0, st.CANNOT_TELL),
    ("better", -2.0, -0.1, 0.0, st.DOES_NOT_HOLD),
    # no_better, margin 0.05 of |mean B| = 10 -> 0.5: improvements above 0.5 must be ruled out
    ("no_better", -3.0, 0.4, 0.05, st.HOLDS),
    ("no_better", -3.0, 0.6, 0.05, st.CANNOT_TELL),
    ("no_better", 0.6, 3.0, 0.05, st.DOES_NOT_HOLD),
    ("no_better", 0.2, 0.4, 0.05, st.HOLDS),  # significantly better, but by less than the margin
    # no_worse: losses beyond -0.5 must be ruled out
    ("no_worse", -0.4, 3.0, 0.05, st.HOLDS),
    ("no_worse", -0.6, 3.0, 0.05, st.CANNOT_TELL),
    ("no_worse", -3.0, -0.6, 0.05, st.DOES_NOT_HOLD),
])
def test_verdict_rules(kind, low, high, margin, expected):
    assert st.verdict(kind, difference(low, high), margin) == expected
    assert kind in st.RULES


def test_combined_verdicts():
    assert st.combine([st.HOLDS, st.HOLDS]) == st.HOLDS
    assert st.combine([st.HOLDS, st.CANNOT_TELL]) == st.CANNOT_TELL
    assert st.combine([st.HOLDS, st.DOES_NOT_HOLD, st.CANNOT_TELL]) == st.DOES_NOT_HOLD
    assert st.combine([]) == st.CANNOT_TELL


def test_holm_adjustment():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
    adjusted = st.holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06)]
    assert math.isnan(adjusted[3])
    assert st.holm([0.6, 0.7]) == [pytest.approx(1.0), pytest.approx(1.0)]  # capped at 1


def test_first_reach_and_censoring():
    points = [(100, 50.0), (200, 12.0), (300, 9.0), (400, 8.0)]
    assert st.first_reach(points, 10.0, "min") == st.Reach(300.0, True)
    assert st.first_reach(points, 5.0, "min") == st.Reach(400.0, False)  # a lower bound: its last evaluation
    assert st.first_reach([(1, 0.2), (2, 0.9)], 0.8, "max") == st.Reach(2.0, True)
    assert st.first_reach([], 1.0, "min") is None


def test_faster_needs_every_run_of_the_winner_to_reach_the_threshold():
    fast = {"0": st.Reach(300, True), "1": st.Reach(250, True), "2": st.Reach(320, True)}
    slow = {"0": st.Reach(900, True), "1": st.Reach(1000, False), "2": st.Reach(950, True)}
    diff, decided = st.faster_verdict(fast, slow)
    assert decided == st.HOLDS and diff.improvement == pytest.approx((900 + 1000 + 950 - 300 - 250 - 320) / 3)
    censored_fast = dict(fast, **{"2": st.Reach(320, False)})
    assert st.faster_verdict(censored_fast, slow)[1] == st.CANNOT_TELL
    # A slower: a censored run of A only understates how slow A is, so the reversal is safe to state
    assert st.faster_verdict(slow, fast)[1] == st.DOES_NOT_HOLD
    # ... but not when the faster one (B) has a run that never reached the threshold
    assert st.faster_verdict({k: st.Reach(v.value, True) for k, v in slow.items()}, censored_fast)[1] == st.CANNOT_TELL


def test_power_law_fit_recovers_the_exponent_and_its_covariance_interval():
    computes = [1.0, 10.0, 100.0, 1000.0]
    noise = [-0.1, 0.0, 0.1]  # symmetric per size: least squares gives the exact exponent
    points = [(c, 5.0 * c ** -0.5 * math.exp(e)) for c in computes for e in noise]
    fit = st.fit_power_law(points)
    assert fit.alpha == pytest.approx(0.5) and fit.log_a == pytest.approx(math.log(5.0))
    assert fit.n == 12 and fit.sizes == 4
    x = np.log([c for c, _ in points])
    s2 = 4 * (0.01 + 0.0 + 0.01) / (12 - 2)  # residuals are the noise itself
    half = stats.t.ppf(0.975, 10) * math.sqrt(s2 / ((x - x.mean()) ** 2).sum())
    assert (fit.cov_low, fit.cov_high) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    assert fit.boot_low < 0.5 < fit.boot_high and len(fit.boot) == st.BOOTSTRAP_RESAMPLES
    assert fit.boot_high - fit.boot_low < 2 * half  # resampling within sizes keeps every size in the fit
    assert st.fit_power_law(points) == fit  # a fixed bootstrap seed: the report is reproducible
    assert fit.predict(100.0) == pytest.approx(0.5)


def test_power_law_without_noise_has_a_zero_width_bootstrap_interval_and_needs_two_sizes():
    exact = [(c, 3.0 * c ** -0.25) for c in (2.0, 20.0, 200.0) for _ in range(2)]
    fit = st.fit_power_law(exact)
    assert (fit.boot_low, fit.boot_high) == (pytest.approx(0.25), pytest.approx(0.25))
    assert st.fit_power_law([(1.0, 2.0), (1.0, 3.0)]) is None
    assert st.fit_power_law([(1.0, 2.0), (10.0, -1.0)]) is None  # no logarithm of a negative value


def power_law(alpha: float, boot: list[float]) -> st.PowerLaw:
    low, high = np.percentile(boot, [2.5, 97.5])
    return st.PowerLaw(alpha, 0.0, 12, 4, math.nan, math.nan, float(low), float(high), tuple(boot))


def test_scaling_verdicts():
    steep = power_law(0.6, list(np.linspace(0.5, 0.7, 101)))
    flat = power_law(0.1, list(np.linspace(0.0, 0.2, 101)))
    assert st.scaling_verdict(steep, flat) == st.HOLDS
    assert st.scaling_verdict(flat, steep) == st.DOES_NOT_HOLD
    # independent replicates (shuffled against steep's): their differences spread over [-0.15, 0.25]
    overlapping = power_law(0.55, list(np.random.default_rng(0).permutation(np.linspace(0.45, 0.65, 101))))
    assert st.scaling_verdict(steep, overlapping) == st.CANNOT_TELL
    delta, low, high = st.exponent_difference(steep, flat)
    assert delta == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)
    assert st.scaling_verdict(None, flat) == st.CANNOT_TELL


def test_metric_names_are_found_per_modality():
    logged = {"eval/image/fd", "eval/audio/fd", "probe/image/linear/best", "loss/flow"}
    assert metric_name(logged, "eval/fd", "audio") == "eval/audio/fd"
    assert metric_name(logged, "eval/fd") is None  # two modalities: ambiguous without one
    assert metric_name({"eval/video/fd"}, "eval/fd") == "eval/video/fd"
    assert metric_name({"eval/fd"}, "eval/fd", "image") == "eval/fd"
    assert metric_name(logged, "loss/flow") == "loss/flow"


class FakeClient:
    def __init__(self, histories):
        self.histories = histories

    def get_metric_history(self, run_id, name):
        class Metric:
            def __init__(self, step, value, timestamp):
                self.step, self.value, self.timestamp = step, value, timestamp

        return [Metric(*entry) for entry in self.histories[name]]


def test_seconds_per_step_is_the_median_over_training_logs():
    # logs every 10 steps at 0.2 s a step; one interval also holds a 30 s evaluation, one a restart
    times = [0, 2000, 4000, 36000, 38000, 40000, 900000, 902000]
    history = [(10 * (i + 1), 1.0, t) for i, t in enumerate(times)]
    history.append((30, 0.5, 3000))  # step 30 logged twice (a resumed run): the later-logged value counts
    store = StudyStore.__new__(StudyStore)
    store.client = FakeClient({"loss/total": history})
    run = TrialRun("r", "k", "s", "c", "0", 0, 0, {}, {"loss/total": 1.0, "loss/flow": 1.0})
    assert store.seconds_per_step(run) == pytest.approx(0.2)
    assert [s for s, _, _ in store.history(run, "loss/total")] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert store.history(run, "loss/total")[2] == (30, 1.0, 4000)
