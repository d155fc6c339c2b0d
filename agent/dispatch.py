"""Tool dispatch: from a parsed call to a priced `ToolResult`, the same way for every tool.

Everything around a call that must be uniform lives here, so a tool only does its work:
argument size and schema checks (errors name the bad field), per-tool concurrency and rate
limits shared by all episodes of a runner, the timeout, non-text results, head-and-tail
truncation to the tool's token budget, and the cost vector. Every failure is a typed
observation (`ToolResult.error`): `parse`, `unknown_tool`, `too_large`, `invalid_arguments`,
`timeout`, `tool_error`, `bad_output`; nothing a tool does escapes a call except cancellation.

Per-episode state: an `EpisodeTool` gets its own session per episode, and a `Toolkit`'s tools
share one; both are opened at the episode's first call and closed by the runner at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asyncio_throttle.throttler import Throttler

from turnrl.agent.records import ToolCall, ToolResult
from turnrl.tools.base import (
    AnyTool,
    ArgumentError,
    Encode,
    EpisodeTool,
    Tool,
    Toolkit,
    ToolOutput,
    ToolSpec,
    truncate_middle,
)
from turnrl.tools.function import BadOutputError

Session = Any
"""A `ToolSession` (called with the arguments) or a `ToolkitSession` (`call(name, args)`)."""


@dataclass(frozen=True)
class _Entry:
    spec: ToolSpec
    tool: Tool | None
    """Set for a shared stateless tool."""
    opener: EpisodeTool | Toolkit | None
    """Set for a tool with per-episode state."""
    session_key: str
    """Tools with the same key share one session per episode (a toolkit's)."""


class ToolIndex:
    """The tools of a runner or of one episode, by name, toolkits expanded."""

    def __init__(self, tools: Sequence[AnyTool]) -> None:
        self.entries: dict[str, _Entry] = {}
        for t in tools:
            if isinstance(t, Toolkit):
                key = f"toolkit:{id(t)}"
                for spec in t.specs:
                    self._add(_Entry(spec, None, t, key))
            elif isinstance(t, EpisodeTool):
                self._add(_Entry(t.spec, None, t, t.spec.name))
            else:
                self._add(_Entry(t.spec, t, None, t.spec.name))
        self._schemas = {name: e.spec.json_schema() for name, e in self.entries.items()}

    def _add(self, entry: _Entry) -> None:
        name = entry.spec.name
        if name in self.entries:
            raise ValueError(f"two tools are named {name!r}")
        self.entries[name] = entry

    def schemas(self, hidden: frozenset[str] | set[str] = frozenset()) -> list[dict[str, Any]]:
        """JSON schemas of the visible tools, in order."""
        return [s for n, s in self._schemas.items() if n not in hidden]

    def episodic(self, name: str | None) -> bool:
        """Whether calls to `name` change per-episode state (and so are replayed in a branch)."""
        entry = self.entries.get(name or "")
        return entry is not None and entry.opener is not None


class _Limit:
    """A tool's concurrency gate and rate throttle (`asyncio-throttle`'s sliding window)."""

    def __init__(self, spec: ToolSpec) -> None:
        self.gate = asyncio.Semaphore(spec.concurrency) if spec.concurrency else None
        self.throttle: Throttler | None = None
        if spec.rate_per_s:
            # At most n starts in any window of n / rate seconds: the rate, with bursts of n.
            n = max(1, math.ceil(spec.rate_per_s))
            self.throttle = Throttler(rate_limit=n, period=n / spec.rate_per_s)


class Dispatcher:
    """Runs calls for a runner: its limits are shared by every episode the runner runs."""

    def __init__(self, encode: Encode, clock: Callable[[], float]) -> None:
        self._encode = encode
        self._clock = clock
        self._limits: dict[str, _Limit | None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _limit(self, spec: ToolSpec) -> _Limit | None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a semaphore belongs to one event loop
            self._loop, self._limits = loop, {}
        if spec.name not in self._limits:
            limited = spec.concurrency or spec.rate_per_s
            self._limits[spec.name] = _Limit(spec) if limited else None
        return self._limits[spec.name]

    async def call(
        self,
        index: ToolIndex,
        sessions: dict[str, Session],
        call: ToolCall,
        hidden: frozenset[str] | set[str] = frozenset(),
    ) -> ToolResult:
        """Run one call (module docstring); `sessions` holds the episode's open sessions."""
        if call.parse_error is not None or call.name is None:
            return error(call, "parse", f"Error: could not parse tool call: {call.parse_error}")
        entry = index.entries.get(call.name)
        if entry is None or call.name in hidden:
            known = ", ".join(n for n in index.entries if n not in hidden) or "none"
            return error(call, "unknown_tool", f"Error: unknown tool {call.name!r}; tools: {known}")
        spec = entry.spec
        if len(call.raw) > spec.max_argument_chars:
            return error(
                call,
                "too_large",
                f"Error: arguments for {spec.name} are {len(call.raw)} characters; "
                f"the limit is {spec.max_argument_chars}",
            )
        try:
            args = spec.validate(call.arguments or {})
        except ArgumentError as e:
            text = f"Error: invalid arguments for {spec.name}: {e}"
            return error(call, "invalid_arguments", text)
        except Exception as e:  # a schema that cannot be checked (a dangling $ref): the tool's
            text = f"Error: {spec.name} could not check its arguments: {type(e).__name__}: {e}"
            return error(call, "tool_error", text)
        limit = self._limit(spec)
        if limit is None:
            return await self._timed(entry, sessions, call, args)
        async with contextlib.AsyncExitStack() as stack:
            if limit.gate is not None:
                await stack.enter_async_context(limit.gate)
            if limit.throttle is not None:
                await limit.throttle.acquire()
            return await self._timed(entry, sessions, call, args)
        raise AssertionError("unreachable")  # pragma: no cover (mypy: the stack may swallow)

    async def _timed(
        self, entry: _Entry, sessions: dict[str, Session], call: ToolCall, args: Any
    ) -> ToolResult:
        spec = entry.spec
        t0 = self._clock()
        try:
            async with asyncio.timeout(spec.timeout_s):
                if entry.tool is not None:
                    out = await entry.tool(args)
                else:
                    session: Session = sessions.get(entry.session_key)
                    if session is None:
                        assert entry.opener is not None
                        session = sessions[entry.session_key] = entry.opener.session()
                    if isinstance(entry.opener, Toolkit):
                        out = await session.call(spec.name, args)
                    else:
                        out = await session(args)
        except TimeoutError:
            latency = self._clock() - t0
            text = f"Error: {spec.name} timed out after {spec.timeout_s:g} s"
            return error(call, "timeout", text, latency, spec.cost.cost(latency))
        except BadOutputError as e:
            latency = self._clock() - t0
            return error(call, "bad_output", f"Error: {e}", latency, spec.cost.cost(latency))
        except Exception as e:  # a tool bug is the agent's observation, not the run's crash
            latency = self._clock() - t0
            text = f"Error: {spec.name} failed: {type(e).__name__}: {e}"
            return error(call, "tool_error", text, latency, spec.cost.cost(latency))
        latency = self._clock() - t0
        if not isinstance(out, ToolOutput) or not isinstance(out.text, str):
            text = f"Error: {spec.name} returned {type(out).__name__}, not a ToolOutput"
            return error(call, "bad_output", text, latency, spec.cost.cost(latency))
        text, truncated = out.text, out.truncated
        if spec.max_output_tokens is not None:
            text, cut = truncate_middle(text, self._encode, spec.max_output_tokens)
            truncated = truncated or cut
        return ToolResult(
            call_id=call.id,
            text=text,
            truncated=truncated,
            latency_s=latency,
            cost=spec.cost.cost(latency, out.extra_cost),
            items=list(out.items),
        )


CLOSE_TIMEOUT_S = 30.0
"""How long closing one session may take (a sandbox's teardown, an MCP or HTTP goodbye)."""


async def close_sessions(sessions: dict[str, Session]) -> None:
    """Close an episode's sessions; one failing or hanging close never skips the others."""
    for session in sessions.values():
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await session.aclose()


def error(
    call: ToolCall,
    kind: str,
    text: str,
    latency_s: float = 0.0,
    cost: dict[str, float] | None = None,
) -> ToolResult:
    """A failed call's result."""
    return ToolResult(call_id=call.id, text=text, error=kind, latency_s=latency_s, cost=cost or {})
