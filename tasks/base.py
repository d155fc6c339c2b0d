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
from typing import Any, Literal, Protocol

from turnrl.tools.base import EpisodeTool, Tool

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


class GraderError(Exception):
    """A grader failed on an answer (a bug, not a wrong answer)."""


class TaskSuite(Protocol):
    """A family of tasks the agent can be trained and evaluated on."""

    @property
    def name(self) -> str: ...

    @property
    def system_prompt(self) -> str:
        """Instructions placed before the tool schemas in the system message."""
        ...

    def items(self, split: Split) -> Sequence[TaskItem]:
        """The items of a split, in a fixed order; train and test never share an item."""
        ...

    def tools(self) -> Sequence[Tool | EpisodeTool]:
        """The tools offered to the agent."""
        ...

    def few_shot(self) -> Sequence[tuple[str, str]]:
        """Example messages `(role, content)` placed between the system message and the
        question: worked examples (from the train split, never the test split) that show a
        small model the call and answer syntax. Empty for none."""
        ...

    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        """Scores of `answer` (None when the agent gave none), including `correct`."""
        ...
