"""The chat-completions wire format, and the translation between it and turnrl's token contexts.

The runner keeps every episode as token ids rendered by `ChatML`; an API model speaks chat
messages with native function calling. This module maps one to the other, statelessly:

- **context ids -> messages.** The renderer's special ids (`start_id`, `end_id`) delimit its
  messages exactly (content is always encoded as plain text, so no content can forge them).
  Each message is decoded; the system message's rendered tool block (found by rendering a probe
  schema through the renderer's own `system_text`) becomes native `tools`, replaced by a short
  note that keeps the answer-tag convention; an assistant message's `<tool_call>` blocks become
  native `tool_calls` (read by `parse_completion`, the parser the runner used, so the calls are
  the ones that ran); the user message after them becomes one `tool` message per call, with its
  `tool_call_id`, in order (the tool-response wrapping is also learnt from the renderer, by
  rendering a probe observation). Tools revealed mid-conversation (`tools_note`) join `tools`.
  Call ids are `call_<message>_<i>`: the same on every request of an episode, so a provider's
  prompt cache still hits, and consistent within each request, which is all the API checks.
- **reply -> completion text.** The reply's content, then each native call written in turnrl's
  syntax, `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (arguments as the object
  they parse to, or as the raw string when they are not a JSON object, so the runner's parser
  reports the malformed call to the agent as it would a local model's).

The response models are strict about what turnrl reads (types, one choice at least, usage
counts) and ignore the rest: providers add fields of their own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from turnrl.agent.chat import ChatML
from turnrl.agent.parse import parse_completion
from turnrl.agent.records import ToolCall

NATIVE_NOTE = (
    "Call the functions provided when you need them. When you know the answer, write it "
    "inside <answer></answer> tags, e.g. <answer>Paris</answer>, and nothing after it."
)
"""Replaces the rendered tool block (which teaches the `<tool_call>` text syntax) in the
system message an API model sees: its tools arrive natively, the answer convention stays."""

_PROBE = {"name": "\x00probe", "description": "", "parameters": {}}
_PROBE_TEXT = "\x00result"


class ContextError(ValueError):
    """The context ids are not a ChatML conversation this module can translate."""


# -- the wire format: requests -------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FunctionCallOut(_Out):
    name: str
    arguments: str
    """JSON text, as the API expects it."""


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class SystemMessage(_Out):
    role: Literal["system"] = "system"
    content: str


class UserMessage(_Out):
    role: Literal["user"] = "user"
    content: str


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None
    """None only when there are `tool_calls`."""
    tool_calls: list[ToolCallOut] | None = None


class ToolMessage(_Out):
    role: Literal["tool"] = "tool"
    tool_call_id: str
    content: str


Message = SystemMessage | UserMessage | AssistantMessage | ToolMessage


# -- the wire format: responses ------------------------------------------------------------


class _In(BaseModel):
    # Strict on what is read, tolerant of what providers add.
    model_config = ConfigDict(frozen=True, extra="ignore")


class FunctionCallIn(_In):
    name: StrictStr = Field(min_length=1)
    arguments: StrictStr
    """JSON text as the model wrote it (it may not parse)."""


class ToolCallIn(_In):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ReplyMessage(_In):
    role: Literal["assistant"]
    content: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None
    refusal: StrictStr | None = None
    """A safety refusal's text (OpenAI); shown to the runner as content when there is none."""


class Choice(_In):
    message: ReplyMessage
    finish_reason: StrictStr | None = None
    """`stop`, `length`, `tool_calls`, `content_filter`, ... (only `length` matters here)."""


class PromptTokensDetails(_In):
    cached_tokens: StrictInt | None = Field(None, ge=0)


class Usage(_In):
    prompt_tokens: StrictInt = Field(ge=0)
    completion_tokens: StrictInt = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails | None = None

    @property
    def cached_tokens(self) -> int:
        details = self.prompt_tokens_details
        cached = details.cached_tokens if details is not None else None
        return min(cached or 0, self.prompt_tokens)


class ChatResponse(_In):
    choices: list[Choice] = Field(min_length=1)
    usage: Usage
    """Required: without the provider's counts a turn has no price."""


# -- translation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    """What one request sends: the messages and the tool schemas (OpenAI's `tools` entries)."""

    messages: list[Message]
    tools: list[dict[str, Any]]


class ChatTranslator:
    """Context ids <-> chat messages for one renderer (module docstring)."""

    def __init__(self, renderer: ChatML) -> None:
        self.renderer = renderer
        self.tokenizer = renderer.tokenizer
        self.start_id = renderer.start_id
        self.end_id = renderer.end_of_turn_id()
        probe = json.dumps(_PROBE, ensure_ascii=False)
        block = renderer.system_text("", [_PROBE])
        if not block.endswith(probe):
            raise ValueError("the renderer's tool block does not end with the schemas")
        self._tools_marker = block[: -len(probe)]
        """The text between the instructions and the schemas (one JSON object per line)."""
        if "<tool_call>" not in self._tools_marker:
            # The runner parses replies in the renderer's call syntax; replies are written in
            # the `<tool_call>` (hermes) one.
            raise ValueError("an API model needs the renderer's <tool_call> (hermes) call syntax")
        note = renderer.tools_note([_PROBE])
        self._note_marker = note[: -len(probe)] if note.endswith(probe) else None
        one = self._user_content(renderer.observation([_PROBE_TEXT], completion_closed=True))
        two = self._user_content(
            renderer.observation([_PROBE_TEXT, _PROBE_TEXT], completion_closed=True)
        )
        self._open, _, self._close = one.partition(_PROBE_TEXT)
        self._sep = two[len(one) : -len(one)]
        if two != one + self._sep + one:
            raise ValueError("the renderer's tool responses are not joined blocks")

    def _user_content(self, ids: Sequence[int]) -> str:
        for role, content, _ in self._segments(list(ids)):
            if role == "user":
                return content
        raise ValueError("the renderer's observation has no user message")

    def _segments(self, ids: list[int]) -> list[tuple[str, str, bool]]:
        """(role, content, closed) per message, in order."""
        out: list[tuple[str, str, bool]] = []
        starts = [i for i, t in enumerate(ids) if t == self.start_id]
        if not starts:
            raise ContextError("no message start in the context")
        for k, begin in enumerate(starts):
            stop = starts[k + 1] if k + 1 < len(starts) else len(ids)
            body = ids[begin + 1 : stop]
            closed = self.end_id in body
            if closed:
                body = body[: body.index(self.end_id)]
            role, sep, content = self.tokenizer.decode(body).partition("\n")
            if not sep:
                raise ContextError(f"message {k} has no role line")
            out.append((role, content, closed))
        return out

    def conversation(self, context: Sequence[int]) -> Conversation:
        """The request for continuing `context`, which must end with an open assistant
        header (the runner's contexts always do)."""
        segments = self._segments(list(context))
        role, content, closed = segments[-1]
        if role != "assistant" or closed or content:
            raise ContextError("the context does not end with an open assistant message")
        messages: list[Message] = []
        tools: dict[str, dict[str, Any]] = {}
        pending: list[ToolCall] = []
        """Calls of the last assistant message whose results come next."""
        for index, (role, content, _) in enumerate(segments[:-1]):
            if role == "system":
                text, schemas = self._split_system(content)
                tools.update((s["name"], s) for s in schemas)
                messages.append(SystemMessage(content=text))
            elif role == "assistant":
                message, pending = self._assistant(content, index)
                messages.append(message)
            elif role == "user":
                if self._note_marker is not None and content.startswith(self._note_marker):
                    tools.update((s["name"], s) for s in self._schemas(content, self._note_marker))
                messages += self._user(content, pending, index - 1)
                pending = []
            else:
                raise ContextError(f"message {index} has role {role!r}")
        return Conversation(
            messages,
            [{"type": "function", "function": schema} for schema in tools.values()],
        )

    def _split_system(self, content: str) -> tuple[str, list[dict[str, Any]]]:
        at = content.find(self._tools_marker)
        if at < 0:
            return content, []
        schemas = self._schemas(content[at:], self._tools_marker)
        return f"{content[:at]}\n\n{NATIVE_NOTE}".lstrip("\n"), schemas

    def _schemas(self, text: str, marker: str) -> list[dict[str, Any]]:
        schemas = []
        for line in text[len(marker) :].split("\n"):
            if not line.strip():
                break  # a tools note's schemas end at the blank line before its message
            try:
                schema = json.loads(line)
            except ValueError:
                raise ContextError(f"a tool schema line is not JSON: {line[:80]!r}") from None
            if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
                raise ContextError(f"a tool schema has no name: {line[:80]!r}")
            schemas.append(schema)
        return schemas

    def _assistant(self, text: str, index: int) -> tuple[AssistantMessage, list[ToolCall]]:
        calls = parse_completion(text, index).tool_calls
        native: list[ToolCallOut] = []
        for i, call in enumerate(calls):
            if call.name is None:
                continue  # unreadable: stays in the text, its error goes back as user text
            native.append(
                ToolCallOut(
                    id=_call_id(index, i),
                    function=FunctionCallOut(name=call.name, arguments=_arguments(call)),
                )
            )
            text = text.replace(f"<tool_call>{call.raw}</tool_call>", "", 1)
        content = text.strip()
        return (
            AssistantMessage(
                content=content or (None if native else ""), tool_calls=native or None
            ),
            calls,
        )

    def _user(self, content: str, calls: list[ToolCall], assistant: int) -> list[Message]:
        """The messages of one user message: a tool message per native call answered, and
        the rest (results of unreadable calls, notes, a question) as user text."""
        results = self._blocks(content, len(calls) if calls else None)
        if results is None:
            return [UserMessage(content=content)]
        out: list[Message] = []
        rest: list[str] = []
        for i, text in enumerate(results):
            if i < len(calls) and calls[i].name is not None:
                out.append(ToolMessage(tool_call_id=_call_id(assistant, i), content=text))
            else:
                rest.append(text)
        if rest:
            out.append(UserMessage(content="\n".join(rest)))
        return out

    def _blocks(self, content: str, n: int | None) -> list[str] | None:
        """The tool-response blocks of `content` (None when it is not made of them). With `n`
        calls answered, a result that happens to contain the separator is kept whole."""
        if not (content.startswith(self._open) and content.endswith(self._close)):
            return None
        inner = content[len(self._open) : len(content) - len(self._close)]
        parts = inner.split(self._close + self._sep + self._open)
        if n is not None and len(parts) > n > 0:
            joined = (self._close + self._sep + self._open).join(parts[n - 1 :])
            parts = [*parts[: n - 1], joined]
        return parts

    def completion_text(self, message: ReplyMessage) -> str:
        """The reply in turnrl's syntax (module docstring)."""
        parts = []
        content = message.content if message.content is not None else message.refusal
        if content:
            parts.append(content)
        for call in message.tool_calls or []:
            try:
                args: Any = json.loads(call.function.arguments)
            except ValueError:
                args = call.function.arguments
            if not isinstance(args, dict):
                args = call.function.arguments
            body = json.dumps({"name": call.function.name, "arguments": args}, ensure_ascii=False)
            parts.append(f"<tool_call>{body}</tool_call>")
        return "\n".join(parts)


def _call_id(message: int, i: int) -> str:
    return f"call_{message}_{i}"


def _arguments(call: ToolCall) -> str:
    """The call's arguments as JSON text, as the model gave them where they did not parse."""
    if call.arguments is not None:
        return json.dumps(call.arguments, ensure_ascii=False)
    try:
        raw = json.loads(call.raw)
    except ValueError:
        return call.raw
    args = raw.get("arguments", {}) if isinstance(raw, dict) else raw
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
