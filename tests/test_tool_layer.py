"""The tool layer: `@tool` schemas, JSON-Schema tools, toolkits, dispatch failures as typed
observations, truncation, cost accounting, rate and concurrency limits, multi-turn
conversations with tools revealed mid-way."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Annotated, Any, ClassVar, Literal

import pytest
from fakes import CharTokenizer
from pydantic import BaseModel, Field

from turnrl.agent.chat import ChatML
from turnrl.agent.dispatch import Dispatcher, ToolIndex
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode, StopReason, ToolCall, ToolErrorKind, UserTurn
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.tools.base import AnyTool, ArgumentError, CostModel, ToolError, ToolOutput, ToolSpec
from turnrl.tools.function import FunctionTool, state_toolkit, tool

TOK = CharTokenizer()
END = "<|im_end|>"


def call(name: str, **arguments: Any) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def run(
    replies: Sequence[str],
    tools: Sequence[AnyTool],
    spec: EpisodeSpec | None = None,
    budget: Budget | None = None,
) -> tuple[Episode, ScriptedPolicy]:
    it = iter(replies)
    policy = ScriptedPolicy(lambda ctx: next(it, "<answer>end</answer>") + END, TOK)
    runner = EpisodeRunner(
        policy,
        ChatML(TOK),
        tools,
        budget
        or Budget(
            max_context_tokens=200_000, max_new_tokens=100_000, max_turns=20, max_tool_calls=50
        ),
        SamplingParams(),
    )
    spec = spec or EpisodeSpec("e", "g", "t", "Be brief.", "Q?")
    return asyncio.run(runner.run_episode(spec)), policy


@tool(cost=CostModel(per_call={"calls": 1, "money_usd": 0.25}))
async def weather(
    city: str,
    unit: Literal["C", "F"] = "C",
    days: Annotated[int, Field(ge=1, le=7, description="Forecast length.")] = 1,
) -> str:
    """Current temperature in a city.

    Args:
        city: City name, e.g. "Paris".
        unit: Temperature unit.
    """
    return f"{city}: 21 {unit} for {days} day(s)"


# ---- @tool schemas ----------------------------------------------------------------------


def test_tool_decorator_schema_round_trips() -> None:
    schema = weather.spec.json_schema()
    assert schema["name"] == "weather"
    assert schema["description"] == "Current temperature in a city."
    params = schema["parameters"]
    assert params["required"] == ["city"]
    props = params["properties"]
    assert props["city"] == {"type": "string", "description": 'City name, e.g. "Paris".'}
    assert props["unit"]["enum"] == ["C", "F"] and props["unit"]["default"] == "C"
    assert props["days"]["maximum"] == 7 and props["days"]["description"] == "Forecast length."
    # The schema the agent sees validates exactly what the model accepts.
    args = weather.spec.validate({"city": "Oslo", "unit": "F"})
    assert (args.city, args.unit, args.days) == ("Oslo", "F", 1)
    assert json.loads(json.dumps(schema)) == schema


def test_tool_decorator_rejects_bad_signatures() -> None:
    async def untyped(x):  # type: ignore[no-untyped-def]
        """Doc."""

    async def star(*xs: int) -> str:
        """Doc."""
        return ""

    with pytest.raises(TypeError, match="no type annotation"):
        tool(untyped)
    with pytest.raises(TypeError, match="named parameter"):
        tool(star)


def test_validation_errors_name_the_bad_field() -> None:
    with pytest.raises(ArgumentError, match=r"days: Input should be less than or equal to 7"):
        weather.spec.validate({"city": "Oslo", "days": 9})
    with pytest.raises(ArgumentError, match=r"city: Field required"):
        weather.spec.validate({})
    with pytest.raises(ArgumentError, match=r"country: Extra inputs are not permitted"):
        weather.spec.validate({"city": "Oslo", "country": "NO"})


def test_json_schema_tools_validate_with_jsonschema() -> None:
    spec = ToolSpec(
        name="move",
        description="Move a file.",
        parameters={
            "type": "object",
            "properties": {
                "source": {"type": "string"},
                "n": {"type": "integer", "minimum": 0},
                "opts": {"type": "object", "properties": {"force": {"type": "boolean"}}},
            },
            "required": ["source"],
        },
    )
    assert spec.json_schema()["parameters"]["required"] == ["source"]
    assert spec.validate({"source": "a", "n": 2}) == {"source": "a", "n": 2}
    with pytest.raises(ArgumentError, match=r"n: -1 is less than the minimum of 0"):
        spec.validate({"source": "a", "n": -1})
    with pytest.raises(ArgumentError, match=r"opts\.force: 'yes' is not of type 'boolean'"):
        spec.validate({"source": "a", "opts": {"force": "yes"}})
    with pytest.raises(ArgumentError, match=r"arguments: 'source' is a required property"):
        spec.validate({})
    with pytest.raises(ValueError, match="JSON object"):
        ToolSpec(name="x", description="x", parameters={"type": "array"})
    with pytest.raises(ValueError, match="invalid parameters schema: 3 is not of type 'array'"):
        ToolSpec(name="x", description="x", parameters={"type": "object", "required": 3})


# ---- failures are typed observations ----------------------------------------------------


class Misbehaving:
    """Tools that hang, raise, return non-text, or print a lot."""

    @tool(timeout_s=0.2)
    async def hang(self) -> str:
        """Never returns."""
        await asyncio.sleep(3600)
        return ""

    @tool
    async def boom(self) -> str:
        """Raises."""
        raise RuntimeError("kaput")

    @tool
    async def blob(self) -> bytes:
        """Returns bytes."""
        return b"\x89PNG"

    @tool
    async def data(self) -> dict[str, Any]:
        """Returns JSON."""
        return {"a": [1, 2]}

    @tool(max_output_tokens=40)
    async def flood(self) -> str:
        """A long output."""
        return "head " + "x" * 5000 + " tail"

    @tool(max_argument_chars=1000)
    def blocking(self, n: int) -> int:
        """A plain function (run off the event loop)."""
        time.sleep(0.01)
        return n * 2


def test_failures_become_typed_observations_and_the_episode_goes_on() -> None:
    kit = state_toolkit(Misbehaving)
    huge = "y" * 2000
    replies = [
        call("hang")
        + call("boom")
        + call("blob")
        + call("data")
        + call("flood")
        + call("blocking", n=21)
        + call("nope")
        + call("blocking", n="many")
        + call("blocking", n=1, pad=huge)
        + "<tool_call>{not json</tool_call>",
    ]
    ep, _ = run(replies, [kit])
    assert ep.stop_reason == StopReason.ANSWERED
    results = ep.turns[0].tool_results
    kinds = [r.error for r in results]
    assert kinds == [
        "timeout",
        "tool_bug",
        "bad_output",
        None,
        None,
        None,
        "unknown_tool",
        "invalid_arguments",
        "too_large",
        "parse",
    ]
    assert "timed out after 0.2 s" in results[0].text
    assert "RuntimeError: kaput" in results[1].text
    assert "returned bytes, not text" in results[2].text
    assert json.loads(results[3].text) == {"a": [1, 2]}
    flood = results[4]
    assert flood.truncated and flood.text.startswith("head ") and flood.text.endswith(" tail")
    assert len(TOK.encode(flood.text)) < 80
    assert results[5].text == "42"
    assert "unknown tool 'nope'" in results[6].text and "blocking" in results[6].text
    assert "n: Input should be a valid integer" in results[7].text
    assert "the limit is 1000" in results[8].text
    # Every call that ran was priced (the default cost model: one call each).
    assert ep.cost["calls"] == 6.0


# ---- toolkits and per-episode state -----------------------------------------------------


class Counter:
    opened: ClassVar[list[Counter]] = []

    def __init__(self) -> None:
        self.n = 0
        self.closed = False
        Counter.opened.append(self)

    @tool
    async def inc(self, by: int = 1) -> str:
        """Add to the counter."""
        self.n += by
        return str(self.n)

    @tool
    async def get(self) -> str:
        """Read the counter."""
        return str(self.n)

    async def aclose(self) -> None:
        self.closed = True


def test_toolkit_tools_share_one_state_per_episode_closed_at_the_end() -> None:
    Counter.opened.clear()
    kit = state_toolkit(Counter)
    ep1, _ = run([call("inc", by=2) + call("get"), call("inc")], [kit])
    ep2, _ = run([call("get")], [kit])
    assert [r.text for r in ep1.turns[0].tool_results] == ["2", "2"]
    assert ep1.turns[1].tool_results[0].text == "3"
    assert ep2.turns[0].tool_results[0].text == "0"  # a fresh state per episode
    assert len(Counter.opened) == 2 and all(c.closed for c in Counter.opened)


def test_two_tools_with_one_name_are_refused() -> None:
    with pytest.raises(ValueError, match="two tools are named 'weather'"):
        ToolIndex([weather, weather])


# ---- costs ------------------------------------------------------------------------------


def test_cost_vectors_add_up_across_an_episode() -> None:
    slow = FunctionTool(
        weather.fn,
        ToolSpec(
            name="slow_weather",
            description="x",
            args_model=weather.spec.args_model,
            cost=CostModel(per_call={"calls": 1}, per_second={"time_s": 1.0}),
        ),
    )
    replies = [
        call("weather", city="A") + call("slow_weather", city="B"),
        call("weather", city="C"),
    ]
    ep, _ = run(replies, [weather, slow])
    results = [r for t in ep.turns for r in t.tool_results]
    total: dict[str, float] = {}
    for r in results:
        for k, v in r.cost.items():
            total[k] = total.get(k, 0.0) + v
    assert total == ep.cost
    assert ep.cost["calls"] == 3.0 and ep.cost["money_usd"] == 0.5
    assert ep.cost["time_s"] == pytest.approx(results[1].latency_s)
    assert ep.turns[-1].cost_so_far == ep.cost


# ---- rate and concurrency limits --------------------------------------------------------


class Probe:
    """Records when each call starts and how many run at once."""

    def __init__(self, concurrency: int | None, rate: float | None) -> None:
        self.starts: list[float] = []
        self.active = self.peak = 0
        self._spec = ToolSpec(
            name="probe",
            description="Probe.",
            args_model=_NoArgs,
            concurrency=concurrency,
            rate_per_s=rate,
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def __call__(self, args: object) -> ToolOutput:
        self.starts.append(time.monotonic())
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.02)
        self.active -= 1
        return ToolOutput(text="ok")


class _NoArgs(BaseModel):
    pass


def _many(probe: Probe, n: int) -> list[Episode]:
    policy = ScriptedPolicy(
        lambda ctx: (
            (
                call("probe")
                if "<tool_response>\nok" not in TOK.decode(ctx)
                else "<answer>x</answer>"
            )
            + END
        ),
        TOK,
    )
    runner = EpisodeRunner(policy, ChatML(TOK), [probe], Budget(), SamplingParams())
    specs = [EpisodeSpec(f"e{i}", "g", "t", "Hi.", "Q?") for i in range(n)]
    return asyncio.run(runner.run_many(specs, concurrency=n))


def test_concurrency_limit_holds_under_100_concurrent_episodes() -> None:
    probe = Probe(concurrency=3, rate=None)
    episodes = _many(probe, 100)
    assert len(probe.starts) == 100 and all(e.stop_reason == StopReason.ANSWERED for e in episodes)
    assert probe.peak == 3


def test_rate_limit_holds_under_100_concurrent_episodes() -> None:
    probe = Probe(concurrency=None, rate=40.0)
    t0 = time.monotonic()
    _many(probe, 100)
    starts = sorted(probe.starts)
    assert len(starts) == 100
    # At most 40 starts in any second: the 41st waits until a second after the first began,
    # the 81st two seconds. (A start is recorded a little after its slot is taken, so only
    # this direction is exact; a slower machine only makes it later.)
    assert starts[40] - t0 >= 1.0 and starts[80] - t0 >= 2.0


def test_dispatcher_limits_are_per_event_loop() -> None:
    """A runner reused across `asyncio.run` calls (train steps) rebinds its semaphores."""
    probe = Probe(concurrency=2, rate=None)
    index = ToolIndex([probe])
    dispatcher = Dispatcher(TOK.encode, time.monotonic)
    c = ToolCall(id="t0c0", name="probe", raw="{}", arguments={})
    for _ in range(2):

        async def both() -> list[str]:
            rs = await asyncio.gather(*(dispatcher.call(index, {}, c) for _ in range(4)))
            return [r.text for r in rs]

        assert asyncio.run(both()) == ["ok"] * 4


# ---- multi-turn conversations and revealed tools ----------------------------------------


def test_followups_continue_after_each_answer_and_reveal_tools() -> None:
    spec = EpisodeSpec(
        "e",
        "g",
        "t",
        "Help.",
        "First request",
        followups=(UserTurn("Second request"), UserTurn("Now with weather", reveal=("weather",))),
        hidden_tools=frozenset({"weather"}),
    )
    replies = [
        call("weather", city="X"),
        "<answer>cannot</answer>",
        "<answer>done two</answer>",
        call("weather", city="Oslo"),
        "<answer>Oslo is 21 C</answer>",
    ]
    ep, policy = run(replies, [weather], spec=spec)
    assert ep.stop_reason == StopReason.ANSWERED and ep.answer == "Oslo is 21 C"
    assert [t.user_turn for t in ep.turns] == [0, 0, 1, 2, 2]
    assert [t.answer for t in ep.turns] == [None, "cannot", "done two", None, "Oslo is 21 C"]
    first = ep.turns[0].tool_results[0]
    assert first.error == "unknown_tool" and "weather" not in first.text.split("tools:")[1]
    assert ep.turns[3].tool_results[0].text == "Oslo: 21 C for 1 day(s)"
    system = TOK.decode(ep.turns[0].prompt_ids)
    assert '"name": "weather"' not in system
    reveal = TOK.decode(ep.turns[2].observation_ids)
    assert '"name": "weather"' in reveal and "Now with weather" in reveal
    assert "Second request" in TOK.decode(ep.turns[1].observation_ids)
    # Tokens are the truth: each prompt the policy saw is the stored prefix.
    ids = ep.token_ids()
    offset = len(ep.turns[0].prompt_ids)
    for turn, seen in zip(ep.turns, policy.prompts, strict=True):
        assert seen == ids[:offset]
        offset += len(turn.completion_ids) + len(turn.observation_ids)


def test_a_branch_inside_a_conversation_resumes_at_its_user_turn() -> None:
    spec = EpisodeSpec(
        "e",
        "g",
        "t",
        "Help.",
        "First",
        followups=(UserTurn("Second", reveal=("weather",)), UserTurn("Third")),
        hidden_tools=frozenset({"weather"}),
    )
    ep, _ = run(
        ["<answer>a</answer>", call("weather", city="P"), "<answer>b</answer>"], [weather], spec
    )
    branch = replace(spec, episode_id="b", prefix=tuple(ep.turns[:2]))
    again, _ = run(
        [call("weather", city="Q"), "<answer>b2</answer>", "<answer>c</answer>"], [weather], branch
    )
    assert again.stop_reason == StopReason.ANSWERED and again.answer == "c"
    assert [t.user_turn for t in again.turns] == [0, 1, 1, 1, 2]
    assert again.turns[2].tool_results[0].error is None  # still revealed after the restore


# ---- records stay what the policy wrote; bad tool definitions stay inside the episode ----


class Mutator:
    """A JSON-Schema tool that changes the arguments it is given."""

    spec = ToolSpec(
        name="mutate",
        description="Pops its argument.",
        parameters={"type": "object", "properties": {"a": {"type": "array"}}},
    )

    async def __call__(self, args: dict[str, Any]) -> ToolOutput:
        args.pop("a")[0]["x"] = 99
        return ToolOutput(text="done")


def test_a_tool_that_changes_its_arguments_cannot_rewrite_the_stored_call() -> None:
    ep, _ = run([call("mutate", a=[{"x": 1}])], [Mutator()])
    stored = ep.turns[0].tool_calls[0]
    assert ep.turns[0].tool_results[0].text == "done"
    assert stored.arguments == {"a": [{"x": 1}]}


def test_a_tool_error_shows_its_message_and_any_other_exception_is_a_tool_bug() -> None:
    @tool
    async def lookup(key: str) -> str:
        """Looks a key up."""
        if key == "bug":
            raise KeyError(key)
        raise ToolError(f"no entry called {key!r}; try 'alpha'")

    ep, _ = run([call("lookup", key="beta") + call("lookup", key="bug")], [lookup])
    refused, bug = ep.turns[0].tool_results
    assert refused.error == ToolErrorKind.TOOL_ERROR
    assert refused.text == "Error: lookup failed: no entry called 'beta'; try 'alpha'"
    assert bug.error == ToolErrorKind.TOOL_BUG
    assert bug.text == "Error: lookup failed: KeyError: 'bug'"
    # Stored as the same strings as before the enum existed; loaded back as the enum.
    stored = ep.model_dump_json()
    assert '"error":"tool_error"' in stored and '"error":"tool_bug"' in stored
    assert Episode.model_validate_json(stored) == ep


def test_a_schema_that_cannot_be_checked_is_a_tool_bug_observation() -> None:
    broken = FunctionTool(
        weather.fn,
        ToolSpec(
            name="broken",
            description="Its schema points at nothing.",
            parameters={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
        ),
    )
    ep, _ = run([call("broken", a=1), call("weather", city="Rome")], [broken, weather])
    assert ep.stop_reason == StopReason.ANSWERED
    first = ep.turns[0].tool_results[0]
    assert first.error == "tool_bug" and "could not check its arguments" in first.text
    assert ep.turns[1].tool_results[0].error is None


def test_two_tools_with_one_name_in_an_episode_end_that_episode_only() -> None:
    policy = ScriptedPolicy(lambda ctx: "<answer>x</answer>" + END, TOK)
    runner = EpisodeRunner(policy, ChatML(TOK), [weather], Budget(), SamplingParams())
    specs = [
        EpisodeSpec("bad", "g", "t", "Hi.", "Q?", tools=(weather, weather)),
        EpisodeSpec("good", "g", "t", "Hi.", "Q?"),
    ]
    bad, good = asyncio.run(runner.run_many(specs, concurrency=2))
    assert bad.stop_reason == StopReason.ERROR and "two tools are named 'weather'" in (
        bad.error or ""
    )
    assert good.stop_reason == StopReason.ANSWERED


def test_a_graph_branches_after_an_answer_that_has_a_followup() -> None:
    from turnrl.agent.graph import TrajectoryGraph

    spec = EpisodeSpec("e", "g", "t", "Help.", "First", followups=(UserTurn("Second"),))
    ep, _ = run(["<answer>a</answer>", "<answer>b</answer>"], [weather], spec)
    graph = TrajectoryGraph.build([ep])
    key = ep.turns[0].state_key
    assert key is not None
    branch = graph.branch_spec(key, replace(spec, episode_id="b"))
    again, _ = run(["<answer>b2</answer>"], [weather], branch)
    assert again.stop_reason == StopReason.ANSWERED and again.answer == "b2"
    assert [t.user_turn for t in again.turns] == [0, 1]
