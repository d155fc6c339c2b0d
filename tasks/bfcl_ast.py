"""BFCL's AST check of single-turn function calls, re-implemented for calls decoded from JSON.

The Berkeley Function Calling Leaderboard (bfcl-eval, `eval_checker/ast_eval/ast_checker.py`)
grades a model's first response by comparing its calls with a list of accepted values per
argument. This module applies the same rules to calls the agent wrote as
`{"name": ..., "arguments": {...}}`, so a value is a JSON value: exactly what bfcl-eval's own
function-calling handlers hand its checker after `json.loads` of the arguments. Only the Python
rules apply (the Java and JavaScript suites are not used). The tests compare this checker with
bfcl-eval's on every shipped ground truth and on perturbations of it.

Rules, per call (`_check_call`; the first failure decides, as in bfcl-eval):
- the name must be the expected function's;
- every parameter the doc marks `required` must be present;
- every argument must be a documented parameter that the ground truth lists;
- type: the value's exact Python type must be the doc type's (`string` str, `integer` int,
  `float` float, `boolean` bool, `array`/`tuple` list, `dict` dict, `any` str), except that an
  int is accepted (as a float) where a float is expected, and a value of the type of the
  ground truth's first non-"" accepted value is accepted too (bfcl-eval calls it a variable).
  Exact types: `true` is no integer and `2.0` is no integer. Array items are checked one level
  deep against the item type (no int-to-float coercion there), and not at all when the
  accepted list holds a non-list before any list that fits (an optional `""`);
- value: strings compare after `standardize` (lower case; spaces and `,./-_*^` removed;
  `'` read as `"`); lists compare element-wise after standardising their string elements;
  dicts compare key by key against each accepted dict (string values standardised, missing
  keys allowed only where that key's accepted list holds ""); lists of dicts compare dict by
  dict, in order; anything else (numbers, booleans, "variables") by Python equality;
- every ground-truth parameter left out must accept "" (the mark of an optional argument).

Per response (`check_calls`), by category name as bfcl-eval dispatches it: a name containing
`parallel` needs as many calls as the ground truth and matches them in any order, greedily
(each ground-truth call, in order, takes the first unmatched call that passes; bfcl-eval does
not search for a perfect matching, so neither does this); else a name containing `multiple`
needs as many calls as the ground truth (always one) and checks the first against the function
the ground truth names; else (simple) exactly one call, checked against the first function.

Deliberate differences: a doc or ground truth shape that crashes bfcl-eval's checker (an array
item that is not a dict where dicts are expected, a ground-truth name no doc has) is a failed
check here (`valid` False) or a `ValueError` for data errors, never an unhandled exception.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PYTHON_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
"""BFCL Python type name -> the exact Python type a JSON value must have."""

NESTED_TYPES = ("array", "tuple")
"""Types whose items are type-checked (one level deep)."""

_STANDARDIZE = re.compile(r"[ ,./\-_*^]")


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one response."""

    valid: bool
    """True when the calls match the ground truth."""
    error: str | None = None
    """Why not, for people (bfcl-eval's wording where it has one); None when valid."""


OK = CheckResult(True)


def standardize(text: str) -> str:
    """BFCL's string normal form: "April 1, 2024" and "april 1 2024" compare equal."""
    return _STANDARDIZE.sub("", text).lower().replace("'", '"')


def _std(value: Any) -> Any:
    return standardize(value) if type(value) is str else value


def _answer_type(accepted: Sequence[Any]) -> type | None:
    """Type of the first accepted value that is not the optional mark ""."""
    for a in accepted:
        if a != "":
            return type(a)
    return None


def _type_ok(value: Any, accepted: Any, expected: type, nested: type | None) -> tuple[bool, bool]:
    """(type matches, value is a "variable") as bfcl-eval's `type_checker` decides them."""
    answer_type = _answer_type(accepted)
    is_variable = answer_type is not None and answer_type is not expected
    value_type = type(value)  # compared by identity: bool is no int, int no float
    if value_type is expected:
        if nested is None:
            return True, is_variable
        for item in accepted:
            if type(item) is not list or all(_type_ok(v, item, nested, None)[0] for v in value):
                return True, is_variable
        return False, False
    if answer_type is not None and value_type is answer_type:
        return True, True
    return False, False


def _dict_ok(value: dict[str, Any], accepted: Sequence[Any]) -> bool:
    """bfcl-eval's `dict_checker`: `value` matches one accepted dict ("" entries skipped)."""
    for answer in accepted:
        if answer == "":
            continue
        if not isinstance(answer, dict):
            raise ValueError(f"bfcl: accepted dict value {answer!r} is not a dict")
        if all(
            key in answer and _std(v) in [_std(a) for a in answer[key]] for key, v in value.items()
        ) and all(key in value or "" in vals for key, vals in answer.items()):
            return True
    return False


def _list_dict_ok(value: list[Any], accepted: Sequence[Any]) -> bool:
    """bfcl-eval's `list_dict_checker`: same length as an accepted list, dicts matching in
    order."""
    for answer in accepted:
        if len(value) != len(answer):
            continue
        if all(type(v) is dict and _dict_ok(v, [a]) for v, a in zip(value, answer, strict=True)):
            return True
    return False


def _value_error(param: str, value: Any, accepted: Sequence[Any]) -> CheckResult:
    return CheckResult(
        False, f"Invalid value for parameter {param!r}: {value!r}. Expected one of {accepted}."
    )


def _check_value(
    param: str, value: Any, accepted: Sequence[Any], doc: Mapping[str, Any]
) -> CheckResult:
    """One argument's type and value against its doc entry and accepted values."""
    type_name = doc["type"]
    expected = PYTHON_TYPES[type_name]
    nested = PYTHON_TYPES[doc["items"]["type"]] if type_name in NESTED_TYPES else None
    if type_name == "float" and type(value) is int:
        value = float(value)
    type_ok, is_variable = _type_ok(value, accepted, expected, nested)
    if not type_ok:
        return CheckResult(
            False,
            f"Incorrect type for parameter {param!r}. Expected type {type_name}, "
            f"got {type(value).__name__}. Parameter value: {value!r}.",
        )
    if not is_variable:
        if expected is dict:
            return OK if _dict_ok(value, accepted) else _value_error(param, value, accepted)
        if expected is list and nested is dict:
            return OK if _list_dict_ok(value, accepted) else _value_error(param, value, accepted)
        if expected is str:
            ok = standardize(value) in [standardize(a) for a in accepted if type(a) is str]
            return OK if ok else _value_error(param, value, accepted)
        if expected is list:
            # An accepted "" iterates as an empty list: `[]` passes for an optional list.
            ok = [_std(v) for v in value] in [[_std(a) for a in answer] for answer in accepted]
            return OK if ok else _value_error(param, value, accepted)
    return OK if value in accepted else _value_error(param, value, accepted)


def _check_call(
    doc: Mapping[str, Any],
    call: tuple[str, Mapping[str, Any]],
    answer: Mapping[str, Mapping[str, Sequence[Any]]],
) -> CheckResult:
    """One call against one function doc and one ground-truth call (bfcl-eval's
    `simple_function_checker`)."""
    accepted = next(iter(answer.values()))
    name, args = call
    if name != doc["name"]:
        return CheckResult(False, f"Function name {doc['name']!r} not found in model output.")
    properties = doc["parameters"]["properties"]
    for param in doc["parameters"]["required"]:
        if param not in args:
            return CheckResult(False, f"Missing required parameter: {param!r}.")
    for param, value in args.items():
        if param not in properties or param not in accepted:
            return CheckResult(False, f"Unexpected parameter: {param!r}.")
        result = _check_value(param, value, accepted[param], properties[param])
        if not result.valid:
            return result
    for param, values in accepted.items():
        if param not in args and "" not in values:
            return CheckResult(
                False, f"Optional parameter {param!r} not provided and not marked as optional."
            )
    return OK


def _doc_for(functions: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    for doc in functions:
        if doc["name"] == name:
            return doc
    raise ValueError(f"bfcl: the ground truth calls {name!r}, which no function doc defines")


def check_calls(
    calls: Sequence[tuple[str, Mapping[str, Any]]],
    possible_answer: Sequence[Mapping[str, Mapping[str, Sequence[Any]]]],
    functions: Sequence[Mapping[str, Any]],
    category: str,
) -> CheckResult:
    """Whether `calls` (name, arguments), in the order written, answer a BFCL item whose
    ground truth is `possible_answer` (`[{function: {param: [accepted values]}}]`) over
    `functions` (its docs), for the BFCL test `category` (`simple_python`, `live_multiple`,
    ...; only `parallel` and `multiple` in the name matter). Names compare exactly, as
    bfcl-eval compares them for a model shown the doc names unchanged. Pure; raises
    `ValueError` only on data errors (a ground-truth function without a doc)."""
    if "parallel" in category:
        if len(calls) != len(possible_answer):
            return CheckResult(False, "Wrong number of functions.")
        matched: set[int] = set()
        for i, answer in enumerate(possible_answer):
            doc = _doc_for(functions, next(iter(answer)))
            for index, call in enumerate(calls):
                if index not in matched and _check_call(doc, call, answer).valid:
                    matched.add(index)
                    break
            else:
                return CheckResult(
                    False, f"Could not find a matching function for index {i} of possible answers."
                )
        return OK
    if "multiple" in category:
        if len(calls) != len(possible_answer):
            return CheckResult(False, "Wrong number of functions.")
        doc = _doc_for(functions, next(iter(possible_answer[0])))
        return _check_call(doc, calls[0], possible_answer[0])
    if len(calls) != 1:
        return CheckResult(False, "Wrong number of functions.")
    return _check_call(functions[0], calls[0], possible_answer[0])
