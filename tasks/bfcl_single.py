"""BFCL single-turn function calling: pick the right function(s) among those offered and call
them with the right arguments, or call none when none fits (Berkeley Function Calling
Leaderboard v4, Patil et al., bfcl-eval 2026.3.23; the Python categories only).

Items. One per line of the package's `data/BFCL_v4_<file>.json`, id = BFCL id, in the
categories asked for: `simple` (the `simple_python` file), `multiple`, `parallel`,
`parallel_multiple`, `irrelevance` and their `live_` versions (user-contributed requests).
Four items are left out because their shipped ground truth cannot pass bfcl-eval's own checker
(`UNSATISFIABLE`): bfcl-eval scores every model 0 on them. The question is the item's one user
message; a live item with more messages (an application's system prompt, earlier turns) has
them folded into the question text (`question_text`), because an episode has one system prompt
(this suite's) and one question.

Split. An item belongs to the test split when a SHA-256 hash of `(seed, group)` falls below
`test_fraction`. Groups (`split_groups`) join, transitively and across all categories, the
items that share a question text (183 questions recur: `multiple` reuses `simple` questions
with more functions, `live_irrelevance` repeats requests) or a live function set (the middle
number of `live_simple_3-2-1`: its items ask near-duplicate questions of the same functions),
so none of them straddles the split; an item's split does not depend on which categories are
chosen. Each split is ordered by a second hash of `(seed, id)`, so `n_train` / `n_test` keep a
uniform sample over the categories, and a larger cap only appends items.

Episodes. `tools_for` offers the item's functions (`turnrl.tools.bfcl_schema.function_spec`,
which keeps their names, dots included, so a call's name is compared with the doc's as is);
calling one runs nothing and only acknowledges it. As bfcl-eval grades a model's first response,
`grade_episode` reads the episode's first turn only: its calls must pass `bfcl_ast.check_calls`
(one unparsable or unterminated call makes the response invalid, where bfcl-eval's Qwen-style
decoder would drop it silently; so do calls written beside an answer, which the parser does not
run); an irrelevance item is correct when that turn neither makes a call nor attempts one
(`Turn.calls_not_run`: a call written beside an answer, which the parser does not run, still
counts as calling). Both read the parsed record, so they hold in every tool-call format. The
answer that ends the episode is not graded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Any, ClassVar, Literal, get_args

from pydantic import Field

from turnrl.agent.records import Episode, Turn
from turnrl.agent.tool_formats import Hermes, ToolFormat, write_call
from turnrl.tasks.base import BaseSuite, Split, TaskItem
from turnrl.tasks.bfcl_ast import check_calls
from turnrl.tasks.suite_config import BuildContext, SuiteConfig
from turnrl.tools.base import AnyTool, ToolOutput, ToolSpec
from turnrl.tools.bfcl_schema import function_spec

Category = Literal[
    "simple",
    "multiple",
    "parallel",
    "parallel_multiple",
    "irrelevance",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
    "live_irrelevance",
]
"""A BFCL single-turn category (the keys of `FILES`, in the same order)."""

FILES: dict[str, str] = {
    "simple": "simple_python",
    "multiple": "multiple",
    "parallel": "parallel",
    "parallel_multiple": "parallel_multiple",
    "irrelevance": "irrelevance",
    "live_simple": "live_simple",
    "live_multiple": "live_multiple",
    "live_parallel": "live_parallel",
    "live_parallel_multiple": "live_parallel_multiple",
    "live_irrelevance": "live_irrelevance",
}
"""Category -> BFCL data file stem (`BFCL_v4_<stem>.json`), which is also bfcl-eval's name of
the test category."""

CATEGORIES = tuple(FILES)

UNSATISFIABLE = frozenset(
    {
        "live_simple_106-63-0",  # required arrays whose accepted-value lists are empty
        "live_simple_112-68-0",  # (same)
        "live_multiple_862-181-3",  # ground truth passes `journey_start_time`, not in the doc
        "live_multiple_964-207-0",  # ground truth omits the required `statement`
    }
)
"""Items whose ground truth fails bfcl-eval's own AST check (the tests verify it): no response
can be right, so they are not offered."""

RECORDED = "ok (this task checks the call, nothing is executed)"
"""What every call observes."""

NO_CALL_ANSWER = "none of the functions applies"
DONE_ANSWER = "done"

SYSTEM_PROMPT = f"""\
You are given functions you can call. Read the request, then in ONE reply call the function or \
functions that carry it out, with the right arguments: one {{unit}} per call, several when \
the request needs several, e.g. {{example}}. \
The calls are checked, not executed: each only returns an acknowledgement. Write only the \
calls in that reply (an answer in the same reply cancels them); once the acknowledgements come \
back, reply <answer>{DONE_ANSWER}</answer>. If none of the functions fits the request, or the \
request lacks values a function requires, call nothing and answer at once, e.g. \
<answer>{NO_CALL_ANSWER}</answer>."""
"""The system prompt, to `format` with the tool format's `unit` (`ToolFormat.call_unit`) and
`example` call (`prompt_for`)."""


def prompt_for(fmt: ToolFormat) -> str:
    """The suite's system prompt with its example call written in `fmt`."""
    example = write_call(fmt, "get_weather", {"city": "Paris"})
    return SYSTEM_PROMPT.format(unit=fmt.call_unit, example=example)


def _load(stem: str, answers: bool) -> list[dict[str, Any]]:
    folder = resources.files("bfcl_eval").joinpath("data")
    if answers:
        folder = folder.joinpath("possible_answer")
    text = folder.joinpath(f"BFCL_v4_{stem}.json").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def question_text(messages: Sequence[Mapping[str, str]]) -> str:
    """One BFCL question (its list of chat messages) as one user message: a lone user message
    as it is; otherwise the system messages under "Instructions from the application:", the
    earlier turns under "Conversation so far:" (one `User:` / `Assistant:` line each), and the
    last message, which is always the user's, under "User request:"."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("bfcl: a question must end with a user message")
    if len(messages) == 1:
        return messages[0]["content"]
    system = [m["content"].strip() for m in messages if m["role"] == "system"]
    earlier = [m for m in messages[:-1] if m["role"] != "system"]
    parts = []
    if system:
        parts.append("Instructions from the application:\n" + "\n\n".join(system))
    if earlier:
        lines = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in earlier]
        parts.append("Conversation so far:\n" + "\n".join(lines))
    parts.append("User request:\n" + messages[-1]["content"])
    return "\n\n".join(parts)


def _unit(seed: int, key: str) -> float:
    """A uniform draw in [0, 1) fixed by `(seed, key)`."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _function_set(item: TaskItem) -> str | None:
    """The live function set an item draws on (the 2 of `live_simple_3-2-1`); None for others."""
    category = str(item.meta["category"])
    if not category.startswith("live_"):
        return None
    return f"{category}:{item.id.rsplit('_', 1)[1].split('-')[1]}"


def split_groups(items: Sequence[TaskItem]) -> dict[str, str]:
    """Item id -> its split group, named by the group's smallest id: items are joined,
    transitively, by the same question text or the same live function set."""
    parent = {it.id: it.id for it in items}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = x = parent[parent[x]]
        return x

    first: dict[str, str] = {}
    for it in items:
        function_set = _function_set(it)
        keys = [f"question:{it.question}"]
        keys += [] if function_set is None else [f"functions:{function_set}"]
        for key in keys:
            a, b = root(it.id), root(first.setdefault(key, it.id))
            parent[max(a, b)] = min(a, b)
    return {it.id: root(it.id) for it in items}


def _category_items(category: str) -> list[TaskItem]:
    stem = FILES[category]
    entries = _load(stem, answers=False)
    truths: list[Any] = (
        [None] * len(entries)
        if "irrelevance" in category
        else [a["ground_truth"] for a in _load(stem, answers=True)]
    )
    if len(truths) != len(entries):
        raise ValueError(f"bfcl: {stem} has {len(entries)} items, {len(truths)} answers")
    irrelevance = "irrelevance" in category
    items = []
    for entry, truth in zip(entries, truths, strict=True):
        if entry["id"] in UNSATISFIABLE:
            continue
        items.append(
            TaskItem(
                id=entry["id"],
                question=question_text(entry["question"][0]),
                answers=(NO_CALL_ANSWER if irrelevance else DONE_ANSWER,),
                meta={
                    "category": category,
                    "bfcl_category": stem,
                    "functions": entry["function"],
                    "ground_truth": truth,
                },
            )
        )
    return items


def contradictory(items: Sequence[TaskItem]) -> frozenset[str]:
    """Items shown the same request with the same functions where one expects no call
    (irrelevance) and another expects calls: BFCL ships a few such pairs; no policy can get
    both right, so neither is offered."""

    def prompt(it: TaskItem) -> str:
        return it.question + json.dumps(it.meta["functions"], sort_keys=True)

    wants_call: dict[str, set[bool]] = {}
    for it in items:
        wants_call.setdefault(prompt(it), set()).add("irrelevance" not in it.meta["category"])
    return frozenset(it.id for it in items if len(wants_call[prompt(it)]) > 1)


@cache
def load_items() -> tuple[TaskItem, ...]:
    """Every item of every category, in file order, with its split group in `meta["group"]`
    (read once per process; groups span categories, so they are found over all of them)."""
    items = [it for category in CATEGORIES for it in _category_items(category)]
    excluded = contradictory(items)
    items = [it for it in items if it.id not in excluded]
    groups = split_groups(items)
    return tuple(replace(it, meta={**it.meta, "group": groups[it.id]}) for it in items)


def _concrete(accepted: Sequence[Any]) -> Any:
    """The first accepted value that is not the optional mark "" ("" when there is none)."""
    return next((a for a in accepted if a != ""), "")


def _concrete_dict(answer: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    return {k: _concrete(v) for k, v in answer.items() if "" not in v}


def oracle_arguments(
    doc: Mapping[str, Any], accepted: Mapping[str, Sequence[Any]]
) -> dict[str, Any]:
    """The ground-truth call's arguments: each parameter's first accepted value, optional
    parameters that accept "" left out; inside an accepted dict (or list of dicts), the same
    rule per key."""
    properties = doc["parameters"]["properties"]
    required = set(doc["parameters"].get("required", []))
    args: dict[str, Any] = {}
    for param, values in accepted.items():
        if "" in values and param not in required:
            continue
        value = _concrete(values)
        kind = properties.get(param, {})
        if kind.get("type") == "dict" and isinstance(value, dict):
            value = _concrete_dict(value)
        elif kind.get("items", {}).get("type") == "dict" and isinstance(value, list):
            value = [_concrete_dict(v) if isinstance(v, dict) else v for v in value]
        args[param] = value
    return args


def _calls_not_run(turn: Turn) -> int:
    """The turn's call attempts that are not among its calls (`Turn.calls_not_run`). A record
    from before that field is read as the hermes parser's (the only format then): each
    `<tool_call>` tag beyond the parsed calls is one."""
    if turn.calls_not_run is not None:
        return turn.calls_not_run
    return max(0, turn.text.count("<tool_call>") - len(turn.tool_calls))


@dataclass(frozen=True, eq=False)
class CheckedFunction:
    """One BFCL function as a tool: a call is accepted and recorded, nothing runs. Hashed by
    identity (its spec holds a dict): the runner keys its tool index on an episode's tools."""

    spec: ToolSpec

    async def __call__(self, args: Any) -> ToolOutput:
        return ToolOutput(RECORDED)


class BfclSingle(BaseSuite):
    """BFCL v4 single-turn Python categories (see the module docstring)."""

    source = "bfcl-eval 2026.3.23 (BFCL v4)"
    license = "Apache-2.0"
    """As bfcl-eval's package metadata states it."""

    def __init__(
        self,
        categories: Sequence[str] = CATEGORIES,
        seed: int = 0,
        test_fraction: float = 0.5,
        n_train: int | None = None,
        n_test: int | None = None,
        tool_format: ToolFormat | None = None,
    ) -> None:
        """`n_train` / `n_test` cap a split (None keeps all of it); `tool_format` writes the
        prompt's example call (default hermes)."""
        unknown = sorted(set(categories) - set(FILES))
        if unknown:
            raise ValueError(f"bfcl: unknown categories {unknown}; known: {list(FILES)}")
        if not 0.0 <= test_fraction <= 1.0:
            raise ValueError("bfcl: test_fraction must be in [0, 1]")
        self._prompt = prompt_for(tool_format or Hermes())
        chosen = set(categories)
        splits: dict[Split, list[TaskItem]] = {"train": [], "test": []}
        for item in load_items():
            if item.meta["category"] in chosen:
                test = _unit(seed, "split:" + str(item.meta["group"])) < test_fraction
                splits["test" if test else "train"].append(item)
        self._tools: dict[str, tuple[CheckedFunction, ...]] = {}
        caps: dict[Split, int | None] = {"train": n_train, "test": n_test}
        self._splits: dict[Split, list[TaskItem]] = {}
        for split, items in splits.items():
            items.sort(key=lambda it: _unit(seed, "order:" + it.id))
            self._splits[split] = items[: caps[split]]

    @property
    def name(self) -> str:
        return "bfcl_single"

    @property
    def system_prompt(self) -> str:
        return self._prompt

    def items(self, split: Split) -> Sequence[TaskItem]:
        return self._splits[split]

    def tools(self) -> Sequence[AnyTool]:
        """None shared: every item brings its own functions (`tools_for`)."""
        return []

    def tools_for(self, item: TaskItem) -> Sequence[AnyTool]:
        """The item's functions, built once per item: the episodes of an item share one
        tuple of tools (the runner indexes each tuple once), and a spec's schema check costs
        milliseconds."""
        tools = self._tools.get(item.id)
        if tools is None:
            tools = tuple(CheckedFunction(function_spec(doc)) for doc in item.meta["functions"])
            self._tools[item.id] = tools
        return tools

    def few_shot(self) -> Sequence[tuple[str, str]]:
        """None: an example would call functions the item's system message does not list."""
        return []

    async def grade_episode(self, item: TaskItem, episode: Episode) -> dict[str, float]:
        """`correct` of the episode's first response (see the module docstring); an episode
        without turns is wrong."""
        if not episode.turns:
            return {"correct": 0.0}
        first = episode.turns[0]
        not_run = _calls_not_run(first)
        if "irrelevance" in item.meta["category"]:
            return {"correct": float(not first.tool_calls and not not_run)}
        if not_run:
            return {"correct": 0.0}  # a call left unterminated, or written beside an answer
        calls: list[tuple[str, Mapping[str, Any]]] = []
        for call in first.tool_calls:
            if call.name is None or call.arguments is None or call.parse_error is not None:
                return {"correct": 0.0}
            calls.append((call.name, call.arguments))
        result = check_calls(
            calls,
            item.meta["ground_truth"],
            item.meta["functions"],
            str(item.meta["bfcl_category"]),
        )
        return {"correct": float(result.valid)}

    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        """Always `correct` 0: the calls decide, so this suite needs the episode
        (`grade_episode`)."""
        return {"correct": 0.0}

    def oracle_turns(self, item: TaskItem) -> list[str]:
        """The ground-truth calls in one completion, then `<answer>done</answer>`; for an
        irrelevance item, only the no-call answer."""
        if item.meta["ground_truth"] is None:
            return [f"<answer>{NO_CALL_ANSWER}</answer>"]
        docs = {doc["name"]: doc for doc in item.meta["functions"]}
        calls = []
        for call in item.meta["ground_truth"]:
            ((name, accepted),) = call.items()
            args = oracle_arguments(docs[name], accepted)
            body = json.dumps({"name": name, "arguments": args})
            calls.append(f"<tool_call>{body}</tool_call>")
        return ["\n".join(calls), f"<answer>{DONE_ANSWER}</answer>"]


class BfclSingleConfig(SuiteConfig):
    """BFCL v4 single-turn function calling (simple, multiple, parallel, irrelevance and their
    live variants), graded by AST matching against the accepted answers."""

    metrics: ClassVar[tuple[str, ...]] = ("correct",)
    gold_answer_text: ClassVar[bool] = False

    kind: Literal["bfcl_single"] = "bfcl_single"
    categories: tuple[Category, ...] = get_args(Category)
    """BFCL categories included."""
    seed: int = 0
    """Seed of the train/test split (items sharing a question or a function set stay
    together)."""
    test_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Share of the items held out for test."""

    def build(self, ctx: BuildContext) -> BfclSingle:
        return BfclSingle(
            categories=tuple(self.categories),
            seed=self.seed,
            test_fraction=self.test_fraction,
            tool_format=ctx.tool_format,
        )
