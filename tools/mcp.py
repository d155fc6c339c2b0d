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

Lifecycle (`turnrl.tools.mcp_connection`). One dedicated asyncio task owns each SDK client
from connect to close; episodes only send requests through it, so a transport's crash ends that
task, never an episode. Connect and close in the loop that runs the episodes, from any task.

Failures. A call answered with `isError` raises `ToolError` with the server's text; a call
longer than `timeout_s` raises `TimeoutError` (the SDK then tells the server to cancel it); a
protocol error raises `ToolError` naming the code. A dead server (process killed, connection
refused) fails the calls in flight with `ToolError("... connection lost ...")`, never a hang,
and so does an HTTP server that restarted and forgot the session. Reconnecting (`reconnect`):
the call after such a failure, or any call once the transport saw the server go, opens a new
connection (a new process for stdio, a new session for HTTP) and goes on. A stdio server's exit
is seen when its output closes, a moment after the process ends (`connected` turns False); an
HTTP server's only by the next request. A call sent before then fails as a call in flight does:
the toolkit cannot tell whether the server read it. A failed reconnect is that call's error,
and calls within `reconnect_backoff_s` after it fail at once with it rather than each starting
a process. A call is never resent: it may have had effects. The tool list is the one read at
`connect()`; a reconnect does not change what the agent was shown.

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
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from turnrl.tools.base import ToolError, ToolOutput, ToolSpec
from turnrl.tools.mcp_config import McpHttpConfig, McpServerConfig, McpStdioConfig, default_label
from turnrl.tools.mcp_connection import Connection, McpConnectError, OpenFailed

if TYPE_CHECKING:
    # The SDK takes half a second to import: it is imported where a connection opens, so
    # that configs load and validate without it.
    import mcp
    import mcp.types as mt

__all__ = [
    "McpConnectError",
    "McpHttpConfig",
    "McpServerConfig",
    "McpStdioConfig",
    "McpTool",
    "McpToolkit",
    "mcp_tools",
    "render_result",
]


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
        self.label = repr(config.label or default_label(config))
        """How errors name the server."""
        self._conn: Connection | None = None
        self._tools: list[McpTool] | None = None
        self._connect_lock = asyncio.Lock()
        self._last_failure: tuple[float, str] | None = None
        self._reconnecting: asyncio.Task[Connection] | None = None
        self._closed = False

    @property
    def tools(self) -> list[McpTool]:
        """The offered tools, after `connect()`."""
        if self._tools is None:
            raise RuntimeError(f"MCP server {self.label}: connect() before asking for its tools")
        return list(self._tools)

    @property
    def connected(self) -> bool:
        """Whether a connection is up as far as the toolkit knows: from `connect()` or a
        reconnect until the toolkit learns that the server went (module docstring), or
        `aclose()`. What the next call finds: False means it reconnects (or fails)."""
        return self._conn is not None and self._conn.client is not None

    async def connect(self) -> None:
        """Start or reach the server and list its tools. Raises `McpConnectError`; a connect
        that is cancelled or fails leaves nothing running."""
        async with self._connect_lock:
            if self._tools is not None:
                return
            self._closed, self._last_failure = False, None
            try:
                conn = await self._open()
            except OpenFailed as e:
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

    async def _live(self) -> Connection:
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

    async def _reconnect(self) -> Connection:
        old, self._conn = self._conn, None
        if old is not None:
            await old.close()
        try:
            conn = await self._open()
        except OpenFailed as e:
            why = f"MCP server {self.label}: connection lost, reconnecting failed: {e}"
            self._last_failure = (time.monotonic(), why)
            raise ToolError(why) from None
        if self._closed:  # closed while reconnecting
            await conn.close()
            raise ToolError(f"MCP server {self.label}: not connected")
        self._last_failure = None
        self._conn = conn
        return conn

    async def _open(self) -> Connection:
        conn = Connection(self.config, self.label)
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


def _session_gone(e: mcp.MCPError) -> bool:
    """Whether `e` says the server does not know the HTTP session (HTTP 404 on a session,
    which the SDK turns into an invalid-request error): the spec's cue to start a new one."""
    import mcp

    return e.code == mcp.types.INVALID_REQUEST and e.message in (
        "Session not found",
        "Session terminated",
    )
