"""Small-sample statistics for the experiment report, on scipy.stats.

Paired comparisons over seeds (Student t), the power of the paired t-test (noncentral t), the
smallest detectable difference and the seeds a difference needs, Holm's step-down correction,
chi-square intervals for a seed-to-seed standard deviation, and a bootstrap interval for the
mean of per-image differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats


def student_t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return float(stats.t.ppf(p, df))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def paired_difference(values: Sequence[float], baseline: Sequence[float],
                      confidence: float = 0.95) -> dict[str, float]:
    """Mean of ``values[i] - baseline[i]``, its Student-t interval and two-sided p-value."""
    if len(values) != len(baseline):
        raise ValueError(f"paired samples differ in length: {len(values)} vs {len(baseline)}")
    diffs = [v - b for v, b in zip(values, baseline)]
    mean, std = mean_std(diffs)
    n = len(diffs)
    result = {"mean": mean, "std": std, "ci_low": math.nan, "ci_high": math.nan,
              "p_value": math.nan, "n": n}
    if n < 2:
        return result
    half = student_t_ppf(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    result.update(ci_low=mean - half, ci_high=mean + half)
    if std > 0:
        result["p_value"] = float(2.0 * stats.t.sf(abs(mean) / (std / math.sqrt(n)), n - 1))
    elif mean != 0:
        result["p_value"] = 0.0  # every pair moved by the same amount
    return result


def std_interval(std: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Chi-square interval for a standard deviation estimated from ``n`` values."""
    if n < 2 or not math.isfinite(std):
        return math.nan, math.nan
    df = n - 1
    tail = (1.0 - confidence) / 2.0
    return (std * math.sqrt(df / stats.chi2.ppf(1.0 - tail, df)),
            std * math.sqrt(df / stats.chi2.ppf(tail, df)))


def paired_power(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` for a true mean difference
    ``delta`` when the paired differences have standard deviation ``sd`` (n pairs)."""
    if n < 2:
        return math.nan
    if sd <= 0:
        return 1.0 if delta != 0 else alpha
    df = n - 1
    critical = stats.t.ppf(1.0 - alpha / 2.0, df)
    noncentrality = abs(delta) * math.sqrt(n) / sd
    # P(T > c) + P(T < -c); the lower tail as P(T' > c) with T' of noncentrality -nc, which
    # scipy evaluates without the NaN its cdf gives for tiny tails.
    return float(stats.nct.sf(critical, df, noncentrality)
                 + stats.nct.sf(critical, df, -noncentrality))


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference the paired t-test detects with ``power`` (n pairs)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    high = sd
    while paired_power(high, sd, n, alpha) < power:
        high *= 2.0
    return float(optimize.brentq(lambda d: paired_power(d, sd, n, alpha) - power, 0.0, high,
                                 xtol=1e-12 * sd))


def seeds_needed(delta: float, sd: float, alpha: float = 0.05, power: float = 0.8,
                 max_seeds: int = 100_000) -> int | None:
    """The fewest pairs (seeds) for which the paired t-test detects ``delta`` with ``power``;
    None when ``sd`` is unknown."""
    if not math.isfinite(sd):
        return None
    if sd == 0:
        return 2
    if paired_power(delta, sd, max_seeds, alpha) < power:
        raise ValueError(f"Δ {delta} with sd {sd} needs more than {max_seeds} seeds")
    low, high = 2, 2
    while paired_power(delta, sd, high, alpha) < power:  # power grows with n
        low, high = high, min(2 * high, max_seeds)
    while low < high:
        mid = (low + high) // 2
        if paired_power(delta, sd, mid, alpha) >= power:
            high = mid
        else:
            low = mid + 1
    return high


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order.

    NaN p-values (a comparison that could not be tested) stay NaN and do not count in the
    family size.
    """
    tested = [i for i, p in enumerate(p_values) if math.isfinite(p)]
    adjusted = [math.nan] * len(p_values)
    order = sorted(tested, key=lambda i: p_values[i])
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def bootstrap_mean_interval(values: Sequence[float], confidence: float = 0.95,
                            resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """BCa bootstrap interval of the mean of ``values`` (resampling the values)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < 2:
        return math.nan, math.nan
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])  # no spread: every resample has this mean
    result = stats.bootstrap((data,), np.mean, confidence_level=confidence,
                             n_resamples=resamples, method="BCa",
                             rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
