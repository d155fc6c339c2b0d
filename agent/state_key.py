"""State keys: a stable name for the history of (action, observation) pairs up to a turn.

The key of the state after a turn chains a hash of the turn's normalised action and its
observation onto the key of the state before it (`ROOT` before the first turn), so equal
histories get equal keys without comparing whole histories. The runner stores each turn's key
as it records the turn (`Turn.state_key`); `turnrl.agent.graph` merges a group's episodes by
them, and its module docstring defines the normalisation (`action_key`, `observation_key`).

Keys are stable: the same history gives the same key in every process (blake2b, 96 bits, of
the parent key and the turn's normalised action and observation, each field tagged and
length-prefixed so that no two different turns hash the same input).

This module sits below both the runner and the graph (the graph builds `EpisodeSpec`s for the
runner; the runner keys turns as the graph does) so that neither imports the other for it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from hashlib import blake2b

from turnrl.agent.records import ToolCall, ToolResult, Turn

ROOT = "root"
"""Key of the state every episode of a group starts from."""

_encode_args = json.JSONEncoder(sort_keys=True, ensure_ascii=False).encode


def normalise(text: str) -> str:
    """`text` with whitespace runs collapsed to one space and case folded."""
    return " ".join(text.split()).casefold()


def step_text(
    tool_calls: Sequence[ToolCall],
    answer: str | None,
    text: str,
    tool_results: Sequence[ToolResult],
) -> str:
    """A turn's action and observation as one unambiguous string: each field is tagged and
    length-prefixed. Two turns give equal strings exactly when their `action_key` and
    `observation_key` are equal (written for speed: this is the inner loop of every graph
    estimator, and the runner's per-turn cost)."""
    parts: list[str] = []
    for call in tool_calls:
        name = call.name
        if call.parse_error is None and name is not None:
            args = call.arguments
            if not args:
                a = "j{}"
            else:
                # One string argument (a query, a snippet of code) is the common case and
                # needs no JSON encoder; a different tag keeps it apart from encoded ones.
                a = ""
                if len(args) == 1:
                    ((k, v),) = args.items()
                    if type(v) is str:
                        a = f"s{len(k)}:{k}{v}"
                if not a:
                    a = "j" + _encode_args(args)
            parts.append(f"c{len(name)}:{name}{len(a)}:{a}")
        else:
            raw = normalise(call.raw)
            parts.append(f"b{len(raw)}:{raw}")
    if answer is not None:
        answer = normalise(answer)
        parts.append(f"a{len(answer)}:{answer}")
    if not parts:
        text = normalise(text)
        parts.append(f"t{len(text)}:{text}")
    for r in tool_results:
        err = r.error or ""
        obs = r.text
        parts.append(f"o{len(err)}:{err}{len(obs)}:{obs}")
    return "".join(parts)


def turn_text(turn: Turn) -> str:
    """`step_text` of a recorded turn."""
    return step_text(turn.tool_calls, turn.answer, turn.text, turn.tool_results)


def step_key(
    parent: str,
    tool_calls: Sequence[ToolCall],
    answer: str | None,
    text: str,
    tool_results: Sequence[ToolResult],
) -> str:
    """The key of the state after a turn with these parts, taken from the state keyed
    `parent`: what the runner stores as `Turn.state_key` (computed before the record is
    built, so the record is built once)."""
    data = f"{parent}\x1e{step_text(tool_calls, answer, text, tool_results)}"
    return blake2b(data.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def chain_key(parent: str, turn: Turn) -> str:
    """The key of the state after `turn` taken from the state keyed `parent`."""
    return step_key(parent, turn.tool_calls, turn.answer, turn.text, turn.tool_results)
