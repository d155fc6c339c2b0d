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
