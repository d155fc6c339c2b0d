"""Search QA: questions about countries whose gold answers come from the CIA World Factbook,
answered with the `search` tool over Wikipedia lead paragraphs and the Factbook.

Questions are generated from `tasks.factbook` facts with fixed templates:

- one hop: the capital, highest point, official language or government type of X;
- two hops: the capital of the one country bordering both X and Y, or the only country
  bordering X; the highest point / official language of the country whose capital is C; the
  capital of the country whose highest point is P. A template is used only where its bridge is
  unique in the Factbook (exactly one common neighbour, one country with that capital...) and
  not given away by the question (no "the country whose capital is Luxembourg").

Every question the templates allow is generated, in id order; ids name the template and
entities (`border_capital:an+po`), so they are stable across seeds and processes. The split is
by answer entity: all questions whose answer is a fact of the same country fall in the same
split, so no test answer can be memorised from training (the same question can never be in
both). `seed` alone decides which entities are held out and which questions are drawn, via
`random.Random(seed)` over sorted inputs; nothing depends on hash order.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from itertools import combinations

from turnrl.tasks.base import Split, TaskItem
from turnrl.tasks.factbook import Answer, Country, load_countries
from turnrl.tasks.grading import normalize_answer, score_answer
from turnrl.tools.base import Tool
from turnrl.tools.search import Encode, SearchIndex, SearchTool

SYSTEM_PROMPT = """\
Answer the user's question about the world's countries. Use the `search` tool: it searches \
the lead paragraphs of Wikipedia articles and the CIA World Factbook. Search with a few \
keywords, e.g. a country's name and the fact you need. Some questions need two searches: \
first find the country the question describes, then look up its fact. Where sources \
disagree, the Factbook is right.
When you know the answer, reply with only the answer inside answer tags, e.g. \
<answer>Paris</answer>: a name, not a sentence."""


def _item(
    id: str, question: str, answers: Answer, template: str, entities: Sequence[str],
    answer_entity: Country, evidence: str, bridge: Country | None = None,
) -> TaskItem:  # fmt: skip
    return TaskItem(
        id=id,
        question=question,
        answers=answers,
        meta={
            "hops": 1 if bridge is None else 2,
            "template": template,
            "entities": list(entities),
            "answer_entity": answer_entity.code,
            "bridge": None if bridge is None else bridge.name,
            "evidence_query": f"{answer_entity.name} {evidence}",
        },
    )


def _unique_by(countries: Sequence[Country], answers: Mapping[str, Answer]) -> dict[str, Country]:
    """code -> country for the countries whose answer (any alias) no other country shares."""
    owners: dict[str, set[str]] = defaultdict(set)
    for c in countries:
        for alias in answers.get(c.code, ()):
            owners[normalize_answer(alias)].add(c.code)
    return {
        c.code: c
        for c in countries
        if c.code in answers
        and all(owners[normalize_answer(a)] == {c.code} for a in answers[c.code])
    }


def _gives_away(name: str, clue: str) -> bool:
    """True when the clue names the country ("Kuwait City" for Kuwait)."""
    a, b = normalize_answer(name), normalize_answer(clue)
    return a in b or b in a


def generate_questions(countries: Mapping[str, Country]) -> list[TaskItem]:
    """Every question the templates yield for `countries`, sorted by id."""
    return sorted(_one_hop(countries) + _two_hop(countries), key=lambda item: item.id)


def _one_hop(countries: Mapping[str, Country]) -> list[TaskItem]:
    items = []
    for c in countries.values():
        if c.capital:
            items.append(
                _item(
                    f"capital:{c.code}",
                    f"What is the capital of {c.name}?",
                    c.capital,
                    "capital",
                    [c.code],
                    c,
                    "capital",
                )
            )
        if c.highest_point:
            items.append(
                _item(
                    f"highest_point:{c.code}",
                    f"What is the highest point in {c.name}?",
                    c.highest_point,
                    "highest_point",
                    [c.code],
                    c,
                    "elevation highest point",
                )
            )
        if c.official_language:
            items.append(
                _item(
                    f"official_language:{c.code}",
                    f"What is the official language of {c.name}?",
                    c.official_language,
                    "official_language",
                    [c.code],
                    c,
                    "languages official",
                )
            )
        if c.government_type:
            items.append(
                _item(
                    f"government_type:{c.code}",
                    f"What type of government does {c.name} have?",
                    (c.government_type,),
                    "government_type",
                    [c.code],
                    c,
                    "government type",
                )
            )
    return items  # fmt: skip


def _two_hop(countries: Mapping[str, Country]) -> list[TaskItem]:
    items = list(_border_questions(countries))
    ordered = [countries[code] for code in sorted(countries)]
    by_capital = _unique_by(ordered, {c.code: c.capital for c in ordered if c.capital})
    for c in by_capital.values():
        assert c.capital is not None
        clue = c.capital[0]
        if _gives_away(c.name, clue):
            continue
        if c.highest_point:
            items.append(
                _item(
                    f"capital_highest_point:{c.code}",
                    f"What is the highest point in the country whose capital is {clue}?",
                    c.highest_point,
                    "capital_highest_point",
                    [c.code],
                    c,
                    "elevation highest point",
                    bridge=c,
                )
            )
        if c.official_language:
            items.append(
                _item(
                    f"capital_official_language:{c.code}",
                    f"What is the official language of the country whose capital is {clue}?",
                    c.official_language,
                    "capital_official_language",
                    [c.code],
                    c,
                    "languages official",
                    bridge=c,
                )
            )
    by_peak = _unique_by(ordered, {c.code: c.highest_point for c in ordered if c.highest_point})
    for c in by_peak.values():
        assert c.highest_point is not None
        clue = c.highest_point[0]
        if c.capital and not _gives_away(c.name, clue):
            items.append(
                _item(
                    f"highest_point_capital:{c.code}",
                    f"What is the capital of the country whose highest point is {clue}?",
                    c.capital,
                    "highest_point_capital",
                    [c.code],
                    c,
                    "capital",
                    bridge=c,
                )
            )
    return items  # fmt: skip


def _border_questions(countries: Mapping[str, Country]) -> Iterator[TaskItem]:
    neighbours = {code: set(c.borders) & countries.keys() for code, c in countries.items()}
    for code in sorted(countries):
        only = neighbours[code]
        if len(only) == 1:
            z = countries[next(iter(only))]
            if z.capital:
                x = countries[code]
                yield _item(f"only_neighbor_capital:{code}",
                            f"What is the capital of the only country that borders {x.name}?",
                            z.capital, "only_neighbor_capital", [code, z.code], z, "capital",
                            bridge=z)  # fmt: skip
    for a, b in combinations(sorted(countries), 2):
        common = neighbours[a] & neighbours[b]
        if len(common) != 1:
            continue
        z = countries[next(iter(common))]
        if not z.capital:
            continue
        x, y = sorted((countries[a], countries[b]), key=lambda c: c.name)
        yield _item(f"border_capital:{a}+{b}",
                    f"What is the capital of the country that borders both {x.name} and "
                    f"{y.name}?", z.capital, "border_capital", [a, b, z.code], z, "capital",
                    bridge=z)  # fmt: skip


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


class SearchQA:
    """The Search QA task suite (see the module docstring)."""

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
        max_tool_tokens: int = 512,
        countries: Mapping[str, Country] | None = None,
    ) -> None:
        """`encode` (the policy's tokenizer) is needed only by `tools()`, so that a stored run
        can be re-graded without a model; `index` defaults to the cached shipped index,
        opened on the first `tools()` call; `countries` defaults to the parsed Factbook."""
        if n_train < 0 or n_test < 0:
            raise ValueError("search_qa: n_train and n_test must be >= 0")
        if not (0.0 < test_fraction < 1.0 and 0.0 <= two_hop_fraction <= 1.0):
            raise ValueError(
                "search_qa: test_fraction must be in (0, 1), two_hop_fraction in [0, 1]"
            )
        self._encode = encode
        self._index = index
        self._max_tool_tokens = max_tool_tokens
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
        return [SearchTool(self._index, self._encode, max_tokens=self._max_tool_tokens)]

    def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        return score_answer(answer, item.answers)
