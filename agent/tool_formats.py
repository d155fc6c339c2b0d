"""How a model writes tool calls, as small formats chosen by config (`ChatConfig.tool_format`).

A format reads a completion into a `ParsedTurn` (calls, final answer, format error, and the
call attempts it left unrun: graders of calls read these, never the format's text), writes
calls as the text a model of that family would sample (the oracle plays gold calls through it;
task prompts write their example calls with it), and tells the model its syntax when the chat
template does not render tools itself. The final answer is `<answer>...</answer>` in every
format: graders read it, whatever the call syntax.

- `hermes` (default): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, several per
  message (Hermes, Qwen2.5/3, SmolLM2 under turnrl's prompt). `agent.parse` reads it.
- `llama3_json`: the whole message is one JSON object `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>` (Llama 3.1/3.2/3.3 custom tools). A JSON list of such
  objects is accepted and written for several calls (Llama 3.2 style).
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (Mistral's v3 tokenizer
  format: Mistral 7B v0.3, Mixtral 8x22B, Nemo); text before the marker is allowed.

Parsing never raises and is linear time: one JSON decode of bounded size per message (a
`[`-list is read element by element, so each call keeps its exact text in `ToolCall.raw`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from turnrl.agent.parse import (
    MAX_CALL_CHARS,
    ParsedTurn,
    call_from_json,
    last_answer,
    parse_completion,
)
from turnrl.agent.records import ToolCall

ToolFormatName = Literal["hermes", "llama3_json", "mistral"]

ANSWER_SYNTAX = """\
When you know the answer, write it inside <answer></answer> tags, e.g. <answer>Paris</answer>, \
and nothing after it."""

HERMES_SYNTAX = (
    """\
You can call tools. To call one, write a JSON object inside <tool_call></tool_call> tags:
<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>
You may make several calls in one message. Their results come back inside \
<tool_response></tool_response> tags. """
    + ANSWER_SYNTAX
)
"""`ChatML`'s call syntax since the first release (regression-locked by `CALL_SYNTAX`)."""

LLAMA3_SYNTAX = (
    """\
You can call tools. To call one, reply with only a JSON object, nothing else in the message:
{"name": "<tool name>", "parameters": {<arguments>}}
For several calls, reply with a JSON list of such objects. Their results come back in the \
next message. """
    + ANSWER_SYNTAX
)

MISTRAL_SYNTAX = (
    """\
You can call tools. To call them, write [TOOL_CALLS] followed by a JSON list of calls:
[TOOL_CALLS] [{"name": "<tool name>", "arguments": {<arguments>}}]
Their results come back in the next message. """
    + ANSWER_SYNTAX
)

_MAX_MESSAGE_CHARS = 8 * MAX_CALL_CHARS
"""A JSON message longer than this is refused unread (several calls at most)."""


class ToolFormat(Protocol):
    """One way of writing tool calls."""

    @property
    def name(self) -> ToolFormatName:
        """The config name (`ChatConfig.tool_format`)."""
        ...

    @property
    def call_unit(self) -> str:
        """What prose names one written call, as in "one <tool_call> per call" (task prompts
        that say how to make several calls in one reply)."""
        ...

    def syntax(self) -> str:
        """How to call tools and answer, for the system message when the template does not
        render tools itself."""
        ...

    def parse(self, text: str, turn_index: int) -> ParsedTurn:
        """Read one decoded completion (its end-of-turn token included); call ids are
        `t{turn}c{i}`. Never raises."""
        ...

    def write_calls(self, calls: Sequence[ToolCall]) -> str:
        """The reply text that makes `calls` (each with a name and arguments), without the
        end-of-turn token."""
        ...


class Hermes:
    """`<tool_call>{json}</tool_call>`: `agent.parse` (JSON-aware, linear time)."""

    name: ToolFormatName = "hermes"
    call_unit: ClassVar[str] = "<tool_call>"

    def syntax(self) -> str:
        return HERMES_SYNTAX

    def parse(self, text: str, turn_index: int) -> ParsedTurn:
        return parse_completion(text, turn_index)

    def write_calls(self, calls: Sequence[ToolCall]) -> str:
        return "".join(
            f"<tool_call>{json.dumps(_obj(c, 'arguments'), ensure_ascii=False)}</tool_call>"
            for c in calls
        )


@dataclass(frozen=True)
class Llama3Json:
    """Llama 3's JSON calls: the whole message is the call (or a list of calls)."""

    end_texts: tuple[str, ...] = ()
    """End-of-message markers the sampled text may end with (`<|eot_id|>`, `<|eom_id|>`)."""
    name: ToolFormatName = "llama3_json"
    call_unit: ClassVar[str] = "JSON object"

    def syntax(self) -> str:
        return LLAMA3_SYNTAX

    def parse(self, text: str, turn_index: int) -> ParsedTurn:
        body = _strip_ends(text, self.end_texts).strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>") :].lstrip()
        if not body.startswith(("{", "[")):
            return _answer_only(body, 'a JSON call {"name": ..., "parameters": {...}}')
        return _json_calls(body, "", turn_index, ("parameters", "arguments"))

    def write_calls(self, calls: Sequence[ToolCall]) -> str:
        objs = [_obj(c, "parameters") for c in calls]
        return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)


@dataclass(frozen=True)
class Mistral:
    """Mistral's `[TOOL_CALLS] [...]` (v3 tokenizer), after optional text."""

    end_texts: tuple[str, ...] = ()
    """End-of-message markers the sampled text may end with (`</s>`)."""
    name: ToolFormatName = "mistral"
    call_unit: ClassVar[str] = "object in the [TOOL_CALLS] list"

    def syntax(self) -> str:
        return MISTRAL_SYNTAX

    def parse(self, text: str, turn_index: int) -> ParsedTurn:
        body = _strip_ends(text, self.end_texts)
        at = body.find("[TOOL_CALLS]")
        if at < 0:
            return _answer_only(body, "[TOOL_CALLS]")
        calls = body[at + len("[TOOL_CALLS]") :].strip()
        return _json_calls(calls, body[:at], turn_index, ("arguments", "parameters"))

    def write_calls(self, calls: Sequence[ToolCall]) -> str:
        objs = [_obj(c, "arguments") for c in calls]
        return "[TOOL_CALLS] " + json.dumps(objs, ensure_ascii=False)


def make_tool_format(name: ToolFormatName, end_texts: Sequence[str] = ()) -> ToolFormat:
    """The format `name`; `end_texts` are the renderer's end-of-message markers."""
    if name == "hermes":
        return Hermes()
    if name == "llama3_json":
        return Llama3Json(tuple(end_texts))
    return Mistral(tuple(end_texts))


def write_call(fmt: ToolFormat, name: str, arguments: Mapping[str, Any]) -> str:
    """One call to `name` as `fmt` writes it: a task prompt's example call, which must show the
    syntax the policy's replies are parsed in."""
    return fmt.write_calls([ToolCall(id="example", name=name, raw="", arguments=dict(arguments))])


def rewrite_hermes(text: str, fmt: ToolFormat) -> str:
    """`text`, a reply written in the hermes format (tasks' gold replies and few-shot
    examples), as `fmt` writes it: well-formed calls are rewritten, anything else is kept."""
    if fmt.name == "hermes" or "<tool_call>" not in text:
        return text
    parsed = parse_completion(text, 0)
    if parsed.format_error is not None or not parsed.tool_calls:
        return text
    return fmt.write_calls(parsed.tool_calls)


def _obj(call: ToolCall, args_key: str) -> dict[str, object]:
    return {"name": call.name, args_key: call.arguments or {}}


def _strip_ends(text: str, ends: Sequence[str]) -> str:
    body = text.rstrip()
    stripped = True
    while stripped:
        stripped = False
        for end in ends:
            if end and body.endswith(end):
                body, stripped = body[: -len(end)].rstrip(), True
    return body


def _answer_only(body: str, call_name: str) -> ParsedTurn:
    answer = last_answer(body)
    if answer is not None:
        return ParsedTurn(answer=answer)
    if "<answer>" in body:
        return ParsedTurn(format_error="unterminated <answer> (missing </answer>)")
    return ParsedTurn(format_error=f"no {call_name} and no <answer>: call a tool or answer")


def _json_calls(text: str, before: str, turn_index: int, args_keys: tuple[str, ...]) -> ParsedTurn:
    """`text` (a JSON object or list of objects, then maybe more text) as calls; `before` is
    text that preceded the calls in the message."""
    errors: list[str] = []
    if len(text) > _MAX_MESSAGE_CHARS:
        raw = text[:MAX_CALL_CHARS]
        limit = f"calls are {len(text)} characters; the limit is {_MAX_MESSAGE_CHARS}"
        call = ToolCall(id=f"t{turn_index}c0", name=None, raw=raw, parse_error=limit)
        return ParsedTurn(tool_calls=[call], format_error=f"tool call {call.id}: {limit}")
    raws, rest, error = _split_json(text)
    if error is not None:
        call = ToolCall(id=f"t{turn_index}c0", name=None, raw=text, parse_error=error)
        return ParsedTurn(tool_calls=[call], format_error=f"tool call {call.id}: {error}")
    calls = [call_from_json(raw, f"t{turn_index}c{i}", args_keys) for i, raw in enumerate(raws)]
    errors += [f"tool call {c.id}: {c.parse_error}" for c in calls if c.parse_error]
    if not calls:
        errors.append("an empty list of calls")
    answer = last_answer(before + rest)
    if answer is not None:
        errors.append("an answer and tool calls in the same turn: the calls were not run")
        return ParsedTurn(answer=answer, format_error="; ".join(errors), calls_not_run=len(calls))
    if rest.strip():
        errors.append("text after the tool calls")
    return ParsedTurn(tool_calls=calls, format_error="; ".join(errors) or None)


def _split_json(text: str) -> tuple[list[str], str, str | None]:
    """(each call's exact JSON text, the text after the calls, a JSON error or None) for a
    JSON object or a JSON list of values at the start of `text`."""
    decoder = json.JSONDecoder()
    try:
        if text.startswith("{"):
            _, end = decoder.raw_decode(text)
            return [text[:end]], text[end:], None
        raws: list[str] = []
        pos = _skip_ws(text, 1)
        if text.startswith("]", pos):
            return raws, text[pos + 1 :], None
        while True:
            _, end = decoder.raw_decode(text, pos)
            raws.append(text[pos:end])
            pos = _skip_ws(text, end)
            if text.startswith("]", pos):
                return raws, text[pos + 1 :], None
            if not text.startswith(",", pos):
                return raws, "", f"expected ',' or ']' at character {pos}"
            pos = _skip_ws(text, pos + 1)
    except (ValueError, RecursionError) as e:
        return [], "", f"invalid JSON: {e}"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos
