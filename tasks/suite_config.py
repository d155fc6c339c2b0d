"""What every task suite's config is: a pydantic value (one `kind` of the run config's `task`
union) that builds its live suite and declares, as class-level facts, what a run must know
before building it: whether the suite runs model-written code (so the run opens a sandbox),
which outcome metrics its grader emits (so a reward that reads another is refused at load), and
whether its items carry gold answer text (which answer-probability rewards measure).

Config modules import no model, HTTP, search or MCP library: a run config loads, validates and
prints without them; `build` imports the suite."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from turnrl.agent.model_config import ExpertConfig
from turnrl.agent.tool_formats import Hermes, ToolFormat
from turnrl.sandboxes.base import Sandbox
from turnrl.tools.python_config import PythonToolConfig

if TYPE_CHECKING:
    from turnrl.tasks.base import TaskSuite
    from turnrl.tools.python import PythonTool

Encode = Callable[[str], Sequence[int]]
Generate = Callable[[str], Awaitable[str]]
"""A prompt in, text out (another model answering the agent's questions)."""


@dataclass(frozen=True)
class BuildContext:
    """What a run hands a suite config to build the live suite."""

    encode: Encode | None = None
    """The policy's tokenizer (text -> ids). None when no episode will run (re-grading a
    stored run, listing suites): tools that count tokens are then not built."""
    sandbox: Sandbox | None = None
    """Where model-written code runs; the run opens one when the config `runs_code`."""
    expert: Generate | None = None
    """The model that answers `ask`, when the config's `expert()` names one."""
    tool_format: ToolFormat = field(default_factory=Hermes)
    """How the policy writes tool calls (the run's `chat.tool_format`): a suite writes the
    example calls of its prompt with it, so the prompt agrees with the syntax the renderer
    explains."""

    def python_tool(self, kind: str, config: PythonToolConfig | None) -> PythonTool | None:
        """The python tool a code suite offers (None for `python: null`, or with no episode
        to run); a suite that will run code refuses to build without a sandbox."""
        if self.sandbox is None and self.encode is not None:
            raise ValueError(f"task {kind!r} runs code and needs a sandbox")
        if config is None or self.encode is None or self.sandbox is None:
            return None
        return config.build(self.sandbox, self.encode)


class SuiteConfig(BaseModel, ABC):
    """Base of every suite's config (subclasses add `kind: Literal[...]` and their fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metrics: ClassVar[tuple[str, ...]]
    """The scores the suite's grader (`TaskSuite.grade_episode`) returns for every episode,
    `correct` first: the metrics a reward may read."""
    runs_code: ClassVar[bool] = False
    """The suite's tools or grader run model-written code, so a run opens its sandbox."""
    gold_answer_text: ClassVar[bool] = True
    """Items carry gold answer text (False where the grader judges calls or state, not text):
    rewards that measure the answer's probability or appearance need it."""
    answer_in_observations: ClassVar[bool] = False
    """A correct answer is something the tools show (a search result, a printed number, a room
    seen): an episode whose answer no tool output contained guessed it, and a warm start
    should not clone it (`turnrl.sft.answer_supported`). False where the answer is written,
    not found (code, calls)."""

    @abstractmethod
    def build(self, ctx: BuildContext) -> TaskSuite:
        """The live suite this config describes."""

    def expert(self) -> ExpertConfig | None:
        """The model the suite wants answering `ask` (given back as `ctx.expert`); None for
        none."""
        return None

    @classmethod
    def kind_name(cls) -> str:
        """The `task.kind` that selects this config."""
        kind = cls.model_fields["kind"].default
        assert isinstance(kind, str), f"{cls.__name__} declares no `kind`"
        return kind
