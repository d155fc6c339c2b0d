"""Summaries of a set of episodes, computed only from what the episodes store.

Every number in a table or a metrics row comes from `summarize`, so it can be recomputed from
the run's `episodes.rec` by `turnrl replay`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from rich.table import Table

from turnrl.agent.records import Episode
from turnrl.stats import mean_interval, paired_rates, rate_estimate, separated, wilson_interval

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
        "error": _error_line(e.error),
    }


def _error_line(error: str | None) -> str | None:
    """What ended a failed episode, at a glance: a policy error's class and text, or a
    traceback's last line."""
    lines = (error or "").strip().splitlines()
    if not lines:
        return None
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line[:500]


def curves_table(rows: Sequence[dict[str, float]], columns: Mapping[str, str]) -> Table:
    """Per-step training curves; `columns` maps metric keys to column labels. A metric no
    row has (f1 on a suite that does not score it) gets no column; a missing or NaN cell
    prints a dash."""
    table = Table(title="Training curves (per learner step)")
    table.add_column("step", justify="right")
    keys = [k for k in columns if any(_finite(row.get(k)) for row in rows)]
    for k in keys:
        table.add_column(columns[k], justify="right")
    for row in rows:
        cells = (f"{v:.3f}" if _finite(v := row.get(k)) else "-" for k in keys)
        table.add_row(str(int(row.get("step", 0))), *cells)
    return table


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


_FIRST = ["success", "f1", "answered", "tool_calls_per_episode", "successes_per_call"]


def _order(key: str) -> tuple[int, str]:
    return (_FIRST.index(key), key) if key in _FIRST else (len(_FIRST), key)


def with_intervals(summary: dict[str, float], episodes: Sequence[Episode]) -> dict[str, float]:
    """`summary` plus the 95% Wilson interval of its success rate (`success_low`,
    `success_high`), so every printed rate can carry one."""
    if not episodes:
        return summary
    successes = round(sum(e.outcome.get("correct", 0.0) >= 1.0 for e in episodes))
    low, high = wilson_interval(successes, len(episodes))
    return {**summary, "success_low": low, "success_high": high}


def rate_cell(summary: Mapping[str, float], key: str = "success") -> str:
    """`0.600 [0.502, 0.691]`: a rate with its interval, when the summary has one."""
    value = summary.get(key)
    if value is None:
        return "—"
    low, high = summary.get(f"{key}_low"), summary.get(f"{key}_high")
    return f"{value:.3f}" if low is None or high is None else f"{value:.3f} [{low:.3f}, {high:.3f}]"


COMPARED = {
    "success": "success",
    "f1": "f1",
    "tool_calls_per_episode": "tool calls / episode",
    "format_error_rate": "format errors / turn",
    "completion_tokens_per_episode": "sampled tokens / episode",
}
"""The per-episode figures the evaluation table compares, with their labels."""


def _per_episode(e: Episode, key: str) -> float:
    if key == "success":
        return float(e.outcome.get("correct", 0.0) >= 1.0)
    if key == "tool_calls_per_episode":
        return float(e.n_tool_calls)
    if key == "format_error_rate":
        return fmean(t.format_error is not None for t in e.turns) if e.turns else 0.0
    if key == "completion_tokens_per_episode":
        return float(e.n_completion_tokens)
    return e.outcome.get(key, 0.0)


def comparison_table(columns: Mapping[str, Sequence[Episode]]) -> Table:
    """Evaluations side by side (e.g. base, warm start, after RL), each figure with its 95%
    interval (Wilson for success, normal for means), and each later column's change from the
    first with its paired interval over the items both evaluated: the change is clear of noise
    when that interval excludes 0 (`*`)."""
    names = list(columns)
    table = Table(title="Held-out evaluation (95% intervals; * = paired change clear of 0)")
    table.add_column("metric")
    for name in names:
        table.add_column(f"{name} (n={len(columns[name])})", justify="right")
    for name in names[1:]:
        table.add_column(f"{name} − {names[0]}", justify="right")
    first = columns[names[0]]
    for key, label in COMPARED.items():
        if key == "f1" and not any("f1" in e.outcome for e in first):
            continue
        cells = []
        for name in names:
            values = [_per_episode(e, key) for e in columns[name]]
            if not values:
                cells.append("—")
                continue
            if key == "success":
                low, high = wilson_interval(round(sum(values)), len(values))
            else:
                low, high = mean_interval(values)
            cells.append(f"{fmean(values):.3f} [{low:.3f}, {high:.3f}]")
        for name in names[1:]:
            cells.append(_paired_change(first, columns[name], key))
        table.add_row(label, *cells)
    return table


def _paired_change(base: Sequence[Episode], other: Sequence[Episode], key: str) -> str:
    """Mean change of `key` over the items both evaluated (per item, the mean of its
    episodes), with a normal 95% interval of the paired differences."""
    by_item: dict[str, list[float]] = {}
    for e in base:
        by_item.setdefault(e.task_id, []).append(_per_episode(e, key))
    mine: dict[str, list[float]] = {}
    for e in other:
        mine.setdefault(e.task_id, []).append(_per_episode(e, key))
    diffs = [fmean(mine[k]) - fmean(v) for k, v in by_item.items() if k in mine]
    if not diffs:
        return "—"
    low, high = mean_interval(diffs)
    clear = "*" if low > 0 or high < 0 else ""
    return f"{fmean(diffs):+.3f} [{low:+.3f}, {high:+.3f}]{clear}"


def success_tests(columns: Mapping[str, Sequence[Episode]]) -> list[str]:
    """One line per later column against the first: success before and after with Wilson
    intervals, whether the intervals separate, and McNemar's exact test on the items both
    evaluated with one greedy episode each (the paired test sees what separate intervals
    miss: the same items, solved or not, by both)."""
    names = list(columns)
    lines = []
    first = {e.task_id: _per_episode(e, "success") for e in columns[names[0]]}
    base = rate_estimate(round(sum(first.values())), len(first))
    for name in names[1:]:
        mine = {e.task_id: _per_episode(e, "success") for e in columns[name]}
        shared = [k for k in first if k in mine]
        other = rate_estimate(round(sum(mine.values())), len(mine))
        paired = paired_rates([first[k] for k in shared], [mine[k] for k in shared])
        lines.append(
            f"{name} vs {names[0]}: success {base} -> {other}; intervals "
            f"{'separate' if separated(base, other) else 'overlap'}; paired change "
            f"{paired.change.format(signed=True)} on {len(shared)} items (solved only by "
            f"{names[0]}: {paired.only_before}, only by {name}: {paired.only_after}; "
            f"McNemar p = {paired.p_value:.2g})"
        )
    return lines
