"""BFCL function docs -> JSON Schema: every doc bfcl-eval ships converts to a valid schema, and
the arguments of the benchmark's own ground truth validate against it."""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from turnrl.tasks.bfcl_multi import CATEGORIES, EXCLUDED_SCENARIOS, entries, gold_calls
from turnrl.tools.base import ArgumentError
from turnrl.tools.bfcl import CLASSES, function_docs
from turnrl.tools.bfcl_schema import function_spec, parameters_schema, to_json_schema

DATA = importlib.resources.files("bfcl_eval") / "data"

# Single-turn ground-truth values that contradict their own doc, found on bfcl-eval 2026.3.23
# (its AST checker compares values and types but never reads `enum`, so these pass there):
# (entry id, parameter) -> what is wrong.
KNOWN_BAD_VALUES: dict[tuple[str, str], str] = {
    ("live_multiple_306-131-5", "number_of_rooms"): "'dontcare' for an integer",
    ("live_multiple_338-133-2", "year"): "'dontcare' for an integer",
    ("live_multiple_342-133-6", "year"): "'dontcare' for an integer",
    ("live_multiple_343-133-7", "year"): "'dontcare' for an integer",
    ("live_multiple_344-133-8", "year"): "'dontcare' for an integer",
    ("live_multiple_345-133-9", "year"): "'dontcare' for an integer",
    ("live_multiple_350-133-14", "year"): "'dontcare' for an integer",
    ("live_multiple_351-133-15", "year"): "'dontcare' for an integer",
    ("live_multiple_352-133-16", "year"): "'dontcare' for an integer",
    ("live_multiple_354-133-18", "year"): "'dontcare' for an integer",
    ("live_multiple_862-181-3", "journey_start_time"): "not a parameter of the doc",
    ("live_multiple_964-207-0", "question"): "not a parameter of the doc",
    ("parallel_152", "mod"): "None with no None default",
    ("parallel_multiple_12", "permeability"): "not a parameter of the doc",
    ("parallel_multiple_21", "x"): "a string for an array",
    ("parallel_multiple_21", "y"): "a string for an array",
    ("parallel_multiple_26", "type"): "not a parameter of the doc",
    ("parallel_multiple_94", "elements"): "strings for an array of integers",
    ("simple_python_149", "company_names"): "lists for an array of strings",
    ("simple_python_307", "venue"): "True for a string",
}
NO_DOCS = ("memory", "web_search")
"""Categories whose entries name a simulator class instead of listing function docs."""
CODE_CATEGORIES = ("simple_java", "simple_javascript")
"""Their arguments are source code in strings (BFCL shows these docs to models as strings)."""


def _lines(path: str) -> list[dict[str, Any]]:
    text = (DATA / path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _single_turn_categories() -> list[str]:
    names = [p.name for p in (DATA / "possible_answer").iterdir()]
    cats = [n.removeprefix("BFCL_v4_").removesuffix(".json") for n in names]
    return sorted(c for c in cats if not c.startswith("multi_turn") and c not in NO_DOCS)


def _all_docs() -> Iterator[dict[str, Any]]:
    for path in (DATA / "multi_turn_func_doc").iterdir():
        yield from _lines(f"multi_turn_func_doc/{path.name}")
    for path in DATA.iterdir():
        name = path.name
        if name.startswith("BFCL_v4_") and name != "BFCL_v4_format_sensitivity.json":
            for e in _lines(name):
                yield from e.get("function", [])


def test_every_shipped_doc_is_a_valid_schema() -> None:
    """Each distinct doc (the live categories repeat many) converts to a valid schema."""
    n = 0
    distinct = {json.dumps(d, sort_keys=True): d for d in _all_docs()}
    for doc in distinct.values():
        Draft202012Validator.check_schema(parameters_schema(doc))
        n += 1
    assert n > 3000


def test_conversion_rules() -> None:
    """Regression lock (the module docstring's rules): change only with a decision."""
    doc = {
        "name": "a.b",
        "description": "d",
        "parameters": {
            "type": "dict",
            "properties": {
                "x": {"type": "float", "description": "x", "default": 1.5},
                "t": {"type": "tuple", "items": {"type": "integer"}},
                "a": {"type": "any"},
                "m": {"type": "HashMap", "properties": {"k": {"type": "long"}}, "required": ["k"]},
                "e": {"type": "integer", "enum": ["1", "2", "dontcare"]},
                "l": {"type": "array", "items": {"type": "string"}, "enum": ["p", "q"]},
                "n": {"type": "string", "default": None, "optional": True},
            },
            "required": ["x"],
        },
    }
    assert parameters_schema(doc) == {
        "type": "object",
        "properties": {
            "x": {"type": "number", "description": "x", "default": 1.5},
            "t": {"type": "array", "items": {"type": "integer"}},
            "a": {},
            "m": {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]},
            "e": {"enum": ["1", "2", "dontcare"]},
            "l": {"type": "array", "items": {"type": "string", "enum": ["p", "q"]}},
            "n": {"type": ["string", "null"], "default": None},
        },
        "required": ["x"],
    }
    assert function_spec(doc).name == "a.b"
    with pytest.raises(ValueError, match="unknown type"):
        to_json_schema({"type": "complex"})


def test_multi_turn_ground_truth_validates() -> None:
    """Every multi-turn ground-truth call fits its schema, except in the scenario the suite
    excludes for it (a string ticket id for an integer parameter)."""
    specs = {doc["name"]: function_spec(doc) for c in CLASSES for doc in function_docs(c)}
    for name, spec in specs.items():
        assert spec.name == name and spec.json_schema()["parameters"] == spec.parameters
    n = 0
    bad: set[tuple[int, str]] = set()
    for category in CATEGORIES:
        for e in entries(category).values():
            for turn in gold_calls(e):
                for name, arguments in turn:
                    n += 1
                    try:
                        specs[name].validate(arguments)
                    except ArgumentError:
                        bad.add((int(e.id.rsplit("_", 1)[1]), name))
    assert n == 4625
    assert bad == {(173, "close_ticket")} and set(EXCLUDED_SCENARIOS) == {173}


def _concrete(option: Any, schema: dict[str, Any]) -> Any:
    """One value a BFCL accepted-value entry stands for: a dict (or list of dicts) whose
    values are lists of accepted values stands for the dict made of each first option."""

    def is_options(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, list) for v in d.values())

    if schema.get("type") == "object" and is_options(option):
        props = schema.get("properties", {})
        return {
            k: _concrete(next(o for o in v if o != ""), props.get(k, {}))
            for k, v in option.items()
            if any(o != "" for o in v)
        }
    array = schema.get("type") == "array" and isinstance(option, list) and bool(option)
    if array and all(is_options(x) for x in option):
        return [_concrete(x, schema.get("items", {})) for x in option]
    return option


def test_single_turn_ground_truth_validates() -> None:
    """Every accepted value of every single-turn ground truth validates against its
    parameter's schema, except source-code strings (Java, JavaScript), values outside the
    doc's enum (or typed unlike it: `True` for the enum's `"True"`), and the listed data
    errors (`KNOWN_BAD_VALUES`)."""
    checked = 0
    off_enum = 0
    bad: set[tuple[str, str]] = set()
    for category in _single_turn_categories():
        docs = {e["id"]: e["function"] for e in _lines(f"BFCL_v4_{category}.json")}
        for answer in _lines(f"possible_answer/BFCL_v4_{category}.json"):
            by_name = {d["name"]: parameters_schema(d) for d in docs[answer["id"]]}
            for call in answer["ground_truth"]:
                for name, params in call.items():
                    properties = by_name[name]["properties"]
                    for param, options in params.items():
                        for option in options:
                            if option == "":
                                continue
                            checked += 1
                            schema = properties.get(param)
                            if schema is None:
                                bad.add((answer["id"], param))
                                continue
                            value = _concrete(option, schema)
                            errors = list(Draft202012Validator(schema).iter_errors(value))
                            if not errors or category in CODE_CATEGORIES:
                                continue
                            kinds = {e.validator for e in errors}
                            if "enum" in kinds and kinds <= {"enum", "type"}:
                                off_enum += 1
                            else:
                                bad.add((answer["id"], param))
    assert bad == set(KNOWN_BAD_VALUES)
    assert checked > 11_000 and off_enum < 0.01 * checked
