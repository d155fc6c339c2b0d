"""Parse one completion into tool calls and a final answer.

Syntax (rendered into the system prompt by `agent.chat`):
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (several per turn allowed) and a
final `<answer>...</answer>`. Parsing never raises: whatever the model wrote, the result is a
`ParsedTurn` whose malformed parts carry an error the agent will see as an observation, and a
format flag for the turn's reward.

A call's content is read as JSON: when the text up to the first `</tool_call>` outside JSON
string literals is one JSON value, that tag ends the call, so code passed as an argument may
hold `</tool_call>` or `<answer>...</answer>` in a string without ending the call, and nothing
inside a call is taken as the episode's answer. Malformed JSON gets the plain textual reading
(the first `</tool_call>` ends the call) and its JSON error is reported; a call cut off inside
a string literal (out of tokens) runs to the end of the text. Linear time whatever the model
wrote: every scan is a find or a possessive (non-backtracking) regex, and no character is
scanned as JSON twice (after the first call that does not read as JSON, calls are cut
textually).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from turnrl.agent.records import ToolCall

MAX_CALL_CHARS = 16_384
"""A call longer than this is rejected unparsed: no tool takes arguments that size, and JSON
parsing a hostile megabyte costs the event loop."""

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_ANSWER, _END_ANSWER = "<answer>", "</answer>"
_JSON_PREFIX = re.compile(r'(?:[^"<]++|"(?:[^"\\]++|\\.)*+"|<(?!/tool_call>))*+', re.DOTALL)
"""Call content up to its end, JSON string literals skipped whole: stops at a `</tool_call>`
outside strings, at a `"` whose string never closes, or at the end of the text. Possessive, so
it never backtracks (linear time)."""


@dataclass(frozen=True)
class ParsedTurn:
    """What a completion asks for."""

    tool_calls: list[ToolCall] = field(default_factory=list)
    """Calls in order, well-formed or not (a malformed one has `parse_error`)."""
    answer: str | None = None
    """The final answer text, stripped; None when there is no complete `<answer>` tag."""
    format_error: str | None = None
    """Why the turn is malformed, for the format reward; None when well-formed."""
    calls_not_run: int = 0
    """Call attempts left out of `tool_calls`, so never run: calls written beside an answer,
    a `<tool_call>` without its closing tag. Graders that judge calls read it (a format's
    malformed but complete call is in `tool_calls`, with its `parse_error`)."""


def parse_completion(text: str, turn_index: int) -> ParsedTurn:
    """Parse `text` (one decoded completion). Call ids are `t{turn}c{i}`."""
    errors: list[str] = []
    split = _split_calls(text)
    calls = [_parse_call(raw, f"t{turn_index}c{i}") for i, raw in enumerate(split.raws)]
    errors += [f"tool call {c.id}: {c.parse_error}" for c in calls if c.parse_error]

    # An opening tag left without its closing tag: the model ran out of tokens or lost track.
    outside = split.outside
    if split.unterminated:
        errors.append("unterminated <tool_call> (missing </tool_call>)")
    elif _CLOSE in outside:
        errors.append("</tool_call> without a matching <tool_call>")

    answer = last_answer(outside)
    if answer is None and "<answer>" in outside:
        errors.append("unterminated <answer> (missing </answer>)")
    if answer is not None and calls:
        errors.append("an answer and tool calls in the same turn: the calls were not run")
    if answer is None and not calls and not errors:
        errors.append("no <tool_call> and no <answer>: call a tool or answer")
    return ParsedTurn(
        tool_calls=calls if answer is None else [],
        answer=answer,
        format_error="; ".join(errors) or None,
        calls_not_run=(0 if answer is None else len(calls)) + int(split.unterminated),
    )


@dataclass(frozen=True)
class _Split:
    """A completion cut into its calls and the rest."""

    raws: list[str]
    """Each complete call's content (between its tags), in order."""
    outside: str
    """The text outside complete calls and outside an unterminated call's open string."""
    unterminated: bool
    """A `<tool_call>` has no `</tool_call>` after it."""


def _split_calls(text: str) -> _Split:
    raws: list[str] = []
    outside: list[str] = []
    pos = 0
    # Cleared once a call's JSON reading fails: later calls are cut textually, since another
    # scan to the end of the text per call would make a hostile turn quadratic, and the turn
    # is malformed (reported) anyway.
    json_aware = True
    while (start := text.find(_OPEN, pos)) >= 0:
        body = start + len(_OPEN)
        close = text.find(_CLOSE, body)
        if json_aware:
            prefix = _JSON_PREFIX.match(text, body)  # always matches, possibly empty
            end = body if prefix is None else prefix.end()
            if not text.startswith(_CLOSE, end):
                json_aware = False
                if close < 0 and end < len(text):
                    # Cut off inside a string literal: the rest is that call's argument, and
                    # an `<answer>` in it is not the episode's.
                    outside.append(text[pos:start])
                    return _Split(raws, "".join(outside), unterminated=True)
            elif end != close:  # a `</tool_call>` inside a string: JSON decides
                if _is_json(text[body:end]):
                    close = end
                else:
                    json_aware = False
        if close < 0:
            outside.append(text[pos:])
            return _Split(raws, "".join(outside), unterminated=True)
        outside.append(text[pos:start])
        raws.append(text[body:close])
        pos = close + len(_CLOSE)
    outside.append(text[pos:])
    return _Split(raws, "".join(outside), unterminated=False)


def _is_json(raw: str) -> bool:
    """Whether `raw` is one JSON value; a call over `MAX_CALL_CHARS` is taken as JSON unread
    (it is refused whatever it holds, and its string literals stay inside it)."""
    if len(raw) > MAX_CALL_CHARS:
        return True
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


def last_answer(text: str) -> str | None:
    """The last `<answer>...</answer>` of `text`, stripped: each answer is an opening tag and
    the first closing tag after it (a lazy regex's reading, without its quadratic time on a
    run of opening tags that never close)."""
    answer, pos = None, 0
    while (start := text.find(_ANSWER, pos)) >= 0:
        end = text.find(_END_ANSWER, start + len(_ANSWER))
        if end < 0:
            break
        answer, pos = text[start + len(_ANSWER) : end], end + len(_END_ANSWER)
    return None if answer is None else answer.strip()


def _parse_call(raw: str, call_id: str) -> ToolCall:
    return call_from_json(raw, call_id)


def call_from_json(raw: str, call_id: str, args_keys: tuple[str, ...] = ("arguments",)) -> ToolCall:
    """The call `raw` (one JSON object with a string `name` and its arguments under the first
    of `args_keys` present) as a `ToolCall`; a malformed one carries its `parse_error`. Shared
    by every tool-call format (`agent.tool_formats`)."""
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
    args: object = next((obj[k] for k in args_keys if k in obj), {})
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
            id=call_id, name=name, raw=raw, parse_error=f'"{args_keys[0]}" must be a JSON object'
        )
    return ToolCall(id=call_id, name=name, raw=raw, arguments=args)
