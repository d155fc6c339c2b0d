"""A routed run's evaluation on the cost–success plane (`turnrl eval` with `models:`).

The configured router is evaluated, then each model alone on the same items (the boundary
policies: always-cheap, always-expensive, ...); each becomes a `turnrl.frontier.CostSuccess`
on the `model_usd` axis, printed as one table with the Pareto frontier marked, with success
under a sweep of strict per-task budgets (from the unbudgeted episodes: what a budget-unaware
policy would score; `turnrl.frontier.success_under_budgets`), and written beside the run as
`eval.frontier.json` and `eval.frontier.png`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from turnrl.agent.records import Episode
from turnrl.agent.routing_config import MODEL_USD
from turnrl.frontier import (
    CostSuccess,
    cost_success_table,
    plot_frontier,
    success_under_budgets,
    summarize,
    to_json,
)
from turnrl.resume import read_run
from turnrl.rl.bandit import BanditRouter
from turnrl.rl.step_router import episode_reward, scored
from turnrl.rl.task_router import bandit_log, ope_estimates
from turnrl.session import Session
from turnrl.stats import mean_estimate

EXPLORE_TAG = "eval-explore"
"""The tag of a bandit router's exploring pass (the log off-policy evaluation reads)."""

BUDGET_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5)
"""The budget sweep, as fractions of the most expensive policy's mean cost per episode."""


def boundary_tag(model: str) -> str:
    """The evaluation tag of `model` alone (`eval-always-big`)."""
    return f"eval-always-{model}"


def report_frontier(
    console: Console, run_dir: Path, runs: Mapping[str, Sequence[Episode]], tag: str = "eval"
) -> list[CostSuccess]:
    """Print and store the cost–success comparison of `runs` (name -> evaluation episodes)."""
    summaries = [summarize(name, episodes) for name, episodes in runs.items()]
    console.print(cost_success_table(summaries, MODEL_USD))
    top = max((s.cost(MODEL_USD).mean.value for s in summaries), default=0.0)
    budgets = [f * top for f in BUDGET_FRACTIONS] if top > 0 else []
    sweep: dict[str, dict[str, float]] = {}
    if budgets:
        table = Table(title="Success under a strict per-task budget (budget-unaware replay)")
        table.add_column("policy")
        for b in budgets:
            table.add_column(f"${b:.4f}", justify="right")
        for name, episodes in runs.items():
            points = success_under_budgets(episodes, MODEL_USD, budgets)
            table.add_row(name, *(f"{p.success.value:.2f}" for p in points))
            sweep[name] = {f"{p.budget:.6g}": p.success.value for p in points}
        console.print(table)
    out = {"summaries": to_json(summaries), "budget_sweep": sweep}
    (run_dir / f"{tag}.frontier.json").write_text(json.dumps(out, indent=1, allow_nan=False))
    plot = plot_frontier(run_dir / f"{tag}.frontier.png", summaries, MODEL_USD)
    if plot is not None:
        console.print(f"cost–success plane: {plot}")
    return summaries


def report_ope(
    console: Console,
    run_dir: Path,
    router: BanditRouter,
    logged: Sequence[Episode],
    greedy: Sequence[Episode],
    cost_weight: float,
    usd_scale: float,
    success_metric: str,
) -> dict[str, dict[str, float]]:
    """Off-policy estimates (IPS, SNIPS, DR) of the greedy bandit router's mean reward from
    the exploring pass `logged`, beside its on-policy mean reward on the same items
    (`greedy`), each with its 95% interval; written as `eval.ope.json`."""
    log = bandit_log(logged, router.arms, cost_weight, usd_scale, success_metric, router)
    report = ope_estimates(log, router, greedy=True)
    rewards = [
        episode_reward(e, success_metric, cost_weight, usd_scale) for e in greedy if scored(e)
    ]
    on = mean_estimate(rewards)
    table = Table(title="Bandit router: off-policy estimates vs on-policy (mean reward, 95%)")
    for column in ("estimate", "value", "interval", "within on-policy interval"):
        table.add_column(column, justify="left" if column == "estimate" else "right")
    out = {"on_policy": {"value": on.value, "low": on.low, "high": on.high, "n": len(rewards)}}
    table.add_row("on-policy (greedy)", f"{on.value:.3f}", f"[{on.low:.3f}, {on.high:.3f}]", "")
    for name, est in (("IPS", report.ips), ("SNIPS", report.snips), ("DR", report.dr)):
        if est is None:
            continue
        inside = on.low <= est.value <= on.high
        table.add_row(
            name, f"{est.value:.3f}", f"[{est.low:.3f}, {est.high:.3f}]", "yes" if inside else "no"
        )
        out[name.lower()] = {
            "value": est.value,
            "low": est.low,
            "high": est.high,
            "within_on_policy": float(inside),
        }
    console.print(table)
    (run_dir / "eval.ope.json").write_text(json.dumps(out, indent=1, allow_nan=False))
    return out


def refit_router(s: Session) -> None:
    """A learned router is its logged decisions: refit it from the training steps stored in
    the run folder (none: it evaluates untrained, and says so)."""
    assert s.routing is not None and s.routing.learned is not None
    steps = read_run(s.store).steps
    for step in sorted(steps):
        s.routing.learn(steps[step])
    n = s.routing.learned.decisions
    s.console.print(
        f"[bold]router[/]: refitted on {n} logged decisions of {len(steps)} training steps"
        if n
        else "[bold]router[/]: no training steps in the run folder: it evaluates untrained"
    )
