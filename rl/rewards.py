"""Turn-level reward components: each turn gets a vector of named rewards, never pre-summed.

Components (this module's first set; information gain and the others come with the
credit-assignment work):
- `outcome`: the grader's score of the final answer, on the episode's last turn.
- `format`: -1 on a turn with a format error (bad call, unterminated tag, or neither a call
  nor an answer: SimpleTIR's "void turn"), else 0.
- `tool_cost`: minus the turn's tool-call cost vector weighted by kind (HC-GRPO-style
  heterogeneous costs); never positive, so a cost is never rewarded.

`RewardConfig.weights` combine components into a scalar only where an estimator asks for one
(`episode_return`); stored turns keep the components so a run can be re-scored.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from turnrl.agent.records import Episode, Turn

COMPONENTS = ("outcome", "format", "tool_cost")


class RewardConfig(BaseModel):
    """Which components count, and how much."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: dict[str, float] = Field(
        default_factory=lambda: {"outcome": 1.0, "format": 0.1, "tool_cost": 0.01}
    )
    """Weight of each component in the scalar return; names must be in `COMPONENTS`."""
    outcome_metric: str = "f1"
    """Which grader score is the outcome reward (`correct`, `exact_match`, `f1`)."""
    cost_weights: dict[str, float] = Field(default_factory=lambda: {"calls": 1.0})
    """Price of each cost kind in the `tool_cost` component."""

    def model_post_init(self, context: object) -> None:
        unknown = sorted(set(self.weights) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown reward components {unknown}; known: {list(COMPONENTS)}")


def turn_rewards(episode: Episode, config: RewardConfig) -> Episode:
    """Return `episode` with every turn's `rewards` filled in. Needs `episode.outcome`."""
    last = len(episode.turns) - 1
    outcome = episode.outcome.get(config.outcome_metric, 0.0)
    turns = [
        t.model_copy(update={"rewards": _components(t, i == last, outcome, config)})
        for i, t in enumerate(episode.turns)
    ]
    return episode.model_copy(update={"turns": turns})


def _components(
    turn: Turn, is_last: bool, outcome: float, config: RewardConfig
) -> dict[str, float]:
    cost = 0.0
    for result in turn.tool_results:
        cost += sum(config.cost_weights.get(k, 0.0) * v for k, v in result.cost.items())
    return {
        "outcome": outcome if is_last else 0.0,
        "format": -1.0 if turn.format_error else 0.0,
        "tool_cost": -abs(cost),
    }


def weighted(rewards: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """One turn's scalar reward."""
    return sum(w * rewards.get(name, 0.0) for name, w in weights.items())


def episode_return(episode: Episode, weights: Mapping[str, float]) -> float:
    """Undiscounted sum of the turns' weighted rewards."""
    return sum(weighted(t.rewards, weights) for t in episode.turns)
