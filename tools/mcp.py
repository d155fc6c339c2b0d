"""Tools served by an MCP server (Model Context Protocol), over stdio or streamable HTTP.

`McpToolkit` connects to one server, lists its tools (every page) and exposes each as a `Tool`
whose spec is what the server says: its `inputSchema` as `ToolSpec.parameters` (the runner
validates arguments against it), its description, and this side's timeout, prices and output
budget from `McpServerConfig`. `mcp_tools()` opens several servers at once and refuses two tools
with one name (give each server a `name_prefix`).

The connection is shared by every episode of a run, as a database or a search service would
be: calls from many episodes go through it concurrently. Whatever state the server keeps (a
counter, a file, a session) is the server's business; episodes see each other's effects unless
the server separates them.

Lifecycle. The SDK runs each transport in anyio task groups whose cancel scopes must be left by
the task that entered them, and a transport that fails (an HTTP server gone) cancels the task
that holds it. So one dedicated asyncio task owns the SDK client from connect to close, and
episodes only send requests through it: a crash ends that task, never an episode, and opening
and closing from any task of the loop is safe. Connect and close in the loop that runs the
episodes.

Failures. A call answered with `isError` raises `ToolError` with the server's text; a call
longer than `timeout_s` raises `TimeoutError` (the SDK then tells the server to cancel it); a
protocol error raises `ToolError` naming the code. A dead server (process killed, connection
refused) fails the calls in flight with `ToolError("... connection lost ...")`, never a hang,
and so does an HTTP server that restarted and forgot the session. Reconnecting (`reconnect`):
the call after such a failure, or any call once the transport saw the server go (a stdio
server's exit is seen at once; an HTTP server's only by the next request), opens a new
connection (a new process for stdio, a new session for HTTP) and goes on. A failed reconnect is
that call's error, and calls within `reconnect_backoff_s` after it fail at once with it rather
than each starting a process. A call is never resent: it may have had effects. The tool list
is the one read at `connect()`; a reconnect does not change what the agent was shown.

Observations: text blocks joined by newlines; images, audio and binary resources summarised as
`[image/png, 1032 bytes]` (never their bytes); text resources as their text; resource links as
their URI; structured content as JSON when there is no text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fnmatch
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from turnrl.tools.base import CostModel, ToolError, ToolOutput, ToolSpec

if TYPE_CHECKING:
    # The SDK takes half a second to import: it is imported where a connection opens, so
    # that configs load and validate without it.
    import mcp
    import mcp.types as mt
    from mcp.client import Transport
    from mcp.client._transport import ReadStream, TransportStreams


class _ServerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str | None = None
    """Name of the server in error messages (default: the command or URL)."""
    timeout_s: float = Field(30.0, gt=0)
    """Wall-clock limit of one tool call."""
    connect_timeout_s: float = Field(30.0, gt=0)
    """Wall-clock limit of connecting and listing the tools."""
    cost: CostModel = Field(default_factory=CostModel)
    """How a call of any of the server's tools is priced."""
    tool_costs: dict[str, CostModel] = Field(default_factory=dict)
    """Prices of single tools (by the server's name for them), replacing `cost`."""
    include: tuple[str, ...] | None = None
    """Tools to offer (names or `fnmatch` patterns of the server's names); None offers all.
    A pattern that matches no tool is an error."""
    exclude: tuple[str, ...] = ()
    """Tools not to offer (names or patterns), applied after `include`."""
    name_prefix: str = ""
    """Prepended to every tool name the agent sees (e.g. `github_`), so that servers with
    tools of the same name can be used together."""
    max_output_tokens: int | None = Field(None, ge=1)
    """The runner cuts longer observations (head and tail kept)."""
    concurrency: int | None = Field(None, ge=1)
    """Calls of each tool in flight at once (enforced by the runner, per tool)."""
    rate_per_s: float | None = Field(None, gt=0)
    """Calls of each tool started per second (enforced by the runner, per tool)."""
    protocol: Literal["auto", "legacy"] = "auto"
    """`auto` asks the server for the newest protocol (2026-07-28, stateless) and falls back to
    the initialize handshake of older servers; `legacy` goes straight to the handshake (for a
    server that mishandles the probe)."""
    reconnect: bool = True
    """Whether a call that finds the connection dead reconnects (module docstring)."""
    reconnect_backoff_s: float = Field(5.0, ge=0)
    """After a failed reconnect, calls fail at once for this long instead of trying again."""


class McpStdioConfig(_ServerConfig):
    """A server run as a child process, speaking MCP over its stdin and stdout."""

    transport: Literal["stdio"] = "stdio"
    command: str
    """Executable to run."""
    args: tuple[str, ...] = ()
    """Its arguments."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables. The child sees only these and a safe few of ours (HOME,
    PATH, USER, ...): secrets in our environment are not passed on unless named here."""
    cwd: str | None = None
    """Working directory of the child (default: ours)."""


class McpHttpConfig(_ServerConfig):
    """A server reached over MCP's streamable HTTP transport."""

    transport: Literal["http"] = "http"
    url: str
    """The MCP endpoint, e.g. `http://127.0.0.1:8000/mcp`."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Sent with every request (e.g. `Authorization`)."""


McpServerConfig = Annotated[McpStdioConfig | McpHttpConfig, Field(discriminator="transport")]
"""One MCP server: `transport: stdio` or `transport: http`."""


class McpConnectError(RuntimeError):
    """The server could not be started, reached, or listed; or its tools do not fit the
    config. For a person to fix, not the agent."""


class _OpenFailed(Exception):
    """Why a connection could not be opened (the toolkit says which server)."""


class McpTool:
    """One of a server's tools (a `Tool`: the arguments are the dict the runner validated)."""

    def __init__(self, toolkit: McpToolkit, remote_name: str, spec: ToolSpec) -> None:
        self.toolkit = toolkit
        self.remote_name = remote_name
        """The server's name for it (the spec's name carries the prefix)."""
        self._spec = spec

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def __call__(self, args: Any) -> ToolOutput:
        return await self.toolkit.call(self.remote_name, dict(args or {}))


class McpToolkit:
    """A connection to one MCP server and its tools (module docstring). Use as
    `async with McpToolkit(config) as kit: runner = EpisodeRunner(..., tools=kit.tools)`."""

    def __init__(self, config: McpStdioConfig | McpHttpConfig) -> None:
        self.config = config
        self.label = repr(config.label or _default_label(config))
        """How errors name the server."""
        self._conn: _Connection | None = None
        self._tools: list[McpTool] | None = None
        self._connect_lock = asyncio.Lock()
        self._last_failure: tuple[float, str] | None = None
        self._reconnecting: asyncio.Task[_Connection] | None = None
        self._closed = False

    @property
    def tools(self) -> list[McpTool]:
        """The offered tools, after `connect()`."""
        if self._tools is None:
            raise RuntimeError(f"MCP server {self.label}: connect() before asking for its tools")
        return list(self._tools)

    async def connect(self) -> None:
        """Start or reach the server and list its tools. Raises `McpConnectError`; a connect
        that is cancelled or fails leaves nothing running."""
        async with self._connect_lock:
            if self._tools is not None:
                return
            self._closed, self._last_failure = False, None
            try:
                conn = await self._open()
            except _OpenFailed as e:
                raise McpConnectError(f"MCP server {self.label}: {e}") from None
            try:
                if self._closed:
                    raise McpConnectError(f"MCP server {self.label}: closed while connecting")
                self._tools = self._offer(conn.listed)
            except BaseException:
                await conn.close()
                raise
            self._conn = conn

    async def aclose(self) -> None:
        """Close the connection (a stdio server is asked to exit, then killed). Idempotent;
        raises nothing but the caller's own cancellation. Calls after it fail with
        `ToolError`; `connect()` opens a new connection."""
        self._closed = True
        self._tools = None
        if self._reconnecting is not None:
            await asyncio.wait({self._reconnecting})  # it sees `_closed` and closes
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> McpToolkit:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutput:
        """Call the server's tool `name` (its own name, without the prefix)."""
        import mcp

        conn = await self._live()
        client = conn.client
        if client is None:  # it died between the check and here
            raise ToolError(f"MCP server {self.label}: connection lost: {conn.describe_end()}")
        try:
            async with asyncio.timeout(self.config.timeout_s):
                result = await client.call_tool(name, arguments)
        except mcp.MCPError as e:
            if _session_gone(e):
                # The server forgot the session (it restarted): it refused the call unseen.
                await conn.lost()
                raise ToolError(
                    f"MCP server {self.label}: connection lost: the server no longer knows "
                    f"this session ({e.message}; did it restart?)"
                ) from None
            if e.code != mcp.types.CONNECTION_CLOSED:
                raise ToolError(f"MCP server {self.label}: error {e.code}: {e.message}") from None
            why = "the toolkit was closed" if self._closed else await conn.lost()
            raise ToolError(
                f"MCP server {self.label}: connection lost during the call: {why}"
            ) from None
        text = render_result(result)
        if result.is_error:
            raise ToolError(text)
        return ToolOutput(text=text)

    async def _live(self) -> _Connection:
        """The open connection, reconnecting when it died (module docstring)."""
        conn = self._conn
        if conn is not None and conn.client is not None:
            return conn
        if self._closed or self._tools is None:
            raise ToolError(f"MCP server {self.label}: not connected")
        if not self.config.reconnect:
            end = conn.describe_end() if conn is not None else "closed"
            raise ToolError(f"MCP server {self.label}: connection lost: {end}")
        task = self._reconnecting
        if task is None or task.done():
            if self._last_failure is not None:
                at, why = self._last_failure
                if time.monotonic() - at < self.config.reconnect_backoff_s:
                    raise ToolError(why)
            # A task of its own, shared by the calls that find the connection dead: a call's
            # timeout (which counts the reconnect) must not abandon a server half started.
            task = self._reconnecting = asyncio.create_task(self._reconnect())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    async def _reconnect(self) -> _Connection:
        old, self._conn = self._conn, None
        if old is not None:
            await old.close()
        try:
            conn = await self._open()
        except _OpenFailed as e:
            why = f"MCP server {self.label}: connection lost, reconnecting failed: {e}"
            self._last_failure = (time.monotonic(), why)
            raise ToolError(why) from None
        if self._closed:  # closed while reconnecting
            await conn.close()
            raise ToolError(f"MCP server {self.label}: not connected")
        self._last_failure = None
        self._conn = conn
        return conn

    async def _open(self) -> _Connection:
        conn = _Connection(self.config, self.label)
        await conn.open()
        return conn

    def _offer(self, listed: Sequence[mt.Tool]) -> list[McpTool]:
        """The listed tools the config offers, as `McpTool`s; config mistakes raise."""
        c = self.config
        names = [t.name for t in listed]
        for pattern in c.include or ():
            if not fnmatch.filter(names, pattern):
                raise McpConnectError(
                    f"MCP server {self.label}: `include` names {pattern!r}, which matches none "
                    f"of its tools: {', '.join(names) or 'none'}"
                )
        unknown = sorted(set(c.tool_costs) - set(names))
        if unknown:
            raise McpConnectError(
                f"MCP server {self.label}: `tool_costs` prices tools it does not have: "
                f"{', '.join(unknown)}"
            )
        tools: list[McpTool] = []
        for t in listed:
            if c.include is not None and not any(fnmatch.fnmatchcase(t.name, p) for p in c.include):
                continue
            if any(fnmatch.fnmatchcase(t.name, p) for p in c.exclude):
                continue
            try:
                spec = ToolSpec(
                    name=c.name_prefix + t.name,
                    description=t.description or t.title or "",
                    parameters=_clean_schema(t.input_schema),
                    cost=c.tool_costs.get(t.name, c.cost),
                    timeout_s=c.timeout_s,
                    max_output_tokens=c.max_output_tokens,
                    concurrency=c.concurrency,
                    rate_per_s=c.rate_per_s,
                )
            except Exception as e:  # jsonschema's SchemaError, or a schema that is no object
                raise McpConnectError(
                    f"MCP server {self.label}: tool {t.name!r} has an unusable input schema "
                    f"({type(e).__name__}: {e}); leave it out with `exclude`"
                ) from None
            tools.append(McpTool(self, t.name, spec))
        return tools


@contextlib.asynccontextmanager
async def mcp_tools(
    configs: Sequence[McpStdioConfig | McpHttpConfig],
) -> AsyncIterator[list[McpTool]]:
    """Connect to every server in `configs` at once and yield all their tools; close them all
    on exit. Two tools with one name (across servers) raise `McpConnectError`."""
    async with AsyncExitStack() as stack:
        kits = [McpToolkit(c) for c in configs]
        for kit in kits:
            stack.push_async_callback(kit.aclose)
        await asyncio.gather(*(kit.connect() for kit in kits))
        tools = [t for kit in kits for t in kit.tools]
        seen: dict[str, McpToolkit] = {}
        for t in tools:
            other = seen.setdefault(t.spec.name, t.toolkit)
            if other is not t.toolkit:
                raise McpConnectError(
                    f"tool {t.spec.name!r} is offered by MCP servers {other.label} and "
                    f"{t.toolkit.label}; give one of them a `name_prefix`"
                )
        yield tools


_LOST_WAIT_S = 5.0
"""How long a call that lost its connection waits for the transport to wind down, to report
why it ended (the SDK bounds a stdio server's shutdown to a few seconds)."""


class _Connection:
    """One SDK client, entered and left by its own task (module docstring)."""

    def __init__(self, config: McpStdioConfig | McpHttpConfig, label: str) -> None:
        self.config = config
        self.label = label
        self.client: mcp.Client | None = None
        """The SDK client while the connection is up; None before and after."""
        self.listed: list[mt.Tool] = []
        """The server's tools (`mcp.types.Tool`), every page."""
        self.error: BaseException | None = None
        """Why the connection ended, when it did not end by `close()`."""
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Start the owner task and wait until the tools are listed. Raises `_OpenFailed`."""
        self._task = asyncio.create_task(self._own(), name=f"mcp server {self.label}")
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                await self._ready.wait()
        except TimeoutError:
            await self.close()
            raise _OpenFailed(f"no answer within {self.config.connect_timeout_s:g} s") from None
        except BaseException:
            await self.close()
            raise
        if self.client is None:
            await self.close()
            raise _OpenFailed(self.describe_end())

    async def close(self) -> None:
        """Leave the client in its owner task and wait for it. Idempotent; raises nothing but
        the caller's own cancellation."""
        self._stop.set()
        task = self._task
        if task is None:
            return
        if not self._ready.is_set():
            task.cancel()  # stuck in the handshake: nothing to leave gracefully
        # `wait`, not `await task`: a cancelled caller must not cancel the server's shutdown
        # half way, and the task's own end is no error of the caller's.
        await asyncio.wait({task})

    async def lost(self) -> str:
        """After a call saw the connection close: leave the client (a stdio transport stays
        entered when its process dies) and say why it ended."""
        self.client = None
        self._stop.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=_LOST_WAIT_S)
        return self.describe_end()

    def describe_end(self) -> str:
        if self.error is None:
            return "the server closed the connection (did it exit?)"
        return _describe(self.error)

    def _ended(self) -> None:
        """The server closed the stream (a stdio server exited): new calls reconnect at once,
        and the owner task leaves the client, reaping the process."""
        self.client = None
        self._stop.set()

    async def _own(self) -> None:
        try:
            async with AsyncExitStack() as stack:
                client = await _enter_client(stack, self.config, self._ended)
                self.listed = await _list_all(client)
                self.client = client
                self._ready.set()
                await self._stop.wait()
        except Exception as e:  # the connection's end: reported by connect() and by calls
            self.error = e
        finally:
            self.client = None
            self._ready.set()


async def _enter_client(
    stack: AsyncExitStack, config: McpStdioConfig | McpHttpConfig, on_end: Callable[[], None]
) -> mcp.Client:
    import mcp

    transport: Transport
    if isinstance(config, McpStdioConfig):
        from mcp.client.stdio import stdio_client

        params = mcp.StdioServerParameters(
            command=config.command, args=list(config.args), env=config.env, cwd=config.cwd
        )
        transport = stdio_client(params)
    else:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        # The SDK's defaults (30 s, and 300 s to read a response stream), with our headers.
        read_s = max(300.0, config.timeout_s + 30.0)
        http = await stack.enter_async_context(
            httpx2.AsyncClient(headers=config.headers, timeout=httpx2.Timeout(30.0, read=read_s))
        )
        transport = streamable_http_client(config.url, http_client=http)
    # No response cache: the tool list is read once per connection.
    info = mcp.types.Implementation(name="turnrl", version="0")
    client = mcp.Client(
        _watched(transport, on_end), cache=None, client_info=info, mode=config.protocol
    )
    return await stack.enter_async_context(client)


@contextlib.asynccontextmanager
async def _watched(
    transport: Transport, on_end: Callable[[], None]
) -> AsyncIterator[TransportStreams]:
    """`transport`, calling `on_end` when its read stream ends. The SDK keeps a client whose
    server is gone open until a request fails; this is how a connection learns of it first,
    so that the next call reconnects instead of failing."""
    async with transport as (read, write):
        yield _WatchedStream(read, on_end), write


class _WatchedStream:
    """A transport's read stream that reports its end (see `_watched`)."""

    def __init__(self, inner: ReadStream[Any], on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> Any:
        # The SDK reads it off HTTP streams to run handlers in the sender's context.
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        import anyio

        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise

    def __aiter__(self) -> _WatchedStream:
        return self

    async def __anext__(self) -> Any:
        import anyio

        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _list_all(client: mcp.Client) -> list[mt.Tool]:
    """Every page of `tools/list` (a server may paginate; a cursor loop is cut at 1000 pages)."""
    tools: list[mt.Tool] = []
    cursor: str | None = None
    for _ in range(1000):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            return tools
    raise McpConnectError("tools/list returned more than 1000 pages")


def render_result(result: mt.CallToolResult) -> str:
    """The observation text of an MCP tool result (module docstring)."""
    import mcp.types as mt

    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mt.TextContent):
            parts.append(block.text)
        elif isinstance(block, mt.ImageContent | mt.AudioContent):
            parts.append(f"[{block.mime_type}, {_decoded_size(block.data)} bytes]")
        elif isinstance(block, mt.EmbeddedResource):
            res = block.resource
            if isinstance(res, mt.TextResourceContents):
                parts.append(res.text)
            else:
                mime = res.mime_type or "application/octet-stream"
                parts.append(f"[resource {res.uri}: {mime}, {_decoded_size(res.blob)} bytes]")
        elif isinstance(block, mt.ResourceLink):
            what = f"{block.name}: " if block.name else ""
            parts.append(f"[resource link {what}{block.uri}]")
        else:
            parts.append(f"[{getattr(block, 'type', type(block).__name__)} content]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    if not parts:
        return "(the tool reported an error)" if result.is_error else "(no output)"
    return "\n".join(parts)


def _decoded_size(data: str) -> int:
    try:
        return len(base64.b64decode(data, validate=False))
    except (binascii.Error, ValueError):
        return len(data) * 3 // 4


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The server's input schema without the `title`s pydantic-made schemas carry (`addArguments`,
    `A`): they repeat the names and cost prompt tokens; pydantic tools are shown the same way."""
    out = dict(schema)
    if isinstance(out.get("title"), str):
        out.pop("title")
    props = out.get("properties")
    if isinstance(props, dict):
        out["properties"] = {
            k: {kk: vv for kk, vv in v.items() if not (kk == "title" and isinstance(vv, str))}
            if isinstance(v, dict)
            else v
            for k, v in props.items()
        }
    return out


def _default_label(config: McpStdioConfig | McpHttpConfig) -> str:
    if isinstance(config, McpStdioConfig):
        return " ".join([config.command, *config.args])[:80]
    return config.url


def _session_gone(e: mcp.MCPError) -> bool:
    """Whether `e` says the server does not know the HTTP session (HTTP 404 on a session,
    which the SDK turns into an invalid-request error): the spec's cue to start a new one."""
    import mcp

    return e.code == mcp.types.INVALID_REQUEST and e.message in (
        "Session not found",
        "Session terminated",
    )


def _describe(e: BaseException) -> str:
    """The innermost causes of `e` (anyio wraps transport errors in exception groups)."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(_describe(x) for x in e.exceptions))
    text = str(e)
    if type(e).__name__ == "MCPError" and text == "Connection closed":
        return "the server closed the connection (did it exit?)"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
