"""Per-step routing among priced models, under a hard per-task budget.

Budget-Aware Agentic Routing (Zhang et al. 2026, "Budget-Aware Agentic Routing via
Boundary-Guided Training", arXiv 2602.21227): at each step of an episode a router picks which
of several models, each with a price, writes the next turn, so that an expensive model is paid
for only at the steps where it matters; a per-task budget bounds what an episode may spend.

How the runner (`turnrl.agent.runner`) uses a `Routing`:
- Before each turn the router (`StepRouter`) sees the episode so far (`RouteView`) and names a
  model. Its choice is logged on the turn (`Turn.route`, with the router's probability of it:
  its propensity), and a turn another model than the trained policy wrote is `Turn.foreign`:
  its ids stay in the context exactly, and the learner never trains on them.
- Every turn is charged its model's `Price` in dollars (`model_usd`, plus what an API model's
  provider billed, `Completion.metrics["cost_usd"]`) and counted per model (`turns:NAME`), in
  the episode's cost vector like a tool's cost.
- The hard budget is `Budget.max_cost`. A turn is refused before it runs when its worst case
  (`Price.bound`: the price at the turn's token limit, and one more `turns:NAME`) would take
  any bounded cost kind over its limit: the episode ends with `budget_exhausted` and says
  which turn was refused and why. A turn that lands exactly on a limit runs. What cannot be
  bounded in advance (a per-second price) is charged afterwards; a turn that crossed a limit
  that way ends the episode with `budget_exhausted`, and its answer does not count.
- The agent sees what it has left: the system prompt states the budget, and every
  observation ends with a line of what is left (unless `Budget.shown` is off).

Two routers live here, the ones that need no learning: `FixedRouter` (one model for every
turn: the boundary policies always-cheap and always-expensive) and `DelegateRouter` (the
trained policy decides, by calling a `delegate` tool: a routing action parsed like any tool
call and trained with the rest of its turn). A learned router over turn features is in
`turnrl.rl.step_router`; a task-level bandit that picks one model per episode gives each
episode a `FixedRouter` of its pick (`EpisodeSpec.router`) and its logged decision
(`EpisodeSpec.route`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from turnrl.agent.policy import Policy
from turnrl.agent.records import Route, Turn
from turnrl.agent.routing_config import MODEL_USD, Price, turns_kind
from turnrl.tools.base import CostModel, NoArgs, ToolOutput, ToolSpec


@dataclass(frozen=True)
class RoutedModel:
    """One model a router can pick."""

    name: str
    """Its name in the run's `models:`."""
    price: Price
    """What each of its turns costs."""
    policy: Policy | None
    """Its policy; None for the trained policy (the runner's own, or the episode's)."""

    @property
    def trained(self) -> bool:
        """Whether this is the trained policy (its turns are trained on)."""
        return self.policy is None


@dataclass(frozen=True)
class RouteView:
    """What a router sees before a turn."""

    task_id: str
    """The episode's task item."""
    index: int
    """The index of the turn to be written."""
    turns: Sequence[Turn]
    """The episode's turns so far."""
    cost: Mapping[str, float]
    """The episode's cost vector so far."""
    limits: Mapping[str, float]
    """The budget's limits per cost kind (`Budget.max_cost`)."""
    context_tokens: int
    """The context's length in tokens."""
    max_turns: int
    """The episode's turn budget."""
    step: int = 0
    """The training step of the episode (-1 in an evaluation: a learned router picks greedily
    there)."""


class StepRouter(Protocol):
    """Picks the model that writes the next turn."""

    def choose(self, view: RouteView) -> Route:
        """The choice, with its propensity (1 for a deterministic router)."""
        ...


@dataclass(frozen=True)
class FixedRouter:
    """Every turn by `model`."""

    model: str

    def choose(self, view: RouteView) -> Route:
        return Route(model=self.model, router="fixed")


@dataclass(frozen=True)
class DelegateRouter:
    """The trained policy writes every turn, except the one after its own turn called the
    delegate tool (with no error), which `to` writes."""

    trained: str
    """The trained policy's name."""
    to: str
    """The model a delegated turn goes to."""
    tool_name: str = "delegate"
    """The routing action's tool name."""

    def choose(self, view: RouteView) -> Route:
        if view.turns:
            last = view.turns[-1]
            if not last.foreign and any(
                c.name == self.tool_name and r.error is None
                for c, r in zip(last.tool_calls, last.tool_results, strict=True)
            ):
                return Route(model=self.to, router="delegate")
        return Route(model=self.trained, router="delegate")


class DelegateTool:
    """The routing action the trained policy calls to hand its next turn to another model."""

    def __init__(self, name: str, to: str, price: Price) -> None:
        self.to = to
        self._spec = ToolSpec(
            name=name,
            description=(
                f"Hand your next turn to a stronger model ({to}), which costs "
                f"{_price_text(price)}. Use it when you cannot answer well yourself."
            ),
            args_model=NoArgs,
            cost=CostModel(per_call={"delegations": 1.0}),
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def __call__(self, args: NoArgs) -> ToolOutput:
        return ToolOutput(f"Your next turn is written by {self.to}.")


@dataclass(frozen=True)
class Routing:
    """A run's priced models and the router that picks among them."""

    models: Mapping[str, RoutedModel]
    """The models by name; exactly one is the trained policy."""
    router: StepRouter
    """The run's router (an episode may bring its own: `EpisodeSpec.router`)."""

    def __post_init__(self) -> None:
        trained = [m.name for m in self.models.values() if m.trained]
        if len(trained) != 1:
            raise ValueError(f"routing needs exactly one trained model, got {trained}")

    def refusal(
        self,
        model: RoutedModel,
        cost: Mapping[str, float],
        limits: Mapping[str, float],
        input_tokens: int,
        max_tokens: int,
    ) -> str | None:
        """Why a turn of `model` may not run under `limits` (None: it may)."""
        worst = {
            MODEL_USD: model.price.bound(input_tokens, max_tokens),
            turns_kind(model.name): 1.0,
        }
        for kind, amount in worst.items():
            limit = limits.get(kind)
            if limit is not None and cost.get(kind, 0.0) + amount > limit:
                return (
                    f"turn refused: a turn of {model.name} may cost up to {amount:.6g} "
                    f"{kind}, {limit - cost.get(kind, 0.0):.6g} of {limit:.6g} left"
                )
        return None

    @staticmethod
    def charge(
        model: RoutedModel,
        input_tokens: int,
        output_tokens: int,
        seconds: float,
        billed_usd: float,
    ) -> dict[str, float]:
        """The cost vector of one turn of `model` (`billed_usd`: what an API billed for it)."""
        usd = model.price.charge(input_tokens, output_tokens, seconds) + billed_usd
        return {MODEL_USD: usd, turns_kind(model.name): 1.0}


def budget_intro(limits: Mapping[str, float]) -> str | None:
    """The budget, for the system prompt (None without limits)."""
    if not limits:
        return None
    return "Budget for this task: " + _amounts(limits) + "."


def budget_note(cost: Mapping[str, float], limits: Mapping[str, float]) -> str | None:
    """What is left of the budget, for an observation (None without limits)."""
    if not limits:
        return None
    left = {k: max(0.0, v - cost.get(k, 0.0)) for k, v in limits.items()}
    return "Budget left: " + _amounts(left) + "."


def over_budget(cost: Mapping[str, float], limits: Mapping[str, float]) -> list[str]:
    """The cost kinds strictly over their limits."""
    return [k for k, limit in limits.items() if cost.get(k, 0.0) > limit]


def _amounts(amounts: Mapping[str, float]) -> str:
    return ", ".join(
        f"${v:.4f}" if k == MODEL_USD else f"{v:g} {k}" for k, v in sorted(amounts.items())
    )


def _price_text(price: Price) -> str:
    parts = []
    if price.per_call:
        parts.append(f"${price.per_call:g} per turn")
    if price.input_per_mtok or price.output_per_mtok:
        parts.append(
            f"${price.input_per_mtok:g}/${price.output_per_mtok:g} per million input/output tokens"
        )
    if price.per_second:
        parts.append(f"${price.per_second:g} per second")
    return " plus ".join(parts) or "nothing"


def merged_cost(cost: dict[str, float], add: Mapping[str, float]) -> None:
    """Add `add` into `cost` in place."""
    for kind, amount in add.items():
        cost[kind] = cost.get(kind, 0.0) + amount
