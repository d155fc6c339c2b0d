"""Embodied search: fetch the object a user means in a generated house, by exploring or by
asking (text-only, after ESearch-R1, arXiv:2508.12015: exploring costs time, asking costs the
user's attention).

Items. Each item is one world of `embodied_world` (read its docstring for the house, the
ambiguous request and the knobs), regenerated from `meta["seed"]` and `meta["knobs"]` whenever
it is needed, so an item is a few numbers. Item `i` of a split uses world seed
`(seed << 32) + 2 * i` for train and `+ 1` for test: the splits never share a seed. A knob
given as a tuple is drawn per item, from a generator seeded by the item's world seed. Ids name
the knobs and the world seed (`embodied:r4d2a1h1:8589934594`).

Tools. `tools_for(item)` gives one `EmbodiedToolkit` (navigate, look, get_memory, ask, pick)
whose session is the episode's state; `tools()` lists none. `ask` is answered by an oracle that
knows the target's facts and answers only what was asked (`turnrl.tools.ask`).

Grading. Picking is the act: `grade_episode` reads the episode's last successful `pick` (its
result names the object in `ToolResult.items`) and scores `correct` 1 when it is the target;
the answer does not matter there (`answer_correct` reports it). `grade(item, answer)`, which
has no episode, is the fallback: `correct` when the object ids written in the answer (`mug-2`)
are exactly the target's.

Scripts (each a list of completions, one tool call per completion, then the answer):
- `oracle_turns`: the shortest solution — walk to the target's room, look, pick, answer —
  preceded by one question about the hidden attributes only when no hint lets exploring
  tell the candidates apart (`World.needs_ask`).
- `explore_turns`: no questions — walk to every room and look, recall the hint's landmark (or
  the named description) from memory, walk back to the target's room, pick. Without a hint
  on an ambiguous item it picks the first candidate it saw: a guess.
- `ask_turns`: ask first — one question for the room and the hidden attributes, then walk
  there, look, pick.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from turnrl.agent.model_config import EmbeddedModel, ExpertConfig, WeightsConfig
from turnrl.agent.records import Episode
from turnrl.agent.tool_formats import Hermes, ToolFormat, write_call
from turnrl.tasks.base import BaseSuite, Split, TaskItem
from turnrl.tasks.embodied_tools import DEFAULT_COSTS, Costs, EmbodiedToolkit, Generate
from turnrl.tasks.embodied_world import Knobs, Thing, World, generate
from turnrl.tasks.suite_config import BuildContext, SuiteConfig
from turnrl.tools.base import AnyTool

SPLIT_SHIFT = 32
"""Bits of a world seed that index an item within its split (times two, plus the split)."""

SYSTEM_PROMPT = """\
You are a household robot. The user asks you to fetch an object. Walk between rooms with \
`navigate`, see what is in the room you are in with `look`, recall what you saw earlier with \
`get_memory`, and take the object with `pick`, by the id `look` shows (e.g. mug-2). The house \
may hold several objects that fit the request: find out which one the user means by looking \
around, or ask them with `ask`, which costs their attention. Walking to a room takes \
{move_s:g} s and looking {look_s:g} s. Call one tool at a time, e.g. {example}. Once you hold \
the object, answer with its id, e.g. <answer>mug-2</answer>."""
"""The system prompt, to `format` with the costs and an `example` call (`EmbodiedSearch`)."""

_ID = re.compile(r"\b[a-z]+-[0-9]+\b")

Knob = int | tuple[int, ...]


@functools.lru_cache(maxsize=4096)
def _world(seed: int, knobs: Knobs) -> World:
    return generate(seed, knobs)


def world_of(item: TaskItem) -> World:
    """The item's world, regenerated from its meta (cached)."""
    return _world(int(item.meta["seed"]), Knobs(**item.meta["knobs"]))


def _call(name: str, **arguments: str) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def _answer(thing_id: str) -> str:
    return f"<answer>{thing_id}</answer>"


def _fetch(thing: Thing) -> list[str]:
    """Walk to `thing`'s room, look, pick it, answer its id."""
    return [
        _call("navigate", room=thing.room),
        _call("look"),
        _call("pick", object=thing.id),
        _answer(thing.id),
    ]


def oracle_turns(world: World) -> list[str]:
    """The shortest solution (see the module docstring)."""
    turns = []
    if world.needs_ask:
        question = f"What {' and '.join(world.hidden)} is the {world.description(world.named)}?"
        turns.append(_call("ask", question=question))
    return turns + _fetch(world.target_thing)


def explore_turns(world: World) -> list[str]:
    """Look everywhere, never ask (see the module docstring)."""
    turns = []
    for room in world.rooms:
        turns += [_call("navigate", room=room), _call("look")]
    query = world.hint or world.description(world.named)
    turns.append(_call("get_memory", query=query))
    chosen = world.target_thing
    if world.needs_ask:
        candidates = {x.id for x in world.candidates()}
        chosen = next(
            x
            for room in world.rooms
            for c in world.containers[room]
            for x in world.contents(room, c)
            if x.id in candidates
        )
    if chosen.room != world.rooms[-1]:
        turns.append(_call("navigate", room=chosen.room))
    return [*turns, _call("pick", object=chosen.id), _answer(chosen.id)]


def ask_turns(world: World) -> list[str]:
    """Ask for the room and the hidden attributes first (see the module docstring)."""
    question = f"Which room is the {world.description(world.named)} in"
    if world.hidden:
        question += f", and what is its {' and '.join(world.hidden)}"
    return [_call("ask", question=question + "?"), *_fetch(world.target_thing)]


def world_seed(seed: int, split: Split, index: int) -> int:
    """The world seed of item `index` of `split` (see the module docstring)."""
    return (seed << SPLIT_SHIFT) + 2 * index + (split == "test")


def _pick(rng: random.Random, knob: Knob) -> int:
    return knob if isinstance(knob, int) else rng.choice(knob)


def make_item(seed: int, split: Split, index: int, knobs: dict[str, Any]) -> TaskItem:
    """Item `index` of `split`; `knobs` holds `Knobs` fields, `rooms`, `distractors` and
    `ambiguity` possibly as tuples to draw from."""
    ws = world_seed(seed, split, index)
    rng = random.Random(f"knobs:{ws}")
    chosen = Knobs(
        rooms=_pick(rng, knobs["rooms"]),
        distractors=_pick(rng, knobs["distractors"]),
        ambiguity=_pick(rng, knobs["ambiguity"]),
        hint_rate=float(knobs["hint_rate"]),
    )
    world = _world(ws, chosen)
    target = world.target_thing
    tag = f"r{chosen.rooms}d{chosen.distractors}a{chosen.ambiguity}h{chosen.hint_rate:g}"
    return TaskItem(
        id=f"embodied:{tag}:{ws}",
        question=world.instruction,
        answers=(world.target,),
        meta={
            "seed": ws,
            "knobs": asdict(chosen),
            "split": split,
            "kind": target.kind,
            "room": target.room,
            "hidden": list(world.hidden),
            "hint": world.hint,
            "candidates": len(world.candidates()),
            "needs_ask": world.needs_ask,
        },
    )


class EmbodiedSearch(BaseSuite):
    """The embodied search suite (see the module docstring)."""

    name = "embodied_search"
    source = "generated"
    license = "Apache-2.0"

    def __init__(
        self,
        n_train: int = 400,
        n_test: int = 100,
        seed: int = 0,
        rooms: Knob = 4,
        distractors: Knob = 2,
        ambiguity: Knob = 1,
        hint_rate: float = 1.0,
        costs: Costs = DEFAULT_COSTS,
        expert: Generate | None = None,
        tool_format: ToolFormat | None = None,
    ) -> None:
        """A knob given as a tuple is drawn per item. `hint_rate` below 1 adds ambiguous
        items that exploring cannot resolve (only asking can). `tool_format` writes the
        prompt's example call (default hermes)."""
        if seed < 0 or n_train < 0 or n_test < 0:
            raise ValueError("embodied_search: seed, n_train and n_test must be >= 0")
        if max(n_train, n_test) > 2 ** (SPLIT_SHIFT - 1):
            raise ValueError("embodied_search: too many items for the seed layout")
        for knob in (rooms, distractors, ambiguity):
            if isinstance(knob, tuple) and not knob:
                raise ValueError("embodied_search: a knob tuple needs at least one value")
        knobs = {
            "rooms": rooms,
            "distractors": distractors,
            "ambiguity": ambiguity,
            "hint_rate": hint_rate,
        }
        self.costs = costs
        self._example = write_call(tool_format or Hermes(), "navigate", {"room": "kitchen"})
        self.expert = expert
        """Another model answering `ask` (shown the target's facts) instead of the oracle."""
        self._splits: dict[Split, list[TaskItem]] = {
            "train": [make_item(seed, "train", i, knobs) for i in range(n_train)],
            "test": [make_item(seed, "test", i, knobs) for i in range(n_test)],
        }

    @property
    def system_prompt(self) -> str:
        return SYSTEM_PROMPT.format(
            move_s=self.costs.move_s, look_s=self.costs.look_s, example=self._example
        )

    def items(self, split: Split) -> Sequence[TaskItem]:
        return self._splits[split]

    def tools(self) -> Sequence[AnyTool]:
        """None: the tools are per item (`tools_for`)."""
        return []

    def tools_for(self, item: TaskItem) -> Sequence[EmbodiedToolkit]:
        return [EmbodiedToolkit(world_of(item), self.costs, self.expert)]

    def few_shot(self) -> Sequence[tuple[str, str]]:
        """None: a worked episode would show a route through a house the model never sees."""
        return []

    def oracle_turns(self, item: TaskItem) -> list[str]:
        return oracle_turns(world_of(item))

    def explore_turns(self, item: TaskItem) -> list[str]:
        return explore_turns(world_of(item))

    def ask_turns(self, item: TaskItem) -> list[str]:
        return ask_turns(world_of(item))

    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        """The fallback without an episode: the answer names exactly the target's id."""
        ids = set(_ID.findall((answer or "").lower()))
        return {"correct": float(ids == {item.answers[0]})}

    async def grade_episode(self, item: TaskItem, episode: Episode) -> dict[str, float]:
        """`correct`: the last successful pick is the target; `picked`: something was picked;
        `answer_correct`: `grade` of the final answer; `asked`: a question was answered."""
        last: str | None = None
        asked = False
        for turn in episode.turns:
            for call, result in zip(turn.tool_calls, turn.tool_results, strict=False):
                if result.error is not None:
                    continue
                if call.name == "pick" and result.items:
                    last = result.items[0]
                asked = asked or call.name == "ask"
        answer = await self.grade(item, episode.answer)
        return {
            "correct": float(last == item.answers[0]),
            "picked": float(last is not None),
            "answer_correct": answer["correct"],
            "asked": float(asked),
        }


class EmbodiedCosts(BaseModel):
    """Simulated prices of the embodied suite's actions: seconds of robot time, units of a
    person's attention (they are the cost vector, not the Python call's wall time)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    move_s: float = Field(10.0, ge=0)
    look_s: float = Field(4.0, ge=0)
    pick_s: float = Field(2.0, ge=0)
    memory_s: float = Field(0.0, ge=0)
    ask_attention: float = Field(1.0, ge=0)
    """`human_attention` of one question."""
    ask_per_word: float = Field(0.0, ge=0)
    """Extra `human_attention` per word of a question."""
    max_questions: int | None = Field(None, ge=0)
    """Questions allowed per episode (null: no limit)."""


class AskConfig(BaseModel):
    """Who answers `ask`: an oracle that knows the target's facts and answers only what was
    asked, or another model shown the same facts (HILA's defer-to-expert)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    answered_by: Literal["oracle", "model"] = "oracle"
    model: WeightsConfig = Field(default_factory=EmbeddedModel)
    """The expert model when `answered_by: model` (greedy)."""
    max_new_tokens: int = Field(48, ge=1)
    """Length limit of an expert's answer."""


class EmbodiedConfig(SuiteConfig):
    """Find and pick the object an ambiguous instruction means, in a generated house, by
    exploring (time) or asking (human attention)."""

    metrics: ClassVar[tuple[str, ...]] = ("correct", "picked", "answer_correct", "asked")
    answer_in_observations: ClassVar[bool] = True

    kind: Literal["embodied_search"] = "embodied_search"
    seed: int = 0
    """Seed of house and instruction generation (and so of the split)."""
    n_train: int = Field(400, ge=0)
    """Train items generated."""
    n_test: int = Field(100, ge=0)
    """Test items generated (disjoint from train)."""
    rooms: int = Field(4, ge=2)
    """Rooms per house."""
    distractors: int = Field(2, ge=0)
    """Objects of the target's type besides the target."""
    ambiguity: int = Field(1, ge=0)
    """Attributes that tell the target apart left out of the instruction (0: unambiguous)."""
    hint_rate: float = Field(1.0, ge=0.0, le=1.0)
    """Share of ambiguous instructions with a hint that exploring resolves (below 1, some
    tasks can be solved only by asking)."""
    ask: AskConfig = Field(default_factory=lambda: AskConfig())
    """Who answers the agent's questions."""
    costs: EmbodiedCosts = Field(default_factory=lambda: EmbodiedCosts())
    """Simulated prices of the actions."""

    def expert(self) -> ExpertConfig | None:
        if self.ask.answered_by != "model":
            return None
        return ExpertConfig(model=self.ask.model, max_new_tokens=self.ask.max_new_tokens)

    def build(self, ctx: BuildContext) -> EmbodiedSearch:
        return EmbodiedSearch(
            n_train=self.n_train,
            n_test=self.n_test,
            seed=self.seed,
            rooms=self.rooms,
            distractors=self.distractors,
            ambiguity=self.ambiguity,
            hint_rate=self.hint_rate,
            costs=Costs(**self.costs.model_dump()),
            expert=ctx.expert if self.ask.answered_by == "model" else None,
            tool_format=ctx.tool_format,
        )
