"""BFCL's simulated device APIs (file system, messaging, trading, travel, car, ...) as one
per-episode toolkit.

bfcl-eval's multi-turn categories give the agent the public methods of a few Python classes
(`GorillaFileSystem`, `TwitterAPI`, ...), each loaded from the test item's `initial_config`.
This module runs the benchmark's own classes, so states and results are the benchmark's, and
copies its execution path (`multi_turn_utils.execute_multi_turn_func_call`) in the parts that
decide what the agent sees:
- each involved class is instantiated once per episode and, unless stateless (`MathAPI`),
  loaded with `_load_scenario(deepcopy(initial_config[class]), long_context=...)`;
- a call is a method call of the class that documents the function, with keyword arguments
  (BFCL `eval`s a Python call string; here the runner has already parsed and validated JSON
  arguments, so nothing is evaluated);
- the result is shown as BFCL shows it: a string as is, a dict as `json.dumps` (or `str` when it
  does not serialise), anything else as `str`; an exception becomes
  `Error during execution: {exception}`, an observation rather than a tool error.

The simulators are pure Python and fast (well under a millisecond a call), so calls run on the
event loop. Their randomness is seeded by the scenario, so a replay of the same calls from the
same config reproduces states and results exactly, which the grader relies on.

bfcl-eval is installed without its dependencies; the modules used here (the simulators, their
`long_context` data, the function docs) need none of them, and are imported on first use.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import importlib.resources
import inspect
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from turnrl.tools.base import CostModel, ToolError, ToolOutput, ToolSpec
from turnrl.tools.bfcl_schema import function_spec

_BACKEND = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"

CLASSES: dict[str, tuple[str, str]] = {
    "GorillaFileSystem": ("gorilla_file_system", "gorilla_file_system.json"),
    "MathAPI": ("math_api", "math_api.json"),
    "MessageAPI": ("message_api", "message_api.json"),
    "TwitterAPI": ("posting_api", "posting_api.json"),
    "TicketAPI": ("ticket_api", "ticket_api.json"),
    "TradingBot": ("trading_bot", "trading_bot.json"),
    "TravelAPI": ("travel_booking", "travel_booking.json"),
    "VehicleControlAPI": ("vehicle_control", "vehicle_control.json"),
}
"""Simulator class -> (its module under BFCL's `func_source_code`, its function-doc file), as
in BFCL's `executable_backend_config`. The memory and web-search classes are left out: they
need packages bfcl-eval was installed without, and the network."""

STATELESS = frozenset({"MathAPI"})
"""Classes BFCL never loads a scenario into."""

ERROR_PREFIX = "Error during execution: "
"""How BFCL shows the model a call that raised."""


@functools.cache
def function_docs(class_name: str) -> tuple[dict[str, Any], ...]:
    """The BFCL function docs of a simulator class, in file order."""
    if class_name not in CLASSES:
        raise ValueError(f"bfcl: unknown simulator class {class_name!r}")
    path = importlib.resources.files("bfcl_eval") / "data" / "multi_turn_func_doc"
    text = (path / CLASSES[class_name][1]).read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


@functools.cache
def simulator_class(class_name: str) -> type:
    """The benchmark's class itself, imported on first use."""
    if class_name not in CLASSES:
        raise ValueError(f"bfcl: unknown simulator class {class_name!r}")
    module = importlib.import_module(f"{_BACKEND}.{CLASSES[class_name][0]}")
    cls: type = getattr(module, class_name)
    return cls


@functools.cache
def _default_specs(class_name: str) -> tuple[ToolSpec, ...]:
    return tuple(function_spec(doc) for doc in function_docs(class_name))


def owners(classes: Iterable[str]) -> dict[str, str]:
    """Function name -> the class that provides it. BFCL maps names in class order, a later
    class winning a clash; the shipped classes share no name, which `BfclToolkit` checks."""
    out: dict[str, str] = {}
    for class_name in classes:
        for doc in function_docs(class_name):
            out[str(doc["name"])] = class_name
    return out


def new_instances(
    classes: Sequence[str], initial_config: Mapping[str, Any], long_context: bool
) -> dict[str, Any]:
    """Fresh simulators for `classes`, loaded as BFCL loads them (from a deep copy)."""
    instances: dict[str, Any] = {}
    for class_name in classes:
        instance = simulator_class(class_name)()
        if class_name not in STATELESS:
            config = copy.deepcopy(initial_config.get(class_name, {}))
            instance._load_scenario(config, long_context=long_context)
        instances[class_name] = instance
    return instances


def format_result(value: Any) -> str:
    """A method's return value as BFCL shows it to the model."""
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def execute(instance: Any, name: str, arguments: Mapping[str, Any]) -> str:
    """Call `instance.name(**arguments)`; the result, or the exception, as BFCL shows it.
    The simulator gets a deep copy: it keeps argument lists in its state and mutates them
    later (`post_tweet`'s mentions, extended by `mention`), which must not reach the caller's
    records (BFCL `eval`s fresh literals, so its calls share nothing either)."""
    try:
        return format_result(getattr(instance, name)(**copy.deepcopy(dict(arguments))))
    except Exception as e:  # the simulator's errors are the agent's observations
        return f"{ERROR_PREFIX}{e}"


def parse_call(text: str, classes: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """A BFCL ground-truth call string (`mv(source='a', destination='b')`, `cd('x')`) as a
    function name and keyword arguments. Parsed with `ast` and read with `literal_eval`, never
    evaluated; positional arguments are named from the method's signature."""
    node = ast.parse(text.strip(), mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"bfcl: not a plain function call: {text!r}")
    name = node.func.id
    args = [ast.literal_eval(a) for a in node.args]
    kwargs = {str(k.arg): ast.literal_eval(k.value) for k in node.keywords}
    if args:
        owner = owners(classes).get(name)
        if owner is None:
            raise ValueError(f"bfcl: {name!r} is not a function of {list(classes)}")
        signature = inspect.signature(getattr(simulator_class(owner), name))
        bound = signature.bind_partial(None, *args, **kwargs).arguments
        bound.pop(next(iter(signature.parameters)))
        kwargs = dict(bound)
    return name, kwargs


class BfclSession:
    """One episode's simulators."""

    def __init__(self, toolkit: BfclToolkit) -> None:
        self._toolkit = toolkit
        self._instances: dict[str, Any] | None = None
        self._closed = False

    def state(self) -> dict[str, Any]:
        """Class name -> its simulator, as the calls so far have left it (loaded on first use)."""
        if self._instances is None:
            tk = self._toolkit
            self._instances = new_instances(tk.classes, tk.initial_config, tk.long_context)
        return self._instances

    async def call(self, name: str, args: Any) -> ToolOutput:
        """Run function `name` with its (validated) keyword arguments."""
        if self._closed:
            raise ToolError("bfcl: session is closed")
        owner = self._toolkit.owner.get(name)
        if owner is None:
            raise ToolError(f"bfcl: no function {name!r} in {list(self._toolkit.classes)}")
        return ToolOutput(text=execute(self.state()[owner], name, args))

    async def aclose(self) -> None:
        self._closed = True
        self._instances = None


class BfclToolkit:
    """The functions of some BFCL simulator classes over one episode's state (see the module
    docstring)."""

    def __init__(
        self,
        classes: Sequence[str],
        initial_config: Mapping[str, Any],
        long_context: bool = False,
        hidden: Sequence[str] = (),
        cost: CostModel | None = None,
    ) -> None:
        """`hidden` names functions the episode keeps from the agent until a user turn reveals
        them (BFCL's missed functions); they are among `specs`, and the runner does the
        hiding."""
        self.classes = tuple(classes)
        self.initial_config: dict[str, Any] = copy.deepcopy(dict(initial_config))
        self.long_context = long_context
        self.owner = owners(self.classes)
        n_docs = sum(len(function_docs(c)) for c in self.classes)
        if len(self.owner) != n_docs:
            raise ValueError(f"bfcl: classes {list(self.classes)} share a function name")
        unknown = [h for h in hidden if h not in self.owner]
        if unknown:
            raise ValueError(f"bfcl: hidden functions {unknown} are not in {list(self.classes)}")
        self.hidden = tuple(hidden)
        self._specs = tuple(
            spec
            for c in self.classes
            for spec in (
                _default_specs(c)
                if cost is None
                else tuple(function_spec(doc, cost) for doc in function_docs(c))
            )
        )

    @property
    def specs(self) -> Sequence[ToolSpec]:
        return self._specs

    def session(self) -> BfclSession:
        return BfclSession(self)
