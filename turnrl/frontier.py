"""Evaluation on the cost–success plane: what each policy or router buys for what it spends.

- `summarize` turns one policy's (or router's) evaluation episodes into a `CostSuccess`: its
  success rate (Wilson interval), its mean cost per cost kind (normal interval) and its cost
  of pass per kind: total cost / successes, the expected spend per solved item (Erol et al.
  2025, "Cost-of-Pass: An Economic Framework for Evaluating Language Models", arXiv
  2504.13359).
- `success_under_budgets` (from unbudgeted runs) and `success_of_budgeted_runs` (from runs
  each made under its own `budget.max_cost`) give success under a strict per-task budget.
- `pareto_frontier` keeps the summaries no other beats on (mean cost, success).
- `cost_success_table`, `plot_frontier` and `to_json` show and store them.

Success is `outcome["correct"] >= 1` (`solved`), as in `turnrl.report`, unless a caller passes
its own predicate. A cost kind an episode did not record costs it 0: the runner adds a kind to
`Episode.cost` only when something charged it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from turnrl.agent.records import Episode, StopReason
from turnrl.agent.routing import over_budget
from turnrl.stats import Estimate, mean_estimate, rate_estimate

Z = 1.96
"""z of the two-sided 95% intervals, as in `turnrl.stats`."""


def solved(episode: Episode) -> bool:
    """The default success: the grader's `correct` reaches 1 (ungraded: not solved)."""
    return episode.outcome.get("correct", 0.0) >= 1.0


@dataclass(frozen=True)
class KindCost:
    """What a set of episodes spent of one cost kind."""

    kind: str
    """The cost kind (`model_usd`, `time_s`, `turns:expert`, ...)."""
    mean: Estimate
    """Mean cost per episode, with its normal interval (unknown below two episodes)."""
    per_success: Estimate | None
    """Cost of pass: total cost / successes, with a delta-method interval (`cost_of_pass`).
    None when nothing succeeded: the spend per success is unbounded, and None, unlike inf,
    survives JSON and cannot win a `min`."""


@dataclass(frozen=True)
class CostSuccess:
    """One policy's or router's evaluation, summarised on the cost–success plane."""

    name: str
    """Which policy or router (a table row, a point on the plot)."""
    n: int
    """Episodes."""
    successes: int
    """Episodes that succeeded."""
    success: Estimate
    """Success rate with its Wilson interval."""
    costs: tuple[KindCost, ...]
    """Per cost kind any episode recorded, sorted by kind."""
    budget_exhausted: int
    """Episodes that ended `budget_exhausted` (refused a turn, or crossed a limit)."""

    def cost(self, kind: str) -> KindCost:
        """The cost of `kind`; a kind no episode recorded cost every episode 0."""
        for c in self.costs:
            if c.kind == kind:
                return c
        flags = [1.0] * self.successes + [0.0] * (self.n - self.successes)
        return _kind_cost(kind, [0.0] * self.n, flags)

    def to_json(self) -> dict[str, float]:
        """Plain floats for an evaluation summary file. A figure with no finite value (a mean
        of no episode, an interval of one, the cost of pass of no success) is absent: JSON has
        no inf or nan."""
        out = {
            "episodes": float(self.n),
            "successes": float(self.successes),
            "budget_exhausted": float(self.budget_exhausted),
            **_estimate_json("success", self.success),
        }
        for c in self.costs:
            out |= _estimate_json(f"cost/{c.kind}", c.mean)
            if c.per_success is not None:
                out |= _estimate_json(f"cost_of_pass/{c.kind}", c.per_success)
        return out


def summarize(
    name: str, episodes: Sequence[Episode], success: Callable[[Episode], bool] = solved
) -> CostSuccess:
    """`episodes` (one policy's evaluation) on the cost–success plane."""
    flags = [float(success(e)) for e in episodes]
    successes = sum(1 for f in flags if f)
    kinds = sorted({k for e in episodes for k in e.cost})
    return CostSuccess(
        name=name,
        n=len(episodes),
        successes=successes,
        success=rate_estimate(successes, len(episodes), Z),
        costs=tuple(_kind_cost(k, [e.cost.get(k, 0.0) for e in episodes], flags) for k in kinds),
        budget_exhausted=sum(e.stop_reason is StopReason.BUDGET_EXHAUSTED for e in episodes),
    )


def cost_of_pass(costs: Sequence[float], successes: Sequence[float]) -> Estimate | None:
    """Total cost / total successes (`successes` 0 or 1 per episode, aligned with `costs`),
    i.e. the ratio of means R = mean(c) / mean(s); None when nothing succeeded.

    Its interval is the delta method's for a ratio of means (Cochran 1977, "Sampling
    Techniques", 3rd ed., section 6.3): R +- z sqrt(sum_i (c_i - R s_i)^2 / (n - 1)) /
    (sqrt(n) mean(s)). It is symmetric, so it is wide and rough when successes are few; its
    low end is cut at 0 when no cost is negative (the ratio cannot be). Unknown (-inf, inf)
    below two episodes.
    """
    if len(costs) != len(successes):
        raise ValueError(f"cost_of_pass: {len(costs)} costs, {len(successes)} success flags")
    n, total_s = len(costs), sum(successes)
    if total_s <= 0:
        return None
    ratio = sum(costs) / total_s
    if n < 2:
        return Estimate(ratio, -math.inf, math.inf, n)
    residuals = sum((c - ratio * s) ** 2 for c, s in zip(costs, successes, strict=True))
    half = Z * math.sqrt(residuals / (n - 1)) / (math.sqrt(n) * (total_s / n))
    low = ratio - half
    if min(costs) >= 0:
        low = max(0.0, low)
    return Estimate(ratio, low, ratio + half, n)


def _kind_cost(kind: str, costs: Sequence[float], flags: Sequence[float]) -> KindCost:
    return KindCost(kind, mean_estimate(costs, Z), cost_of_pass(costs, flags))


@dataclass(frozen=True)
class BudgetPoint:
    """Success under one strict per-task budget."""

    budget: float
    """The limit on the cost kind, per episode."""
    success: Estimate
    """Share of episodes that succeeded within it, with its Wilson interval."""


def within(episode: Episode, kind: str, budget: float) -> bool:
    """Whether the episode's total cost of `kind` stays within `budget`. The runner's own
    test (`turnrl.agent.routing.over_budget`): strictly over is out, exactly at the budget is
    in, with no float tolerance."""
    return not over_budget(episode.cost, {kind: budget})


def success_under_budgets(
    episodes: Sequence[Episode],
    kind: str,
    budgets: Sequence[float],
    success: Callable[[Episode], bool] = solved,
) -> tuple[BudgetPoint, ...]:
    """Success rate under each budget B (sorted, each once) of episodes run without it: an
    episode counts only when it succeeded with its total cost of `kind` <= B.

    That is what a budget-*unaware* policy would score under a hard budget B: it follows the
    same trajectory until its next turn would cross B, is refused there, and fails. For a
    policy that is not shown the budget it is an upper bound on a rerun with
    `budget.max_cost: {kind: B}`: the runner refuses a turn on its worst case (`Price.bound`),
    which may have fitted, and a tool's cost that lands exactly on B ends the episode (`>=`)
    although its answer would have come in budget. A shown budget (`Budget.shown`) changes
    what the policy sees, hence its trajectory: then it is no bound at all. A budget-*aware*
    router spends differently under a budget than without one: rerun it under each budget and
    pass the runs to `success_of_budgeted_runs`. The curve is a step function of B that rises
    only at the costs `breakpoints` lists.
    """
    flagged = [(e, success(e)) for e in episodes]
    return tuple(
        BudgetPoint(
            b, rate_estimate(sum(ok and within(e, kind, b) for e, ok in flagged), len(flagged), Z)
        )
        for b in sorted(set(_checked(budgets)))
    )


def success_of_budgeted_runs(
    runs: Sequence[tuple[float, Sequence[Episode]]],
    kind: str,
    success: Callable[[Episode], bool] = solved,
) -> tuple[BudgetPoint, ...]:
    """Success rate of runs each evaluated under its own budget `(B, episodes run with
    budget.max_cost: {kind: B})`, sorted by B (runs with equal B keep their order). The
    budget-aware router's curve. The same rule as `success_under_budgets` counts a success
    (succeeded, cost <= B); in a run really made under B it only guards against a run passed
    with the wrong budget, whose overspending successes would otherwise count."""
    _checked([b for b, _ in runs])
    points = [
        BudgetPoint(
            b, rate_estimate(sum(success(e) and within(e, kind, b) for e in eps), len(eps), Z)
        )
        for b, eps in runs
    ]
    return tuple(sorted(points, key=lambda p: p.budget))


def breakpoints(
    episodes: Sequence[Episode], kind: str, success: Callable[[Episode], bool] = solved
) -> tuple[float, ...]:
    """The budgets where `success_under_budgets` steps up: the distinct costs of `kind` of
    the successful episodes, sorted (a sweep over them misses no change of the curve)."""
    return tuple(sorted({e.cost.get(kind, 0.0) for e in episodes if success(e)}))


def _checked(budgets: Sequence[float]) -> Sequence[float]:
    bad = [b for b in budgets if math.isnan(b) or b < 0]
    if bad:
        raise ValueError(f"budgets must be >= 0 (inf for none), got {bad}")
    return budgets


def dominates(a: CostSuccess, b: CostSuccess, kind: str) -> bool:
    """`a` costs no more (mean of `kind`) and succeeds no less than `b`, and is strictly
    better in one. Point estimates only: intervals are in the table, to judge by eye."""
    ca, cb = a.cost(kind).mean.value, b.cost(kind).mean.value
    sa, sb = a.success.value, b.success.value
    return ca <= cb and sa >= sb and (ca < cb or sa > sb)


def pareto_frontier(summaries: Sequence[CostSuccess], kind: str) -> tuple[CostSuccess, ...]:
    """The summaries no other dominates on (mean cost of `kind`, success rate), sorted by
    cost, then by name.

    Ties: summaries at the same point do not dominate each other, so duplicates are all on
    the frontier (or all off it). At equal cost the lower success is dominated; at equal
    success, the higher cost. A summary of no episode (mean cost nan) has no point and is never
    on it. Raises when no summary recorded `kind` (a misspelt kind would put all at cost 0).
    """
    _require_kind(summaries, kind)
    placed = [s for s in summaries if not math.isnan(s.cost(kind).mean.value)]
    front = [s for s in placed if not any(dominates(o, s, kind) for o in placed)]
    return tuple(sorted(front, key=lambda s: (s.cost(kind).mean.value, s.name)))


def _require_kind(summaries: Sequence[CostSuccess], kind: str) -> None:
    if not any(c.kind == kind for s in summaries for c in s.costs):
        recorded = sorted({c.kind for s in summaries for c in s.costs})
        raise ValueError(f"no summary recorded cost kind {kind!r}; they recorded {recorded}")


FRONTIER_MARK = "◆"
"""Marks the rows of `cost_success_table` on the Pareto frontier."""


def cost_success_table(summaries: Sequence[CostSuccess], kind: str) -> Table:
    """One row per summary, in the given order: success, mean cost and cost of pass of
    `kind`, each with its 95% interval, budget-exhausted episodes, and `FRONTIER_MARK` on the
    Pareto frontier."""
    front = {id(s) for s in pareto_frontier(summaries, kind)}
    table = Table(
        title=f"Cost–success on {kind} (95% intervals; {FRONTIER_MARK} = Pareto frontier)"
    )
    for label in (
        "",
        "policy",
        "n",
        "success",
        f"mean {kind}",
        f"{kind} per success",
        "budget out",
    ):
        table.add_column(label, justify="left" if label in ("", "policy") else "right")
    for s in summaries:
        c = s.cost(kind)
        table.add_row(
            FRONTIER_MARK if id(s) in front else "",
            s.name,
            str(s.n),
            _cell(s.success),
            _cell(c.mean, 4),
            "—" if c.per_success is None else _cell(c.per_success, 4),
            str(s.budget_exhausted),
        )
    return table


def _cell(e: Estimate, digits: int = 3) -> str:
    if math.isnan(e.value):
        return "—"
    if math.isinf(e.low) or math.isinf(e.high):
        return f"{e.value:.{digits}f} [?]"
    return e.format(digits)


def plot_frontier(path: Path, summaries: Sequence[CostSuccess], kind: str) -> Path | None:
    """A PNG at `path` of the summaries on (mean cost of `kind`, success), 95% intervals as
    error bars, the frontier as a staircase: between two frontier points, the cheaper one's
    success is what that spend buys for sure (mixing the two at random would reach the
    segment between them). None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: never open a window, whatever the environment says
    import matplotlib.pyplot as plt

    front = pareto_frontier(summaries, kind)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for s in summaries:
        mean, rate = s.cost(kind).mean, s.success
        if math.isnan(mean.value):
            continue
        # Clamped at 0: an interval's end can fall a rounding error inside its value (a
        # Wilson interval's upper end at a success rate of 1), which matplotlib refuses.
        xerr = (
            [[max(0.0, mean.value - mean.low)], [max(0.0, mean.high - mean.value)]]
            if math.isfinite(mean.low)
            else None
        )
        yerr = [[max(0.0, rate.value - rate.low)], [max(0.0, rate.high - rate.value)]]
        on = any(s is f for f in front)
        ax.errorbar(
            mean.value,
            rate.value,
            xerr=xerr,
            yerr=yerr,
            fmt="o" if on else "s",
            color="C0" if on else "C7",
            capsize=3,
            markersize=5,
        )
        ax.annotate(
            s.name, (mean.value, rate.value), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    if front:
        xs = [f.cost(kind).mean.value for f in front]
        ys = [f.success.value for f in front]
        ax.step(xs, ys, where="post", color="C0", alpha=0.6, label="Pareto frontier")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(f"mean {kind} per episode")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def to_json(summaries: Sequence[CostSuccess]) -> dict[str, dict[str, float]]:
    """Each summary's `CostSuccess.to_json` under its name (names must differ)."""
    dupes = sorted(k for k, v in Counter(s.name for s in summaries).items() if v > 1)
    if dupes:
        raise ValueError(f"to_json: summaries share names {dupes}")
    return {s.name: s.to_json() for s in summaries}


def _estimate_json(key: str, e: Estimate) -> dict[str, float]:
    out = {key: e.value, f"{key}_low": e.low, f"{key}_high": e.high}
    return {k: v for k, v in out.items() if math.isfinite(v)}
