"""Configs of MCP servers (`turnrl.tools.mcp`): how to start or reach one, and how its tools
are offered, priced and limited. Plain pydantic values that load, validate and dump without
the MCP SDK, which only a connection imports."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from turnrl.tools.base import CostModel


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
    """Whether a call that finds the connection dead reconnects (`turnrl.tools.mcp`)."""
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


def default_label(config: McpStdioConfig | McpHttpConfig) -> str:
    """How errors name a server whose config has no `label`."""
    if isinstance(config, McpStdioConfig):
        return " ".join([config.command, *config.args])[:80]
    return config.url
