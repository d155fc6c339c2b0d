"""The evaluation tables: every rate with its interval, paired changes over the same items."""

from __future__ import annotations

from rich.console import Console

from turnrl.agent.records import Episode, StopReason
from turnrl.report import comparison_table, curves_table, success_tests, with_intervals


def _evals(solved: list[bool], tag: str) -> list[Episode]:
    return [
        Episode(
            episode_id=f"{tag}/{i}",
            task_id=f"item{i}",
            group_id=f"{tag}/{i}",
            stop_reason=StopReason.ANSWERED,
            answer="x",
            outcome={"correct": float(ok), "f1": float(ok)},
        )
        for i, ok in enumerate(solved)
    ]


def test_success_has_a_wilson_interval() -> None:
    summary = with_intervals({"success": 0.6}, _evals([True] * 60 + [False] * 40, "a"))
    assert round(summary["success_low"], 3) == 0.502
    assert round(summary["success_high"], 3) == 0.691


def test_paired_change_and_mcnemar_over_the_same_items() -> None:
    # 40 items: 10 solved by both, 2 only before, 18 only after, 10 by neither.
    before = [True] * 10 + [True] * 2 + [False] * 18 + [False] * 10
    after = [True] * 10 + [False] * 2 + [True] * 18 + [False] * 10
    columns = {"base": _evals(before, "b"), "trained": _evals(after, "t")}
    (line,) = success_tests(columns)
    assert "solved only by base: 2, only by trained: 18" in line
    # McNemar exact, two-sided: 2 * P(X <= 2), X ~ Bin(20, 1/2) = 2 * 211 / 2**20.
    assert f"McNemar p = {2 * 211 / 2**20:.2g}" in line
    console = Console(width=200, record=True)
    console.print(comparison_table(columns))
    text = console.export_text()
    assert "0.300 [0.181, 0.454]" in text  # 12/40 with its Wilson interval
    assert "+0.400" in text and "*" in text  # the paired change, clear of 0


def test_curves_table_drops_a_metric_no_step_has_and_dashes_gaps() -> None:
    # Embodied scores no f1: no f1 column. Step 1 has no clip fraction, step 0 a NaN loss.
    rows = [
        {"step": 0.0, "success": 0.25, "loss": float("nan"), "clip_frac": 0.01},
        {"step": 1.0, "success": 0.5, "loss": 0.125},
    ]
    columns = {"success": "success", "f1": "f1", "loss": "loss", "clip_frac": "clip"}
    console = Console(width=120, record=True)
    console.print(curves_table(rows, columns))
    text = console.export_text()
    assert "f1" not in text and "nan" not in text
    lines = [line for line in text.splitlines() if line.strip().startswith(("│", "┃"))]
    cells = [[c.strip() for c in line.replace("┃", "│").strip("│ ").split("│")] for line in lines]
    assert cells[0] == ["step", "success", "loss", "clip"]
    assert cells[1] == ["0", "0.250", "-", "0.010"]
    assert cells[2] == ["1", "0.500", "0.125", "-"]
