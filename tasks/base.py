"""What a task suite gives the runner: items with gold answers, a system prompt, the tools the
agent may use, a grader and a gold solution.

A grader is a function of (item, stored episode) only, so that a stored run can be re-graded
without the model; it returns named scores in [0, 1], the same names for every episode (the
suite's config declares them: `SuiteConfig.metrics`). Most suites grade the final answer
alone (`grade`); some grade what the agent did (`grade_episode`: the calls made, the state
left). It is async because some graders execute code (in a sandbox, never in the trainer's
process). Every suite reports `correct` (0 or 1), which the evaluation tables and the default
outcome reward read.

What suites differ in (tools per item, episode grading, a scripted gold solution) is part of
the one `TaskSuite` interface; `BaseSuite` gives the plain behaviour of each, so callers never
ask a suite what it can do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from turnrl.agent.records import Episode, UserTurn
from turnrl.tools.base import AnyTool

Split = Literal["train", "test"]


@dataclass(frozen=True)
class TaskItem:
    """One question with its gold answers."""

    id: str
    """Stable id, unique within the suite (not within a split only)."""
    question: str
    """The user message."""
    answers: tuple[str, ...]
    """Accepted gold answers (aliases); the grader scores against the best match."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Suite-specific facts (hops, entities, template) for analysis; not shown to the agent."""
    followups: tuple[UserTurn, ...] = ()
    """User messages after the question, one after each answer (multi-turn conversations)."""
    hidden_tools: tuple[str, ...] = ()
    """Tools offered only once a followup reveals them."""


class GraderError(Exception):
    """A grader failed on an answer (a bug, not a wrong answer)."""


class TaskSuite(Protocol):
    """A family of tasks the agent can be trained and evaluated on."""

    @property
    def name(self) -> str: ...

    @property
    def source(self) -> str:
        """Where the items come from: a package and its version, or "generated"."""
        ...

    @property
    def license(self) -> str:
        """The license of the items (an SPDX id where there is one)."""
        ...

    @property
    def system_prompt(self) -> str:
        """Instructions placed before the tool schemas in the system message."""
        ...

    def items(self, split: Split) -> Sequence[TaskItem]:
        """The items of a split, in a fixed order; train and test never share an item."""
        ...

    def tools(self) -> Sequence[AnyTool]:
        """The tools offered in every episode (may be empty)."""
        ...

    def tools_for(self, item: TaskItem) -> Sequence[AnyTool]:
        """The tools only `item`'s episodes get, besides `tools()` (simulators loaded with the
        item's state, functions the item brings); empty for most suites."""
        ...

    def few_shot(self) -> Sequence[tuple[str, str]]:
        """Example messages `(role, content)` placed between the system message and the
        question: worked examples (from the train split, never the test split) that show a
        small model the call and answer syntax. Empty for none."""
        ...

    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        """Scores of `answer` (None when the agent gave none), including `correct`."""
        ...

    async def grade_episode(self, item: TaskItem, episode: Episode) -> dict[str, float]:
        """Scores of a stored episode of `item`, including `correct`: what rollouts and
        re-grading use (`BaseSuite`: `grade` of its answer)."""
        ...

    def oracle_turns(self, item: TaskItem) -> list[str]:
        """The completions (without the end-of-turn token) of a gold policy for `item`, in
        order, each reply to a user message ending with an answer (`BaseSuite`: the first gold
        answer)."""
        ...


class BaseSuite(ABC):
    """The plain behaviour of the `TaskSuite` methods a suite may leave out: no per-item
    tools, no examples, graded on the final answer, an oracle that answers at once."""

    def tools_for(self, item: TaskItem) -> Sequence[AnyTool]:
        return ()

    def few_shot(self) -> Sequence[tuple[str, str]]:
        return ()

    @abstractmethod
    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]: ...

    async def grade_episode(self, item: TaskItem, episode: Episode) -> dict[str, float]:
        return await self.grade(item, episode.answer)

    def oracle_turns(self, item: TaskItem) -> list[str]:
        return [f"<answer>{item.answers[0]}</answer>"]
