"""Tools a run offers in every episode besides its suite's own (`RunConfig.tools`): one config
per kind (web fetch, an MCP server, search, python, ask), each opening its tools in the run's
event loop (an MCP connection lives in one).

The configs import no tool library (HTTP client, MCP SDK, BM25 index, torch): loading a run
config stays light; `open` imports what it builds. A config declares, as a class-level fact,
whether its tool runs model-written code (`runs_code`): a run with such a tool opens its
sandbox, as for a suite that runs code.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from turnrl.agent.model_config import ExpertConfig
from turnrl.sandboxes.base import Sandbox
from turnrl.tools.ask import EXPERT_PROMPT
from turnrl.tools.base import AnyTool, CostModel
from turnrl.tools.mcp_config import McpServerConfig
from turnrl.tools.python_config import PythonToolConfig
from turnrl.tools.web_config import WebFetchConfig

Encode = Callable[[str], Sequence[int]]
Closer = Callable[[], Awaitable[None]]


@dataclass
class ToolContext:
    """What a run hands a tool config to open its tools."""

    encode: Encode
    """The policy's tokenizer (text -> ids): observation budgets count these tokens."""
    sandbox: Sandbox | None = None
    """The run's sandbox; opened when any config `runs_code`."""
    closers: list[Closer] = field(default_factory=list)
    """Where a config registers the close of what it opened, before anything can fail, so
    that the run closes it whatever happens next."""


class _ToolConfig(BaseModel, ABC):
    model_config = ConfigDict(frozen=True, extra="forbid")

    runs_code: ClassVar[bool] = False
    """The tool runs model-written code, so a run with it opens its sandbox."""

    @abstractmethod
    async def open(self, ctx: ToolContext) -> list[AnyTool]:
        """The tools this config offers, ready to call."""


class WebToolConfig(_ToolConfig):
    """The `fetch` tool (web pages as readable text)."""

    kind: Literal["web_fetch"] = "web_fetch"
    fetch: WebFetchConfig = Field(default_factory=WebFetchConfig)
    """Hosts allowed and denied, byte cap, timeout, redirects, content types, budget, cost."""

    async def open(self, ctx: ToolContext) -> list[AnyTool]:
        from turnrl.tools.web import WebFetch

        web = WebFetch(ctx.encode, self.fetch)
        ctx.closers.append(web.aclose)
        return [web]


class McpToolConfig(_ToolConfig):
    """The tools of one MCP server (stdio or streamable HTTP)."""

    kind: Literal["mcp"] = "mcp"
    server: McpServerConfig
    """How to reach the server, its timeouts, costs, tool filters and name prefix."""

    async def open(self, ctx: ToolContext) -> list[AnyTool]:
        from turnrl.tools.mcp import McpToolkit

        kit = McpToolkit(self.server)
        ctx.closers.append(kit.aclose)
        await kit.connect()
        return list(kit.tools)


class SearchToolConfig(_ToolConfig):
    """The `search` tool: BM25 over the shipped Wikipedia leads and the CIA World Factbook."""

    kind: Literal["search"] = "search"
    search_k: int = Field(3, ge=1, le=10)
    """Default number of passages a search returns."""
    result_tokens: int = Field(256, ge=16)
    """Token budget of one search result."""

    async def open(self, ctx: ToolContext) -> list[AnyTool]:
        from turnrl.tools.search import SearchIndex, SearchTool

        # Loading (or building, the first time) the index takes seconds: off the event loop.
        index = await asyncio.to_thread(SearchIndex.open)
        tool = SearchTool(index, ctx.encode, max_tokens=self.result_tokens, default_k=self.search_k)
        return [tool]


class PythonRunToolConfig(_ToolConfig, PythonToolConfig):
    """The sandboxed `python` tool, running in the run's sandbox."""

    runs_code: ClassVar[bool] = True

    kind: Literal["python"] = "python"

    async def open(self, ctx: ToolContext) -> list[AnyTool]:
        if ctx.sandbox is None:
            raise ValueError("tools: the python tool runs code and needs the run's sandbox")
        return [self.build(ctx.sandbox, ctx.encode)]


class AskToolConfig(_ToolConfig):
    """`ask(question)` answered by another model (the expert, greedy), priced in the
    attention of whoever is asked (`human_attention`)."""

    kind: Literal["ask"] = "ask"
    expert: ExpertConfig = Field(default_factory=ExpertConfig)
    """The model that answers, and the length limit of its answers."""
    prompt: str = EXPERT_PROMPT
    """What the expert is shown: a template with a `{question}` field."""
    description: str = (
        "Ask an expert a question. Costs their attention: ask only what you cannot find out "
        "yourself."
    )
    """The tool's description, as the agent reads it."""
    attention: float = Field(1.0, ge=0)
    """`human_attention` of one question."""
    per_word: float = Field(0.0, ge=0)
    """Extra `human_attention` per word of a question."""
    max_questions: int | None = Field(None, ge=0)
    """Questions allowed per episode (null: no limit)."""

    @field_validator("prompt")
    @classmethod
    def _has_question_field(cls, prompt: str) -> str:
        if "{question}" not in prompt:
            raise ValueError("the prompt needs a {question} field, where the question goes")
        return prompt

    async def open(self, ctx: ToolContext) -> list[AnyTool]:
        from turnrl.suites import open_expert
        from turnrl.tools.ask import AskTool, ExpertResponder

        expert = await asyncio.to_thread(open_expert, self.expert)

        async def close() -> None:
            expert.close()

        ctx.closers.append(close)
        tool = AskTool(
            ExpertResponder(expert.generate, prompt=self.prompt),
            cost=CostModel(per_call={"calls": 1.0, "human_attention": self.attention}),
            per_word=self.per_word,
            max_questions=self.max_questions,
            description=self.description,
        )
        return [tool]


ExtraToolConfig = Annotated[
    WebToolConfig | McpToolConfig | SearchToolConfig | PythonRunToolConfig | AskToolConfig,
    Field(discriminator="kind"),
]
"""One entry of `RunConfig.tools`."""


async def open_run_tools(configs: Sequence[ExtraToolConfig], ctx: ToolContext) -> list[AnyTool]:
    """The tools of every config, in order; each registers its close in `ctx.closers` before it
    can fail, so the caller closes whatever opened when a later one fails."""
    tools: list[AnyTool] = []
    for cfg in configs:
        tools.extend(await cfg.open(ctx))
    return tools
