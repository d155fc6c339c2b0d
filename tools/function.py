"""`@tool`: a typed Python function as a tool, and `state_toolkit`: a class of such methods as a
per-episode toolkit.

The signature is the schema: each parameter becomes a field of a pydantic model (its annotation
the type, its default the default, `Annotated[..., Field(...)]` kept as is), the docstring's
first paragraph the description and its `Args:` section the fields' descriptions. Errors in
the signature are the author's, so they raise when the decorator runs, not when the agent calls.

    @tool(cost=CostModel(per_call={"calls": 1, "money_usd": 0.001}), rate_per_s=5)
    async def weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''Current temperature in a city.

        Args:
            city: City name, e.g. "Paris".
            unit: Temperature unit.
        '''
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model

from turnrl.tools.base import BadOutputError, CostModel, ToolOutput, ToolSpec

T = TypeVar("T")


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _doc_parts(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google-style docstring."""
    text = inspect.cleandoc(doc or "")
    description = text.split("\n\n", 1)[0].replace("\n", " ").strip()
    params: dict[str, str] = {}
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?|\n)*)", text, re.M)
    if section:
        current = None
        for line in section.group(1).splitlines():
            m = re.match(r"\s+(\w+)(?:\s*\([^)]*\))?:\s*(.*)", line)
            if m and (current is None or len(line) - len(line.lstrip()) <= 8):
                current = m.group(1)
                params[current] = m.group(2).strip()
            elif current and line.strip():
                params[current] += " " + line.strip()
    return description, params


def args_model_of(fn: Callable[..., Any], skip_first: bool = False) -> type[BaseModel]:
    """The pydantic model of `fn`'s parameters (module docstring)."""
    name = getattr(fn, "__name__", "tool")
    hints = typing.get_type_hints(fn, include_extras=True)
    _, docs = _doc_parts(fn.__doc__)
    fields: dict[str, Any] = {}
    params = list(inspect.signature(fn).parameters.values())
    for p in params[1:] if skip_first else params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"tool {name!r}: parameter {p.name!r} must be a named parameter")
        if p.name not in hints:
            raise TypeError(f"tool {name!r}: parameter {p.name!r} has no type annotation")
        default: Any = ... if p.default is p.empty else p.default
        annotation = hints[p.name]
        if p.name in docs and not _has_field(annotation):
            default = Field(default, description=docs[p.name])
        fields[p.name] = (annotation, default)
    model: type[BaseModel] = create_model(f"{name}_args", __base__=_Args, **fields)
    return model


def _has_field(annotation: Any) -> bool:
    return typing.get_origin(annotation) is typing.Annotated and any(
        type(m).__name__ == "FieldInfo" for m in typing.get_args(annotation)[1:]
    )


def to_output(value: object, tool: str) -> ToolOutput:
    """A function's return value as an observation: text as is, JSON values as JSON, pydantic
    models as their JSON; anything else is a `BadOutputError`."""
    if isinstance(value, ToolOutput):
        return value
    if isinstance(value, str):
        return ToolOutput(text=value)
    if value is None:
        return ToolOutput(text="(no output)")
    if isinstance(value, BaseModel):
        return ToolOutput(text=value.model_dump_json())
    if isinstance(value, int | float | bool | list | dict | tuple):
        try:
            return ToolOutput(text=json.dumps(value, ensure_ascii=False))
        except (TypeError, ValueError) as e:
            raise BadOutputError(f"{tool} returned a value with no JSON form: {e}") from None
    raise BadOutputError(f"{tool} returned {type(value).__name__}, not text")


class FunctionTool(Generic[T]):
    """A `Tool` calling a function with its validated arguments (made by `@tool`)."""

    def __init__(self, fn: Callable[..., Any], spec: ToolSpec) -> None:
        self.fn = fn
        self._spec = spec
        self._fields = tuple(spec.args_model.model_fields)
        self._is_async = inspect.iscoroutinefunction(fn)

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def __call__(self, args: Any) -> ToolOutput:
        return await self.call_with(args)

    async def call_with(self, args: Any, *first: Any) -> ToolOutput:
        """Call the function with `first` (a bound instance) and the fields of `args`."""
        # Attributes, not model_dump: nested models stay models, as the function typed them.
        kwargs = {f: getattr(args, f) for f in self._fields}
        if self._is_async:
            value = await self.fn(*first, **kwargs)
        else:
            # A blocking function must not stall every other episode on the loop.
            value = await asyncio.to_thread(self.fn, *first, **kwargs)
        return to_output(value, self._spec.name)


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    cost: CostModel | None = None,
    timeout_s: float = 30.0,
    max_output_tokens: int | None = None,
    concurrency: int | None = None,
    rate_per_s: float | None = None,
    max_argument_chars: int = 16_384,
) -> Any:
    """Make a `FunctionTool` of a typed function (module docstring). Usable bare (`@tool`) or
    with settings (`@tool(cost=..., rate_per_s=...)`). On a method of a `state_toolkit` class,
    `self` is not part of the schema."""

    def wrap(f: Callable[..., Any]) -> FunctionTool[Any]:
        params = list(inspect.signature(f).parameters)
        is_method = bool(params) and params[0] == "self"
        doc_description, _ = _doc_parts(f.__doc__)
        spec = ToolSpec(
            name=name or f.__name__,
            description=description or doc_description or f.__name__,
            args_model=args_model_of(f, skip_first=is_method),
            cost=cost or CostModel(),
            timeout_s=timeout_s,
            max_output_tokens=max_output_tokens,
            concurrency=concurrency,
            rate_per_s=rate_per_s,
            max_argument_chars=max_argument_chars,
        )
        if not spec.description:
            raise TypeError(f"tool {spec.name!r} needs a description (a docstring)")
        return FunctionTool(f, spec)

    return wrap if fn is None else wrap(fn)


class _StateSession:
    def __init__(self, instance: Any, tools: dict[str, FunctionTool[Any]]) -> None:
        self._instance = instance
        self._tools = tools
        self._closed = False

    async def call(self, name: str, args: Any) -> ToolOutput:
        return await self._tools[name].call_with(args, self._instance)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        close: Callable[[], Awaitable[None] | None] | None = getattr(self._instance, "aclose", None)
        if close is None:
            return
        try:
            result = close()
            if inspect.isawaitable(result):
                await result
        except Exception:  # closing must never raise (the `ToolkitSession` contract)
            return


class StateToolkit:
    """A `Toolkit` whose state is an instance of a class with `@tool` methods: each episode gets
    a fresh instance (`factory()`); its `aclose()`, if any, runs when the episode ends."""

    def __init__(self, factory: Callable[[], Any], tools: Sequence[FunctionTool[Any]]) -> None:
        self._factory = factory
        self._tools = {t.spec.name: t for t in tools}
        self._specs = [t.spec for t in tools]

    @property
    def specs(self) -> Sequence[ToolSpec]:
        return self._specs

    def session(self) -> _StateSession:
        return _StateSession(self._factory(), self._tools)

    def with_specs(self, **changes: Any) -> StateToolkit:
        """The same toolkit with every spec changed (e.g. `timeout_s=5`)."""
        tools: list[FunctionTool[Any]] = [
            FunctionTool(t.fn, replace(t.spec, **changes)) for t in self._tools.values()
        ]
        return StateToolkit(self._factory, tools)


def state_toolkit(cls: type[Any], *args: Any, **kwargs: Any) -> StateToolkit:
    """The `@tool` methods of `cls` as a toolkit; each episode's state is `cls(*args, **kwargs)`."""
    tools = [v for v in vars(cls).values() if isinstance(v, FunctionTool)]
    if not tools:
        raise TypeError(f"{cls.__name__} has no @tool methods")
    return StateToolkit(lambda: cls(*args, **kwargs), tools)
