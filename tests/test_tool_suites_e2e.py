"""`turnrl eval` on the tool-calling suites (BFCL multi-turn, BFCL single-turn, embodied
search) with the oracle policy, through the command line and the example configs: every
item's gold calls go through the runner, the real simulators or toolkits, the parser and the
episode grader, and must score 100%. The run folder must hold the per-episode results and the
summary (cost per kind, per success, per call, calls per tool) that `write_eval` promises, and
`turnrl replay` must re-grade the stored episodes to the same verdicts.

`turnrl tasks list --json` must list every suite with where its data comes from."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from turnrl.agent.store import RunStore
from turnrl.cli import app
from turnrl.config import load_config
from turnrl.report import MAX_TOOL_KEYS
from turnrl.suites import build_suite
from turnrl.tasks.base import TaskItem
from turnrl.tasks.bfcl_single import CATEGORIES as SINGLE_CATEGORIES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

LONG_CONTEXT_ROOM = "budget.max_context_tokens=65536"
"""The oracle's room for BFCL's long_context simulators (a single `ls` returns ~32k tokens);
the example's 8,192 is the embedded model's window."""

# The first 40 bfcl_single test items span 7 of the 10 categories; the split does not depend on
# the categories chosen, so a run restricted to the other 3 covers them (all their ~150 test
# items: live_parallel and live_parallel_multiple have 7 and 8 only).
SINGLE_FIRST_40 = frozenset(
    {
        "simple",
        "multiple",
        "parallel",
        "parallel_multiple",
        "irrelevance",
        "live_multiple",
        "live_irrelevance",
    }
)
SINGLE_REST = tuple(c for c in SINGLE_CATEGORIES if c not in SINGLE_FIRST_40)

CASES = [
    pytest.param("bfcl_multi_turn.yaml", 40, [LONG_CONTEXT_ROOM], id="bfcl_multi_turn"),
    pytest.param("bfcl_single.yaml", 40, [], id="bfcl_single"),
    pytest.param(
        "bfcl_single.yaml",
        1000,  # all of them
        [f"task.categories={json.dumps(list(SINGLE_REST))}"],
        id="bfcl_single-rare-categories",
    ),
    pytest.param("embodied.yaml", 40, [], id="embodied_search"),
]

TOOLS_EXPECTED: dict[str, set[str]] = {
    # Tools the gold solutions call at least once on these items.
    "embodied.yaml": {"ask", "navigate", "look", "pick"},
}
COST_KINDS: dict[str, set[str]] = {
    "bfcl_multi_turn.yaml": {"calls"},
    "bfcl_single.yaml": {"calls"},
    "embodied.yaml": {"calls", "time_s", "human_attention"},
}


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def split_items(example: str, sets: list[str]) -> list[TaskItem]:
    """The test split of `example`'s suite with the `--set` overrides `sets`."""
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in sets)}
    cfg = load_config(EXAMPLES / example, overrides)
    return list(build_suite(cfg.task, None, None, chat=cfg.chat).items("test"))


def oracle_eval(example: str, n_items: int, sets: list[str], run_dir: Path) -> list[str]:
    """The `turnrl eval` arguments of an oracle run of `example` on the first `n_items`."""
    overrides = [
        f"run_dir={run_dir}",
        "model.kind=oracle",
        f"eval.n_items={n_items}",
        *sets,
    ]
    return ["eval", str(EXAMPLES / example), *(a for s in overrides for a in ("--set", s))]


@pytest.mark.parametrize(("example", "n_items", "sets"), CASES)
def test_oracle_scores_every_item(
    example: str, n_items: int, sets: list[str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cli(*oracle_eval(example, n_items, sets, run_dir))

    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    summary: dict[str, float] = json.loads((run_dir / "eval.summary.json").read_text())
    items = split_items(example, sets)[:n_items]
    assert [r["task_id"] for r in rows] == [it.id for it in items]  # the first n, in order
    n = len(rows)
    assert summary["episodes"] == n > 0
    failed = [(r["task_id"], r["stop_reason"], r["outcome"]) for r in rows if r["correct"] != 1]
    assert failed == []
    assert summary["success"] == 1.0
    for r in rows:
        assert r["stop_reason"] == "answered"
        assert r["format_errors"] == 0
        assert set(r["cost"]) <= COST_KINDS[example]
        assert r["cost"].get("calls", 0.0) == r["tool_calls"]

    calls = sum(r["tool_calls"] for r in rows)
    assert calls > 0
    assert summary["successes_per_call"] == pytest.approx(n / calls)
    assert summary["tool_calls_per_episode"] == pytest.approx(calls / n)
    with RunStore.open_readonly(run_dir) as store:
        names = Counter(c.name for e in store.episodes() for t in e.turns for c in t.tool_calls)
    assert sum(names.values()) == calls
    assert TOOLS_EXPECTED.get(example, set()) <= set(names)
    per_tool = {
        k.removeprefix("tool_calls/"): v for k, v in summary.items() if k.startswith("tool_calls/")
    }
    # One key per tool name, unless the episodes called more names than a summary lists.
    expected = {name: c / n for name, c in names.items()} if len(names) <= MAX_TOOL_KEYS else {}
    assert per_tool == pytest.approx(expected)
    for kind in COST_KINDS[example]:
        total = sum(r["cost"].get(kind, 0.0) for r in rows)
        assert total > 0
        assert summary[f"cost/{kind}"] == pytest.approx(total / n)
        assert summary[f"cost_per_success/{kind}"] == pytest.approx(total / n)

    if example == "bfcl_multi_turn.yaml":
        # Every user message was answered and every checked user turn passed.
        assert all(
            r["outcome"]["finished"] == 1 and r["outcome"]["turns_correct"] == 1 for r in rows
        )
        assert {it.meta["category"] for it in items} == {
            "base",
            "miss_func",
            "miss_param",
            "long_context",
        }
    if example == "bfcl_single.yaml":
        covered = {str(it.meta["category"]) for it in items}
        assert covered == (set(SINGLE_REST) if sets else SINGLE_FIRST_40)

    out = cli("replay", str(run_dir))
    found = re.search(r"(\d+) episodes; .* grades differing: (\d+)", " ".join(out.split()))
    assert found is not None, out
    assert (int(found[1]), int(found[2])) == (n, 0)


def test_tasks_list_names_every_suite() -> None:
    rows: list[dict[str, Any]] = json.loads(cli("tasks", "list", "--json"))
    by_kind = {r["kind"]: r for r in rows}
    assert list(by_kind) == [
        "search_qa",
        "humaneval",
        "gsm_symbolic",
        "bfcl_multi_turn",
        "bfcl_single",
        "embodied_search",
    ]
    for r in rows:
        assert r["source"] and r["source"] != "?", r
        assert r["license"] and r["license"] != "?", r
        assert r["train"] > 0 and r["test"] > 0, r
        assert r["description"], r


@pytest.mark.parametrize(
    ("example", "sets"),
    [
        pytest.param("bfcl_multi_turn.yaml", [LONG_CONTEXT_ROOM], id="bfcl_multi_turn"),
        pytest.param("bfcl_single.yaml", [], id="bfcl_single"),
        pytest.param("embodied.yaml", [], id="embodied_search"),
    ],
)
def test_oracle_scores_the_whole_test_split(example: str, sets: list[str], tmp_path: Path) -> None:
    """Every test item, including the look-alikes a context-keyed script would confuse: BFCL's
    base and long_context twins (same messages, different ground truth) and bfcl_single's
    live_simple_29-7-2 / live_irrelevance_118-7-8 (same question and function, call vs none)."""
    items = split_items(example, sets)
    run_dir = tmp_path / "run"
    cli(*oracle_eval(example, len(items), sets, run_dir))
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [it.id for it in items]
    assert [r["task_id"] for r in rows if r["correct"] != 1] == []
