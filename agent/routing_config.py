"""What a routed run's models cost, and which of them writes each turn: plain pydantic values,
so that a run config names its priced models and its router without importing a model.

`models:` in a run config maps a name to a `PricedModel`: a policy (any `model` kind, or
`trained`: the run's own `model:`, the one `turnrl train` trains) and its `Price`. A router
(`turnrl.config.RouterConfig`) picks, at each turn, which of them writes it
(`turnrl.agent.routing`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from turnrl.agent.model_config import AnyModel

MODEL_USD = "model_usd"
"""The cost kind a priced model's turns add to (dollars); an API model's usage adds to it too,
so one `budget.max_cost: {model_usd: ...}` bounds every model of a run."""


def turns_kind(model: str) -> str:
    """The cost kind counting the turns `model` wrote (`turns:expert`): a budget can bound it
    (`budget.max_cost: {"turns:expert": 2}`)."""
    return f"turns:{model}"


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Price(_Config):
    """What one turn of a model costs, in dollars. Every part is optional; they add up.

    Input tokens are the whole context the turn was sampled from (what an API bills per request
    without a prompt cache; a self-hosted model with a prefix cache computes less, so price it
    per second or per output token instead)."""

    input_per_mtok: float = Field(0.0, ge=0)
    """Dollars per million context tokens sent with the turn's request."""
    output_per_mtok: float = Field(0.0, ge=0)
    """Dollars per million tokens the model wrote."""
    per_call: float = Field(0.0, ge=0)
    """Dollars per turn (per request)."""
    per_second: float = Field(0.0, ge=0)
    """Dollars per second the turn took (compute time, queueing included)."""

    def charge(self, input_tokens: int, output_tokens: int, seconds: float) -> float:
        """The price of one turn."""
        return (
            self.per_call
            + input_tokens * self.input_per_mtok / 1e6
            + output_tokens * self.output_per_mtok / 1e6
            + seconds * self.per_second
        )

    def bound(self, input_tokens: int, max_tokens: int) -> float:
        """The most a turn can cost before it runs: the price at `max_tokens` output tokens.
        A per-second part is not bounded in advance (a turn's time is known only after it):
        it is charged afterwards, and a turn that crosses the budget that way ends its
        episode (`turnrl.agent.routing`)."""
        return self.charge(input_tokens, max_tokens, 0.0)


class TrainedModel(_Config):
    """The run's own policy (`model:`), the one `turnrl train` trains."""

    kind: Literal["trained"] = "trained"


class PricedModel(_Config):
    """One of a routed run's models and its price."""

    model: Annotated[TrainedModel | AnyModel, Field(discriminator="kind")]
    """The policy: `{kind: trained}` for the run's own model, or any other model kind (an
    oracle, a frozen checkpoint, an API model). Only the trained policy's turns are trained."""
    price: Price = Field(default_factory=Price)
    """What each of its turns costs."""


class FixedRouterConfig(_Config):
    """Every turn by one model (a boundary policy: always-cheap, always-expensive)."""

    kind: Literal["fixed"] = "fixed"
    model: str
    """The model's name in `models:`."""


class DelegateRouterConfig(_Config):
    """The trained policy decides: it writes each turn, unless its previous turn called the
    `delegate` tool, which hands the next turn to `to` (and the turn after that back to it).
    The delegate call is part of the policy's own sampled tokens, so the routing decision is
    trained with the rest of its turn."""

    kind: Literal["delegate"] = "delegate"
    to: str
    """The model a delegated turn goes to (its name in `models:`)."""
    tool_name: str = "delegate"
    """The routing action's name, offered to the policy as a tool with no arguments."""


AgentRouterConfig = FixedRouterConfig | DelegateRouterConfig
"""The routers the runner knows by itself (the learned ones live in `turnrl.rl`; a run config
joins them all in `turnrl.config.RouterConfig`)."""
