"""Credit for graded episodes: turn reward components, per-turn scalar rewards, then step-level
advantages stored on the turns.

The one scoring path: training calls it on fresh rollouts and `turnrl replay` on stored ones,
so replay with the run's own settings reproduces the stored advantages bit for bit. Quantities
a model measured (`Turn.signals`: gold-answer probabilities, values) are inputs here, filled in
before scoring; everything else is a pure function of the stored records.

Components are combined per turn by their weights (`weighted`), or, with
`RewardConfig.decoupled`, GDPO-style: each normalised within its group before the weighted sum.
Replayed prefix turns (a branch's restored history) keep their rewards but get no advantage:
they were not sampled by this episode's policy. An episode that a failure outside the policy
ended (`UNTRAINED`: the inference server failed, or the runner raised), or whose grader
raised, keeps its rewards but gets no advantage either, and its group's baselines are taken
without it: its return says what the server or the grader did, not what the policy did.
"""

from __future__ import annotations

from collections.abc import Sequence

from turnrl.agent.records import GRADER_ERROR, Episode, StopReason
from turnrl.rl.advantages import EstimatorConfig, compute_advantages, estimator_config
from turnrl.rl.rewards import RewardConfig, decoupled_turn_rewards, group_rewards, weighted

UNTRAINED = frozenset({StopReason.POLICY_ERROR, StopReason.ERROR})
"""Stops that say nothing about the policy: such an episode is never trained on."""


def trainable(episode: Episode) -> bool:
    """Whether the episode's turns may get advantages (and value targets): not when a failure
    outside the policy ended it, nor when its grader raised (a grader bug scores 0, which says
    nothing about the answer)."""
    return episode.stop_reason not in UNTRAINED and not episode.outcome.get(GRADER_ERROR)


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
    kept = [i for i, e in enumerate(rewarded) if trainable(e)]
    advantages: list[list[float | None]] = [[None] * len(e.turns) for e in rewarded]
    if kept:
        trained = [rewarded[i] for i in kept]
        rows = rewards_NT if len(kept) == len(rewarded) else turn_scalar_rewards(trained, rewards)
        for i, row in zip(kept, compute_advantages(trained, rows, cfg), strict=True):
            advantages[i] = list(row)
    scored = [
        e.model_copy(
            update={
                "turns": [
                    t.model_copy(update={"advantage": None if t.context_only else a})
                    for t, a in zip(e.turns, adv, strict=True)
                ]
            }
        )
        for e, adv in zip(rewarded, advantages, strict=True)
    ]
    return scored, [sum(r) for r in rewards_NT]
