"""The statistics of a study (platform/tracking/study_report.py): comparisons of two cells over
seeds, the rules that turn them into verdicts, power-law fits and times to a threshold.

Conventions. A cell is a list of per-seed values (one finished run per seed). "Improvement" is
signed so that positive always means "A is better than B": B - A for a metric where lower is
better (FD), A - B where higher is better (accuracy). Intervals are two-sided 95 %.

Every verdict is one of HOLDS / DOES_NOT_HOLD / CANNOT_TELL, decided only from the interval of
the improvement; `RULES` states each rule in words, and the report prints them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from selfflow.platform.tracking.compare import mean_interval

HOLDS, DOES_NOT_HOLD, CANNOT_TELL = "holds", "does not hold", "cannot tell"
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the report is a pure function of the store

RULES = {
    "better": (
        "A is better than B: **holds** if the 95 % interval of the improvement of A over B lies entirely "
        "above 0; **does not hold** if it lies entirely below 0 (B is significantly better); "
        "**cannot tell** if it contains 0."),
    "no_better": (
        "A is no better than B (margin m): **holds** if the 95 % interval of the improvement of A over B "
        "lies entirely below m x |mean of B| (an improvement larger than the margin is ruled out); "
        "**does not hold** if it lies entirely above m x |mean of B|; **cannot tell** otherwise."),
    "no_worse": (
        "A is no worse than B (margin m): **holds** if the 95 % interval of the improvement of A over B "
        "lies entirely above -m x |mean of B| (a loss larger than the margin is ruled out); "
        "**does not hold** if it lies entirely below -m x |mean of B|; **cannot tell** otherwise."),
    "faster": (
        "A reaches the threshold sooner than B: per run, the first evaluation at or past the threshold "
        "(a run that never reaches it counts as its last evaluated step, a lower bound). **Holds** if "
        "every run of A reached it and the 95 % interval of (B - A) lies above 0; **does not hold** if "
        "every run of B reached it and the interval lies below 0; **cannot tell** otherwise."),
    "scaling": (
        "A scales better than B: per series, log(metric) = log(a) - alpha log(compute) by least squares "
        "over every finished run (all sizes, all seeds); the interval of alpha is a stratified bootstrap "
        "(runs resampled within each size). **Holds** if alpha_A's interval lies above 0 and the "
        "interval of alpha_A - alpha_B lies above 0; **does not hold** if alpha_A's interval lies "
        "below or at 0, or that of alpha_A - alpha_B lies below 0; **cannot tell** otherwise."),
}


@dataclass(frozen=True)
class Difference:
    """The improvement of A over B (positive: A better), with its test."""

    test: str  # "paired t" | "Welch t" | "" (too few values)
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    improvement: float
    low: float
    high: float
    p_value: float
    effect_size: float  # Cohen's d_z (paired) or Hedges' g (Welch), signed like the improvement
    effect_name: str

    @property
    def defined(self) -> bool:
        return bool(self.test) and math.isfinite(self.low) and math.isfinite(self.high)


def improvement_sign(mode: str) -> float:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return -1.0 if mode == "min" else 1.0


def _finite(values: Mapping[str, float]) -> dict[str, float]:
    return {seed: float(v) for seed, v in values.items() if v is not None and math.isfinite(float(v))}


def compare_cells(a: Mapping[str, float], b: Mapping[str, float], mode: str) -> Difference:
    """A vs B from their per-seed values ({seed: value}). Paired t-test when both cells have the same
    seeds (at least two), else Welch's t-test. mode: 'min' (lower is better) or 'max'."""
    from scipy import stats

    a, b = _finite(a), _finite(b)
    sign = improvement_sign(mode)
    mean_a = sum(a.values()) / len(a) if a else math.nan
    mean_b = sum(b.values()) / len(b) if b else math.nan
    improvement = sign * (mean_a - mean_b)
    nothing = Difference("", len(a), len(b), mean_a, mean_b, improvement, math.nan, math.nan, math.nan, math.nan, "")
    if set(a) == set(b) and len(a) >= 2:
        seeds = sorted(a)
        diffs = np.array([sign * (a[s] - b[s]) for s in seeds])
        n = len(diffs)
        sd = float(diffs.std(ddof=1))
        if sd == 0.0:
            p = 0.0 if diffs.mean() != 0 else 1.0
            return Difference("paired t", n, n, mean_a, mean_b, improvement, improvement, improvement, p,
                              math.copysign(math.inf, improvement) if improvement else 0.0, "d_z")
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
        p = float(stats.ttest_rel([sign * a[s] for s in seeds], [sign * b[s] for s in seeds]).pvalue)
        return Difference("paired t", n, n, mean_a, mean_b, improvement, improvement - half, improvement + half,
                          p, float(diffs.mean()) / sd, "d_z")
    if len(a) < 2 or len(b) < 2:
        return nothing
    va, vb = np.var(list(a.values()), ddof=1), np.var(list(b.values()), ddof=1)
    na, nb = len(a), len(b)
    se2 = va / na + vb / nb
    if se2 == 0.0:
        return nothing
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))  # Welch-Satterthwaite
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * math.sqrt(se2)
    p = float(stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).pvalue)
    pooled = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    correction = 1.0 - 3.0 / (4.0 * (na + nb) - 9.0)  # Hedges' small-sample factor
    g = improvement / pooled * correction if pooled > 0 else math.nan
    return Difference("Welch t", na, nb, mean_a, mean_b, improvement, improvement - half, improvement + half,
                      p, g, "g")


def verdict(kind: str, diff: Difference, margin: float = 0.0) -> str:
    """The verdict of an ordering claim from the interval of the improvement (RULES)."""
    if not diff.defined:
        return CANNOT_TELL
    if kind == "better":
        bound = 0.0
        if diff.low > bound:
            return HOLDS
        return DOES_NOT_HOLD if diff.high < bound else CANNOT_TELL
    scale = margin * abs(diff.mean_b)
    if kind == "no_better":
        if diff.high < scale:
            return HOLDS
        return DOES_NOT_HOLD if diff.low > scale else CANNOT_TELL
    if kind == "no_worse":
        if diff.low > -scale:
            return HOLDS
        return DOES_NOT_HOLD if diff.high < -scale else CANNOT_TELL
    raise ValueError(f"no verdict rule for claim kind {kind!r}")


def combine(verdicts: Sequence[str]) -> str:
    """A claim of several comparisons: holds if all hold, does not hold if any does not."""
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return DOES_NOT_HOLD if DOES_NOT_HOLD in verdicts else CANNOT_TELL


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error) of p-values; NaN stays NaN."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


# ---- time to a threshold --------------------------------------------------------------------------


@dataclass(frozen=True)
class Reach:
    value: float  # step (or seconds) of the first evaluation at or past the threshold, else the last one
    reached: bool


def first_reach(points: Sequence[tuple[float, float]], threshold: float, mode: str) -> Reach | None:
    """points: (clock, metric) of one run's evaluations, in clock order. None without evaluations."""
    if not points:
        return None
    for clock, value in points:
        if (value <= threshold) if mode == "min" else (value >= threshold):
            return Reach(float(clock), True)
    return Reach(float(points[-1][0]), False)


def faster_verdict(a: Mapping[str, Reach], b: Mapping[str, Reach]) -> tuple[Difference, str]:
    """A reaches the threshold sooner than B (RULES['faster']); the difference is in clock units."""
    diff = compare_cells({s: r.value for s, r in a.items()}, {s: r.value for s, r in b.items()}, "min")
    if not diff.defined:
        return diff, CANNOT_TELL
    if diff.low > 0 and a and all(r.reached for r in a.values()):
        return diff, HOLDS
    if diff.high < 0 and b and all(r.reached for r in b.values()):
        return diff, DOES_NOT_HOLD
    return diff, CANNOT_TELL


# ---- power laws ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLaw:
    """metric = a * compute^(-alpha), fitted in log-log space."""

    alpha: float
    log_a: float
    n: int
    sizes: int
    cov_low: float  # alpha's t interval from the least-squares covariance
    cov_high: float
    boot_low: float  # alpha's stratified-bootstrap percentile interval
    boot_high: float
    boot: tuple[float, ...]  # the bootstrap replicates (for differences between series)

    def predict(self, compute: float) -> float:
        return math.exp(self.log_a) * compute ** (-self.alpha)


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum()) / sxx
    return slope, float(ym - slope * xm)


def fit_power_law(points: Sequence[tuple[float, float]], *, resamples: int = BOOTSTRAP_RESAMPLES,
                  seed: int = BOOTSTRAP_SEED) -> PowerLaw | None:
    """points: (compute, metric) per run, several runs (seeds) per compute. None below two distinct
    computes or with a non-positive value (no logarithm)."""
    from scipy import stats

    points = [(float(c), float(v)) for c, v in points if math.isfinite(c) and math.isfinite(v)]
    computes = sorted({c for c, _ in points})
    if len(computes) < 2 or any(c <= 0 or v <= 0 for c, v in points):
        return None
    x = np.log(np.array([c for c, _ in points]))
    y = np.log(np.array([v for _, v in points]))
    slope, intercept = _slope(x, y)
    n = len(points)
    cov_low = cov_high = math.nan
    if n > 2:
        residual = y - (intercept + slope * x)
        s2 = float((residual ** 2).sum()) / (n - 2)
        se = math.sqrt(s2 / float(((x - x.mean()) ** 2).sum()))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 2)) * se
        cov_low, cov_high = -slope - half, -slope + half
    strata = [np.flatnonzero(np.isclose(np.exp(x), c)) for c in computes]
    rng = np.random.default_rng(seed)
    replicates = []
    if all(len(s) >= 2 for s in strata):
        for _ in range(resamples):
            index = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])
            replicates.append(-_slope(x[index], y[index])[0])
    boot_low, boot_high = _percentiles(replicates)
    return PowerLaw(alpha=-slope, log_a=intercept, n=n, sizes=len(computes), cov_low=cov_low, cov_high=cov_high,
                    boot_low=boot_low, boot_high=boot_high, boot=tuple(replicates))


def _percentiles(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(np.array(values), [tail, 100 - tail])
    return float(low), float(high)


def exponent_difference(a: PowerLaw, b: PowerLaw) -> tuple[float, float, float]:
    """alpha_A - alpha_B and its bootstrap interval (the two series resampled independently)."""
    if not a.boot or not b.boot:
        return a.alpha - b.alpha, math.nan, math.nan
    diffs = np.array(a.boot) - np.array(b.boot)
    low, high = _percentiles(list(diffs))
    return a.alpha - b.alpha, low, high


def scaling_verdict(a: PowerLaw | None, b: PowerLaw | None) -> str:
    if a is None or b is None or not math.isfinite(a.boot_low):
        return CANNOT_TELL
    _, low, high = exponent_difference(a, b)
    if not math.isfinite(low):
        return CANNOT_TELL
    if a.boot_high <= 0 or high < 0:
        return DOES_NOT_HOLD
    if a.boot_low > 0 and low > 0:
        return HOLDS
    return CANNOT_TELL


def cell_summary(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95 % t interval, n) of a cell's finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return mean_interval(finite, CONFIDENCE) + (len(finite),)
