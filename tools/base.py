"""The tool protocol: a typed spec (pydantic arguments -> JSON schema, cost model) and an async
call that returns text.

The runner owns everything around a call that must be uniform across tools: parsing and
validating arguments (errors become observations naming the bad field), timeouts, latency and
the cost vector. A tool only does its work and reports what it produced.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Encode = Callable[[str], Sequence[int]]


class CostModel(BaseModel):
    """Prices that turn one call into a cost vector (kind -> amount)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    per_call: dict[str, float] = Field(default_factory=lambda: {"calls": 1.0})
    """Fixed cost of every call, by kind (e.g. `calls`, `money_usd`, `human_attention`)."""
    per_second: dict[str, float] = Field(default_factory=dict)
    """Cost per second of wall time, by kind (e.g. `{"time_s": 1.0}`)."""

    def cost(self, latency_s: float, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Cost vector of one call that took `latency_s` and reported `extra` (e.g. tokens)."""
        out = dict(self.per_call)
        for kind, price in self.per_second.items():
            out[kind] = out.get(kind, 0.0) + price * latency_s
        for kind, amount in (extra or {}).items():
            out[kind] = out.get(kind, 0.0) + amount
        return out


class NoArgs(BaseModel):
    # No docstring: pydantic would show it to the agent as the schema's description.
    model_config = ConfigDict(extra="forbid")


class ArgumentError(ValueError):
    """Arguments that do not fit a tool's schema; the message names each bad field."""


@dataclass(frozen=True)
class ToolSpec:
    """What the agent is told about a tool, and how calls to it are bounded and priced."""

    name: str
    """Name the agent calls it by."""
    description: str
    """One or two sentences for the system prompt."""
    args_model: type[BaseModel] = NoArgs
    """Pydantic model of the arguments (none by default); its JSON schema is what the agent
    sees, and the tool receives an instance of it."""
    parameters: dict[str, Any] | None = None
    """A JSON Schema for the arguments instead of a pydantic model (MCP servers, BFCL function
    docs): shown to the agent as is, enforced with `jsonschema`; the tool receives the arguments
    as a plain dict (a copy: what the policy wrote stays as recorded)."""
    cost: CostModel = field(default_factory=CostModel)
    """How a call is priced."""
    timeout_s: float = 30.0
    """A call that takes longer is cancelled and observed as a timeout."""
    max_output_tokens: int | None = None
    """The runner cuts longer observations (head and tail kept, the middle marked)."""
    concurrency: int | None = None
    """Calls of this tool in flight at once, across all episodes of a runner."""
    rate_per_s: float | None = None
    """Calls started per second, across all episodes of a runner: at most `ceil(rate)` starts
    in any window of `ceil(rate) / rate` seconds (a sliding window; bursts up to `ceil(rate)`)."""
    max_argument_chars: int = 16_384
    """A call whose raw JSON is longer is refused before validation (the parser refuses any
    call over 16,384 characters; a tool may set a lower bound)."""
    _validator: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, value in (
            ("timeout_s", self.timeout_s),
            ("max_output_tokens", self.max_output_tokens),
            ("concurrency", self.concurrency),
            ("rate_per_s", self.rate_per_s),
            ("max_argument_chars", self.max_argument_chars),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"tool {self.name!r}: {name} must be positive, got {value}")
        if self.parameters is None:
            return
        if self.args_model is not NoArgs:
            raise ValueError(f"tool {self.name!r}: give args_model or parameters, not both")
        if self.parameters.get("type", "object") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must describe a JSON object")
        try:  # a broken schema is the tool author's error: say so now, not per call
            validator = _validator_for(json.dumps(self.parameters, sort_keys=True))
        except Exception as e:
            why = getattr(e, "message", str(e))
            raise ValueError(f"tool {self.name!r}: invalid parameters schema: {why}") from e
        object.__setattr__(self, "_validator", validator)

    def json_schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema rendered into the system prompt."""
        if self.parameters is not None:
            params = dict(self.parameters)
        else:
            params = self.args_model.model_json_schema()
            params.pop("title", None)
            for prop in params.get("properties", {}).values():
                prop.pop("title", None)
        return {"name": self.name, "description": self.description, "parameters": params}

    def validate(self, arguments: dict[str, Any]) -> Any:
        """The arguments as the tool receives them: an `args_model` instance, or a copy of the
        dict when the spec has `parameters`. Raises `ArgumentError` naming every bad field;
        any other exception is a broken schema (the tool's fault, not the agent's)."""
        # A copy: a tool that changes its arguments must not rewrite the stored call. Flat
        # arguments (the common case) hold no value that can change in place, so copying the
        # dict is enough; a deep copy costs ~2 us a call, a tenth of dispatch's overhead.
        if all(type(v) in _FLAT for v in arguments.values()):
            arguments = dict(arguments)
        else:
            arguments = copy.deepcopy(arguments)
        if self._validator is not None:
            errors = sorted(self._validator.iter_errors(arguments), key=lambda e: list(e.path))
            if errors:
                raise ArgumentError("; ".join(_schema_error(e) for e in errors[:5]))
            return arguments
        try:
            return self.args_model.model_validate(arguments)
        except ValidationError as e:
            parts = []
            for err in e.errors()[:5]:
                where = ".".join(str(x) for x in err["loc"]) or "arguments"
                parts.append(f"{where}: {err['msg']}")
            raise ArgumentError("; ".join(parts)) from None


_FLAT = frozenset({str, int, float, bool, type(None)})
"""Types of JSON values that cannot change in place."""


@functools.lru_cache(maxsize=4096)
def _validator_for(schema_json: str) -> Any:
    # Keyed by the schema's JSON: many tools share a schema (BFCL items repeat functions), and
    # building a validator (meta-schema check included) costs milliseconds.
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def _schema_error(e: Any) -> str:
    where = ".".join(str(x) for x in e.absolute_path) or "arguments"
    return f"{where}: {e.message}"


@dataclass(frozen=True)
class ToolOutput:
    """What a tool produced."""

    text: str
    """Observation text, already within the tool's budget."""
    truncated: bool = False
    """True when the tool cut its output."""
    extra_cost: dict[str, float] = field(default_factory=dict)
    """Cost the tool measured itself (e.g. `tokens` returned)."""
    items: tuple[str, ...] = ()
    """Ids of what the output showed (search passages, ...), for coverage rewards."""


@runtime_checkable
class Tool(Protocol):
    """A capability the agent can call."""

    @property
    def spec(self) -> ToolSpec: ...

    async def __call__(self, args: Any) -> ToolOutput:
        """Run with validated arguments (an instance of `spec.args_model`). Raise `ToolError`
        with a message for the agent when the call cannot be done (a `tool_error` observation);
        any other exception is recorded as a `tool_bug`."""
        ...


class ToolSession(Protocol):
    """One episode's handle on a stateful tool (a Python interpreter, a file system)."""

    async def __call__(self, args: Any) -> ToolOutput:
        """As `Tool.__call__`; state persists between calls of the same session."""
        ...

    async def aclose(self) -> None:
        """Destroy the episode's state. Idempotent; never raises."""
        ...


@runtime_checkable
class EpisodeTool(Protocol):
    """A tool whose state belongs to one episode: the runner opens a session at the episode's
    first call to it and closes it when the episode ends, however it ends."""

    @property
    def spec(self) -> ToolSpec: ...

    def session(self) -> ToolSession:
        """A new, empty session. Cheap: expensive resources are taken on its first call."""
        ...


class ToolkitSession(Protocol):
    """One episode's handle on a toolkit's shared state."""

    async def call(self, name: str, args: Any) -> ToolOutput:
        """Run the toolkit's tool `name` with validated arguments (as `ToolSpec.validate`
        returns them); state persists between calls of the same session."""
        ...

    async def aclose(self) -> None:
        """Destroy the episode's state. Idempotent; never raises."""
        ...


@runtime_checkable
class Toolkit(Protocol):
    """Several tools over one per-episode state (a simulated file system's `ls`, `cd` and `cat`;
    a house the agent walks through): the runner opens one session at the episode's first call
    to any of them and closes it when the episode ends."""

    @property
    def specs(self) -> Sequence[ToolSpec]: ...

    def session(self) -> ToolkitSession:
        """A new session with fresh state. Cheap: expensive resources are taken lazily."""
        ...


AnyTool = Tool | EpisodeTool | Toolkit
"""What a runner or an episode can be given."""


def tool_specs(tools: Sequence[AnyTool]) -> list[ToolSpec]:
    """Every spec of `tools`, toolkits expanded, in order."""
    out: list[ToolSpec] = []
    for t in tools:
        if isinstance(t, Toolkit):
            out.extend(t.specs)
        else:
            out.append(t.spec)
    return out


class ToolError(Exception):
    """A tool failed in a way the agent should see: the runner shows the agent the message
    alone (no class name), as a `tool_error` observation. Any other exception a tool raises is
    a defect for a person to fix (`tool_bug`)."""


class BadOutputError(ToolError):
    """A tool returned something that is not text and has no faithful text form (bytes, an
    arbitrary object). The runner records it as a `bad_output` observation."""


def truncate_to_tokens(
    text: str, encode: Callable[[str], Sequence[int]], max_tokens: int
) -> tuple[str, bool]:
    """Cut `text` to at most `max_tokens` tokens (by `encode`), at a character boundary found by
    bisection so that no partial token is left; returns (text, truncated)."""
    if len(encode(text)) <= max_tokens:
        return text, False
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(text[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + " …[truncated]", True


def truncate_middle(text: str, encode: Encode, max_tokens: int) -> tuple[str, bool]:
    """Cut `text` to at most about `max_tokens` tokens, keeping a head and a tail of half the
    budget each (found by bisection on characters, so no token is split)."""
    if len(encode(text)) <= max_tokens:
        return text, False
    half = max(max_tokens // 2, 1)

    def longest(fits: Callable[[int], bool], n: int) -> int:
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    # Tokens are rarely longer than 32 characters: bound the search to keep it cheap.
    bound = min(len(text), half * 32)
    head = longest(lambda k: len(encode(text[:k])) <= half, bound)
    tail = longest(lambda k: len(encode(text[len(text) - k :])) <= half, bound)
    cut = len(text) - head - tail
    return f"{text[:head]}\n…[{cut} characters cut]…\n{text[len(text) - tail :]}", True
