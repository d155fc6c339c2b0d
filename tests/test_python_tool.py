"""The python tool end to end: runner -> per-episode session -> real sandbox -> observation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest
from fakes import CharTokenizer, EchoArgs
from hypothesis import given
from hypothesis import strategies as st

from turnrl.agent.chat import ChatML
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode, StopReason
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.sandboxes.base import ExecResult, Limits, Sandbox
from turnrl.sandboxes.bwrap import BwrapSandbox, bwrap_usable
from turnrl.sandboxes.local import SubprocessSandbox
from turnrl.tools.base import ToolOutput, ToolSpec
from turnrl.tools.python import PythonTool, format_result, truncate_middle

TOK = CharTokenizer()


def call(code: str) -> str:
    body = json.dumps({"name": "python", "arguments": {"code": code}})
    return f"<tool_call>{body}</tool_call><|im_end|>"


def backends() -> list[object]:
    reason = bwrap_usable()
    return [
        pytest.param("bwrap", marks=pytest.mark.skipif(reason is not None, reason=str(reason))),
        "subprocess",
    ]


def make_sandbox(kind: str) -> Sandbox:
    if kind == "bwrap":
        return BwrapSandbox(pool_size=4, warm=1)
    return SubprocessSandbox(pool_size=4, warm=1)


def run_episodes(
    sandbox: Sandbox, scripts: Sequence[Sequence[str]], stateful: bool = True
) -> list[Episode]:
    tool = PythonTool(sandbox, TOK.encode, max_tokens=200, stateful=stateful)

    def script_for(replies: Sequence[str]) -> ScriptedPolicy:
        it = iter(replies)
        return ScriptedPolicy(lambda ctx: next(it, "<answer>done</answer><|im_end|>"), TOK)

    async def main() -> list[Episode]:
        try:
            episodes = []
            for i, replies in enumerate(scripts):
                runner = EpisodeRunner(
                    script_for(replies),
                    ChatML(TOK),
                    [tool],
                    Budget(max_context_tokens=100_000, max_turns=10),
                    SamplingParams(),
                )
                spec = EpisodeSpec(f"e{i}", "g", "t", "Be brief.", "Q?")
                episodes.append(await runner.run_episode(spec))
            return episodes
        finally:
            await sandbox.close()

    return asyncio.run(main())


@pytest.mark.parametrize("kind", backends())
def test_state_persists_within_an_episode_and_not_across(kind: str) -> None:
    first, second = run_episodes(
        make_sandbox(kind),
        [
            [call("x = 41"), call("x += 1\nprint(x)"), call("open('f.txt', 'w').write('kept')")],
            [call("print(x)"), call("print(open('f.txt').read())")],
        ],
    )
    assert first.stop_reason == StopReason.ANSWERED
    texts = [r.text for t in first.turns for r in t.tool_results]
    assert texts[0] == "(no output)" and texts[1] == "42"
    later = [r.text for t in second.turns for r in t.tool_results]
    assert "NameError: name 'x' is not defined" in later[0]
    assert "FileNotFoundError" in later[1]  # the first episode's files died with its session
    assert second.cost["calls"] == 2.0 and second.cost["sandbox_cpu_s"] >= 0.0


@pytest.mark.parametrize("kind", backends())
def test_stateless_calls_forget_variables(kind: str) -> None:
    (episode,) = run_episodes(
        make_sandbox(kind), [[call("x = 1"), call("print(x)")]], stateful=False
    )
    texts = [r.text for t in episode.turns for r in t.tool_results]
    assert "NameError" in texts[1]


@pytest.mark.parametrize("kind", backends())
def test_time_limit_is_an_observation_and_variables_survive(kind: str) -> None:
    sandbox = make_sandbox(kind)
    tool = PythonTool(sandbox, TOK.encode, limits=Limits(wall_s=1.0, cpu_s=5.0))

    async def main() -> list[ToolOutput]:
        session = tool.session()
        try:
            outs = []
            for code in ["y = 7", "while True: pass", "print(y)"]:
                outs.append(await session(tool.spec.args_model(code=code)))
            return outs
        finally:
            await session.aclose()
            await sandbox.close()

    _, looped, after = asyncio.run(main())
    assert "KeyboardInterrupt" in looped.text and "[stopped: time limit" in looped.text
    assert after.text == "7"


def test_format_result_notes() -> None:
    limits = Limits(wall_s=2, memory_mb=64)
    text = format_result(
        ExecResult(stdout="a\n", stderr="Traceback...\nValueError: v\n", timed_out=True), limits
    )
    assert text == "a\nTraceback...\nValueError: v\n[stopped: time limit (2 s wall, 10 s CPU)]"
    lost = ExecResult(oom_killed=True, state_lost=True, error="worker died")
    assert format_result(lost, limits) == (
        "[killed: memory limit (64 MB)]\n"
        "[the interpreter was restarted: variables from earlier calls are gone]"
    )
    assert format_result(ExecResult(), limits) == "(no output)"


@given(st.text(max_size=400), st.integers(min_value=2, max_value=60))
def test_truncate_middle_respects_the_budget(text: str, budget: int) -> None:
    out, cut = truncate_middle(text, TOK.encode, budget)
    if len(TOK.encode(text)) <= budget:
        assert (out, cut) == (text, False)
    else:
        assert cut and "characters cut]" in out
        head, _, rest = out.partition("\n…[")
        tail = rest.split("]…\n", 1)[1]
        assert text.startswith(head) and text.endswith(tail)
        assert len(TOK.encode(head)) <= budget // 2 and len(TOK.encode(tail)) <= budget // 2


class CountingTool:
    """An `EpisodeTool` fake that records how sessions open and close."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self._spec = ToolSpec(name="echo", description="Echo.", args_model=EchoArgs)

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    def session(self) -> CountingSession:
        self.opened += 1
        return CountingSession(self)


class CountingSession:
    def __init__(self, tool: CountingTool) -> None:
        self.tool = tool
        self.seen: list[str] = []

    async def __call__(self, args: EchoArgs) -> ToolOutput:
        self.seen.append(args.text)
        return ToolOutput(text="|".join(self.seen))

    async def aclose(self) -> None:
        self.tool.closed += 1


def test_runner_opens_one_session_per_episode_and_always_closes_it() -> None:
    tool = CountingTool()
    echo = '<tool_call>{{"name": "echo", "arguments": {{"text": "{}"}}}}</tool_call><|im_end|>'
    replies = iter([echo.format("a"), echo.format("b"), "<answer>x</answer><|im_end|>"])
    runner = EpisodeRunner(
        ScriptedPolicy(lambda ctx: next(replies), TOK),
        ChatML(TOK),
        [tool],
        Budget(max_context_tokens=100_000),
        SamplingParams(),
    )
    episode = asyncio.run(runner.run_episode(EpisodeSpec("e", "g", "t", "I", "Q?")))
    assert [r.text for t in episode.turns for r in t.tool_results] == ["a", "a|b"]
    assert (tool.opened, tool.closed) == (1, 1)

    # An episode that makes no call opens nothing; one that ends in a policy error still closes.
    def broken(ctx: Sequence[int]) -> str:
        if tool.opened == 2:
            raise RuntimeError("policy died")
        return echo.format("c")

    runner.policy = ScriptedPolicy(broken, TOK)
    episode = asyncio.run(runner.run_episode(EpisodeSpec("e2", "g", "t", "I", "Q?")))
    assert episode.stop_reason == StopReason.POLICY_ERROR
    assert (tool.opened, tool.closed) == (2, 2)
