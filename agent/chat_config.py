"""How a run renders conversations (`RunConfig.chat`): plain pydantic values, torch-free;
`agent.chat_template.build_renderer` turns one into a `Renderer` once the tokenizer is loaded.

    chat:
      template: chatml            # default: turnrl's ChatML renderer (the fast path)
      template: model             # the tokenizer's own chat_template
      template: {path: t.jinja}   # a Jinja file
      template: {inline: "..."}   # Jinja text
      tool_format: hermes         # hermes | llama3_json | mistral (agent.tool_formats)

A Jinja template also takes `tool_schemas` (who writes the tool schemas: the template through
its `tools` argument, or turnrl in the system message) and `tool_results` (tool results as
`tool` messages, or as `<tool_response>` blocks in a user message); `auto` reads the template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from turnrl.agent.tool_formats import ToolFormatName


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChatMLTemplate(_Config):
    """turnrl's ChatML renderer (`agent.chat.ChatML`): the embedded model's format, rendered
    piece by piece without Jinja."""

    kind: Literal["chatml"] = "chatml"


class _Jinja(_Config):
    tool_schemas: Literal["auto", "template", "system"] = "auto"
    """Who renders the tool schemas: the template (`tools=`; it then explains its own call
    syntax, and turnrl adds only how to answer), or turnrl, into the system message with the
    tool format's syntax. `auto`: the template when it reads a `tools` variable."""
    tool_results: Literal["auto", "tool_role", "user_message"] = "auto"
    """How tool results are presented: one `tool` message per call (the template formats
    them), or `<tool_response>` blocks in one user message (ChatML's way). `auto`:
    `tool_role` when the template names a `tool` or `ipython` role."""


class ModelTemplate(_Jinja):
    """The tokenizer's own `chat_template`."""

    kind: Literal["model"] = "model"


class PathTemplate(_Jinja):
    """A Jinja chat template read from a file."""

    kind: Literal["path"] = "path"
    path: Path


class InlineTemplate(_Jinja):
    """A Jinja chat template given as text."""

    kind: Literal["inline"] = "inline"
    inline: str = Field(min_length=1)


TemplateConfig = Annotated[
    ChatMLTemplate | ModelTemplate | PathTemplate | InlineTemplate, Field(discriminator="kind")
]


class ChatConfig(_Config):
    """Which chat template renders the conversation and how the model writes tool calls."""

    template: TemplateConfig = Field(default_factory=ChatMLTemplate)
    """`chatml`, `model`, `{path: ...}` or `{inline: ...}` (module docstring)."""
    tool_format: ToolFormatName = "hermes"
    """How the model writes tool calls (`agent.tool_formats`)."""

    @field_validator("template", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """`template: model` and `template: {path: ...}` without a `kind`."""
        if isinstance(value, str):
            if value not in ("chatml", "model"):
                raise ValueError(
                    f"template {value!r}: expected chatml, model, {{path: FILE}} or "
                    "{inline: JINJA}"
                )
            return {"kind": value}
        if isinstance(value, dict) and "kind" not in value:
            kinds = [k for k in ("path", "inline") if k in value]
            if len(kinds) != 1:
                raise ValueError("a template mapping needs exactly one of `path` or `inline`")
            return {"kind": kinds[0], **value}
        return value
