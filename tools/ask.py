"""`ask(question)`: the agent asks a person (the user, or an expert) instead of finding out
itself — ESearch-R1's Ask action (arXiv:2508.12015) and HILA's defer-to-expert.

Asking is cheap in time and dear in attention, so a call is priced in `human_attention`
(1 per question by default, optionally plus an amount per word of the question, which the person
has to read). Who answers is a `Responder`:

- `OracleResponder` knows the gold facts about the thing the agent looks for and answers *only
  what was asked*, so that asking one question reveals one or two facts and never the whole
  solution. Its policy, in order (`OracleResponder.answer`):
  1. A fact is asked about when the question names it: one of its trigger phrases (the key's own
     words, or an alias such as "color" or "made of") occurs as whole words. "where" names every
     fact marked as a location.
  2. Only when no fact is named that way, a fact whose *value words* occur in the question is
     asked about ("is it blue?" asks about the colour). A question that names a fact and a
     value ("which room is the blue mug in?") is about the named fact only.
  3. The reply states every asked fact as `key: value`, joined by `; `, in the facts' order.
     A yes/no question gets the value, not "yes" or "no" ("is it blue?" -> "colour: red").
  4. A question that asks about no fact ("which one?", "can you help?") gets a clarifying
     reply that lists the facts' *keys*, never their values.
- `ExpertResponder` wraps another model's `generate` (a prompt in, text out); tools/ never
  imports the agent, so whoever builds it passes the policy's generate function in.

A question limit per episode makes the tool stateful: `AskTool` is an `EpisodeTool` whose
session counts the questions asked. Blank questions are refused (a `ToolError`) before the
responder sees them; the runner still charges the call's fixed cost, as for any failed call.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from turnrl.tools.base import CostModel, ToolError, ToolOutput, ToolSpec

ASK_COST = CostModel(per_call={"calls": 1.0, "human_attention": 1.0})
"""One question costs one unit of a person's attention."""

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lowercase alphanumeric words of `text`, in order (hyphens and punctuation split)."""
    return _WORD.findall(text.lower())


def _has_phrase(tokens: list[str], phrase: str) -> bool:
    """True when `phrase` occurs in `tokens` as consecutive whole words."""
    want = words(phrase)
    if not want:
        return False
    n = len(want)
    return any(tokens[i : i + n] == want for i in range(len(tokens) - n + 1))


class AskArgs(BaseModel):
    """Arguments of `ask`."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(description="One short question for the person, in plain words.")


class Responder(Protocol):
    """Whoever answers the agent's questions."""

    async def answer(self, question: str) -> str:
        """The reply to a non-blank `question`."""
        ...


class OracleResponder:
    """Answers from gold `facts`, only what was asked (policy in the module docstring)."""

    def __init__(
        self,
        facts: Mapping[str, str],
        aliases: Mapping[str, Iterable[str]] | None = None,
        values: Mapping[str, Iterable[str]] | None = None,
        locations: Iterable[str] = (),
    ) -> None:
        """`facts` maps a key ("colour") to its gold value ("blue"), in the order replies list
        them. `aliases` adds trigger phrases per key (the key itself always triggers).
        `values` adds per key the words of values the agent might guess ("red", "green"), so
        that "is it red?" is understood as a colour question; the gold value's own words are
        always included. `locations` are the keys a "where" question asks about."""
        if not facts:
            raise ValueError("OracleResponder: no facts to answer from")
        self.facts = dict(facts)
        extra = aliases or {}
        self._triggers = {k: (k, *extra.get(k, ())) for k in self.facts}
        guesses = values or {}
        self._values = {
            k: {w for v in (v0, *guesses.get(k, ())) for w in words(v)}
            for k, v0 in self.facts.items()
        }
        self._locations = set(locations) & set(self.facts)

    def asked_keys(self, question: str) -> list[str]:
        """The fact keys `question` asks about, in the facts' order (empty: a vague one)."""
        tokens = words(question)
        named = {
            k
            for k, phrases in self._triggers.items()
            if any(_has_phrase(tokens, p) for p in phrases)
        }
        if "where" in tokens:
            named |= self._locations
        if not named:
            present = set(tokens)
            named = {k for k, vocab in self._values.items() if vocab & present}
        return [k for k in self.facts if k in named]

    def clarification(self) -> str:
        """The reply to a question that asks about no fact: the keys, never the values."""
        keys = list(self.facts)
        listed = ", ".join(keys[:-1]) + f" or {keys[-1]}" if len(keys) > 1 else keys[0]
        return f"Sorry, what do you want to know? I can tell you its {listed}."

    async def answer(self, question: str) -> str:
        keys = self.asked_keys(question)
        if not keys:
            return self.clarification()
        return "; ".join(f"{k}: {self.facts[k]}" for k in keys)


EXPERT_PROMPT = """\
You are an expert helping an assistant with a task. Answer its question briefly and truthfully.

Question: {question}"""


class ExpertResponder:
    """Answers with another model: `generate(prompt)` where the prompt is `prompt` formatted
    with the question (`{question}`); the reply is stripped and cut to `max_chars`."""

    def __init__(
        self,
        generate: Callable[[str], Awaitable[str]],
        prompt: str = EXPERT_PROMPT,
        max_chars: int = 2000,
    ) -> None:
        if "{question}" not in prompt:
            raise ValueError("ExpertResponder: the prompt has no {question} field")
        self._generate = generate
        self._prompt = prompt
        self._max_chars = max_chars

    async def answer(self, question: str) -> str:
        reply = (await self._generate(self._prompt.format(question=question))).strip()
        if len(reply) > self._max_chars:
            reply = reply[: self._max_chars] + " …[truncated]"
        return reply or "(the expert gave no answer)"


class AskSession:
    """One episode's questions: counts them against the limit."""

    def __init__(self, tool: AskTool) -> None:
        self._tool = tool
        self.asked = 0
        """Questions the responder answered this episode."""

    async def __call__(self, args: AskArgs) -> ToolOutput:
        question = args.question.strip()
        if not question:
            raise ToolError("ask: the question is empty; write the question you want answered")
        limit = self._tool.max_questions
        if limit is not None and self.asked >= limit:
            raise ToolError(f"ask: no questions left (at most {limit} per task)")
        self.asked += 1
        reply = await self._tool.responder.answer(question)
        extra = {}
        if self._tool.per_word:
            extra["human_attention"] = self._tool.per_word * len(words(question))
        return ToolOutput(text=reply, extra_cost=extra)

    async def aclose(self) -> None:
        return None


class AskTool:
    """`ask(question)` answered by `responder` (an `EpisodeTool`: see the module docstring)."""

    def __init__(
        self,
        responder: Responder,
        cost: CostModel = ASK_COST,
        per_word: float = 0.0,
        max_questions: int | None = None,
        name: str = "ask",
        description: str = (
            "Ask the user a question about what they want. Costs their attention: ask only "
            "what you cannot find out yourself."
        ),
        timeout_s: float = 60.0,
    ) -> None:
        """`per_word` adds that much `human_attention` per word of the question;
        `max_questions` caps the questions per episode (None: no cap)."""
        if max_questions is not None and max_questions < 0:
            raise ValueError("AskTool: max_questions must be >= 0")
        self.responder = responder
        self.per_word = per_word
        self.max_questions = max_questions
        self._spec = ToolSpec(
            name=name,
            description=description,
            args_model=AskArgs,
            cost=cost,
            timeout_s=timeout_s,
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    def session(self) -> AskSession:
        return AskSession(self)
