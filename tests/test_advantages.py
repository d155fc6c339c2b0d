"""GRPO / Dr. GRPO against hand-derived numbers, and reward components."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.agent.records import Episode, StopReason, ToolResult, Turn
from turnrl.rl.advantages import dr_grpo, group_ids_to_index, grpo, turn_advantages
from turnrl.rl.rewards import RewardConfig, episode_return, turn_rewards


def test_grpo_hand_example() -> None:
    # Group A: returns 1, 0, 0, 1 -> mean 0.5, population std 0.5 -> +1, -1, -1, +1.
    # Group B: returns 2, 2 -> std 0 -> no signal -> 0, 0.
    # Group C: returns 0, 3, 0 -> mean 1, var (1+4+1)/3 = 2, std sqrt(2) -> -1/sqrt2, 2/sqrt2, ...
    returns = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    group = group_ids_to_index(["a"] * 4 + ["b"] * 2 + ["c"] * 3)
    adv = grpo(returns, group, eps=0.0).tolist()
    r2 = math.sqrt(2)
    expected = [1, -1, -1, 1, 0, 0, -1 / r2, 2 / r2, -1 / r2]
    assert all(math.isclose(a, e, abs_tol=1e-12) for a, e in zip(adv, expected, strict=True))
    # Dr. GRPO: centred only: 0.5, -0.5, -0.5, 0.5, 0, 0, -1, 2, -1.
    assert dr_grpo(returns, group).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, -1, 2, -1]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.floats(-10, 10, allow_nan=False)), min_size=1, max_size=40
    )
)
def test_grpo_sums_to_zero_per_group(rows: list[tuple[int, float]]) -> None:
    group = group_ids_to_index([str(g) for g, _ in rows])
    returns = torch.tensor([r for _, r in rows], dtype=torch.float64)
    adv = grpo(returns, group)
    for g in group.unique():
        assert abs(float(adv[group == g].sum())) < 1e-6


def _episode(group: str, turns: int, outcome: float, format_errors: int = 0) -> Episode:
    return Episode(
        episode_id=f"{group}-{outcome}",
        task_id="t",
        group_id=group,
        stop_reason=StopReason.ANSWERED,
        outcome={"f1": outcome, "correct": float(outcome == 1.0)},
        turns=[
            Turn(
                index=i,
                prompt_ids=[1] if i == 0 else [],
                completion_ids=[2, 3],
                completion_logprobs=[-0.1, -0.2],
                observation_ids=[4],
                text="",
                finish_reason="stop",
                format_error="void" if i < format_errors else None,
                tool_results=[ToolResult(call_id=f"t{i}c0", text="", cost={"calls": 1.0})],
            )
            for i in range(turns)
        ],
    )


def test_turn_rewards_are_components_and_returns_weight_them() -> None:
    cfg = RewardConfig(weights={"outcome": 1.0, "format": 0.5, "tool_cost": 0.1})
    ep = turn_rewards(_episode("g", 3, 0.8, format_errors=1), cfg)
    assert [t.rewards for t in ep.turns] == [
        {"outcome": 0.0, "format": -1.0, "tool_cost": -1.0},
        {"outcome": 0.0, "format": 0.0, "tool_cost": -1.0},
        {"outcome": 0.8, "format": 0.0, "tool_cost": -1.0},
    ]
    # 0.8 - 0.5 * 1 - 0.1 * 3 = 0.0
    assert math.isclose(episode_return(ep, cfg.weights), 0.0, abs_tol=1e-12)


def test_costs_are_never_rewarded() -> None:
    ep = _episode("g", 2, 0.0)
    ep = ep.model_copy(
        update={
            "turns": [
                t.model_copy(
                    update={
                        "tool_results": [ToolResult(call_id="x", text="", cost={"calls": -5.0})]
                    }
                )
                for t in ep.turns
            ]
        }
    )
    assert all(t.rewards["tool_cost"] <= 0 for t in turn_rewards(ep, RewardConfig()).turns)


def test_turn_advantages_broadcast_per_episode() -> None:
    eps = [_episode("a", 2, 1.0), _episode("a", 3, 0.0)]
    adv = turn_advantages(eps, [1.0, 0.0], "grpo")
    assert [len(a) for a in adv] == [2, 3]
    assert adv[0] == [adv[0][0]] * 2 and adv[0][0] > 0 > adv[1][0]
