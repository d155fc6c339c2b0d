"""The house of the embodied search suite: a seeded generator of houses and ambiguous fetch
requests (the toolkit that walks through one is `embodied_tools`).

A house has `rooms` rooms (drawn from `ROOMS`) off a hallway, where the agent starts. Each room
has two or three containers (a cupboard, a shelf...), and containers hold objects: *portable*
objects with three visible attributes (size, colour, material: "a small blue ceramic mug"),
numbered per kind in a shuffled order (`mug-2`), and *landmarks* (a kettle, a globe), each kind
at most once per house, shown by name. Any room can be reached from any other in one move.

The request names the target's kind and all but `ambiguity` of its three attributes; the
hidden ones (drawn at random) are what the user has in mind. The target is the only object of
its kind with its three attributes; with `ambiguity > 0` the first of the `distractors`
(same-kind objects) shares every *named* attribute, and each other one is drawn to share them
with probability 1/2, so the request fits several objects. With probability `hint_rate` an
ambiguous request adds a hint that exploring resolves: "the one I left next to the kettle",
where "next to" means in the same container (the target's container always holds one landmark
and never another object of its kind). Without a hint, looking cannot tell the candidates
apart: only asking can (`World.needs_ask`). Filler objects of other kinds (zero to two a room)
make looking noisier. `ask` is answered from the target's facts (`World.facts`: colour,
material, size, room, container, neighbour), never its id.

Generation draws everything from `random.Random(seed)`, so a (seed, knobs) pair always gives
the same house and request; the suite stores both in the item's `meta`.

"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


def _names(text: str) -> tuple[str, ...]:
    """The comma-separated names in `text`."""
    return tuple(name.strip() for name in text.split(","))


START = "hallway"
"""Where the agent starts; it holds nothing and is not one of the house's `rooms`."""

ROOMS: dict[str, tuple[str, ...]] = {
    "kitchen": ("cupboard", "drawer", "counter", "pantry shelf"),
    "living room": ("bookshelf", "coffee table", "cabinet", "sofa"),
    "bedroom": ("wardrobe", "nightstand", "dresser", "bed"),
    "study": ("desk", "bookcase", "filing cabinet", "drawer"),
    "bathroom": ("medicine cabinet", "shelf", "hamper"),
    "garage": ("workbench", "tool chest", "shelf", "crate"),
    "dining room": ("sideboard", "table", "cabinet"),
    "laundry room": ("basket", "shelf", "cupboard"),
    "attic": ("trunk", "crate", "shelf"),
    "nursery": ("toy chest", "changing table", "shelf"),
    "guest room": ("wardrobe", "nightstand", "desk"),
    "porch": ("bench", "shoe rack", "basket"),
}
"""Room -> the containers it may have."""

SURFACES = frozenset(
    _names(
        "counter, pantry shelf, bookshelf, coffee table, sofa, nightstand, dresser, bed, desk, "
        "bookcase, shelf, workbench, sideboard, table, changing table, bench, shoe rack"
    )
)
"""Containers things lie *on* (the others hold them *in*)."""

MATERIALS: dict[str, tuple[str, ...]] = {
    "mug": ("ceramic", "glass", "metal", "plastic"),
    "cup": ("ceramic", "glass", "plastic", "paper"),
    "bottle": ("glass", "plastic", "metal"),
    "bowl": ("ceramic", "glass", "wooden", "plastic"),
    "plate": ("ceramic", "glass", "plastic", "wooden"),
    "vase": ("ceramic", "glass", "metal"),
    "notebook": ("paper", "leather"),
    "pen": ("plastic", "metal", "wooden"),
    "scarf": ("wool", "cotton", "silk"),
    "hat": ("wool", "cotton", "straw", "felt"),
    "bag": ("leather", "canvas", "plastic"),
    "towel": ("cotton", "linen"),
    "spoon": ("metal", "wooden", "plastic"),
    "glove": ("leather", "wool", "cotton"),
    "brush": ("wooden", "plastic"),
}
"""Portable kind -> its possible materials (each has at least two, so any attribute can be
the one that tells objects apart)."""

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "grey", "orange", "purple", "pink")
SIZES = ("small", "medium", "large")
ATTRIBUTES = ("size", "colour", "material")
"""The visible attributes, in the order a description names them."""

LANDMARKS = _names(
    "kettle, toaster, radio, clock, potted plant, lamp, globe, candle, teapot, laptop, stapler, "
    "mirror, fan, speaker, chess set, sewing kit, flashlight, calculator, piggy bank, metronome, "
    "hourglass, typewriter"
)
"""Singleton objects a hint can refer to; none shares a word with a room, container, kind or
attribute value, so a word in a question or memory query points at one thing."""

REQUESTS = (
    "Please bring me the {desc}.",
    "Could you fetch the {desc}?",
    "I need the {desc}, can you get it?",
    "Go and find the {desc} for me.",
)
HINTS = (
    " It's the one I left next to the {landmark}.",
    " I mean the one next to the {landmark}.",
)


@dataclass(frozen=True)
class Knobs:
    """The difficulty of one generated task."""

    rooms: int = 4
    """Rooms besides the hallway (1 to `len(ROOMS)`)."""
    distractors: int = 2
    """Other objects of the target's kind."""
    ambiguity: int = 1
    """How many of the target's three attributes the request leaves out (0: unambiguous)."""
    hint_rate: float = 1.0
    """Probability that an ambiguous request hints at the target's landmark."""

    def __post_init__(self) -> None:
        if not 1 <= self.rooms <= len(ROOMS):
            raise ValueError(f"embodied: rooms must be in 1..{len(ROOMS)}, got {self.rooms}")
        if self.distractors < 0:
            raise ValueError("embodied: distractors must be >= 0")
        if not 0 <= self.ambiguity <= len(ATTRIBUTES):
            raise ValueError(f"embodied: ambiguity must be in 0..{len(ATTRIBUTES)}")
        if not 0.0 <= self.hint_rate <= 1.0:
            raise ValueError("embodied: hint_rate must be in [0, 1]")


@dataclass(frozen=True)
class Thing:
    """An object in the house."""

    id: str
    """What `pick` takes: `mug-2` for a portable object, the name for a landmark."""
    kind: str
    room: str
    container: str
    attrs: tuple[tuple[str, str], ...] = ()
    """(attribute, value) in `ATTRIBUTES` order; empty for a landmark."""

    def attr(self, name: str) -> str:
        return dict(self.attrs)[name]

    @property
    def name(self) -> str:
        """ "small blue ceramic mug", or a landmark's kind."""
        return " ".join([*(v for _, v in self.attrs), self.kind])

    @property
    def shown(self) -> str:
        """How `look` shows it: with the id when that differs from the name."""
        article = "an" if self.name[0] in "aeiou" or self.name.startswith("hour") else "a"
        shown = f"{article} {self.name}"
        return shown if self.id == self.name else f"{shown} ({self.id})"


@dataclass(frozen=True)
class World:
    """One generated task: the house, the target and the request."""

    seed: int
    knobs: Knobs
    rooms: tuple[str, ...]
    """The house's rooms in the order the request lists them (the hallway not included)."""
    containers: Mapping[str, tuple[str, ...]]
    """Room -> its containers, in the order `look` lists them."""
    things: tuple[Thing, ...]
    target: str
    """The id of the object the user wants."""
    hidden: tuple[str, ...]
    """The attributes the request leaves out."""
    hint: str | None
    """The landmark the request says the target is next to, if any."""
    instruction: str
    by_id: Mapping[str, Thing] = field(repr=False)

    @property
    def target_thing(self) -> Thing:
        return self.by_id[self.target]

    @property
    def named(self) -> tuple[str, ...]:
        return tuple(a for a in ATTRIBUTES if a not in self.hidden)

    def candidates(self) -> list[Thing]:
        """Objects of the target's kind that fit every attribute the request names."""
        t = self.target_thing
        return [
            x
            for x in self.things
            if x.kind == t.kind and all(x.attr(a) == t.attr(a) for a in self.named)
        ]

    @property
    def needs_ask(self) -> bool:
        """True when only asking tells the target apart: several candidates and no hint."""
        return self.hint is None and len(self.candidates()) > 1

    def description(self, attributes: Sequence[str]) -> str:
        """The target's kind with the given attributes ("blue mug")."""
        t = self.target_thing
        return " ".join([*(t.attr(a) for a in ATTRIBUTES if a in attributes), t.kind])

    def facts(self) -> dict[str, str]:
        """What the user knows about the target, for the oracle responder (no id)."""
        t = self.target_thing
        out = {a: t.attr(a) for a in ("colour", "material", "size")}
        out["room"] = t.room
        out["container"] = t.container
        out["neighbour"] = ", ".join(
            x.name for x in self.contents(t.room, t.container) if not x.attrs
        )
        return out

    def contents(self, room: str, container: str) -> list[Thing]:
        return [x for x in self.things if x.room == room and x.container == container]


# --- generation ----------------------------------------------------------------------------


def _attrs(rng: random.Random, kind: str) -> dict[str, str]:
    return {
        "size": rng.choice(SIZES),
        "colour": rng.choice(COLOURS),
        "material": rng.choice(MATERIALS[kind]),
    }


def _confuser(
    rng: random.Random, kind: str, target: dict[str, str], hidden: Sequence[str]
) -> dict[str, str]:
    """Attributes equal to the target's on every named attribute, different on a hidden one."""
    while True:
        fresh = _attrs(rng, kind)
        attrs = {a: fresh[a] if a in hidden else target[a] for a in ATTRIBUTES}
        if attrs != target:
            return attrs


def _other(rng: random.Random, kind: str, target: dict[str, str]) -> dict[str, str]:
    while True:
        attrs = _attrs(rng, kind)
        if attrs != target:
            return attrs


def generate(seed: int, knobs: Knobs) -> World:
    """The task for `seed` under `knobs` (see the module docstring); deterministic."""
    rng = random.Random(seed)
    rooms = tuple(rng.sample(sorted(ROOMS), knobs.rooms))
    containers = {r: tuple(rng.sample(ROOMS[r], rng.randint(2, 3))) for r in rooms}
    places = [(r, c) for r in rooms for c in containers[r]]
    kind = rng.choice(sorted(MATERIALS))
    target = _attrs(rng, kind)
    drawn = rng.sample(ATTRIBUTES, knobs.ambiguity)
    hidden = tuple(a for a in ATTRIBUTES if a in drawn)
    hinted = knobs.ambiguity > 0 and rng.random() < knobs.hint_rate
    home = rng.choice(places)

    # (kind, room, container, attrs), ids assigned once all are placed.
    placed: list[tuple[str, str, str, dict[str, str]]] = [(kind, *home, target)]
    elsewhere = [p for p in places if p != home]
    for j in range(knobs.distractors):
        confuse = knobs.ambiguity > 0 and (j == 0 or rng.random() < 0.5)
        attrs = _confuser(rng, kind, target, hidden) if confuse else _other(rng, kind, target)
        placed.append((kind, *rng.choice(elsewhere), attrs))
    others = [k for k in sorted(MATERIALS) if k != kind]
    for r in rooms:
        for _ in range(rng.randint(0, 2)):
            k = rng.choice(others)
            placed.append((k, r, rng.choice(containers[r]), _attrs(rng, k)))

    landmarks = list(LANDMARKS)
    rng.shuffle(landmarks)
    marks = {home: landmarks.pop()}
    for p in elsewhere:
        if landmarks and rng.random() < 0.4:
            marks[p] = landmarks.pop()

    numbers: dict[str, list[int]] = {}
    for k in sorted({k for k, *_ in placed}):  # sorted: set order varies with the hash seed
        n = [i + 1 for i in range(sum(1 for x in placed if x[0] == k))]
        rng.shuffle(n)
        numbers[k] = n
    things = [
        Thing(
            id=f"{k}-{numbers[k].pop()}",
            kind=k,
            room=r,
            container=c,
            attrs=tuple((a, attrs[a]) for a in ATTRIBUTES),
        )
        for k, r, c, attrs in placed
    ]
    target_id = things[0].id
    things += [Thing(id=name, kind=name, room=r, container=c) for (r, c), name in marks.items()]
    rng.shuffle(things)

    by_id = {t.id: t for t in things}
    desc = " ".join([*(target[a] for a in ATTRIBUTES if a not in hidden), kind])
    request = rng.choice(REQUESTS).format(desc=desc)
    if hinted:
        request += rng.choice(HINTS).format(landmark=marks[home])
    instruction = (
        f"You are in the {START} of a house with these rooms: {', '.join(rooms)}. {request} "
        "Pick it up, then answer with its id."
    )
    return World(
        seed=seed,
        knobs=knobs,
        rooms=rooms,
        containers=containers,
        things=tuple(things),
        target=target_id,
        hidden=hidden,
        hint=marks[home] if hinted else None,
        instruction=instruction,
        by_id=by_id,
    )


# --- the toolkit ---------------------------------------------------------------------------
