"""`RunConfig.tools` beyond web fetch and MCP: search, python (in the run's sandbox) and ask
(answered by an expert model), opened from their configs and called by an episode through the
real runner; each registers its close, and the run closes them."""

from __future__ import annotations

import asyncio
import json

import pytest
from transformers import PreTrainedTokenizerBase

from turnrl.agent.chat import ChatML, HFTokenizer
from turnrl.agent.model_config import ExpertConfig, TinyModel
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode, StopReason
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.sandboxes.config import SubprocessConfig, open_sandbox
from turnrl.tools_config import (
    AskToolConfig,
    PythonRunToolConfig,
    SearchToolConfig,
    ToolContext,
    open_run_tools,
)


def _call(name: str, **arguments: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_search_python_and_ask_open_from_config_and_answer(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    renderer = ChatML(HFTokenizer(tokenizer))
    eot = str(tokenizer.convert_ids_to_tokens(renderer.end_of_turn_id()))
    replies = iter(
        [
            _call("search", query="France capital"),
            _call("python", code="print(6 * 7)"),
            _call("ask", question="What is the capital of France?"),
            _call("ask", question="And of Spain?"),
            "<answer>Paris</answer>",
        ]
    )
    policy = ScriptedPolicy(lambda _: next(replies) + eot, renderer.tokenizer)
    configs = [
        SearchToolConfig(search_k=1, result_tokens=64),
        PythonRunToolConfig(stateful=False),
        AskToolConfig(
            expert=ExpertConfig(model=TinyModel(), max_new_tokens=4), attention=2.0, max_questions=1
        ),
    ]

    async def main() -> tuple[list[str], Episode]:
        sandbox = open_sandbox(SubprocessConfig(pool_size=1, warm=0))
        ctx = ToolContext(renderer.tokenizer.encode, sandbox)
        try:
            tools = await open_run_tools(configs, ctx)
            assert len(ctx.closers) == 1  # the expert model; search and python hold nothing
            budget = Budget(max_turns=6, max_new_tokens=128)
            runner = EpisodeRunner(policy, renderer, tools, budget, SamplingParams())
            spec = EpisodeSpec("e", "g", "t", instructions="Answer.", question="Capital?")
            episode = await runner.run_episode(spec)
            return [t.spec.name for t in tools], episode
        finally:
            for close in reversed(ctx.closers):
                await close()
            await sandbox.close()

    names, episode = asyncio.run(main())
    assert names == ["search", "python", "ask"]
    assert episode.stop_reason == StopReason.ANSWERED
    results = [r for t in episode.turns for r in t.tool_results]
    search, python, asked, refused = results
    assert search.error is None and "France" in search.text
    assert python.error is None and python.text == "42"
    # The expert (a random-weight model) answers something; the question is priced as set.
    assert asked.error is None and asked.text and asked.cost["human_attention"] == 2.0
    assert refused.error is not None and "no questions left" in refused.text


def test_python_without_the_run_sandbox_is_refused(tokenizer: PreTrainedTokenizerBase) -> None:
    ctx = ToolContext(HFTokenizer(tokenizer).encode, None)
    with pytest.raises(ValueError, match="needs the run's sandbox"):
        asyncio.run(open_run_tools([PythonRunToolConfig()], ctx))
