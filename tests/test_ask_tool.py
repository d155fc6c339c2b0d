"""The ask tool: the oracle answers only what was asked, the expert wraps a generate function,
and questions are priced in human attention (directly and through the real runner)."""

from __future__ import annotations

import asyncio

import pytest
from fakes import CharTokenizer

from turnrl.agent.chat import ChatML
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import StopReason
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.tools.ask import (
    AskArgs,
    AskTool,
    ExpertResponder,
    OracleResponder,
)
from turnrl.tools.base import CostModel, EpisodeTool, ToolError

FACTS = {
    "colour": "blue",
    "material": "ceramic",
    "size": "small",
    "room": "kitchen",
    "container": "cupboard",
}


def oracle() -> OracleResponder:
    return OracleResponder(
        FACTS,
        aliases={"colour": ("color",), "material": ("made of",)},
        values={"colour": ("red", "green"), "room": ("study", "garage")},
        locations=("room", "container"),
    )


def answer(question: str) -> str:
    return asyncio.run(oracle().answer(question))


@pytest.mark.parametrize(
    ("question", "reply"),
    [
        ("What colour is the mug?", "colour: blue"),
        ("what COLOR is it", "colour: blue"),
        ("What is it made of?", "material: ceramic"),
        ("Which room is it in?", "room: kitchen"),
        ("Where is it?", "room: kitchen; container: cupboard"),
        # Several facts asked: listed in the facts' order, not the question's.
        ("What size and colour is it?", "colour: blue; size: small"),
        # A guessed value asks about its attribute; the reply is the value, not yes or no.
        ("Is it the red one?", "colour: blue"),
        ("Did I leave it in the study?", "room: kitchen"),
        # A named fact wins over value words: only the room is asked for here.
        ("Which room is the red mug in?", "room: kitchen"),
    ],
)
def test_oracle_answers_what_was_asked(question: str, reply: str) -> None:
    assert answer(question) == reply


def test_oracle_reveals_nothing_else() -> None:
    reply = answer("What colour is the mug?")
    for key, value in FACTS.items():
        if key != "colour":
            assert value not in reply and key not in reply


@pytest.mark.parametrize("question", ["Which mug?", "Can you help me?", "Which one do you mean?"])
def test_vague_question_gets_keys_never_values(question: str) -> None:
    """Regression lock on the clarification policy: keys listed, no value leaked."""
    reply = answer(question)
    assert reply == (
        "Sorry, what do you want to know? I can tell you its colour, material, size, room "
        "or container."
    )
    assert not any(value in reply for value in FACTS.values())


def test_words_match_whole_words_only() -> None:
    # "sized" and "roomy" are not "size" and "room"; "bluish" is no colour value.
    assert answer("Is it roomy and bluish, sized well?").startswith("Sorry")


def test_oracle_needs_facts() -> None:
    with pytest.raises(ValueError, match="no facts"):
        OracleResponder({})


class CountingResponder:
    def __init__(self) -> None:
        self.questions: list[str] = []

    async def answer(self, question: str) -> str:
        self.questions.append(question)
        return "fine"


def test_cost_is_human_attention_per_question_plus_per_word() -> None:
    tool = AskTool(oracle())
    assert isinstance(tool, EpisodeTool)
    out = asyncio.run(tool.session()(AskArgs(question="What colour is it?")))
    assert tool.spec.cost.cost(0.0, out.extra_cost) == {"calls": 1.0, "human_attention": 1.0}
    worded = AskTool(oracle(), per_word=0.25)
    out = asyncio.run(worded.session()(AskArgs(question="What colour is it?")))
    # 1 per question + 0.25 * 4 words
    assert worded.spec.cost.cost(0.0, out.extra_cost)["human_attention"] == 2.0
    priced = AskTool(oracle(), cost=CostModel(per_call={"human_attention": 3.0}))
    assert priced.spec.cost.per_call == {"human_attention": 3.0}


def test_blank_question_is_refused_before_the_responder() -> None:
    responder = CountingResponder()
    session = AskTool(responder).session()
    for blank in ("", "   \n"):
        with pytest.raises(ToolError, match="empty"):
            asyncio.run(session(AskArgs(question=blank)))
    assert responder.questions == [] and session.asked == 0


def test_question_limit_is_per_episode() -> None:
    responder = CountingResponder()
    tool = AskTool(responder, max_questions=2)
    first = tool.session()
    for _ in range(2):
        assert asyncio.run(first(AskArgs(question=" Why? "))).text == "fine"
    with pytest.raises(ToolError, match="no questions left"):
        asyncio.run(first(AskArgs(question="Why?")))
    assert asyncio.run(tool.session()(AskArgs(question="Why?"))).text == "fine"
    assert responder.questions == ["Why?"] * 3
    with pytest.raises(ValueError):
        AskTool(responder, max_questions=-1)


def test_expert_wraps_generate() -> None:
    prompts: list[str] = []

    async def generate(prompt: str) -> str:
        prompts.append(prompt)
        return "  Use the blue one.\n"

    expert = ExpertResponder(generate, prompt="Expert, answer: {question}")
    assert asyncio.run(expert.answer("Which mug?")) == "Use the blue one."
    assert prompts == ["Expert, answer: Which mug?"]

    async def silent(prompt: str) -> str:
        return " "

    assert asyncio.run(ExpertResponder(silent).answer("?")) == "(the expert gave no answer)"

    async def rambling(prompt: str) -> str:
        return "x" * 50

    cut = asyncio.run(ExpertResponder(rambling, max_chars=10).answer("?"))
    assert cut == "x" * 10 + " …[truncated]"
    with pytest.raises(ValueError, match="question"):
        ExpertResponder(generate, prompt="no field")


def test_ask_through_the_runner_costs_attention() -> None:
    tok = CharTokenizer()
    replies = iter(
        [
            '<tool_call>{"name": "ask", "arguments": {"question": "What colour?"}}</tool_call>'
            "<|im_end|>",
            '<tool_call>{"name": "ask", "arguments": {"question": ""}}</tool_call><|im_end|>',
            "<answer>blue</answer><|im_end|>",
        ]
    )
    policy = ScriptedPolicy(lambda ctx: next(replies), tok)
    runner = EpisodeRunner(
        policy,
        ChatML(tok),
        [AskTool(oracle())],
        Budget(max_context_tokens=100_000),
        SamplingParams(),
    )
    spec = EpisodeSpec(
        episode_id="e", group_id="g", task_id="t", instructions="Ask.", question="Which mug?"
    )
    episode = asyncio.run(runner.run_episode(spec))
    assert episode.stop_reason == StopReason.ANSWERED
    ok, refused = episode.turns[0].tool_results[0], episode.turns[1].tool_results[0]
    assert ok.text == "colour: blue" and ok.error is None
    assert refused.error == "tool_error" and "empty" in refused.text
    # A refused question still costs its fixed price: the runner charges every failed call.
    assert episode.cost == {"calls": 2.0, "human_attention": 2.0}
