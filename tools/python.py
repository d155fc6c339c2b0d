"""`python(code)`: the agent runs Python in a sandbox, like a notebook cell.

Stateful by default: each episode gets its own sandbox session (taken from the warm pool at
the episode's first call, destroyed when the episode ends), and variables, imports and files
persist between that episode's calls. Stateless (`stateful=False`): every call runs in a fresh
interpreter forked for it; files in /tmp still persist within the episode.

The observation is what a person at a notebook would see: stdout, then stderr (with the
traceback of an exception), then a bracketed note for what the sandbox did (a time or memory
limit, a restarted interpreter, cut output). It is cut to a token budget keeping both its
head and its tail, because the end of a traceback is what says what went wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from turnrl.sandboxes.base import ExecResult, Limits, Sandbox, SandboxSession
from turnrl.tools.base import CostModel, ToolOutput, ToolSpec, truncate_middle

Encode = Callable[[str], Sequence[int]]

__all__ = ["PythonArgs", "PythonTool", "format_result", "truncate_middle"]


class PythonArgs(BaseModel):
    """Arguments of `python`."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="Python source to run; print() what you want to see.")


def format_result(result: ExecResult, limits: Limits) -> str:
    """The observation text of one call."""
    parts = []
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    if result.stderr:
        parts.append(result.stderr.rstrip("\n"))
    notes = []
    if result.timed_out:
        notes.append(f"stopped: time limit ({limits.wall_s:g} s wall, {limits.cpu_s:g} s CPU)")
    if result.oom_killed:
        notes.append(f"killed: memory limit ({limits.memory_mb} MB)")
    if result.state_lost:
        notes.append("the interpreter was restarted: variables from earlier calls are gone")
    if result.error and not result.oom_killed:
        notes.append(result.error)
    if result.signal is not None and not (result.timed_out or result.oom_killed):
        notes.append(f"killed by signal {result.signal}")
    if result.truncated:
        notes.append("output was cut in the middle")
    if result.background_threads:
        n = result.background_threads
        notes.append(
            f"{n} background thread{'s' if n > 1 else ''} still running: "
            "their output and CPU time count toward the next calls"
        )
    parts += [f"[{n}]" for n in notes]
    return "\n".join(parts) if parts else "(no output)"


class PythonSession:
    """One episode's interpreter (a `ToolSession`)."""

    def __init__(self, tool: PythonTool) -> None:
        self._tool = tool
        self._session: SandboxSession | None = None
        self._closed = False

    async def __call__(self, args: PythonArgs) -> ToolOutput:
        tool = self._tool
        if self._session is None:
            self._session = await tool.sandbox.session()
        if tool.stateful:
            result = await self._session.python(args.code, tool.limits)
        else:
            result = await self._session.python_fresh(args.code, tool.limits)
        text = format_result(result, tool.limits)
        text, cut = truncate_middle(text, tool.encode, tool.max_tokens)
        return ToolOutput(
            text=text,
            truncated=cut or result.truncated,
            extra_cost={"sandbox_cpu_s": result.cpu_s},
        )

    async def aclose(self) -> None:
        if self._session is not None and not self._closed:
            self._closed = True
            await self._session.close()


class PythonTool:
    """The `python` tool (an `EpisodeTool`: one sandbox session per episode)."""

    def __init__(
        self,
        sandbox: Sandbox,
        encode: Encode,
        max_tokens: int = 384,
        stateful: bool = True,
        limits: Limits | None = None,
        cost: CostModel | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.encode = encode
        self.max_tokens = max_tokens
        self.stateful = stateful
        self.limits = limits or Limits(wall_s=10.0, cpu_s=10.0)
        self._spec = ToolSpec(
            name="python",
            description=(
                "Run Python code and see what it prints"
                + (" (variables persist between calls)." if stateful else ".")
            ),
            args_model=PythonArgs,
            cost=cost or CostModel(per_call={"calls": 1.0}, per_second={"time_s": 1.0}),
            # The sandbox enforces the wall limit; this only catches a stuck sandbox.
            timeout_s=self.limits.wall_s + 15.0,
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    def session(self) -> PythonSession:
        return PythonSession(self)
