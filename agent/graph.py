"""Trajectory graphs: the episodes of one task group merged into a DAG of shared states.

A state is the history of (action, observation) pairs since the task began; two turns of a
group start from the same state when everything before them was the same. `state_keys` gives
every turn the key of the state it starts from (turn 0: the group's root), built by chaining a
hash of each turn's normalised action and its observation onto the previous key, so equal
histories get equal keys without comparing whole histories.

Normalisation: an action is its tool calls as (name, arguments as canonical JSON) — or, for a
call that did not parse, its raw argument text — plus its answer with whitespace collapsed
and case folded; a turn with neither is keyed by its completion text with whitespace
collapsed. The observation is the tool results' texts and error kinds (what the agent read).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from turnrl.agent.records import Episode, Turn

ROOT = "root"


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def action_key(turn: Turn) -> str:
    """The normalised action of a turn (see the module docstring)."""
    parts = []
    for call in turn.tool_calls:
        if call.parse_error is None and call.name is not None:
            args = json.dumps(call.arguments or {}, sort_keys=True, ensure_ascii=False)
            parts.append(f"call:{call.name}:{args}")
        else:
            parts.append(f"bad:{_norm(call.raw)}")
    if turn.answer is not None:
        parts.append(f"answer:{_norm(turn.answer)}")
    if not parts:
        parts.append(f"text:{_norm(turn.text)}")
    return "\x1f".join(parts)


def observation_key(turn: Turn) -> str:
    """What the environment showed after the turn."""
    return "\x1f".join(f"{r.error or ''}:{r.text}" for r in turn.tool_results)


def _chain(parent: str, turn: Turn) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(parent.encode())
    h.update(b"\x1e")
    h.update(action_key(turn).encode())
    h.update(b"\x1e")
    h.update(observation_key(turn).encode())
    return h.hexdigest()


def state_keys(episode: Episode) -> list[str]:
    """Key of the state each turn starts from; `[ROOT, k1, k2, ...]` (one per turn)."""
    keys = [ROOT]
    for turn in episode.turns[:-1]:
        keys.append(_chain(keys[-1], turn))
    return keys[: len(episode.turns)]


def after_keys(episode: Episode) -> list[str]:
    """Key of the state after each turn (its action and observation)."""
    out = []
    parent = ROOT
    for turn in episode.turns:
        parent = _chain(parent, turn)
        out.append(parent)
    return out


def group_state_keys(episodes: Sequence[Episode]) -> list[list[str]]:
    """`state_keys` of each episode (keys are only comparable within one task group)."""
    return [state_keys(e) for e in episodes]
