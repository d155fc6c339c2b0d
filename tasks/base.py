"""What a task suite gives the runner: items with gold answers, a system prompt, the tools the
agent may use, and a grader.

A grader is a function of (item, answer) only, so that a stored run can be re-graded without
the model; it returns named scores in [0, 1]. It is async because some graders execute code
(in a sandbox, never in the trainer's process). Every suite reports `correct` (0 or 1), which the
evaluation tables and the default outcome reward read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from turnrl.agent.records import Episode
from turnrl.agent.runner import UserTurn
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
        """The tools offered to the agent (for a suite with `tools_for`, those every item
        shares; may be empty)."""
        ...

    def few_shot(self) -> Sequence[tuple[str, str]]:
        """Example messages `(role, content)` placed between the system message and the
        question: worked examples (from the train split, never the test split) that show a
        small model the call and answer syntax. Empty for none."""
        ...

    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        """Scores of `answer` (None when the agent gave none), including `correct`."""
        ...


@runtime_checkable
class ItemTools(Protocol):
    """A suite whose tools depend on the item (simulators loaded with the item's state, an
    oracle that knows the item's answer)."""

    def tools_for(self, item: TaskItem) -> Sequence[AnyTool]:
        """The tools of `item`'s episodes (used instead of `tools()`)."""
        ...


@runtime_checkable
class EpisodeGrader(Protocol):
    """A suite graded on what the agent did, not only on its final answer (the calls it made,
    the state it left): from the stored episode, so a run can be re-graded without a model."""

    async def grade_episode(self, item: TaskItem, episode: Episode) -> dict[str, float]:
        """Scores of `episode`, including `correct` (used instead of `grade`)."""
        ...


@runtime_checkable
class Oracle(Protocol):
    """A suite that knows a gold solution as the agent would write it."""

    def oracle_turns(self, item: TaskItem) -> list[str]:
        """The completions (without the end-of-turn token) of a gold policy, in order."""
        ...


def suite_tools(suite: TaskSuite, item: TaskItem) -> Sequence[AnyTool]:
    """The tools of `item`'s episodes."""
    return suite.tools_for(item) if isinstance(suite, ItemTools) else suite.tools()


async def grade_episode(suite: TaskSuite, item: TaskItem, episode: Episode) -> dict[str, float]:
    """`suite`'s scores of a stored episode (by `grade_episode` when the suite has it)."""
    if isinstance(suite, EpisodeGrader):
        return await suite.grade_episode(item, episode)
    return await suite.grade(item, episode.answer)
