"""Tool dispatch: from a parsed call to a priced `ToolResult`, the same way for every tool.

Everything around a call that must be uniform lives here, so a tool only does its work:
argument size and schema checks (errors name the bad field), per-tool concurrency and rate
limits shared by all episodes of a runner, the timeout, non-text results, head-and-tail
truncation to the tool's token budget, and the cost vector. Every failure is an observation
typed by a `ToolErrorKind`; nothing a tool does escapes a call except cancellation. A tool's
`ToolError` is shown to the agent as its message alone (`tool_error`): it was written for the
agent. Any other exception, or a schema that cannot be checked, is the tool's defect
(`tool_bug`), shown with its class name as a traceback's last line would show it.

Per-episode state: an `EpisodeTool` gets its own session per episode, and a `Toolkit`'s tools
share one; both are opened at the episode's first call and closed by the runner at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import types
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from asyncio_throttle.throttler import Throttler

from turnrl.agent.records import ToolCall, ToolErrorKind, ToolResult
from turnrl.tools.base import (
    AnyTool,
    ArgumentError,
    BadOutputError,
    Encode,
    EpisodeTool,
    Tool,
    ToolError,
    Toolkit,
    ToolOutput,
    ToolSpec,
    truncate_middle,
)

T = TypeVar("T")

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
    toolkit: bool
    """The opener is a `Toolkit` (its session is called with the tool's name): decided once
    here, as a runtime protocol check costs microseconds a call."""


class ToolIndex:
    """The tools of a runner or of one episode, by name, toolkits expanded."""

    def __init__(self, tools: Sequence[AnyTool]) -> None:
        self.entries: dict[str, _Entry] = {}
        for t in tools:
            if isinstance(t, Toolkit):
                key = f"toolkit:{id(t)}"
                for spec in t.specs:
                    self._add(_Entry(spec, None, t, key, toolkit=True))
            elif isinstance(t, EpisodeTool):
                self._add(_Entry(t.spec, None, t, t.spec.name, toolkit=False))
            else:
                self._add(_Entry(t.spec, t, None, t.spec.name, toolkit=False))
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
        self._limits: dict[str, _Limit] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _limit(self, spec: ToolSpec) -> _Limit:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a semaphore belongs to one event loop
            self._loop, self._limits = loop, {}
        limit = self._limits.get(spec.name)
        if limit is None:
            limit = self._limits[spec.name] = _Limit(spec)
        return limit

    async def call(
        self,
        index: ToolIndex,
        sessions: dict[str, Session],
        call: ToolCall,
        hidden: frozenset[str] | set[str] = frozenset(),
    ) -> ToolResult:
        """Run one call (module docstring); `sessions` holds the episode's open sessions."""
        if call.parse_error is not None or call.name is None:
            text = f"Error: could not parse tool call: {call.parse_error}"
            return error(call, ToolErrorKind.PARSE, text)
        entry = index.entries.get(call.name)
        if entry is None or call.name in hidden:
            known = ", ".join(n for n in index.entries if n not in hidden) or "none"
            text = f"Error: unknown tool {call.name!r}; tools: {known}"
            return error(call, ToolErrorKind.UNKNOWN_TOOL, text)
        spec = entry.spec
        if len(call.raw) > spec.max_argument_chars:
            return error(
                call,
                ToolErrorKind.TOO_LARGE,
                f"Error: arguments for {spec.name} are {len(call.raw)} characters; "
                f"the limit is {spec.max_argument_chars}",
            )
        try:
            args = spec.validate(call.arguments or {})
        except ArgumentError as e:
            text = f"Error: invalid arguments for {spec.name}: {e}"
            return error(call, ToolErrorKind.INVALID_ARGUMENTS, text)
        except Exception as e:  # a schema that cannot be checked (a dangling $ref): the tool's
            text = f"Error: {spec.name} could not check its arguments: {type(e).__name__}: {e}"
            return error(call, ToolErrorKind.TOOL_BUG, text)
        if not (spec.concurrency or spec.rate_per_s):
            return await self._timed(entry, sessions, call, args)
        limit = self._limit(spec)
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
            out = await _within(_invoke(entry, sessions, args), spec.timeout_s)
        except TimeoutError:
            latency = self._clock() - t0
            text = f"Error: {spec.name} timed out after {spec.timeout_s:g} s"
            return error(call, ToolErrorKind.TIMEOUT, text, latency, spec.cost.cost(latency))
        except BadOutputError as e:
            latency = self._clock() - t0
            kind = ToolErrorKind.BAD_OUTPUT
            return error(call, kind, f"Error: {e}", latency, spec.cost.cost(latency))
        except ToolError as e:  # written for the agent: its message, no class name
            latency = self._clock() - t0
            text = f"Error: {spec.name} failed: {e}" if str(e) else f"Error: {spec.name} failed"
            return error(call, ToolErrorKind.TOOL_ERROR, text, latency, spec.cost.cost(latency))
        except Exception as e:  # a tool bug is the agent's observation, not the run's crash
            latency = self._clock() - t0
            text = f"Error: {spec.name} failed: {type(e).__name__}: {e}"
            return error(call, ToolErrorKind.TOOL_BUG, text, latency, spec.cost.cost(latency))
        latency = self._clock() - t0
        if not isinstance(out, ToolOutput) or not isinstance(out.text, str):
            text = f"Error: {spec.name} returned {type(out).__name__}, not a ToolOutput"
            return error(call, ToolErrorKind.BAD_OUTPUT, text, latency, spec.cost.cost(latency))
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


async def _invoke(entry: _Entry, sessions: dict[str, Session], args: Any) -> Any:
    """Run the tool (opening the episode's session on its first call); what it returned."""
    if entry.tool is not None:
        return await entry.tool(args)
    session: Session = sessions.get(entry.session_key)
    if session is None:
        assert entry.opener is not None
        session = sessions[entry.session_key] = entry.opener.session()
    if entry.toolkit:
        return await session.call(entry.spec.name, args)
    return await session(args)


async def _within(coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
    """`await coro` under a timeout, as `asyncio.timeout` does it, except that the timer is
    armed only if `coro` suspends: a call that completes without waiting (an in-process
    simulator, a lookup) skips ~5 us of timer set-up and cancellation. The deadline is taken
    before the first step, so it bounds the same span as a timer armed then."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        pending = coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    async with asyncio.timeout_at(deadline):
        return await _resume(coro, pending)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], pending: Any) -> Generator[Any, None, T]:
    """Finish `coro` after its first step yielded `pending` (what the task must wait on)."""
    while True:
        try:
            yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # cancellation (the timeout's too) goes to the tool
            try:
                pending = coro.throw(e)
            except StopIteration as done:
                result: T = done.value
                return result
        else:
            # Woken as asyncio wakes a task (with None): the rest is plain delegation.
            return (yield from coro.__await__())


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
    kind: ToolErrorKind,
    text: str,
    latency_s: float = 0.0,
    cost: dict[str, float] | None = None,
) -> ToolResult:
    """A failed call's result."""
    return ToolResult(call_id=call.id, text=text, error=kind, latency_s=latency_s, cost=cost or {})
