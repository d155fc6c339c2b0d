"""The tool protocol: a typed spec (pydantic arguments -> JSON schema, cost model) and an async
call that returns text.

The runner owns everything around a call that must be uniform across tools: parsing and
validating arguments (errors become observations naming the bad field), timeouts, latency and
the cost vector. A tool only does its work and reports what it produced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class CostModel(BaseModel):
    """Prices that turn one call into a cost vector (kind -> amount)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    per_call: dict[str, float] = Field(default_factory=lambda: {"calls": 1.0})
    """Fixed cost of every call, by kind (e.g. `calls`, `money_usd`, `human_attention`)."""
    per_second: dict[str, float] = Field(default_factory=dict)
    """Cost per second of wall time, by kind (e.g. `{"time_s": 1.0}`)."""

    def cost(self, latency_s: float, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Cost vector of one call that took `latency_s` and reported `extra` (e.g. tokens)."""
        out = dict(self.per_call)
        for kind, price in self.per_second.items():
            out[kind] = out.get(kind, 0.0) + price * latency_s
        for kind, amount in (extra or {}).items():
            out[kind] = out.get(kind, 0.0) + amount
        return out


@dataclass(frozen=True)
class ToolSpec:
    """What the agent is told about a tool, and how calls to it are bounded and priced."""

    name: str
    """Name the agent calls it by."""
    description: str
    """One or two sentences for the system prompt."""
    args_model: type[BaseModel]
    """Pydantic model of the arguments; its JSON schema is what the agent sees."""
    cost: CostModel = field(default_factory=CostModel)
    """How a call is priced."""
    timeout_s: float = 30.0
    """A call that takes longer is cancelled and observed as a timeout."""

    def json_schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema rendered into the system prompt."""
        params = self.args_model.model_json_schema()
        params.pop("title", None)
        for prop in params.get("properties", {}).values():
            prop.pop("title", None)
        return {"name": self.name, "description": self.description, "parameters": params}


@dataclass(frozen=True)
class ToolOutput:
    """What a tool produced."""

    text: str
    """Observation text, already within the tool's budget."""
    truncated: bool = False
    """True when the tool cut its output."""
    extra_cost: dict[str, float] = field(default_factory=dict)
    """Cost the tool measured itself (e.g. `tokens` returned)."""
    items: tuple[str, ...] = ()
    """Ids of what the output showed (search passages, ...), for coverage rewards."""


@runtime_checkable
class Tool(Protocol):
    """A capability the agent can call."""

    @property
    def spec(self) -> ToolSpec: ...

    async def __call__(self, args: Any) -> ToolOutput:
        """Run with validated arguments (an instance of `spec.args_model`). Raising is allowed:
        the runner turns the exception into a `tool_error` observation."""
        ...


class ToolSession(Protocol):
    """One episode's handle on a stateful tool (a Python interpreter, a file system)."""

    async def __call__(self, args: Any) -> ToolOutput:
        """As `Tool.__call__`; state persists between calls of the same session."""
        ...

    async def aclose(self) -> None:
        """Destroy the episode's state. Idempotent; never raises."""
        ...


@runtime_checkable
class EpisodeTool(Protocol):
    """A tool whose state belongs to one episode: the runner opens a session at the episode's
    first call to it and closes it when the episode ends, however it ends."""

    @property
    def spec(self) -> ToolSpec: ...

    def session(self) -> ToolSession:
        """A new, empty session. Cheap: expensive resources are taken on its first call."""
        ...


class ToolError(Exception):
    """A tool failed in a way the agent should see."""


def truncate_to_tokens(
    text: str, encode: Callable[[str], Sequence[int]], max_tokens: int
) -> tuple[str, bool]:
    """Cut `text` to at most `max_tokens` tokens (by `encode`), at a character boundary found by
    bisection so that no partial token is left; returns (text, truncated)."""
    if len(encode(text)) <= max_tokens:
        return text, False
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(text[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + " …[truncated]", True
