"""Summaries of a set of episodes, computed only from what the episodes store.

Every number in a table or a metrics row comes from `summarize`, so it can be recomputed from
the run's `episodes.rec` by `turnrl replay`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from rich.table import Table

from turnrl.agent.records import Episode

MAX_TOOL_KEYS = 24
"""Per-tool call counts are reported only when the episodes called at most this many names."""


def summarize(episodes: Sequence[Episode]) -> dict[str, float]:
    """Success, answer quality, tool use and its productivity, cost per cost kind (per episode
    and per success), tokens and stop reasons of `episodes`."""
    if not episodes:
        return {"episodes": 0.0}
    n_calls = sum(e.n_tool_calls for e in episodes)
    results = [r for e in episodes for t in e.turns for r in t.tool_results]
    successes = sum(e.outcome.get("correct", 0.0) for e in episodes)
    turns = [t for e in episodes for t in e.turns]
    out = {
        "episodes": float(len(episodes)),
        "success": successes / len(episodes),
        "answered": fmean(e.answer is not None for e in episodes),
        "tool_calls_per_episode": n_calls / len(episodes),
        "successes_per_call": successes / n_calls if n_calls else 0.0,
        "tool_error_rate": fmean(r.error is not None for r in results) if results else 0.0,
        "turns_per_episode": len(turns) / len(episodes),
        "format_error_rate": fmean(t.format_error is not None for t in turns) if turns else 0.0,
        "completion_tokens_per_episode": fmean(e.n_completion_tokens for e in episodes),
        "context_tokens_per_episode": fmean(len(e.token_ids()) for e in episodes),
        "wall_s_per_episode": fmean(e.wall_s for e in episodes),
    }
    # The suite's other scores (f1 for search, timeouts for code, ...) by their own names.
    for key in sorted({k for e in episodes for k in e.outcome} - {"correct"} - set(out)):
        out[key] = fmean(e.outcome.get(key, 0.0) for e in episodes)
    by_tool = Counter(c.name or "?" for e in episodes for t in e.turns for c in t.tool_calls)
    if len(by_tool) <= MAX_TOOL_KEYS:  # BFCL offers thousands of functions: no row per name
        for name, count in sorted(by_tool.items()):
            out[f"tool_calls/{name}"] = count / len(episodes)
    for kind in sorted({k for e in episodes for k in e.cost}):
        total = sum(e.cost.get(kind, 0.0) for e in episodes)
        out[f"cost/{kind}"] = total / len(episodes)
        if successes:  # absent, not infinite, when nothing succeeded (JSON has no inf)
            out[f"cost_per_success/{kind}"] = total / successes
    for reason, count in sorted(Counter(e.stop_reason.value for e in episodes).items()):
        out[f"stop/{reason}"] = count / len(episodes)
    return out


def write_eval(
    run_dir: Path, tag: str, episodes: Sequence[Episode], summary: Mapping[str, float]
) -> None:
    """`{tag}.jsonl` (one `episode_row` per episode) and `{tag}.summary.json` in `run_dir`,
    each written whole then renamed into place, so a crash never leaves half a file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = "".join(json.dumps(episode_row(e), ensure_ascii=False) + "\n" for e in episodes)
    for name, text in ((f"{tag}.jsonl", rows), (f"{tag}.summary.json", json.dumps(summary))):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, run_dir / name)


def episode_row(e: Episode) -> dict[str, Any]:
    """One episode's line in an evaluation's per-episode results."""
    return {
        "episode_id": e.episode_id,
        "task_id": e.task_id,
        "correct": e.outcome.get("correct", 0.0),
        "outcome": e.outcome,
        "answer": e.answer,
        "stop_reason": e.stop_reason.value,
        "turns": len(e.turns),
        "tool_calls": e.n_tool_calls,
        "tool_errors": sum(r.error is not None for t in e.turns for r in t.tool_results),
        "format_errors": sum(t.format_error is not None for t in e.turns),
        "completion_tokens": e.n_completion_tokens,
        "context_tokens": len(e.token_ids()),
        "cost": e.cost,
        "wall_s": e.wall_s,
    }


def before_after_table(before: dict[str, float], after: dict[str, float]) -> Table:
    """The demo's before/after table."""
    table = Table(title="Held-out evaluation: before vs after RL")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for key in sorted(set(before) | set(after), key=_order):
        b, a = before.get(key), after.get(key)
        change = "—" if a is None or b is None else f"{a - b:+.3f}"
        table.add_row(key, _cell(b), _cell(a), change)
    return table


def _cell(value: float | None) -> str:
    # Absent (e.g. cost per success when nothing succeeded) is not zero.
    return "—" if value is None else f"{value:.3f}"


def curves_table(rows: Sequence[dict[str, float]], columns: Mapping[str, str]) -> Table:
    """Per-step training curves; `columns` maps metric keys to column labels."""
    table = Table(title="Training curves (per learner step)")
    table.add_column("step", justify="right")
    for label in columns.values():
        table.add_column(label, justify="right")
    keys = list(columns)
    for row in rows:
        table.add_row(
            str(int(row.get("step", 0))), *(f"{row.get(k, float('nan')):.3f}" for k in keys)
        )
    return table


_FIRST = ["success", "f1", "answered", "tool_calls_per_episode", "successes_per_call"]


def _order(key: str) -> tuple[int, str]:
    return (_FIRST.index(key), key) if key in _FIRST else (len(_FIRST), key)
