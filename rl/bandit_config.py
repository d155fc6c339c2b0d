"""The task-level bandit router's config: its arms, its ridge oracle, its exploration.

Kept apart from the router (`turnrl.rl.bandit`, which needs numpy) so a run config loads
without it, as `turnrl.rl.estimator_config` does for the advantage estimators. Exploration is
one class per rule, chosen by `kind`; each keeps every arm's probability above zero, so every
logged decision has a usable propensity (`turnrl.rl.ope` refuses zero ones).
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EpsilonGreedyConfig(_Config):
    """epsilon-greedy: the greedy arm gets 1 - epsilon + epsilon / A, every other epsilon / A
    (Sutton & Barto 2018, sec. 2.2; ties split the greedy share evenly)."""

    kind: Literal["epsilon_greedy"] = "epsilon_greedy"
    epsilon: float = Field(0.1, gt=0, le=1)
    """Probability of a uniform draw over all arms; above 0, so no arm's probability is 0."""


class SoftmaxConfig(_Config):
    """Softmax (Boltzmann) over predicted rewards, mixed with a uniform floor:
    p = (1 - A floor) softmax(r_hat / temperature) + floor, so no arm falls to 0 even where
    exp underflows (a gap of 746 temperatures does in float64)."""

    kind: Literal["softmax"] = "softmax"
    temperature: float = Field(0.1, gt=0)
    """Divides the predicted rewards before the softmax; lower is greedier."""
    floor: float = Field(0.01, gt=0)
    """Least probability of any arm; A * floor must stay below 1."""


ExplorationConfig: TypeAlias = Annotated[
    EpsilonGreedyConfig | SoftmaxConfig, Field(discriminator="kind")
]
"""How the router turns predicted rewards into action probabilities."""


class BanditRouterConfig(_Config):
    """A contextual bandit that picks one model (arm) for a whole episode from task features."""

    arms: tuple[str, ...] = Field(min_length=2)
    """The models' names, in the order their indices are logged."""
    ridge: float = Field(1.0, gt=0)
    """lambda of each arm's ridge regression, (X^T X + lambda I)^-1 X^T y."""
    exploration: ExplorationConfig = Field(default_factory=EpsilonGreedyConfig)
    """The rule that keeps exploring."""
    intercept: bool = True
    """Append a constant 1 to the features, so each arm's fit has its own bias."""

    @model_validator(mode="after")
    def _floor_fits(self) -> BanditRouterConfig:
        exploration = self.exploration
        if isinstance(exploration, SoftmaxConfig) and exploration.floor * len(self.arms) >= 1:
            raise ValueError(
                f"softmax floor {exploration.floor} times {len(self.arms)} arms must be below 1"
            )
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arm names must be distinct: {self.arms}")
        return self


class LearnedRouterConfig(_Config):
    """A run's per-step router over turn features (`turnrl.rl.step_router`): before each
    turn, a ridge oracle per model predicts the reward of letting that model write it, from
    the features of the episode so far; predictions become probabilities that never reach 0;
    every choice is logged with its propensity (`Turn.route`)."""

    kind: Literal["learned"] = "learned"
    ridge: float = Field(1.0, gt=0)
    """lambda of each model's ridge regression."""
    exploration: ExplorationConfig = Field(default_factory=EpsilonGreedyConfig)
    """How predictions become probabilities during training (never 0 for any model);
    evaluation picks greedily."""
    cost_weight: float = Field(1.0, ge=0)
    """A decision's reward: its episode's success minus `cost_weight` times the episode's
    `model_usd` cost over the budget's `model_usd` limit (over 1 dollar without one)."""


class TaskBanditConfig(_Config):
    """A run's task-level router (`turnrl.rl.bandit`): one model runs a whole episode,
    picked from the task's features; the decision is logged with its propensity
    (`Episode.route`)."""

    kind: Literal["bandit"] = "bandit"
    ridge: float = Field(1.0, gt=0)
    """lambda of each model's ridge regression."""
    exploration: ExplorationConfig = Field(default_factory=EpsilonGreedyConfig)
    """How predictions become probabilities during training (never 0 for any model);
    evaluation picks greedily."""
    cost_weight: float = Field(1.0, ge=0)
    """A decision's reward: success minus `cost_weight` times the episode's `model_usd` cost
    over the budget's `model_usd` limit (over 1 dollar without one)."""

    def router_config(self, arms: tuple[str, ...]) -> BanditRouterConfig:
        """The bandit over `arms` (the run's model names)."""
        return BanditRouterConfig(arms=arms, ridge=self.ridge, exploration=self.exploration)
