"""Regression lock (issue 11): for every example config, the oracle's episodes earn a positive
outcome reward under that config's own reward settings.

`examples/humaneval.yaml` and `gsm_symbolic.yaml` once trained on `outcome_metric: f1`, which
their graders never emit; the reward read the missing metric as 0 and every correct episode
scored nothing. Configs are now checked against the metrics their suite declares, and rewards
read metrics strictly; this test checks the whole path on real items through the real runner,
tools, sandbox and grader. Do not change it without a decision. (Decided with issue 16: a
routed config's evaluation stores its boundary passes beside the main one; the count applies to
the main pass, the reward to all.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from turnrl.agent.store import RunStore
from turnrl.config import load_config
from turnrl.rl.rewards import group_rewards
from turnrl.train import run_eval

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ROOM = {"budget.max_context_tokens": 65536, "budget.max_new_tokens": 2048}
"""The oracle's room: HumanEval's answer with its tests, BFCL's long simulator outputs."""


@pytest.mark.parametrize(
    "example", sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name != "tiny.yaml")
)
def test_oracle_episodes_earn_a_positive_outcome_reward(example: str, tmp_path: Path) -> None:
    config = load_config(
        EXAMPLES / example,
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"kind": "oracle"},  # the whole model: a vllm model has more fields
            "sandbox.kind": "subprocess",
            "eval.n_items": 2,
            **ROOM,
        },
    )
    summary = run_eval(config, Console(width=120, record=True), None)
    assert summary["success"] == 1.0
    with RunStore.open_readonly(config.run_dir) as store:
        episodes = list(store.episodes())
    # A routed config's evaluation also runs its boundary policies (always-cheap, always-
    # expensive: `turnrl.routing_eval`), each under a pass tag of its own; every pass is the
    # oracle here, and every episode must earn the outcome.
    assert len([e for e in episodes if e.group_id.split("/")[0] == "eval"]) == 2
    outcome = config.rewards.outcome()
    rewarded = group_rewards(episodes, config.rewards)
    for e in rewarded:
        assert e.turns[-1].rewards["outcome"] > 0, (example, outcome.metric, e.outcome)
