"""Config of the sandboxed `python` tool (`turnrl.tools.python`): a plain pydantic value, shared
by the code suites (`task.python`) and by a run's own tools (`tools: [{kind: python}]`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from turnrl.sandboxes.base import Limits, Sandbox

if TYPE_CHECKING:
    from turnrl.tools.python import PythonTool

Encode = Callable[[str], Sequence[int]]


class PythonToolConfig(BaseModel):
    """The sandboxed `python` tool."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stateful: bool = True
    """Variables persist between an episode's calls (a notebook), or each call starts fresh."""
    max_tokens: int = Field(384, ge=16)
    """Token budget of one observation (head and tail kept)."""
    limits: Limits = Field(default_factory=lambda: Limits(wall_s=10.0, cpu_s=10.0))
    """Limits of one call."""

    def build(self, sandbox: Sandbox, encode: Encode) -> PythonTool:
        """The tool, running calls in `sandbox` and counting output in `encode`'s tokens."""
        from turnrl.tools.python import PythonTool

        return PythonTool(
            sandbox,
            encode,
            max_tokens=self.max_tokens,
            stateful=self.stateful,
            limits=self.limits,
        )
