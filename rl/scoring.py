"""Credit for graded episodes: turn rewards, returns, then advantages stored on the turns.

The one scoring path: training calls it on fresh rollouts and `turnrl replay` on stored ones,
so replay with the run's own settings reproduces the stored advantages bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

from turnrl.agent.records import Episode
from turnrl.rl.advantages import Estimator, turn_advantages
from turnrl.rl.rewards import RewardConfig, episode_return, turn_rewards


def score(
    episodes: Sequence[Episode], rewards: RewardConfig, estimator: Estimator
) -> tuple[list[Episode], list[float]]:
    """Episodes with per-turn reward components and advantages filled in, and their returns.
    Needs graded episodes (`Episode.outcome`)."""
    rewarded = [turn_rewards(e, rewards) for e in episodes]
    returns = [episode_return(e, rewards.weights) for e in rewarded]
    advantages = turn_advantages(rewarded, returns, estimator)
    scored = [
        e.model_copy(
            update={
                "turns": [
                    t.model_copy(update={"advantage": a}) for t, a in zip(e.turns, adv, strict=True)
                ]
            }
        )
        for e, adv in zip(rewarded, advantages, strict=True)
    ]
    return scored, returns
