"""Runner budgets, stop reasons and token bookkeeping with a scripted policy."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from fakes import CharTokenizer, EchoTool

from turnrl.agent.chat import ChatML
from turnrl.agent.policy import Completion, SamplingParams
from turnrl.agent.records import Episode, StopReason
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy

TOK = CharTokenizer()
CALL = '<tool_call>{"name": "echo", "arguments": {"text": "hi"}}</tool_call><|im_end|>'
ANSWER = "<answer>42</answer><|im_end|>"


def spec(i: int = 0) -> EpisodeSpec:
    return EpisodeSpec(
        episode_id=f"e{i}", group_id="g", task_id="t", instructions="Be brief.", question="Q?"
    )


def run(
    replies: Sequence[str],
    budget: Budget | None = None,
    tools: Sequence[object] | None = None,
    policy: object | None = None,
) -> tuple[Episode, ScriptedPolicy]:
    it = iter(replies)
    scripted = ScriptedPolicy(lambda ctx: next(it, ANSWER), TOK)
    runner = EpisodeRunner(
        policy or scripted,  # type: ignore[arg-type]
        ChatML(TOK),
        tools if tools is not None else [EchoTool()],  # type: ignore[arg-type]
        budget or Budget(max_context_tokens=100_000),
        SamplingParams(),
    )
    return asyncio.run(runner.run_episode(spec())), scripted


def test_call_then_answer() -> None:
    ep, _ = run([CALL, ANSWER])
    assert ep.stop_reason == StopReason.ANSWERED and ep.answer == "42"
    t0, t1 = ep.turns
    assert t0.tool_calls[0].name == "echo" and t0.tool_results[0].text == "hi"
    assert t0.format_error is None and t1.answer == "42"
    assert ep.cost == {"calls": 1.0, "money_usd": 0.5}
    assert t1.observation_ids == []


def test_ids_seen_by_policy_are_the_stored_prefix() -> None:
    """Regression lock: turn k's prompt is exactly the stored ids before turn k's sample."""
    ep, policy = run([CALL, "no tags<|im_end|>", CALL, ANSWER])
    ids = ep.token_ids()
    offset = 0
    for turn, seen in zip(ep.turns, policy.prompts, strict=True):
        offset += len(turn.prompt_ids)
        assert seen == ids[:offset]
        offset += len(turn.completion_ids) + len(turn.observation_ids)
    assert offset == len(ids)
    # Only the first turn carries prompt ids; later context comes from observations.
    assert [bool(t.prompt_ids) for t in ep.turns] == [True, False, False, False]
    # The tool response reached the policy's context.
    assert "<tool_response>\nhi\n</tool_response>" in TOK.decode(policy.prompts[1])


def test_unclosed_completion_is_closed_in_the_observation() -> None:
    ep, _ = run(['<tool_call>{"name": "echo", "arguments": {"text": "a"}}</tool_call>'])
    first = ep.turns[0]
    assert first.completion_ids[-1] != 2
    assert TOK.decode(first.observation_ids).startswith("<|im_end|>\n<|im_start|>user")


def test_void_turn_gets_error_observation_and_flag() -> None:
    ep, _ = run(["I am thinking<|im_end|>", ANSWER])
    assert ep.turns[0].format_error and "no <tool_call>" in ep.turns[0].format_error
    assert "Error: no <tool_call>" in TOK.decode(ep.turns[0].observation_ids)
    assert ep.stop_reason == StopReason.ANSWERED


@pytest.mark.parametrize(
    ("call", "kind", "fragment"),
    [
        ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "unknown_tool", "echo"),
        ('<tool_call>{"name": "echo", "arguments": {}}</tool_call>', "invalid_arguments", "text"),
        (
            '<tool_call>{"name": "echo", "arguments": {"text": 1, "times": "x"}}</tool_call>',
            "invalid_arguments",
            "times",
        ),
        ("<tool_call>{oops</tool_call>", "parse", "invalid JSON"),
    ],
)
def test_bad_calls_become_observations(call: str, kind: str, fragment: str) -> None:
    ep, _ = run([call, ANSWER])
    (result,) = ep.turns[0].tool_results
    assert result.error == kind and fragment in result.text
    assert result.text in TOK.decode(ep.turns[0].observation_ids)
    assert ep.stop_reason == StopReason.ANSWERED


def test_tool_exceptions_and_hangs_are_observations() -> None:
    ep, _ = run([CALL, ANSWER], tools=[EchoTool(fail=True)])
    assert ep.turns[0].tool_results[0].error == "tool_bug"
    assert "echo broke" in ep.turns[0].tool_results[0].text
    ep, _ = run([CALL, ANSWER], tools=[EchoTool(delay_s=5, timeout_s=0.05)])
    assert ep.turns[0].tool_results[0].error == "timeout"
    assert ep.stop_reason == StopReason.ANSWERED


def test_max_turns() -> None:
    ep, _ = run([CALL] * 10, Budget(max_turns=3, max_tool_calls=10, max_context_tokens=10**5))
    assert ep.stop_reason == StopReason.MAX_TURNS and len(ep.turns) == 3


def test_max_tool_calls() -> None:
    ep, _ = run([CALL] * 10, Budget(max_turns=10, max_tool_calls=2, max_context_tokens=10**5))
    assert ep.stop_reason == StopReason.MAX_TOOL_CALLS
    assert ep.n_tool_calls == 3 and ep.cost["calls"] == 2.0
    assert ep.turns[-1].tool_results[0].error == "budget"


def test_cost_budget() -> None:
    budget = Budget(max_turns=10, max_cost={"money_usd": 1.0}, max_context_tokens=10**5)
    ep, _ = run([CALL] * 10, budget)
    assert ep.stop_reason == StopReason.BUDGET_EXHAUSTED
    assert ep.cost["money_usd"] == 1.0 and len(ep.turns) == 2


def test_context_full_clamps_max_tokens() -> None:
    ep, _ = run(["x" * 5000], Budget(max_context_tokens=1000, max_new_tokens=4096))
    assert ep.stop_reason == StopReason.CONTEXT_FULL
    assert len(ep.token_ids()) <= 1000


def test_wall_clock_timeout_keeps_finished_turns() -> None:
    class Slow(ScriptedPolicy):
        async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
            if self.prompts:
                await asyncio.sleep(10)
            return await super().generate(prompt_ids, params)

    slow = Slow(lambda ctx: CALL, TOK)
    ep, _ = run([], Budget(wall_clock_s=0.3, max_context_tokens=10**5), policy=slow)
    assert ep.stop_reason == StopReason.TIMEOUT and len(ep.turns) == 1


def test_policy_failure_does_not_cancel_siblings() -> None:
    class Flaky(ScriptedPolicy):
        async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
            if "Q1?" in TOK.decode(prompt_ids):
                raise RuntimeError("backend down")
            await asyncio.sleep(0.01)
            return await super().generate(prompt_ids, params)

    runner = EpisodeRunner(
        Flaky(lambda ctx: ANSWER, TOK), ChatML(TOK), [EchoTool()], Budget(), SamplingParams()
    )
    specs = [EpisodeSpec(f"e{i}", "g", "t", "Be brief.", f"Q{i}?", seed=i) for i in range(6)]
    eps = asyncio.run(runner.run_many(specs, concurrency=3))
    assert [e.episode_id for e in eps] == [s.episode_id for s in specs]
    assert eps[1].stop_reason == StopReason.POLICY_ERROR and "backend down" in (eps[1].error or "")
    assert all(e.stop_reason == StopReason.ANSWERED for i, e in enumerate(eps) if i != 1)


def test_hostile_output_never_escapes() -> None:
    hostile = [
        "<tool_call>" + "{" * 10_000,
        '<tool_call>{"name": "echo", "arguments": {"text": "' + "A" * 100_000 + '"}}</tool_call>',
        "\x00\ufffd<answer>",
        "</answer></tool_call><tool_call></tool_call>",
    ]
    ep, _ = run(hostile, Budget(max_turns=5, max_context_tokens=10**6))
    assert ep.stop_reason == StopReason.ANSWERED
    assert all(t.format_error for t in ep.turns[:4])
