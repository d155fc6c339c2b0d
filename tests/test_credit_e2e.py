"""Credit assignment through `turnrl train` and `turnrl replay` on the tiny model: step-level
estimators and information gain are chosen in config, measured online, stored, and replay
recomputes them bit for bit (or re-scores with other choices)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from turnrl.agent.store import RunStore
from turnrl.config import ConfigError, load_config
from turnrl.replay import replay
from turnrl.train import run_train

ROOT = Path(__file__).resolve().parents[1]


def train(tmp: Path, overrides: dict[str, Any]) -> Path:
    run_dir = tmp / "run"
    cfg = load_config(
        ROOT / "examples" / "tiny.yaml",
        {"run_dir": str(run_dir), "train.steps": 1, "sampling.temperature": 1.0, **overrides},
    )
    run_train(cfg, Console(width=120, record=True), with_eval=False)
    return run_dir


@pytest.fixture(scope="module")
def gigpo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(
        tmp_path_factory.mktemp("gigpo"),
        {
            "train.estimator": "gigpo",
            "rewards.weights": {"outcome": 1.0, "info_gain": 1.0, "tool_cost": 0.01},
        },
    )


def test_online_credit_is_stored_and_replays_bit_for_bit(gigpo_run: Path) -> None:
    with RunStore.open_readonly(gigpo_run) as store:
        episodes = list(store.episodes())
    assert episodes and all(e.step == 0 for e in episodes)
    for e in episodes:
        assert e.gold_prob_initial is not None and 0.0 < e.gold_prob_initial <= 1.0
        for t in e.turns:
            assert t.signals.gold_prob is not None and 0.0 < t.signals.gold_prob <= 1.0
            assert {"outcome", "info_gain", "tool_cost"} <= set(t.rewards)
            assert t.advantage is not None
    # Information gain telescopes over the turns that did not answer.
    for e in episodes:
        open_turns = [t for t in e.turns if t.answer is None]
        if open_turns:
            total = sum(t.rewards["info_gain"] for t in open_turns)
            first = e.gold_prob_initial
            last = open_turns[-1].signals.gold_prob
            assert first is not None and last is not None
            assert total == pytest.approx(last - first, abs=1e-12)
    again = replay(gigpo_run)
    assert again["turns_compared"] > 0 and again["advantages_differing"] == 0


def test_replay_rescores_with_other_choices(gigpo_run: Path) -> None:
    for kind in ("salt", "trloo", "rloo", "reinforce_pp", "tempo"):
        out = replay(gigpo_run, estimator=kind)
        assert out["turns_compared"] > 0
    out = replay(gigpo_run, reward_weights={"outcome": 1.0, "eapo": 1.0, "coverage": 0.1})
    assert out["turns_compared"] > 0


def test_info_gain_on_a_run_without_probabilities_needs_a_checkpoint(tmp_path: Path) -> None:
    run_dir = train(tmp_path, {})
    with pytest.raises(ValueError, match="--checkpoint"):
        replay(run_dir, reward_weights={"outcome": 1.0, "info_gain": 1.0})
    out = replay(
        run_dir,
        reward_weights={"outcome": 1.0, "info_gain": 1.0},
        checkpoint=run_dir / "checkpoints" / "final",
    )
    assert out["turns_compared"] > 0


@pytest.mark.parametrize("kind", ["gae", "tppo"])
def test_critic_estimators_need_a_value_head(kind: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="value_head"):
        load_config(ROOT / "examples" / "tiny.yaml", {"train.estimator": kind})
    run_dir = train(tmp_path, {"train.estimator": kind, "learner.value_head": {}})
    with RunStore.open_readonly(run_dir) as store:
        episodes = list(store.episodes())
        metrics = store.metrics()
    assert all(t.signals.value is not None for e in episodes for t in e.turns)
    # The bootstrap value at the cut of a truncated episode (T-PPO) is stored too.
    assert all(e.value_after is not None for e in episodes)
    assert "value_loss" in metrics[0]
    assert replay(run_dir)["advantages_differing"] == 0
