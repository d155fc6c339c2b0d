"""Boundary-guided training (BoPO) in a run: the scoring against a worked example, and the stage
end to end on the tiny model with the oracle as the expensive model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rich.console import Console

from turnrl.agent.records import Episode, Route, StopReason, Turn
from turnrl.agent.store import RunStore
from turnrl.bopo import CHEAP, EXPENSIVE, REWARD, SFT, TaskBoundary, bopo_scored, boundary_table
from turnrl.bopo_config import BoundaryTrainingConfig
from turnrl.config import load_config
from turnrl.replay import replay
from turnrl.rl.boundary_config import Difficulty, NoReference
from turnrl.train import run_train

ROOT = Path(__file__).resolve().parents[1]


def turn(index: int, foreign: bool = False) -> Turn:
    return Turn(
        index=index,
        prompt_ids=[1] if index == 0 else [],
        completion_ids=[5, 6],
        completion_logprobs=[-1.0, -1.0],
        observation_ids=[7],
        text="x",
        finish_reason="stop",
        foreign=foreign,
        route=Route(model="big" if foreign else "small", router="delegate"),
    )


def episode(name: str, task: str, success: float, usd: float, turns: list[Turn]) -> Episode:
    return Episode(
        episode_id=name,
        task_id=task,
        group_id=f"s0/{task}",
        turns=turns,
        stop_reason=StopReason.ANSWERED,
        outcome={"correct": success},
        cost={"model_usd": usd},
    )


HARD = TaskBoundary(
    cheap_rate=0.0,
    expensive_rate=1.0,
    cheap_cost=0.0,
    expensive_cost=0.02,
    difficulty=Difficulty.HARD,
)


def test_bopo_scoring_matches_the_worked_example() -> None:
    # A delegated success on a Hard task: C_norm = (0.01 - 0) / (0.02 - 0) = 0.5, so
    # R = 1 + 0.5 * 1 - 0.5 * 0.5 = 1.25. An always-cheap failure: R = 0.
    # Reference: max(cheap 0 * 1.5 - 0.5 * 0, expensive 1 * 1.5 - 0.5 * 1) = 1.0.
    # Group with the reference (weight 1): {1.25, 0, 1.0}, mean 0.75, population variance
    # (0.25 + 0.5625 + 0.0625) / 3 = 0.291667, std 0.540062.
    delegated = episode("a", "t", 1.0, 0.01, [turn(0), turn(1), turn(2, foreign=True)])
    failed = episode("b", "t", 0.0, 0.0, [turn(0), turn(1)])
    scored = bopo_scored([delegated, failed], {"t": HARD}, BoundaryTrainingConfig(), "correct")
    assert scored.returns == pytest.approx([1.25, 0.0])
    a, b = scored.episodes
    std = math.sqrt(0.875 / 3) + 1e-6  # BopoConfig.eps
    assert [t.advantage for t in a.turns[:2]] == pytest.approx([0.5 / std] * 2)
    assert a.turns[2].advantage is None  # the expensive model's turn is never trained
    assert [t.advantage for t in b.turns] == pytest.approx([-0.75 / std] * 2)
    assert [t.rewards for t in a.turns] == [{REWARD: 0.0}, {REWARD: 0.0}, {REWARD: 1.25}]
    # Without the reference the always-cheap failure is pushed down less: plain GRPO on
    # {1.25, 0} gives it -1 (with it, -1.389), and a group of failures only gets 0.
    plain = BoundaryTrainingConfig(bopo={"reference": NoReference()})
    assert bopo_scored([delegated, failed], {"t": HARD}, plain, "correct").episodes[1].turns[
        0
    ].advantage == pytest.approx(-0.625 / (0.625 + 1e-6))
    fails = [failed, failed.model_copy(update={"episode_id": "c"})]
    anchored = bopo_scored(fails, {"t": HARD}, BoundaryTrainingConfig(), "correct")
    assert all(
        t.advantage is not None and t.advantage < 0 for e in anchored.episodes for t in e.turns
    )
    collapsed = bopo_scored(fails, {"t": HARD}, plain, "correct")
    assert all(t.advantage == 0 for e in collapsed.episodes for t in e.turns)


def test_a_task_without_boundary_runs_is_refused() -> None:
    e = episode("a", "unknown", 1.0, 0.0, [turn(0)])
    with pytest.raises(ValueError, match="no boundary runs for tasks"):
        bopo_scored([e], {"t": HARD}, BoundaryTrainingConfig(), "correct")


def test_the_boundary_table_classifies_each_task() -> None:
    cheap = [
        episode("c1", "easy", 1.0, 0.001, [turn(0)]),
        episode("c2", "hard", 0.0, 0.001, [turn(0)]),
    ]
    expensive = [
        episode("x1", "easy", 1.0, 0.02, [turn(0)]),
        episode("x2", "hard", 1.0, 0.03, [turn(0)]),
    ]
    table = boundary_table(cheap, expensive, "correct", 0.5)
    assert table["easy"].difficulty == Difficulty.EASY
    assert table["hard"] == TaskBoundary(0.0, 1.0, 0.001, 0.03, Difficulty.HARD)
    with pytest.raises(ValueError, match="boundary runs missing"):
        boundary_table(cheap, expensive[:1], "correct", 0.5)


def test_a_bopo_run_places_tasks_warm_starts_on_routed_trajectories_and_trains(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "bopo"
    config = load_config(
        ROOT / "examples" / "tiny.yaml",
        {
            "run_dir": str(run_dir),
            "models": {
                "small": {"model": {"kind": "trained"}, "price": {"output_per_mtok": 100.0}},
                "big": {"model": {"kind": "oracle"}, "price": {"per_call": 0.01}},
            },
            "router": {"kind": "delegate", "to": "big"},
            "boundary": {"runs": 1, "n_items": 2, "sft_epochs": 1, "sft_batch_episodes": 2},
            "budget.max_turns": 4,
            "budget.max_new_tokens": 64,  # room for the oracle's calls
            "budget.max_context_tokens": 2048,  # and for two searches' results
        },
    )
    out = run_train(config, Console(width=120, record=True), with_eval=False)  # type: ignore[arg-type]
    assert len(out["rows"]) == 1
    with RunStore.open_readonly(run_dir) as store:
        episodes = list(store.episodes())
    by_tag: dict[str, list[Episode]] = {}
    for e in episodes:
        by_tag.setdefault(e.group_id.split("/")[0], []).append(e)
    # The tiny model solves nothing, the oracle everything: every task is Hard.
    assert all(e.outcome["correct"] == 0 for e in by_tag[CHEAP])
    assert all(e.outcome["correct"] == 1 for e in by_tag[EXPENSIVE])
    # Its routed warm start: the policy's searches and its delegate call are trained on, the
    # expensive model's answer is context.
    sft = by_tag[SFT]
    assert len(sft) == 2
    for e in sft:
        own = [t for t in e.turns if not t.foreign]
        assert own[-1].tool_calls[0].name == "delegate"
        assert all(t.advantage == 1.0 for t in own)
        assert [t.advantage for t in e.turns if t.foreign] == [None]
        assert e.turns[-1].foreign and e.turns[-1].answer is not None
        assert e.cost["turns:big"] == 1
    # RL scored with BoPO's reward on each episode's last turn.
    train = by_tag["s0"]
    assert train and all(set(e.turns[-1].rewards) == {REWARD} for e in train)
    # Replay rebuilds the table from the stored boundary runs: the same advantages.
    replayed = replay(run_dir)
    assert replayed["turns_compared"] > 0 and replayed["advantages_differing"] == 0
    # Scored as configured instead (GRPO), they differ: the comparison can fail.
    assert replay(run_dir, estimator="grpo")["advantages_differing"] > 0
