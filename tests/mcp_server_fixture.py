"""A small MCP server the MCP tool tests start as a subprocess (never imported by them).

    python mcp_server_fixture.py stdio [--page-size N] [--tag T]
    python mcp_server_fixture.py http [--port P] [--page-size N] [--tag T]

Over HTTP it binds 127.0.0.1 on `--port` (default: one the kernel picks, so that a test never
races another process for a "free" port) and prints `PORT <n>` on stdout once the socket
listens. `--tag` does nothing: it marks the process so that a test can find leftovers. The tools
cover what a client must handle: plain results, a slow call, a raising tool, a large text,
image and embedded binary content, structured content without text, and state that lives on
the server (`counter`) across every client's calls. `--page-size` makes `tools/list` paginate,
which the SDK's high-level server does not do by itself.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

import anyio
import mcp.types as types
from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
"""Not a viewable image: only its size and type matter (1032 bytes)."""

server: MCPServer = MCPServer("turnrl-fixture", log_level="CRITICAL")
_count = 0


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep, then say so."""
    await anyio.sleep(seconds)
    return f"slept {seconds:g} s"


@server.tool()
def fail() -> str:
    """Always raises."""
    raise ToolError("the fixture tool failed on purpose")


@server.tool()
def big(chars: int = 200_000) -> str:
    """A long text: `chars` characters of digits."""
    return ("0123456789" * (chars // 10 + 1))[:chars]


@server.tool()
def picture() -> types.CallToolResult:
    """A caption, an image and an embedded binary resource."""
    blob = types.EmbeddedResource(
        type="resource",
        resource=types.BlobResourceContents(
            uri="file:///data.bin", mime_type="application/octet-stream", blob="AAECAw=="
        ),
    )
    image = Image(data=PNG_BYTES, format="png").to_image_content()
    return types.CallToolResult(content=[types.TextContent(text="a picture:"), image, blob])


@server.tool()
def structured() -> types.CallToolResult:
    """Structured content and no text."""
    return types.CallToolResult(content=[], structured_content={"answer": 42, "unit": "m"})


@server.tool()
def counter() -> int:
    """Increment the server-wide counter and return it."""
    global _count
    _count += 1
    return _count


@server.tool()
def pid() -> int:
    """The server's process id (the tests kill it)."""
    return os.getpid()


def _paginate(page_size: int) -> None:
    async def list_tools(ctx: Any, params: types.PaginatedRequestParams) -> types.ListToolsResult:
        tools = await server.list_tools()
        start = int(params.cursor or 0)
        end = start + page_size
        return types.ListToolsResult(
            tools=tools[start:end], next_cursor=str(end) if end < len(tools) else None
        )

    server._lowlevel_server.add_request_handler(
        "tools/list", types.PaginatedRequestParams, list_tools
    )


async def _serve_http(port: int) -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    app = server.streamable_http_app()
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.page_size:
        _paginate(args.page_size)
    if args.transport == "stdio":
        server.run("stdio")
    else:
        anyio.run(_serve_http, args.port)


if __name__ == "__main__":
    main()
