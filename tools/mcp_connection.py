"""One connection to an MCP server, as `turnrl.tools.mcp`'s toolkit holds it.

The SDK runs each transport in anyio task groups whose cancel scopes must be left by the task
that entered them, and a transport that fails (an HTTP server gone) cancels the task that holds
it. So one dedicated asyncio task owns the SDK client from connect to close, and callers only
send requests through it: a crash ends that task, never a caller, and opening and closing from
any task of the loop is safe.

The SDK keeps a client whose server is gone open until a request fails. The transport's read
stream is watched instead: when it ends (a stdio server's output closes, a moment after the
process exits) the connection drops its client at once, so that the toolkit's next call
reconnects rather than sends into a dead connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from turnrl.tools.mcp_config import McpHttpConfig, McpStdioConfig

if TYPE_CHECKING:
    # The SDK takes half a second to import: it is imported where a connection opens, so
    # that configs load and validate without it.
    import mcp
    import mcp.types as mt
    from mcp.client import Transport
    from mcp.client._transport import ReadStream, TransportStreams


class McpConnectError(RuntimeError):
    """The server could not be started, reached, or listed; or its tools do not fit the
    config. For a person to fix, not the agent."""


class OpenFailed(Exception):
    """Why a connection could not be opened (the toolkit says which server)."""


_LOST_WAIT_S = 5.0
"""How long a call that lost its connection waits for the transport to wind down, to report
why it ended (the SDK bounds a stdio server's shutdown to a few seconds)."""


class Connection:
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
        """Start the owner task and wait until the tools are listed. Raises `OpenFailed`."""
        self._task = asyncio.create_task(self._own(), name=f"mcp server {self.label}")
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                await self._ready.wait()
        except TimeoutError:
            await self.close()
            raise OpenFailed(f"no answer within {self.config.connect_timeout_s:g} s") from None
        except BaseException:
            await self.close()
            raise
        if self.client is None:
            await self.close()
            raise OpenFailed(self.describe_end())

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
    """`transport`, calling `on_end` when its read stream ends (module docstring)."""
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


def _describe(e: BaseException) -> str:
    """The innermost causes of `e` (anyio wraps transport errors in exception groups)."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(_describe(x) for x in e.exceptions))
    text = str(e)
    if type(e).__name__ == "MCPError" and text == "Connection closed":
        return "the server closed the connection (did it exit?)"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
