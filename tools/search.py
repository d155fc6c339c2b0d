"""BM25 search over the shipped corpora, as a `Tool`.

`SearchIndex` is a BM25 index (`bm25s`, Lucene scoring, Snowball English stemmer, English
stopwords, accents folded so that "Bogota" finds "Bogotá") over `Passage`s. Titles are
indexed several times over: a Factbook passage's text rarely names its country ("name:
Paris"), so the title carries the entity and must not be outweighed by field texts that
mention another country in passing (see `BM25Params`).

Building takes seconds, so the index is cached on disk under
`$TURNRL_CACHE/search/<fingerprint>/` (default `~/.cache/turnrl`). The fingerprint hashes the
corpus files' contents, the corpus name (which carries the passage format version) and the
index parameters, so a changed corpus or setting gets a fresh index and never a stale one. An
index is built in a temporary sibling folder and renamed into place: concurrent builders and
crashed ones never leave a half-written index where a reader looks; when two processes race,
the second rename fails and that process simply uses the winner's folder.

`SearchTool` formats the top-k passages as numbered blocks within a token budget; unused
budget of short passages goes to long ones, so all k results appear. Retrieval runs in a
worker thread: the event loop is never blocked by scoring.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import Stemmer
from pydantic import BaseModel, ConfigDict, Field, create_model

from turnrl.tools.base import CostModel, ToolOutput, ToolSpec, truncate_to_tokens
from turnrl.tools.corpora import CorpusSource, Passage, default_corpus, fold_accents

Encode = Callable[[str], Sequence[int]]


@dataclass(frozen=True)
class BM25Params:
    """Index settings; all of them are part of the cache fingerprint.

    Defaults were chosen by measurement on the shipped corpora: mean reciprocal rank of the
    gold Factbook field for "<country> <relation>" queries (741 one-hop questions) went from
    0.81 (k1=1.5, b=0.75, title twice) to 0.996 (below), while the MRR of Wikipedia
    articles found by their one-line description stayed at ~0.55 (0.50 before)."""

    k1: float = 0.9
    """Term-frequency saturation (Anserini's MS MARCO setting)."""
    b: float = 0.4
    """Length normalisation; low, because Factbook fields with long notes are no less about
    their country than short ones."""
    method: str = "lucene"
    """bm25s scoring variant."""
    stopwords: str = "en_plus"
    """bm25s stopword list: the NLTK English list, which covers question words."""
    stemmer: str = "english"
    """Snowball stemmer language (PyStemmer)."""
    title_repeats: int = 4
    """How many times the title is indexed ahead of the text: a cheap field weight."""


@dataclass(frozen=True)
class SearchHit:
    """One retrieved passage."""

    passage: Passage
    """The passage."""
    score: float
    """Its BM25 score for the query."""


# Bumped whenever the on-disk layout below changes.
_INDEX_FORMAT = 1
_PASSAGES_FILE = "passages.jsonl"
_STALE_TMP_S = 3600.0


def default_cache_dir() -> Path:
    """`$TURNRL_CACHE`, else `~/.cache/turnrl`."""
    return Path(os.environ.get("TURNRL_CACHE") or Path.home() / ".cache" / "turnrl")


def fingerprint(corpus: CorpusSource, params: BM25Params) -> str:
    """Hex digest of the corpus files' contents, the corpus name and the index settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps([_INDEX_FORMAT, corpus.name, asdict(params)]).encode())
    for path in corpus.files:
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:24]


class SearchIndex:
    """A BM25 index over passages; safe to query from several threads at once."""

    def __init__(
        self,
        retriever: bm25s.BM25,
        passages: Sequence[Passage],
        params: BM25Params,
        *,
        loaded_from_cache: bool,
    ) -> None:
        self._retriever = retriever
        self._stemmer = Stemmer.Stemmer(params.stemmer)
        # PyStemmer objects are not thread-safe; scoring itself only reads arrays.
        self._stem_lock = threading.Lock()
        self.passages = passages
        """The indexed passages, in index order."""
        self.params = params
        """The settings it was built with."""
        self.loaded_from_cache = loaded_from_cache
        """True when this object was read from an existing cache folder, not built."""

    @classmethod
    def build(cls, passages: Sequence[Passage], params: BM25Params | None = None) -> SearchIndex:
        """Index `passages` in memory (no cache)."""
        params = params or BM25Params()
        stemmer = Stemmer.Stemmer(params.stemmer)
        texts = [
            fold_accents("\n".join([p.title] * params.title_repeats + [p.text])) for p in passages
        ]
        tokens = bm25s.tokenize(
            texts, stopwords=params.stopwords, stemmer=stemmer, show_progress=False
        )
        retriever = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
        retriever.index(tokens, show_progress=False)
        return cls(retriever, passages, params, loaded_from_cache=False)

    @classmethod
    def open(
        cls,
        corpus: CorpusSource | None = None,
        *,
        params: BM25Params | None = None,
        cache_dir: Path | None = None,
    ) -> SearchIndex:
        """Load the cached index of `corpus` (default: the shipped corpora), building and
        caching it first when there is none."""
        corpus = corpus or default_corpus()
        params = params or BM25Params()
        root = (cache_dir or default_cache_dir()) / "search"
        final = root / fingerprint(corpus, params)
        if final.is_dir():
            return cls._load(final, params)
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        index = cls.build(corpus.load(), params)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            index._save(tmp)
            os.rename(tmp, final)
        except OSError:
            # Lost a race to another builder (the target now exists): use theirs.
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():
                raise
        return index

    @classmethod
    def _load(cls, folder: Path, params: BM25Params) -> SearchIndex:
        retriever = bm25s.BM25.load(str(folder), show_progress=False)
        with (folder / _PASSAGES_FILE).open(encoding="utf-8") as f:
            passages = [Passage(**json.loads(line)) for line in f]
        return cls(retriever, passages, params, loaded_from_cache=True)

    def _save(self, folder: Path) -> None:
        self._retriever.save(str(folder), show_progress=False)
        with (folder / _PASSAGES_FILE).open("w", encoding="utf-8") as f:
            for p in self.passages:
                f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")

    def search(self, query: str, k: int) -> list[SearchHit]:
        """The best `k` passages with a positive score, best first (ties by index order);
        empty when no query word is in the vocabulary."""
        with self._stem_lock:
            tokens = bm25s.tokenize(
                fold_accents(query),
                stopwords=self.params.stopwords,
                stemmer=self._stemmer,
                return_ids=False,
                show_progress=False,
            )
        ids = self._retriever.get_tokens_ids([t for t in tokens[0] if t] if tokens else [])
        if not ids:
            return []
        scores = np.asarray(self._retriever.get_scores_from_ids(ids))
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        order = top[np.lexsort((top, -scores[top]))]
        return [SearchHit(self.passages[int(i)], float(scores[i])) for i in order if scores[i] > 0]


def _remove_stale_tmp(root: Path) -> None:
    """Delete build folders left by crashed builders (old enough that no one is writing)."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass


class SearchArgs(BaseModel):
    """Arguments of the `search` tool."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    query: str = Field(min_length=1, max_length=500, description="What to search for.")
    """Free-text query; keywords work best."""
    k: int = Field(default=3, ge=1, le=10, description="How many passages to return.")
    """Number of passages returned."""


@functools.cache
def search_args_model(default_k: int = 3) -> type[SearchArgs]:
    """`SearchArgs`, or a subclass whose `k` defaults to `default_k` (the schema the agent
    sees states the default, so it must be the real one)."""
    if default_k == 3:
        return SearchArgs
    k = Field(default=default_k, ge=1, le=10, description="How many passages to return.")
    return create_model("SearchArgs", __base__=SearchArgs, k=(int, k))


_SEPARATOR = "\n\n"


def format_hits(hits: Sequence[SearchHit], encode: Encode, max_tokens: int) -> tuple[str, bool]:
    """Numbered `[i] Title\\ntext` blocks within `max_tokens` (by `encode`); returns
    (text, truncated). Texts share the budget left after the headers: each gets an equal
    share, and what a short text leaves unused is split among the longer ones."""
    if not hits:
        return "No results.", False
    headers = [f"[{i}] {h.passage.title}\n" for i, h in enumerate(hits, start=1)]
    texts = [h.passage.text for h in hits]
    marker = len(encode(" …[truncated]"))
    overhead = len(encode(_SEPARATOR.join(headers))) + len(hits) * marker
    lengths = [len(encode(t)) for t in texts]
    budgets = _water_fill(lengths, max(0, max_tokens - overhead))
    truncated = False
    blocks = []
    for header, text, length, budget in zip(headers, texts, lengths, budgets, strict=True):
        if length > budget:
            text, cut = truncate_to_tokens(text, encode, budget)
            truncated = truncated or cut
        blocks.append(header + text)
    out = _SEPARATOR.join(blocks)
    # Token counts are not additive across joins; the whole is checked once more.
    if len(encode(out)) > max_tokens:
        out, _ = truncate_to_tokens(out, encode, max(0, max_tokens - marker))
        truncated = True
    return out, truncated


def _water_fill(lengths: Sequence[int], budget: int) -> list[int]:
    """Per-item budgets summing to at most `budget`: items shorter than an equal share keep
    their length, the rest split what is left equally."""
    out = [0] * len(lengths)
    remaining = budget
    pending = sorted(range(len(lengths)), key=lambda i: lengths[i])
    while pending:
        share = remaining // len(pending)
        i = pending.pop(0)
        out[i] = min(lengths[i], share)
        remaining -= out[i]
    return out


class SearchTool:
    """The `search` tool: BM25 over Wikipedia lead paragraphs and the CIA World Factbook."""

    def __init__(
        self, index: SearchIndex, encode: Encode, *, max_tokens: int = 256, default_k: int = 3
    ) -> None:
        """`encode` is the policy's tokenizer (text -> ids): the output budget `max_tokens` is
        counted in the tokens the agent will actually read. `default_k` is the number of
        passages returned when the call does not say."""
        self._index = index
        self._encode = encode
        self._max_tokens = max_tokens
        self._args_model = search_args_model(default_k)
        self._spec = ToolSpec(
            name="search",
            description=(
                "Search Wikipedia lead paragraphs and the CIA World Factbook. Returns the k "
                "best-matching passages, each with its title."
            ),
            args_model=self._args_model,
            cost=CostModel(per_call={"calls": 1.0}, per_second={"time_s": 1.0}),
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    def run(self, args: SearchArgs) -> ToolOutput:
        """The synchronous body of a call (what `__call__` runs in a worker thread)."""
        hits = self._index.search(args.query, args.k)
        text, truncated = format_hits(hits, self._encode, self._max_tokens)
        return ToolOutput(
            text=text,
            truncated=truncated,
            extra_cost={"tokens": float(len(self._encode(text)))},
            items=tuple(h.passage.id for h in hits),
        )

    async def __call__(self, args: Any) -> ToolOutput:
        if not isinstance(args, SearchArgs):
            args = self._args_model.model_validate(args)
        return await asyncio.to_thread(self.run, args)
