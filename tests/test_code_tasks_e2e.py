"""`turnrl eval` on the code and math suites with the oracle policy: every item's gold solution
goes through the runner, a real python tool call in a real sandbox, the answer parser and the
sandboxed grader, and must score 100%; `turnrl replay` then re-grades the stored answers in a
new sandbox and agrees with every stored grade."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from turnrl.agent.records import StopReason
from turnrl.agent.store import RunStore
from turnrl.config import load_config
from turnrl.replay import replay
from turnrl.sandboxes.bwrap import bwrap_usable
from turnrl.train import run_eval, run_train

ROOT = Path(__file__).resolve().parents[1]


def backends() -> list[object]:
    why_not_bwrap = bwrap_usable()
    try:
        from turnrl.sandboxes.docker import docker_usable

        why_not_docker = docker_usable()
    except ImportError as e:
        why_not_docker = str(e)
    return [
        pytest.param(
            "bwrap", marks=pytest.mark.skipif(why_not_bwrap is not None, reason=str(why_not_bwrap))
        ),
        pytest.param(
            "docker",
            marks=[
                pytest.mark.docker,
                pytest.mark.skipif(why_not_docker is not None, reason=str(why_not_docker)),
            ],
        ),
    ]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize(
    ("example", "n_items"), [("humaneval.yaml", 40), ("gsm_symbolic.yaml", 30)]
)
def test_oracle_scores_everything(backend: str, example: str, n_items: int, tmp_path: Path) -> None:
    cfg = load_config(
        ROOT / "examples" / example,
        {
            "run_dir": str(tmp_path / "run"),
            "model.kind": "oracle",
            "sandbox.kind": backend,
            "sandbox.pool_size": 8,
            "eval.n_items": n_items,
            # Room for the longest HumanEval solution with its tests in one tool call.
            "budget.max_new_tokens": 2048,
            "budget.max_context_tokens": 4096,
        },
    )
    summary = run_eval(cfg, Console(width=120, record=True), None)
    assert summary["episodes"] == n_items
    assert summary["success"] == 1.0

    with RunStore.open_readonly(cfg.run_dir) as store:
        episodes = list(store.episodes())
    for e in episodes:
        assert e.stop_reason == StopReason.ANSWERED
        (call_turn, _) = e.turns
        (result,) = call_turn.tool_results
        # The tool really ran the code in the sandbox: its output, not an error.
        assert result.error is None and not result.text.startswith("[")
        if example == "humaneval.yaml":
            assert result.text == "all tests passed"
        else:
            assert result.text == e.answer

    again = replay(cfg.run_dir)
    assert again["grades_differing"] == 0 and again["episodes"] == n_items


def test_oracle_cannot_train(tmp_path: Path) -> None:
    cfg = load_config(
        ROOT / "examples" / "gsm_symbolic.yaml",
        {"run_dir": str(tmp_path / "run"), "model.kind": "oracle", "sandbox.kind": "subprocess"},
    )
    with pytest.raises(ValueError, match="turnrl eval"):
        run_train(cfg, Console(record=True), with_eval=False)
