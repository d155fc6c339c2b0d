"""Confidence intervals for evaluation numbers, in pure Python (no numpy, no scipy: the report
and the CLI import this without the training stack).

- Rates (success, exact match): the Wilson score interval (Wilson 1927, "Probable inference,
  the law of succession, and statistical inference", JASA 22:209-212). Unlike the normal
  (Wald) interval it stays inside [0, 1] and keeps its coverage near 0 and 1 and at small n,
  where held-out evaluations often sit.
- Means of bounded per-episode values (tool calls per episode, F1): the normal interval
  mean +- z s / sqrt(n) (s the sample std; boundedness gives the central limit theorem its
  finite variance), or Student's t interval for small n (`t_interval`).
- Before/after on the same items ("did the held-out numbers move"): the interval of the mean
  paired difference (each item its own control, which removes item difficulty from the
  noise), and for paired binary outcomes McNemar's exact test (McNemar 1947, Psychometrika
  12:153-157): only the discordant items (solved before only, after only) carry evidence, and
  under no change each is either kind with probability 1/2.

With fewer than two values a mean's interval is unknown: (-inf, inf), never a zero-width
interval that would read as certainty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean, stdev

Z95 = 1.959963984540054
"""The standard normal's 0.975 quantile: z of a two-sided 95% interval."""

_UNKNOWN = (-math.inf, math.inf)


@dataclass(frozen=True)
class Estimate:
    """A figure with its confidence interval."""

    value: float
    """The point estimate: a rate, a mean, a mean difference."""
    low: float
    """Lower end of the interval (-inf when unknown)."""
    high: float
    """Upper end of the interval (inf when unknown)."""
    n: int
    """Number of values (episodes, items, pairs) it rests on."""

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """`0.600 [0.502, 0.691]` (`signed`: `+0.050 [-0.010, +0.110]`, for changes)."""
        spec = f"{'+' if signed else ''}.{digits}f"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def __str__(self) -> str:
        return self.format()

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly on one side of 0: a change clear of noise."""
        return self.low > 0 or self.high < 0


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a rate `successes / n`: (centre +- half) with centre
    (p + z^2/2n) / (1 + z^2/n) and half z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n); (0, 1)
    for n = 0 (nothing observed)."""
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Normal interval of the mean of `values`: mean +- z s / sqrt(n), s the sample (n - 1)
    std; (-inf, inf) for fewer than two values."""
    if len(values) < 2:
        return _UNKNOWN
    m = fmean(values)
    half = z * stdev(values, m) / math.sqrt(len(values))
    return (m - half, m + half)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean: mean +- t s / sqrt(n), t the (1 + level)/2 quantile
    with n - 1 degrees of freedom (wider than the normal interval at small n: 2.26 rather
    than 1.96 at n = 10); (-inf, inf) for fewer than two values."""
    if len(values) < 2:
        return _UNKNOWN
    return mean_interval(values, t_quantile((1.0 + level) / 2.0, len(values) - 1))


def rate_estimate(successes: int, n: int, z: float = 1.96) -> Estimate:
    """A rate with its Wilson interval (value 0 with interval (0, 1) when n = 0)."""
    low, high = wilson_interval(successes, n, z)
    return Estimate(successes / n if n else 0.0, low, high, n)


def mean_estimate(values: Sequence[float], z: float = 1.96) -> Estimate:
    """A mean with its normal interval (`mean_interval`); nan for no values."""
    low, high = mean_interval(values, z)
    return Estimate(fmean(values) if values else math.nan, low, high, len(values))


def separated(a: Estimate | tuple[float, float], b: Estimate | tuple[float, float]) -> bool:
    """Whether two intervals do not overlap. Conservative for comparing two figures:
    separated 95% intervals mean a clear difference, but overlapping ones may still differ
    (compare paired outcomes on the same items with `paired_change` or `paired_rates`)."""
    a_low, a_high = (a.low, a.high) if isinstance(a, Estimate) else a
    b_low, b_high = (b.low, b.high) if isinstance(b, Estimate) else b
    return a_high < b_low or b_high < a_low


def paired_change(before: Sequence[float], after: Sequence[float], z: float = 1.96) -> Estimate:
    """Mean of `after[i] - before[i]` (the same items, in the same order) with the normal
    interval of the differences."""
    if len(before) != len(after):
        raise ValueError(f"paired_change: {len(before)} values before, {len(after)} after")
    return mean_estimate([a - b for b, a in zip(before, after, strict=True)], z)


def mcnemar_exact(only_before: int, only_after: int) -> float:
    """Two-sided exact McNemar p-value of paired binary outcomes: with d = only_before +
    only_after discordant items, 2 P(X <= min) for X ~ Binomial(d, 1/2), at most 1; 1 when
    there is no discordant item."""
    if only_before < 0 or only_after < 0:
        raise ValueError("mcnemar_exact: counts must be >= 0")
    d = only_before + only_after
    if d == 0:
        return 1.0
    tail: int = sum(math.comb(d, i) for i in range(min(only_before, only_after) + 1))
    return min(1.0, 2 * tail / (1 << d))


@dataclass(frozen=True)
class PairedRates:
    """A before/after comparison of binary outcomes on the same items."""

    change: Estimate
    """after - before success rate, with the normal interval of the paired differences."""
    only_before: int
    """Items solved before and not after."""
    only_after: int
    """Items solved after and not before."""
    p_value: float
    """McNemar's exact two-sided p-value of no change."""


def paired_rates(
    before: Sequence[bool | float], after: Sequence[bool | float], z: float = 1.96
) -> PairedRates:
    """Compare success on the same items, in the same order (truthy = solved)."""
    if len(before) != len(after):
        raise ValueError(f"paired_rates: {len(before)} outcomes before, {len(after)} after")
    b = [float(bool(x)) for x in before]
    a = [float(bool(x)) for x in after]
    only_before = sum(x > y for x, y in zip(b, a, strict=True))
    only_after = sum(y > x for x, y in zip(b, a, strict=True))
    return PairedRates(
        paired_change(b, a, z), only_before, only_after, mcnemar_exact(only_before, only_after)
    )


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom, by bisection on its CDF
    (accurate to ~1e-12)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if _t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-13 * max(1.0, high):
            break
    return (low + high) / 2.0


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for t >= 0: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2)."""
    return 1.0 - 0.5 * _incomplete_beta(df / (df + t * t), df / 2.0, 0.5)


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz;
    Press et al., Numerical Recipes, 3rd ed., section 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # The fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(log_front + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h / a
