"""The cost–success plane: summaries, success under budgets, the Pareto frontier, and their
table, plot and JSON. Every expected number is worked out by hand in a comment."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
from rich.console import Console

from turnrl.agent.records import Episode, StopReason
from turnrl.frontier import (
    FRONTIER_MARK,
    CostSuccess,
    breakpoints,
    cost_of_pass,
    cost_success_table,
    pareto_frontier,
    plot_frontier,
    success_of_budgeted_runs,
    success_under_budgets,
    summarize,
    to_json,
)


def _episodes(
    tag: str, runs: Sequence[tuple[bool, dict[str, float]]], exhausted: Sequence[int] = ()
) -> list[Episode]:
    """One episode per `(solved, cost)`; those at indices `exhausted` ran out of budget."""
    return [
        Episode(
            episode_id=f"{tag}/{i}",
            task_id=f"item{i}",
            group_id=f"{tag}/{i}",
            stop_reason=StopReason.BUDGET_EXHAUSTED if i in exhausted else StopReason.ANSWERED,
            outcome={"correct": float(ok)},
            cost=cost,
        )
        for i, (ok, cost) in enumerate(runs)
    ]


def _flat(name: str, n: int, solved: int, usd: float) -> CostSuccess:
    """n episodes costing `usd` each, the first `solved` of them solved."""
    return summarize(name, _episodes(name, [(i < solved, {"model_usd": usd}) for i in range(n)]))


def _usd(runs: Sequence[tuple[bool, float]]) -> list[Episode]:
    return _episodes("u", [(ok, {"model_usd": c}) for ok, c in runs])


def test_summary_by_hand() -> None:
    eps = _episodes(
        "a",
        [
            (True, {"model_usd": 1.0, "time_s": 10.0}),
            (False, {"model_usd": 2.0, "time_s": 20.0}),
            (True, {"model_usd": 3.0}),  # time_s never charged: 0
            (False, {"model_usd": 4.0}),
        ],
        exhausted=[1, 3],
    )
    s = summarize("router", eps)
    assert (s.n, s.successes, s.budget_exhausted) == (4, 2, 2)
    # Wilson 2/4: centre (0.5 + 1.96^2/8) / (1 + 1.96^2/4) = 0.5, half
    # 1.96 sqrt(0.0625 + 3.8416/64) / 1.9604 = 0.34996.
    assert s.success.format() == "0.500 [0.150, 0.850]"
    assert [c.kind for c in s.costs] == ["model_usd", "time_s"]
    usd = s.cost("model_usd")
    # Mean 2.5, sample sd sqrt(5/3) = 1.29099, half 1.96 * 1.29099 / 2 = 1.26517.
    assert usd.mean.format(4) == "2.5000 [1.2348, 3.7652]"
    # Cost of pass 10 / 2 = 5; residuals c - 5 s: -4, 2, -2, 4 -> S^2 = 40 / 3, se =
    # sqrt(40/3) / (sqrt(4) * 0.5) = 3.6515, half 7.1570: the low end -2.157 is cut at 0.
    assert usd.per_success is not None
    assert usd.per_success.format(3) == "5.000 [0.000, 12.157]"
    time = s.cost("time_s")
    # Mean (10 + 20 + 0 + 0) / 4 = 7.5; cost of pass (10 + 20) / 2 = 15.
    assert time.mean.value == 7.5
    assert time.per_success is not None and time.per_success.value == 15.0


def test_cost_of_pass_interval_by_hand() -> None:
    # Costs 2, 1, 2, 1 with successes 1, 0, 1, 0: R = 6 / 2 = 3; residuals -1, 1, -1, 1 ->
    # S^2 = 4/3; se = sqrt(4/3) / (2 * 0.5) = 1.15470; half 1.96 * 1.15470 = 2.26321.
    est = cost_of_pass([2.0, 1.0, 2.0, 1.0], [1.0, 0.0, 1.0, 0.0])
    assert est is not None
    assert est.format(4) == "3.0000 [0.7368, 5.2632]"
    # All solved: the ratio is the mean, and its interval the mean's normal interval.
    every = cost_of_pass([1.0, 2.0, 3.0, 4.0], [1.0] * 4)
    assert every is not None and every.format(4) == "2.5000 [1.2348, 3.7652]"
    one = cost_of_pass([3.0], [1.0])
    assert one is not None and one.value == 3.0 and math.isinf(one.low)


def test_no_success_has_no_cost_of_pass() -> None:
    s = summarize("hopeless", _usd([(False, 1.0), (False, 3.0)]))
    assert s.success.value == 0.0
    assert s.cost("model_usd").per_success is None
    assert s.cost("model_usd").mean.value == 2.0
    dumped = s.to_json()
    assert "cost_of_pass/model_usd" not in dumped and dumped["cost/model_usd"] == 2.0
    console = Console(width=200, record=True)
    console.print(cost_success_table([s], "model_usd"))
    assert "—" in console.export_text()


def test_kind_not_recorded_costs_zero() -> None:
    s = summarize("local", _episodes("l", [(True, {}), (False, {})]))
    c = s.cost("model_usd")
    assert (c.mean.value, c.mean.low, c.mean.high) == (0.0, 0.0, 0.0)
    assert c.per_success is not None and c.per_success.value == 0.0


def test_budget_sweep_at_exact_boundaries() -> None:
    """Regression lock: a cost exactly at the budget is within it, the next float above is
    not (the runner's `over_budget`). Do not change without a decision."""
    eps = _usd([(True, 0.5), (True, 1.0), (False, 0.2), (True, 1.5)])
    just_under, just_over = math.nextafter(1.0, 0.0), math.nextafter(1.0, 2.0)
    points = success_under_budgets(eps, "model_usd", [1.0, just_over, 0.0, just_under, 0.5, 1.0])
    got = [(p.budget, p.success.value) for p in points]
    # 0: nothing; 0.5: the 0.5 success; just under 1: still 1; 1.0 and just over: 2 of 4.
    assert got == [(0.0, 0.0), (0.5, 0.25), (just_under, 0.25), (1.0, 0.5), (just_over, 0.5)]
    (unbounded,) = success_under_budgets(eps, "model_usd", [math.inf])
    assert unbounded.success.value == 0.75 and unbounded.success.n == 4
    # Wilson 1/4 (1.96): centre (0.25 + 0.4802) / 1.9604 = 0.37248, half
    # 1.96 sqrt(0.1875/4 + 0.060025) / 1.9604 = 0.32689.
    assert points[1].success.format() == "0.250 [0.046, 0.699]"
    assert breakpoints(eps, "model_usd") == (0.5, 1.0, 1.5)
    # Dollars summed in floats: 0.1 + 0.2 > 0.3, and the runner would refuse it too.
    (summed,) = success_under_budgets(_usd([(True, 0.1 + 0.2)]), "model_usd", [0.3])
    assert summed.success.value == 0.0


def test_budget_sweep_rejects_nonsense_budgets() -> None:
    with pytest.raises(ValueError, match="budgets must be >= 0"):
        success_under_budgets(_usd([(True, 1.0)]), "model_usd", [-1.0])
    with pytest.raises(ValueError, match="budgets must be >= 0"):
        success_of_budgeted_runs([(math.nan, _usd([(True, 1.0)]))], "model_usd")


def test_budgeted_runs_each_under_its_own_budget() -> None:
    at_two = _usd([(True, 2.0), (True, 1.0), (False, 2.0)])  # 2 of 3 within 2.0
    at_one = _usd([(True, 1.0), (True, 1.5), (False, 0.5), (True, 0.2)])  # 1.5 overspent
    points = success_of_budgeted_runs([(2.0, at_two), (1.0, at_one)], "model_usd")
    assert [p.budget for p in points] == [1.0, 2.0]
    assert points[0].success.value == 0.5 and points[0].success.n == 4
    assert points[1].success.value == pytest.approx(2 / 3) and points[1].success.n == 3


def test_frontier_with_ties_dominated_and_duplicates() -> None:
    free = _flat("free", 4, 0, 0.0)
    cheap = _flat("cheap", 4, 1, 1.0)
    mid = _flat("mid", 4, 2, 2.0)
    mid_dup = _flat("mid-again", 4, 2, 2.0)  # the same point: neither dominates the other
    pricier_same = _flat("pricier", 4, 2, 3.0)  # same success as mid, costs more
    same_cost_worse = _flat("worse", 4, 1, 2.0)  # same cost as mid, succeeds less
    best = _flat("best", 4, 4, 4.0)
    empty = summarize("empty", [])  # no point on the plane
    summaries = [best, pricier_same, mid_dup, same_cost_worse, empty, mid, cheap, free]
    front = pareto_frontier(summaries, "model_usd")
    # Sorted by cost, then name: 0 free, 1 cheap, 2 mid, 2 mid-again, 4 best.
    assert [s.name for s in front] == ["free", "cheap", "mid", "mid-again", "best"]
    assert pareto_frontier([mid, pricier_same], "model_usd") == (mid,)
    with pytest.raises(ValueError, match="no summary recorded cost kind 'usd'"):
        pareto_frontier(summaries, "usd")


def test_table_marks_the_frontier() -> None:
    summaries = [_flat("cheap", 4, 1, 1.0), _flat("pricier", 4, 1, 3.0), _flat("best", 4, 4, 4.0)]
    console = Console(width=200, record=True)
    console.print(cost_success_table(summaries, "model_usd"))
    rows = {
        name: line
        for line in console.export_text().splitlines()
        for name in ("cheap", "pricier", "best")
        if f" {name} " in line
    }
    assert FRONTIER_MARK in rows["cheap"] and FRONTIER_MARK in rows["best"]
    assert FRONTIER_MARK not in rows["pricier"]
    # Wilson 1/4 and 4/4; every cost equal, so the mean's interval has width 0.
    assert "0.250 [0.046, 0.699]" in rows["cheap"]
    assert "1.000 [0.510, 1.000]" in rows["best"]
    assert "3.0000 [3.0000, 3.0000]" in rows["pricier"]
    assert "12.0000" in rows["pricier"]  # cost of pass: 4 * 3.0 / 1


def test_to_json_is_plain_finite_floats() -> None:
    eps = _usd([(True, 1.0), (False, 3.0)])
    single = summarize("single", _usd([(True, 2.0)]))
    dumped = to_json([summarize("pair", eps), single])
    text = json.dumps(dumped, allow_nan=False)  # raises on inf or nan
    back = json.loads(text)
    assert back["pair"]["cost/model_usd"] == 2.0
    assert back["pair"]["cost_of_pass/model_usd"] == 4.0  # (1 + 3) / 1
    assert back["pair"]["successes"] == 1.0 and back["pair"]["episodes"] == 2.0
    # One episode: the mean has no interval, so its ends are absent rather than inf.
    assert "cost/model_usd_low" not in back["single"] and back["single"]["cost/model_usd"] == 2.0
    with pytest.raises(ValueError, match="share names"):
        to_json([single, single])


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    summaries = [
        _flat("cheap", 4, 1, 1.0),
        _flat("best", 4, 4, 4.0),
        summarize("one", _usd([(True, 2.0)])),
    ]
    path = plot_frontier(tmp_path / "plane.png", summaries, "model_usd")
    assert path == tmp_path / "plane.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_takes_a_perfect_success_rate(tmp_path: Path) -> None:
    # Regression: the Wilson interval of 100/100 ends at 0.9999999999999999, a rounding error
    # below its value, which made a negative error bar that matplotlib refused.
    pytest.importorskip("matplotlib")
    perfect = _flat("always big", 100, 100, 2.0)
    assert perfect.success.high < perfect.success.value
    assert plot_frontier(tmp_path / "plane.png", [perfect], "model_usd") is not None
