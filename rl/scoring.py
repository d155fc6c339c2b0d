"""Credit for graded episodes: turn reward components, per-turn scalar rewards, then step-level
advantages stored on the turns.

The one scoring path: training calls it on fresh rollouts and `turnrl replay` on stored ones,
so replay with the run's own settings reproduces the stored advantages bit for bit. Quantities
a model measured (`Turn.signals`: gold-answer probabilities, values) are inputs here, filled in
before scoring; everything else is a pure function of the stored records.

Components are combined per turn by their weights (`weighted`), or, with
`RewardConfig.decoupled`, GDPO-style: each normalised within its group before the weighted sum.
Replayed prefix turns (a branch's restored history) keep their rewards but get no advantage:
they were not sampled by this episode's policy.
"""

from __future__ import annotations

from collections.abc import Sequence

from turnrl.agent.records import Episode
from turnrl.rl.advantages import EstimatorConfig, compute_advantages, estimator_config
from turnrl.rl.rewards import RewardConfig, decoupled_turn_rewards, group_rewards, weighted


def turn_scalar_rewards(episodes: Sequence[Episode], rewards: RewardConfig) -> list[list[float]]:
    """Each turn's scalar reward from its components (needs `group_rewards` first)."""
    if rewards.decoupled:
        return decoupled_turn_rewards(episodes, rewards)
    return [[weighted(t.rewards, rewards.weights) for t in e.turns] for e in episodes]


def score(
    episodes: Sequence[Episode], rewards: RewardConfig, estimator: EstimatorConfig | str
) -> tuple[list[Episode], list[float]]:
    """Episodes with per-turn reward components and advantages filled in, and their returns
    (the sum of their turns' scalar rewards). Needs graded episodes (`Episode.outcome`)."""
    cfg = estimator_config(estimator)
    rewarded = group_rewards(episodes, rewards)
    rewards_NT = turn_scalar_rewards(rewarded, rewards)
    advantages = compute_advantages(rewarded, rewards_NT, cfg)
    scored = [
        e.model_copy(
            update={
                "turns": [
                    t.model_copy(update={"advantage": None if t.replayed else a})
                    for t, a in zip(e.turns, adv, strict=True)
                ]
            }
        )
        for e, adv in zip(rewarded, advantages, strict=True)
    ]
    return scored, [sum(r) for r in rewards_NT]
