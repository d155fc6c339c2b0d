"""BFCL function docs as tool specs with a standard JSON Schema for their arguments.

The Berkeley Function Calling Leaderboard (bfcl-eval) describes each function as
`{"name", "description", "parameters": {"type": "dict", "properties": {...}, "required": [...]}}`
in a dialect of JSON Schema: Python and Java type names (`dict`, `float`, `tuple`, `any`,
`HashMap`, `long`, ...), `optional` flags, enums on integers that list strings. The runner
validates arguments with `jsonschema`, so a doc must become a schema that (a) is valid JSON
Schema (Draft 2020-12) and (b) accepts the arguments the benchmark's own ground truth passes.

Conversion, per schema node:
- Types map as BFCL's own `GORILLA_TO_OPENAPI` table does (`dict` -> `object`, `float` and
  `double` -> `number`, `tuple` and `ArrayList` -> `array`, `long` -> `integer`, ...), except
  `any`, an empty or a missing type, which constrain nothing (BFCL sends them to models as
  `string`, but its ground truth passes lists and numbers for them).
- Kept: `description`, `enum`, `default`, `properties`, `items`, `required` (a list of names),
  `format`, `maximum`, `minimum`, `minItems`, `maxItems`. Dropped: `optional` (not JSON Schema;
  `required` already says it) and anything else.
- An enum whose values do not all have the node's type (`integer` with `"dontcare"`) keeps the
  enum and drops the type: the enum alone is the contract the data follows. An enum on an
  `array` lists allowed items, so it moves into `items`.
- A parameter whose default is `None` also accepts `null` (type `[t, "null"]`, and `null` in
  its enum): in Python passing `None` is passing the default, and BFCL's ground truth does.
- `additionalProperties` is left open, as BFCL's own conversion leaves it: an unknown argument
  reaches the function, which rejects it the way the benchmark does.

The function name is kept as it is, dots included (`math.factorial`); the doc's `response`
schema is not shown.
"""

from __future__ import annotations

from typing import Any

from turnrl.tools.base import CostModel, ToolSpec

TYPE_MAP: dict[str, str | None] = {
    "integer": "integer",
    "number": "number",
    "float": "number",
    "double": "number",
    "string": "string",
    "String": "string",
    "char": "string",
    "boolean": "boolean",
    "Boolean": "boolean",
    "bool": "boolean",
    "array": "array",
    "Array": "array",
    "ArrayList": "array",
    "list": "array",
    "tuple": "array",
    "Queue": "array",
    "Stack": "array",
    "dict": "object",
    "object": "object",
    "HashMap": "object",
    "Hashtable": "object",
    "byte": "integer",
    "short": "integer",
    "long": "integer",
    "Bigint": "integer",
    "any": None,
    "Any": None,
    "": None,
}
"""BFCL type name -> JSON Schema type; None means no constraint. A name not listed here
raises: a new dialect word must be looked at, not guessed."""

_KEPT = ("description", "default", "format", "maximum", "minimum", "minItems", "maxItems")

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "string": (str,),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
}


def _conforms(value: Any, json_type: str) -> bool:
    """Whether a JSON value has `json_type` (booleans are not numbers, as in JSON Schema)."""
    if isinstance(value, bool) and json_type in ("integer", "number"):
        return False
    return isinstance(value, _PY_TYPES[json_type])


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """One BFCL schema node (a parameter, an item, a property) as JSON Schema."""
    raw_type = node.get("type")
    if raw_type is not None and raw_type not in TYPE_MAP:
        raise ValueError(f"bfcl schema: unknown type {raw_type!r}")
    json_type = TYPE_MAP[raw_type] if raw_type is not None else None
    out: dict[str, Any] = {k: node[k] for k in _KEPT if k in node}
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
    required = node.get("required")
    if isinstance(required, list) and all(isinstance(r, str) for r in required):
        out["required"] = list(required)
    if "items" in node and isinstance(node["items"], dict):
        out["items"] = to_json_schema(node["items"])
    enum = node.get("enum")
    if isinstance(enum, list):
        if json_type == "array":
            out["items"] = {**out.get("items", {}), "enum": list(enum)}
        else:
            out["enum"] = list(enum)
            if json_type is not None and not all(_conforms(v, json_type) for v in enum):
                json_type = None
    nullable = "default" in node and node["default"] is None
    if nullable and "enum" in out and None not in out["enum"]:
        out["enum"].append(None)
    if json_type is not None:
        out["type"] = [json_type, "null"] if nullable else json_type
    return out


def parameters_schema(doc: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema object of a BFCL function doc's arguments."""
    params = doc.get("parameters") or {}
    schema = to_json_schema({**params, "type": "dict"})
    schema.setdefault("properties", {})
    schema.pop("default", None)
    return schema


def function_spec(
    doc: dict[str, Any], cost: CostModel | None = None, timeout_s: float = 10.0
) -> ToolSpec:
    """A `ToolSpec` for one BFCL function doc: its name and description as given, its
    parameters as standard JSON Schema (see the module docstring)."""
    return ToolSpec(
        name=str(doc["name"]),
        description=str(doc.get("description", "")),
        parameters=parameters_schema(doc),
        cost=cost if cost is not None else CostModel(),
        timeout_s=timeout_s,
    )
