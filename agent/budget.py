"""Per-episode limits: the runner's `Budget`. Its own module so that a run config names the
limits without importing the runner."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Budget(BaseModel):
    """Per-episode limits. A limit that is reached ends the episode with its `StopReason`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_turns: int = Field(4, ge=1)
    """Policy turns per episode."""
    max_tool_calls: int = Field(8, ge=0)
    """Tool calls per episode; a call beyond it is not run and the episode stops."""
    max_context_tokens: int = Field(4096, ge=64)
    """Prompt plus completions plus observations, in tokens (at most the model's window)."""
    max_new_tokens: int = Field(256, ge=1)
    """Tokens sampled per turn."""
    max_cost: dict[str, float] = Field(default_factory=dict)
    """Upper bound per cost kind (e.g. `{"time_s": 60}`). A tool call that brings a kind it
    charges to its bound ends the episode; under routing, a model's turn that could take a
    kind past its bound is refused before it runs (`turnrl.agent.routing`)."""
    wall_clock_s: float = Field(600.0, gt=0)
    """Wall-clock seconds per episode, policy queueing included."""
    shown: bool = True
    """Under routing among priced models (`turnrl.agent.routing`): state `max_cost` in the
    system prompt and what is left of it after every turn, so the agent can spend with it."""
