"""Confidence intervals and paired comparisons against numbers worked out by hand (the
arithmetic is in the comments) and published tables."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.stats import (
    Z95,
    Estimate,
    mcnemar_exact,
    mean_estimate,
    mean_interval,
    paired_change,
    paired_rates,
    rate_estimate,
    separated,
    t_interval,
    t_quantile,
    wilson_interval,
)


def near(a: tuple[float, float], b: tuple[float, float], tol: float = 5e-4) -> bool:
    return all(math.isclose(x, y, abs_tol=tol) for x, y in zip(a, b, strict=True))


def test_wilson_hand_examples() -> None:
    # 60/100, z 1.96: z^2 = 3.8416, denom 1 + 0.038416 = 1.038416;
    # centre (0.6 + 0.019208) / 1.038416 = 0.596300;
    # half 1.96 sqrt(0.0024 + 0.00009604) / 1.038416 = 1.96 * 0.049960 / 1.038416 = 0.094300.
    assert near(wilson_interval(60, 100), (0.502, 0.691))
    assert near(wilson_interval(60, 100), (0.596300 - 0.094300, 0.596300 + 0.094300), 1e-6)
    # 0/10: centre = half = (3.8416 / 20) / 1.38416 = 0.138770 -> [0, 0.27754].
    assert wilson_interval(0, 10)[0] == 0.0
    assert math.isclose(wilson_interval(0, 10)[1], 2 * 0.19208 / 1.38416, rel_tol=1e-9)
    # 10/10 mirrors 0/10; nothing observed: the whole of [0, 1].
    assert near(wilson_interval(10, 10), (1 - 0.277540, 1.0), 1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 500), st.integers(0, 500))
def test_wilson_contains_the_rate_and_stays_in_the_unit_interval(s: int, extra: int) -> None:
    n = s + extra
    low, high = wilson_interval(s, n)
    assert 0.0 <= low <= high <= 1.0
    if n:
        assert low - 1e-12 <= s / n <= high + 1e-12


def test_t_quantiles_match_the_tables() -> None:
    # Student's t, two-sided 95% (0.975) and 99% (0.995) columns of any table.
    table = {(1, 0.975): 12.706, (2, 0.975): 4.303, (9, 0.975): 2.262, (19, 0.975): 2.093,
             (30, 0.975): 2.042, (5, 0.995): 4.032, (4, 0.95): 2.132}  # fmt: skip
    for (df, p), t in table.items():
        assert math.isclose(t_quantile(p, df), t, abs_tol=5e-4), (df, p)
        assert math.isclose(t_quantile(1 - p, df), -t, abs_tol=5e-4)
    # Many degrees of freedom: the normal quantile.
    assert math.isclose(t_quantile(0.975, 10**6), Z95, abs_tol=1e-5)


def test_mean_intervals_hand_example() -> None:
    # Calls per episode 0, 1, 1, 1: mean 0.75, sample var (0.5625 + 3 * 0.0625) / 3 = 0.25,
    # s = 0.5, s / sqrt4 = 0.25. Normal: +- 1.96 * 0.25 = 0.49 -> [0.26, 1.24].
    # t with 3 df: +- 3.1824 * 0.25 = 0.7956 -> [-0.0456, 1.5456].
    assert near(mean_interval([0, 1, 1, 1]), (0.26, 1.24), 1e-12)
    assert near(t_interval([0, 1, 1, 1]), (0.75 - 0.79561, 0.75 + 0.79561), 1e-4)
    # One value says nothing about the spread: unknown, never zero width.
    assert mean_interval([0.4]) == t_interval([0.4]) == (-math.inf, math.inf)
    assert mean_estimate([]).n == 0 and math.isnan(mean_estimate([]).value)


def test_estimate_record_and_format() -> None:
    est = rate_estimate(60, 100)
    assert (est.value, est.n) == (0.6, 100)
    assert str(est) == "0.600 [0.502, 0.691]"
    assert Estimate(0.05, -0.01, 0.11, 20).format(signed=True) == "+0.050 [-0.010, +0.110]"
    assert Estimate(0.05, -0.01, 0.11, 20).format(2) == "0.05 [-0.01, 0.11]"
    assert mean_estimate([0, 1, 1, 1]).format() == "0.750 [0.260, 1.240]"
    assert not Estimate(0.05, -0.01, 0.11, 20).excludes_zero
    assert Estimate(0.05, 0.01, 0.09, 20).excludes_zero
    assert rate_estimate(0, 0) == Estimate(0.0, 0.0, 1.0, 0)


def test_separated_intervals() -> None:
    # 60/100 [0.502, 0.691] vs 30/100: centre (0.3 + 0.019208)/1.038416 = 0.307402, half
    # 1.96 sqrt(0.0021 + 0.000096)/1.038416 = 0.088454 -> [0.219, 0.396]: apart.
    # 50/100 is about [0.404, 0.596]: overlaps 60/100's.
    assert separated(rate_estimate(60, 100), rate_estimate(30, 100))
    assert not separated(rate_estimate(60, 100), rate_estimate(50, 100))
    assert separated((0.0, 0.1), (0.2, 0.3)) and not separated((0.0, 0.2), (0.2, 0.3))


def test_mcnemar_exact_hand_examples() -> None:
    # 1 item lost, 9 gained: d = 10, P(X <= 1) = (1 + 10) / 1024 -> p = 22/1024 = 0.0215.
    assert mcnemar_exact(1, 9) == mcnemar_exact(9, 1) == 22 / 1024
    # 0 and 5: 2 * 1/32 = 0.0625 -- five gains alone are not clear at 5%.
    assert mcnemar_exact(0, 5) == 2 / 32
    # Balanced or no discordant item: no evidence of change.
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_rates_hand_example() -> None:
    # Ten items: 4 solved both times, 1 lost, 3 gained, 2 never: change (3 - 1) / 10 = 0.2.
    # Differences: 3 x +1, 1 x -1, 6 x 0: mean 0.2, sample var (3 * 0.64 + 1.44 + 6 * 0.04) / 9
    # = 3.6 / 9 = 0.4, s / sqrt10 = 0.2 -> 0.2 +- 1.96 * 0.2 = [-0.192, 0.592].
    # McNemar: d = 4, min 1: 2 * (1 + 4) / 16 = 0.625.
    before = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    after = [1, 1, 1, 1, 0, 1, 1, 1, 0, 0]
    out = paired_rates([bool(x) for x in before], [bool(x) for x in after])
    assert (out.only_before, out.only_after, out.p_value) == (1, 3, 0.625)
    assert math.isclose(out.change.value, 0.2, abs_tol=1e-12)
    assert near((out.change.low, out.change.high), (-0.192, 0.592), 1e-9)
    assert not out.change.excludes_zero


def test_paired_change_removes_item_difficulty() -> None:
    # F1 on four items of very different difficulty, each up by 0.1: the paired interval is a
    # point (every difference 0.1, s = 0) while the two unpaired intervals overlap widely.
    before = [0.1, 0.4, 0.7, 0.85]
    after = [b + 0.1 for b in before]
    change = paired_change(before, after)
    assert near((change.value, change.low), (0.1, 0.1), 1e-12) and change.excludes_zero
    assert not separated(mean_estimate(before), mean_estimate(after))
    with pytest.raises(ValueError, match="paired_change"):
        paired_change([1.0], [1.0, 2.0])
