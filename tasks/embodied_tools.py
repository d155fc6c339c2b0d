"""The per-episode toolkit of the embodied search suite: `navigate`, `look`, `get_memory`,
`ask` and `pick` over one generated house (`embodied_world`).

The toolkit's simulated time is its cost (`extra_cost["time_s"]`, fixed per action by `Costs`),
not the wall time of the Python call, so that cost trade-offs are reproducible. A refused call
(unknown room, object not here, empty question) raises `ToolError`: the runner shows the
message, charges only the spec's fixed cost (one call, and for `ask` its attention) and the
world does not change. `ask` is answered by an oracle that knows the target's facts, or by
another model shown the same facts (`ask_tool`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from turnrl.tasks.embodied_world import (
    COLOURS,
    LANDMARKS,
    MATERIALS,
    ROOMS,
    SIZES,
    START,
    SURFACES,
    Thing,
    World,
)
from turnrl.tools.ask import (
    AskSession,
    AskTool,
    ExpertResponder,
    OracleResponder,
    Responder,
    words,
)
from turnrl.tools.base import CostModel, ToolError, ToolOutput, ToolSpec


@dataclass(frozen=True)
class Costs:
    """Simulated prices of the actions (seconds of robot time, units of human attention)."""

    move_s: float = 10.0
    """Walking to another room."""
    look_s: float = 4.0
    """Looking over a room's containers."""
    pick_s: float = 2.0
    memory_s: float = 0.0
    """Recalling earlier observations: free in time, only a call."""
    ask_attention: float = 1.0
    """`human_attention` of one question."""
    ask_per_word: float = 0.0
    """Extra `human_attention` per word of a question."""
    max_questions: int | None = None
    """Questions allowed per episode (None: no limit)."""


DEFAULT_COSTS = Costs()


class NavigateArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    room: str = Field(description="The room to go to, e.g. kitchen.")


class LookArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MemoryArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(description="Words to look for in what you saw, e.g. red mug.")


class PickArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    object: str = Field(description="The object's id as look shows it, e.g. mug-2.")


_STOP = frozenset(
    words(
        "a an the my i me is are was were where what which did do you see saw seen of in on at it "
        "its to for one"
    )
)
_ARTICLE = ("the ", "a ", "an ")


def _stems(text: str) -> set[str]:
    """Words of `text` with a plural `s` dropped, for forgiving memory matches."""
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words(text)}


def _clean(text: str) -> str:
    text = " ".join(text.lower().split())
    for article in _ARTICLE:
        if text.startswith(article):
            return text[len(article) :]
    return text


def _where(container: str) -> str:
    return f"{'On' if container in SURFACES else 'In'} the {container}"


EXPERT_PROMPT = """\
You asked a helper to fetch something from your house: {instruction}
What you have in mind: {facts}.
The helper asks you a question. Answer it in one short sentence, telling only what it asks."""
"""The expert's view of the task: the asker's request and the target's facts (the oracle's)."""

Generate = Callable[[str], Awaitable[str]]


def ask_tool(world: World, costs: Costs, expert: Generate | None = None) -> AskTool:
    """`ask`, answered by an oracle that knows the target's facts (`World.facts`), or, given
    `expert` (another model's generate), by that model shown the same facts."""
    responder: Responder
    if expert is not None:
        facts = "; ".join(f"{k}: {v}" for k, v in world.facts().items())
        head = EXPERT_PROMPT.format(instruction=world.instruction, facts=facts)
        # The responder fills in {question}: the head's own braces must stay literal.
        prompt = head.replace("{", "{{").replace("}", "}}") + "\n\nQuestion: {question}"
        return _ask(ExpertResponder(expert, prompt=prompt), costs)
    responder = OracleResponder(
        world.facts(),
        aliases={
            "colour": ("color", "colours", "colors", "coloured", "colored", "shade"),
            "material": ("made", "materials"),
            "size": ("big", "sizes", "how large"),
            "room": ("rooms",),
            "container": ("containers", "furniture", "inside"),
            "neighbour": ("next to", "near", "beside", "nearby", "neighbours"),
        },
        values={
            "colour": COLOURS,
            "material": sorted({m for ms in MATERIALS.values() for m in ms}),
            "size": SIZES,
            "room": sorted(ROOMS),
            "container": sorted({c for cs in ROOMS.values() for c in cs}),
            "neighbour": LANDMARKS,
        },
        locations=("room", "container"),
    )
    return _ask(responder, costs)


def _ask(responder: Responder, costs: Costs) -> AskTool:
    return AskTool(
        responder,
        cost=CostModel(per_call={"calls": 1.0, "human_attention": costs.ask_attention}),
        per_word=costs.ask_per_word,
        max_questions=costs.max_questions,
        description=(
            "Ask the user about the object they want (its colour, material, size, room...). "
            "Costs their attention: ask only what you cannot find out yourself."
        ),
    )


class EmbodiedToolkit:
    """navigate / look / get_memory / ask / pick over one world, sharing one episode state."""

    def __init__(
        self, world: World, costs: Costs = DEFAULT_COSTS, expert: Generate | None = None
    ) -> None:
        """`expert` answers `ask` instead of the oracle (see `ask_tool`)."""
        self.world = world
        self.costs = costs
        self.ask = ask_tool(world, costs, expert)
        self._specs = (
            ToolSpec(
                name="navigate",
                description=f"Walk to a room of the house (takes {costs.move_s:g} s).",
                args_model=NavigateArgs,
            ),
            ToolSpec(
                name="look",
                description="List what is in each container of the room you are in "
                f"(takes {costs.look_s:g} s).",
                args_model=LookArgs,
            ),
            ToolSpec(
                name="get_memory",
                description="Recall what you saw earlier that matches some words (instant).",
                args_model=MemoryArgs,
            ),
            self.ask.spec,
            ToolSpec(
                name="pick",
                description="Pick up an object in your room; you hold one object at a time.",
                args_model=PickArgs,
            ),
        )
        self.by_name = {s.name: s for s in self._specs}

    @property
    def specs(self) -> Sequence[ToolSpec]:
        return self._specs

    def session(self) -> EmbodiedSession:
        return EmbodiedSession(self)


class EmbodiedSession:
    """One episode in the house: where the agent is, what it saw, what it holds."""

    def __init__(self, kit: EmbodiedToolkit) -> None:
        self._kit = kit
        self._world = kit.world
        self._ask: AskSession = kit.ask.session()
        self.location = START
        self.visited: list[str] = [START]
        """Rooms entered, in order, the start included."""
        self.memory: dict[tuple[str, str], str] = {}
        """(room, container) -> what the last look there showed (in the order first seen)."""
        self.held: str | None = None
        """The id of the object in the agent's hand."""

    async def call(self, name: str, args: Any) -> ToolOutput:
        """Run tool `name` with `args` as `ToolSpec.validate` returns them; a plain dict is
        validated here first (scripts and tests call the session directly)."""
        spec = self._kit.by_name.get(name)
        if spec is None:
            raise ToolError(f"unknown tool {name!r}; tools: {', '.join(self._kit.by_name)}")
        if isinstance(args, dict):
            args = spec.validate(args)
        if name == "ask":
            return await self._ask(args)
        if name == "navigate":
            return self.navigate(args.room)
        if name == "get_memory":
            return self.recall(args.query)
        if name == "pick":
            return self.pick(args.object)
        return self.look()

    async def aclose(self) -> None:
        await self._ask.aclose()

    def _time(self, seconds: float) -> dict[str, float]:
        return {"time_s": seconds} if seconds else {}

    def navigate(self, room: str) -> ToolOutput:
        wanted = _clean(room)
        if wanted not in (START, *self._world.rooms):
            known = ", ".join((START, *self._world.rooms))
            raise ToolError(f"There is no room called {room!r}. Rooms: {known}.")
        if wanted == self.location:
            return ToolOutput(f"You are already in the {wanted}.")
        self.location = wanted
        self.visited.append(wanted)
        return ToolOutput(
            f"You walk to the {wanted}.", extra_cost=self._time(self._kit.costs.move_s)
        )

    def _visible(self, room: str, container: str) -> list[Thing]:
        return [x for x in self._world.contents(room, container) if x.id != self.held]

    def look(self) -> ToolOutput:
        room = self.location
        cost = self._time(self._kit.costs.look_s)
        if room == START:
            rooms = ", ".join(self._world.rooms)
            return ToolOutput(
                f"You are in the {START}. From here you can go to: {rooms}.", extra_cost=cost
            )
        lines = [f"You are in the {room}."]
        shown: list[str] = []
        for container in self._world.containers[room]:
            things = self._visible(room, container)
            listed = ", ".join(x.shown for x in things) or "nothing"
            lines.append(f"{_where(container)}: {listed}.")
            self.memory[(room, container)] = (
                f"In the {room}, {_where(container).lower()}: {listed}."
            )
            shown += [x.id for x in things]
        return ToolOutput("\n".join(lines), extra_cost=cost, items=tuple(shown))

    def recall(self, query: str) -> ToolOutput:
        want = _stems(query) - _STOP
        if not want:
            raise ToolError("get_memory: give some words to look for, e.g. 'red mug'.")
        cost = self._time(self._kit.costs.memory_s)
        if not self.memory:
            return ToolOutput("You have not looked at anything yet.", extra_cost=cost)
        scored = [(len(want & _stems(line)), line) for line in self.memory.values()]
        best = max(score for score, _ in scored)
        if best == 0:
            return ToolOutput(f"Nothing you have seen matches {query!r}.", extra_cost=cost)
        lines = [line for score, line in scored if score == best]
        return ToolOutput("You remember:\n" + "\n".join(lines), extra_cost=cost)

    def pick(self, obj: str) -> ToolOutput:
        room = self.location
        here = [x for c in self._world.containers.get(room, ()) for x in self._visible(room, c)]
        wanted = _clean(obj)
        if wanted.endswith(")") and "(" in wanted:  # "small blue mug (mug-2)", as look shows it
            wanted = wanted[wanted.rindex("(") + 1 : -1].strip()
        held = self._world.by_id.get(self.held) if self.held else None
        if held is not None and wanted in (held.id, held.name):
            return ToolOutput(f"You already hold the {held.name}.", items=(held.id,))
        matches = [x for x in here if wanted == x.id] or [x for x in here if wanted == x.name]
        if not matches:
            listed = ", ".join(x.id for x in here) or "nothing"
            raise ToolError(f"There is no {obj!r} here in the {room}. Here: {listed}.")
        if len(matches) > 1:
            ids = ", ".join(x.id for x in matches)
            raise ToolError(f"Several objects here are called {obj!r} ({ids}); pick one by id.")
        (thing,) = matches
        text = f"You pick up the {thing.name} ({thing.id})."
        if held is not None:
            text = (
                f"You put the {held.name} ({held.id}) back where you found it and pick up "
                f"the {thing.name} ({thing.id})."
            )
        self.held = thing.id
        return ToolOutput(text, extra_cost=self._time(self._kit.costs.pick_s), items=(thing.id,))
