"""Parse one completion into tool calls and a final answer.

Syntax (rendered into the system prompt by `agent.chat`):
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (several per turn allowed) and a
final `<answer>...</answer>`. Parsing never raises: whatever the model wrote, the result is a
`ParsedTurn` whose malformed parts carry an error the agent will see as an observation, and a
format flag for the turn's reward.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from turnrl.agent.records import ToolCall

MAX_CALL_CHARS = 16_384
"""A call longer than this is rejected unparsed: no tool takes arguments that size, and JSON
parsing a hostile megabyte costs the event loop."""

_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class ParsedTurn:
    """What a completion asks for."""

    tool_calls: list[ToolCall] = field(default_factory=list)
    """Calls in order, well-formed or not (a malformed one has `parse_error`)."""
    answer: str | None = None
    """The final answer text, stripped; None when there is no complete `<answer>` tag."""
    format_error: str | None = None
    """Why the turn is malformed, for the format reward; None when well-formed."""


def parse_completion(text: str, turn_index: int) -> ParsedTurn:
    """Parse `text` (one decoded completion). Call ids are `t{turn}c{i}`."""
    errors: list[str] = []
    calls = [_parse_call(raw, f"t{turn_index}c{i}") for i, raw in enumerate(_CALL_RE.findall(text))]
    errors += [f"tool call {c.id}: {c.parse_error}" for c in calls if c.parse_error]

    # An opening tag left without its closing tag: the model ran out of tokens or lost track.
    without_calls = _CALL_RE.sub("", text)
    if "<tool_call>" in without_calls:
        errors.append("unterminated <tool_call> (missing </tool_call>)")
    elif "</tool_call>" in without_calls:
        errors.append("</tool_call> without a matching <tool_call>")

    answers = _ANSWER_RE.findall(without_calls)
    answer = answers[-1].strip() if answers else None
    if answer is None and "<answer>" in without_calls:
        errors.append("unterminated <answer> (missing </answer>)")
    if answer is not None and calls:
        errors.append("an answer and tool calls in the same turn: the calls were not run")
    if answer is None and not calls and not errors:
        errors.append("no <tool_call> and no <answer>: call a tool or answer")
    return ParsedTurn(
        tool_calls=calls if answer is None else [],
        answer=answer,
        format_error="; ".join(errors) or None,
    )


def _parse_call(raw: str, call_id: str) -> ToolCall:
    if len(raw) > MAX_CALL_CHARS:
        return ToolCall(
            id=call_id,
            name=None,
            raw=raw[:MAX_CALL_CHARS],
            parse_error=f"call is {len(raw)} characters; the limit is {MAX_CALL_CHARS}",
        )
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        return ToolCall(id=call_id, name=None, raw=raw, parse_error=f"invalid JSON: {e}")
    if not isinstance(obj, dict):
        return ToolCall(
            id=call_id, name=None, raw=raw, parse_error="expected a JSON object with name"
        )
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall(id=call_id, name=None, raw=raw, parse_error='missing string "name"')
    args = obj.get("arguments", {})
    # OpenAI-style clients send arguments as a JSON string; accept both spellings.
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError) as e:
            return ToolCall(
                id=call_id, name=name, raw=raw, parse_error=f"arguments string is not JSON: {e}"
            )
    if not isinstance(args, dict):
        return ToolCall(
            id=call_id, name=name, raw=raw, parse_error='"arguments" must be a JSON object'
        )
    return ToolCall(id=call_id, name=name, raw=raw, arguments=args)
