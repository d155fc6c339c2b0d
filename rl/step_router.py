"""The learned per-step router: before each turn, a contextual bandit over turn features picks
which priced model writes it (`turnrl.agent.routing` runs it; `LearnedRouterConfig` configures
it).

Each decision is a context x (`turn_features`: what is known of the episode before the turn),
an arm (a model's name) and a reward; a ridge oracle per arm predicts the reward and an
exploration rule turns predictions into probabilities that never reach 0 (`turnrl.rl.bandit`,
the regression-oracle reduction cited there). Every choice is logged on its turn
(`Turn.route`) with its propensity and features, so the next generation's router is fitted on
the logs (`step_decisions`, `trained_router`) and the logs support off-policy evaluation.

Credit. A decision's reward is its episode's: success minus `cost_weight` times the episode's
`model_usd` cost over `usd_scale` (`episode_reward`), given whole to every decision of the
episode: a Monte-Carlo return without discount, so each decision is credited with what the
episode it was part of earned, the other decisions' effects included (their noise averages out
over episodes; per-decision credit is what a value model would add). A decision whose turn the
budget refused is logged on its episode (`Episode.refused_route`) and counts like the others.

Evaluation (`greedy`): the router takes the arm of highest predicted reward (lowest index on
ties) and logs what it actually did: propensity 1 and one-hot probabilities, so a greedy log
is never mistaken for an exploring one (it is fit for training the oracle; for off-policy
evaluation of another router it covers only the arms it chose).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from turnrl.agent.records import GRADER_ERROR, Episode, Route, StopReason
from turnrl.agent.routing import RouteView
from turnrl.agent.routing_config import MODEL_USD
from turnrl.rl.bandit import BanditRouter
from turnrl.rl.bandit_config import BanditRouterConfig, LearnedRouterConfig
from turnrl.rl.ope import FloatArray, IntArray
from turnrl.rl.rewards import metric

ROUTER = "learned"
"""`Route.router` of this router's decisions."""

FEATURES: tuple[str, ...] = (
    "turn_fraction",
    "usd_left",
    "budget_left",
    "last_called_tools",
    "last_tool_error",
    "last_format_error",
    "last_foreign",
    "policy_logprob",
    "tool_calls",
    "context_used",
)
"""The turn features, in order (`turn_features`). Each is known before the turn, finite, O(1):

- `turn_fraction`: the turn's index over the turn budget, in [0, 1).
- `usd_left`: the fraction of the `model_usd` limit left, in [0, 1]; 1 without one.
- `budget_left`: the least fraction left over every bounded cost kind, in [0, 1]; 1 with none.
- `last_called_tools`: 1 when the previous turn made tool calls.
- `last_tool_error`: 1 when one of the previous turn's tool results was an error.
- `last_format_error`: 1 when the previous turn was malformed.
- `last_foreign`: 1 when another model than the trained policy wrote the previous turn.
- `policy_logprob`: the mean completion logprob of the trained policy's last turn (its
  confidence), floored at -`LOGPROB_FLOOR`; 0 before it wrote any turn (or an empty one).
  A foreign turn's logprobs are another model's (or an API's placeholders): not used.
- `tool_calls`: the tool calls so far over the turn budget, capped at 1.
- `context_used`: the fraction of the context window filled, from the previous turn's
  `tokens_left`; 0 before the first turn.

All are 0 or 1 at the first turn except the budget fractions; the bandit's intercept is its
bias."""

LOGPROB_FLOOR = 5.0
"""`policy_logprob` is at least -LOGPROB_FLOOR: a degenerate turn's mean logprob (-inf, NaN,
a collapse to noise) does not dwarf the other features."""


def _fraction_left(cost: Mapping[str, float], kind: str, limit: float) -> float:
    if limit <= 0:
        return 0.0
    return min(1.0, max(0.0, (limit - cost.get(kind, 0.0)) / limit))


def _mean_logprob(logprobs: Sequence[float]) -> float:
    if not logprobs:
        return 0.0
    m = math.fsum(logprobs) / len(logprobs)
    return m if m > -LOGPROB_FLOOR else -LOGPROB_FLOOR  # NaN falls to the floor too


def turn_features(view: RouteView) -> tuple[float, ...]:
    """The features of the turn `view` is about, in the order of `FEATURES`."""
    turns = view.turns
    last = turns[-1] if turns else None
    usd_limit = view.limits.get(MODEL_USD)
    usd_left = 1.0 if usd_limit is None else _fraction_left(view.cost, MODEL_USD, usd_limit)
    budget_left = min(
        (_fraction_left(view.cost, k, v) for k, v in view.limits.items()), default=1.0
    )
    own = next((t for t in reversed(turns) if not t.foreign), None)
    calls = sum(t.n_tool_calls for t in turns)
    max_turns = max(view.max_turns, 1)
    window = view.context_tokens + (last.tokens_left if last is not None else 0)
    return (
        view.index / max_turns,
        usd_left,
        budget_left,
        float(last is not None and bool(last.tool_calls)),
        float(last is not None and any(r.error is not None for r in last.tool_results)),
        float(last is not None and last.format_error is not None),
        float(last is not None and last.foreign),
        _mean_logprob(own.completion_logprobs) if own is not None else 0.0,
        min(1.0, calls / max_turns),
        view.context_tokens / window if last is not None and window > 0 else 0.0,
    )


@dataclass(frozen=True)
class LearnedStepRouter:
    """A `StepRouter` that draws each turn's model from a bandit over `turn_features`."""

    bandit: BanditRouter
    """The oracle and exploration rule; its arms are the routed models' names."""
    rng: np.random.Generator
    """The draws (advanced by each exploring choice)."""
    greedy: bool = False
    """Take the arm of highest predicted reward and log propensity 1 (evaluation)."""

    def __post_init__(self) -> None:
        d = len(FEATURES) + int(self.bandit.config.intercept)
        if self.bandit.gram_A_D_D.shape[1] != d:
            raise ValueError(
                f"the bandit has {self.bandit.gram_A_D_D.shape[1]} inputs; turn features need {d}"
            )

    @staticmethod
    def new(
        config: LearnedRouterConfig,
        arms: tuple[str, ...],
        rng: np.random.Generator,
        greedy: bool = False,
    ) -> LearnedStepRouter:
        """A router with no data yet (it explores uniformly) over `arms`."""
        bandit_config = BanditRouterConfig(
            arms=arms, ridge=config.ridge, exploration=config.exploration
        )
        return LearnedStepRouter(BanditRouter.new(bandit_config, len(FEATURES)), rng, greedy)

    def choose(self, view: RouteView) -> Route:
        features = turn_features(view)
        arms = self.bandit.arms
        if self.greedy:
            i = int(self.bandit.greedy_N(np.asarray([features], dtype=np.float64))[0])
            probabilities = {a: float(j == i) for j, a in enumerate(arms)}
            return Route(
                model=arms[i],
                router=ROUTER,
                propensity=1.0,
                probabilities=probabilities,
                features=list(features),
            )
        d = self.bandit.choose(features, self.rng)
        return Route(
            model=d.arm,
            router=ROUTER,
            propensity=d.propensity,
            probabilities=dict(zip(arms, d.probabilities, strict=True)),
            features=list(features),
        )


UNSCORED = frozenset({StopReason.POLICY_ERROR, StopReason.ERROR})
"""Stops that say nothing about the choices (as `turnrl.rl.scoring.UNTRAINED`): their
episodes, and those whose grader raised, give no decision a reward."""


def scored(episode: Episode) -> bool:
    """Whether `episode`'s reward says something about its routing decisions."""
    return episode.stop_reason not in UNSCORED and not episode.outcome.get(GRADER_ERROR)


def usd_scale(limits: Mapping[str, float]) -> float:
    """What a reward's dollars are divided by: the budget's `model_usd` limit, else 1 dollar
    (`LearnedRouterConfig.cost_weight`)."""
    limit = limits.get(MODEL_USD)
    return limit if limit is not None and limit > 0 else 1.0


def episode_reward(
    episode: Episode, success_metric: str, cost_weight: float, usd_scale: float
) -> float:
    """`outcome[success_metric] - cost_weight * cost[model_usd] / usd_scale`. Raises when the
    grader did not emit the metric (most suites emit `correct`)."""
    if usd_scale <= 0:
        raise ValueError(f"usd_scale must be > 0, got {usd_scale}")
    return metric(episode, success_metric) - cost_weight * episode.cost.get(MODEL_USD, 0.0) / (
        usd_scale
    )


@dataclass(frozen=True)
class StepLog:
    """The learned router's logged decisions, one row per routed turn."""

    features_N_D: FloatArray
    """Each decision's turn features (`FEATURES`)."""
    arms_N: IntArray
    """Each decision's model, as an index into the arms."""
    rewards_N: FloatArray
    """Each decision's reward: its episode's (`episode_reward`)."""
    propensities_N: FloatArray
    """Each decision's logged propensity."""
    episodes_N: IntArray
    """Each decision's episode, as an index into the episodes given to `step_decisions`."""


def step_decisions(
    episodes: Sequence[Episode],
    arms: Sequence[str],
    cost_weight: float,
    usd_scale: float,
    success_metric: str = "correct",
) -> StepLog:
    """The decisions of this router (`Route.router == "learned"`) on the turns of the scored
    episodes (`scored`), each rewarded with its episode's reward (module docstring)."""
    index = {a: i for i, a in enumerate(arms)}
    features: list[list[float]] = []
    arm_rows: list[int] = []
    rewards: list[float] = []
    propensities: list[float] = []
    episode_rows: list[int] = []
    for e_i, episode in enumerate(episodes):
        # The turns' choices, and the choice of a turn the budget refused (it ended the
        # episode: its reward is what that choice earned).
        chosen = [t.route for t in episode.turns] + [episode.refused_route]
        routes = [r for r in chosen if r is not None and r.router == ROUTER]
        if not routes or not scored(episode):
            continue
        reward = episode_reward(episode, success_metric, cost_weight, usd_scale)
        for route in routes:
            if route.model not in index:
                raise ValueError(f"episode {episode.episode_id}: {route.model!r} is not in {arms}")
            if len(route.features) != len(FEATURES):
                raise ValueError(
                    f"episode {episode.episode_id}: a decision has {len(route.features)} "
                    f"features, not the {len(FEATURES)} of `FEATURES`"
                )
            features.append(route.features)
            arm_rows.append(index[route.model])
            rewards.append(reward)
            propensities.append(route.propensity)
            episode_rows.append(e_i)
    return StepLog(
        features_N_D=np.asarray(features, dtype=np.float64).reshape(-1, len(FEATURES)),
        arms_N=np.asarray(arm_rows, dtype=np.int64),
        rewards_N=np.asarray(rewards, dtype=np.float64),
        propensities_N=np.asarray(propensities, dtype=np.float64),
        episodes_N=np.asarray(episode_rows, dtype=np.int64),
    )


def trained_router(router: BanditRouter, log: StepLog) -> BanditRouter:
    """`router` with `log`'s decisions added to its oracle's statistics."""
    return router.updated(log.features_N_D, log.arms_N, log.rewards_N)
