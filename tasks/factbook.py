"""Structured facts parsed out of the CIA World Factbook, for generating questions with gold
answers.

Only facts with short, unambiguous answers are kept; anything the parser cannot read with
confidence is dropped rather than guessed (a wrong gold answer teaches the wrong thing):

- capital: `Government/Capital/name`, skipped when a country lists several capitals or none;
  a parenthetical of proper names is an alias ("Tripoli (Tarabulus)"), any other
  parenthetical or `; note` is dropped ("Suva (on Viti Levu)").
- highest point: `Geography/Elevation/highest point` without its elevation; skipped when
  unnamed or described relative to something else ("1 km SW of ...").
- official language: the one language marked "(official...)" in `People and Society/
  Languages`; skipped when none or several are.
- government type: `Government/Government type` when it is at most four plain words.
- borders: `Geography/Land boundaries/border countries` resolved to entities by scanning the
  text for entity names (longest name first), kept only where both sides list each other.

Every answer is a tuple, primary spelling first, then aliases (including accent-free forms).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from turnrl.tools.corpora import FactbookEntry, entity_name, field_text, fold_accents, read_factbook

Answer = tuple[str, ...]


@dataclass(frozen=True)
class Country:
    """The facts of one Factbook entity that questions are generated from."""

    code: str
    """The Factbook's two-letter code."""
    name: str
    """The name questions use (the title of its Factbook passages)."""
    capital: Answer | None
    """Capital and its aliases; None when missing or ambiguous."""
    highest_point: Answer | None
    """Highest point's name and aliases; None when unnamed or unclear."""
    official_language: Answer | None
    """The single official language; None when there is none or several."""
    government_type: Answer | None
    """Short government type, e.g. ("federal parliamentary republic",)."""
    borders: tuple[str, ...]
    """Codes of entities sharing a land border (listed on both sides), sorted."""


# Not countries: their "borders" and "capitals" would make odd questions.
_EXCLUDED = frozenset({"ee", "xx"})

# Spellings used in border lists that are not any entity's conventional name.
_EXTRA_NAMES = {
    "ae": ("UAE",),
    "bm": ("Myanmar",),
    "mk": ("Macedonia",),
    "uk": ("UK",),
    "us": ("US", "USA"),
    "vt": ("Holy See",),
}

_PAREN = re.compile(r"\s*\(([^()]*)\)")
_DISTANCE = re.compile(r"(?:[,\s]+|^)-?\d[\d,.]*\s*(?:m|meters)?\s*$")
# Words allowed in lowercase inside a proper name ("Ciudad de Mexico", "Andorra la Vella").
_PARTICLES = frozenset(
    {"de", "la", "del", "da", "do", "di", "du", "des", "le", "les", "al", "el", "ad", "an"}
    | {"ash", "ech", "en", "of", "on", "or"}
)


def _with_folded(names: Iterable[str]) -> Answer:
    """Names in order, each followed by its accent-free spelling where different, deduped."""
    out: list[str] = []
    for name in names:
        for variant in (name, fold_accents(name)):
            if variant and variant not in out:
                out.append(variant)
    return tuple(out)


def _is_proper_name(text: str) -> bool:
    """Capitalised words, allowing lowercase particles inside ("Ciudad de Mexico") and a
    leading apostrophe ("Jabal Bil 'Ays")."""
    words = text.split()
    return (
        bool(words)
        and words[0].lstrip("'")[:1].isupper()
        and all(w.lstrip("'")[:1].isupper() or w in _PARTICLES for w in words)
    )


def _split_parentheticals(text: str) -> tuple[str, list[str]]:
    """("Tripoli (Tarabulus)") -> ("Tripoli", ["Tarabulus"]): parentheticals made only of
    proper names become aliases; others (remarks) are dropped."""
    aliases: list[str] = []
    for inner in _PAREN.findall(text):
        parts = [p.strip() for p in re.split(r"[/,]", inner)]
        if all(_is_proper_name(p) for p in parts):
            aliases.extend(parts)
    return _PAREN.sub("", text).strip(), aliases


def parse_capital(text: str | None) -> Answer | None:
    """Capital name and aliases, or None when there is not exactly one named capital."""
    if text is None:
        return None
    text = text.split("; note")[0].strip()
    main, aliases = _split_parentheticals(text)
    if main == "Washington, D.C.":  # the one capital whose name has a comma
        return ("Washington, D.C.", "Washington")
    if not _is_proper_name(main) or re.search(r"[;,]| in ", main) or main.lower() == "none":
        return None
    return _with_folded([main, *aliases, *(main.split("/") if "/" in main else [])])


def parse_highest_point(text: str | None) -> Answer | None:
    """Name of the highest point without its elevation, or None when unnamed or unclear.
    Parentheticals are dropped, not taken as aliases: here they often name the region
    ("Mount Paget (South Georgia)")."""
    if text is None:
        return None
    text = re.split(r";\s*note\b|\n", _DISTANCE.sub("", text))[0]
    if re.search(r"\)\s+(?!on\b)\w", text):
        return None  # a remark inside the name: "Mont Blanc (Monte Bianco) de Courmayeur"
    main = _DISTANCE.sub("", _PAREN.sub("", text)).strip()
    if re.search(r"[;,]| and | in |unnamed", main) or not _is_proper_name(main):
        return None
    # "Margherita Peak on Mount Stanley": the peak alone is also right.
    aliases = [main.split(" on ")[0]] if " on " in main else []
    return _with_folded([main, *aliases, *(main.split("/") if "/" in main else [])])


_OFFICIAL = re.compile(r"([^,;()]+?)\s*(?:\d[\d.]*%\s*)?\((?:[^()]*;\s*)?official\b[^()]*\)")


def parse_official_language(text: str | None) -> Answer | None:
    """The one language marked "(official...)", with "X or Y" spellings as aliases."""
    if text is None:
        return None
    found = _OFFICIAL.findall(text)
    if len(found) != 1 or len(re.findall(r"\([^()]*official", text)) != 1:
        return None
    name = found[0].strip()
    if not _is_proper_name(name) or re.search(r"\d", name):
        return None
    return _with_folded([name, *re.split(r" or |/", name)])


def parse_government_type(text: str | None) -> Answer | None:
    """The government type when it is a short plain phrase."""
    if text is None or re.search(r"[;,()\"]", text) or len(text.split()) > 4:
        return None
    return (text.strip(),)


def _name_index(entries: list[FactbookEntry]) -> list[tuple[str, str]]:
    """(name, code) for every spelling of every entity, longest first (so that "Equatorial
    Guinea" is matched before "Guinea")."""
    pairs: set[tuple[str, str]] = set()
    for entry in entries:
        names = entry.data.get("Government", {}).get("Country name", {})
        spellings = [entity_name(entry), *_EXTRA_NAMES.get(entry.code, ())]
        for key in ("conventional short form", "conventional long form"):
            spelling = field_text(names, key)
            if spelling and spelling.lower() != "none":
                spellings.append(spelling.split("; note")[0])
        for spelling in spellings:
            plain = _PAREN.sub("", fold_accents(spelling)).strip()
            for variant in (plain, plain.removeprefix("The ")):
                if variant:
                    pairs.add((variant, entry.code))
    return sorted(pairs, key=lambda p: (-len(p[0]), p))


def parse_borders(text: str | None, names: list[tuple[str, str]], own: str) -> set[str]:
    """Codes of the entities named in a border list (parentheticals and distances ignored)."""
    if text is None:
        return set()
    rest = _PAREN.sub("", fold_accents(text))
    found: set[str] = set()
    for name, code in names:
        pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
        if pattern.search(rest):
            found.add(code)
            rest = pattern.sub(" ", rest)
    found.discard(own)
    return found


def load_countries(entries: list[FactbookEntry] | None = None) -> dict[str, Country]:
    """Facts of every Factbook entity except the World and the EU, keyed by code."""
    entries = [e for e in (entries or read_factbook()) if e.code not in _EXCLUDED]
    names = _name_index(entries)
    listed = {
        e.code: parse_borders(
            field_text(e.data, "Geography", "Land boundaries", "border countries"), names, e.code
        )
        for e in entries
    }
    countries = {}
    for e in entries:
        languages = field_text(e.data, "People and Society", "Languages", "Languages")
        countries[e.code] = Country(
            code=e.code,
            name=entity_name(e),
            capital=parse_capital(field_text(e.data, "Government", "Capital", "name")),
            highest_point=parse_highest_point(
                field_text(e.data, "Geography", "Elevation", "highest point")
            ),
            official_language=parse_official_language(
                languages or field_text(e.data, "People and Society", "Languages")
            ),
            government_type=parse_government_type(
                field_text(e.data, "Government", "Government type")
            ),
            borders=tuple(sorted(c for c in listed[e.code] if e.code in listed.get(c, set()))),
        )
    return countries
