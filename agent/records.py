"""The records every stage shares: tool calls and results, turns, episodes, stop reasons.

They are pydantic models because they cross the disk boundary (the trajectory store) and the
wire (later: Ray actors); all are frozen. Token ids are the truth: a `Turn` keeps the exact ids
the policy sampled and the exact ids appended around them, so that the concatenation over an
episode's turns *is* the context the policy saw, and training never re-tokenizes text.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StopReason(StrEnum):
    """Why an episode ended. Every episode ends with exactly one."""

    ANSWERED = "answered"
    """The policy emitted a final `<answer>...</answer>`."""
    MAX_TURNS = "max_turns"
    """The turn budget ran out before an answer."""
    MAX_TOOL_CALLS = "max_tool_calls"
    """The tool-call budget ran out before an answer."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    """The cost budget (sum of the weighted cost vector) ran out before an answer."""
    CONTEXT_FULL = "context_full"
    """Prompt plus completion reached the context window (or the episode token budget)."""
    TIMEOUT = "timeout"
    """The episode's wall-clock budget ran out."""
    POLICY_ERROR = "policy_error"
    """The policy backend failed (raised, or returned something unusable)."""
    ERROR = "error"
    """Anything else that went wrong inside the runner; `Episode.error` says what."""


class Record(BaseModel):
    """Base for stored records: frozen, and strict about unknown fields on load."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ToolCall(Record):
    """One tool call as the policy wrote it."""

    id: str
    """Unique within the episode: `t{turn}c{index}`."""
    name: str | None
    """The tool name, or None when the call could not be parsed far enough to find one."""
    raw: str
    """The text between `<tool_call>` and `</tool_call>` exactly as emitted."""
    arguments: dict[str, Any] | None = None
    """Parsed JSON arguments; None when parsing failed."""
    parse_error: str | None = None
    """Why the call could not be parsed; None for a well-formed call."""


class ToolResult(Record):
    """What came back from one tool call."""

    call_id: str
    """The `ToolCall.id` this answers."""
    text: str
    """The observation text the agent sees (already truncated)."""
    error: str | None = None
    """An error kind when the call failed: `parse`, `unknown_tool`, `too_large`,
    `invalid_arguments`, `timeout`, `tool_error`, `bad_output`, `budget`; None on success."""
    truncated: bool = False
    """True when `text` was cut to the tool's token budget."""
    latency_s: float = 0.0
    """Wall time of the call in seconds."""
    cost: dict[str, float] = Field(default_factory=dict)
    """Cost vector of the call by cost kind (`time_s`, `money_usd`, `tokens`, `calls`, ...)."""
    items: list[str] = Field(default_factory=list)
    """Ids of what the result showed (search passages, files), in order: what coverage
    rewards count as seen."""


class Turn(Record):
    """One policy step and what the environment appended after it."""

    index: int
    """0-based position in the episode."""
    prompt_ids: list[int]
    """Ids appended to the context just before this turn was sampled (the whole initial
    prompt for turn 0; empty afterwards, as the previous turn's `observation_ids` carry the
    environment's reply)."""
    completion_ids: list[int]
    """The exact ids the policy sampled. The only ids that are ever trained on."""
    completion_logprobs: list[float]
    """Log-probability of each sampled id under the sampling policy, aligned with
    `completion_ids`."""
    observation_ids: list[int]
    """Ids the environment appended after the completion (end-of-turn marker, tool
    responses, the next assistant header). Never trained on."""
    text: str
    """The completion decoded, for people and for parsing; never re-tokenized."""
    finish_reason: str
    """`stop` (end-of-turn id or stop string) or `length` (per-turn token limit)."""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    """Calls parsed from the completion, in order."""
    tool_results: list[ToolResult] = Field(default_factory=list)
    """One result per call, in the same order."""
    answer: str | None = None
    """The answer, when the completion contained `<answer>...</answer>`: the episode's final
    answer, or the reply to one user message of a multi-turn conversation."""
    user_turn: int = 0
    """Which user message this turn serves: 0 for the question, k for the k-th followup."""
    format_error: str | None = None
    """Why the turn is malformed (bad call, unterminated tag, neither call nor answer);
    None for a well-formed turn."""
    rewards: dict[str, float] = Field(default_factory=dict)
    """Per-turn reward components by name, never pre-summed (filled in by `rl.rewards`)."""
    state_key: str | None = None
    """Key of the trajectory-graph state after this turn (`turnrl.agent.graph`), hashed by the
    runner as the turn is recorded (while its data is in cache), so that credit assignment on
    a large batch need not hash every turn again; None in records from before it existed."""
    signals: dict[str, float] = Field(default_factory=dict)
    """Per-turn quantities a model measured for credit assignment, stored so that replay
    needs no model: `gold_prob` (the policy's teacher-forced probability of the gold answer
    after this turn, for information gain), `value` (a value head's estimate of the state
    before this turn)."""
    advantage: float | None = None
    """The advantage the learner broadcast to this turn's completion tokens; None until an
    estimator assigned one (and for evaluation episodes)."""
    cost_so_far: dict[str, float] = Field(default_factory=dict)
    """Episode cost vector after this turn's tool calls."""
    tokens_left: int = 0
    """Context tokens left after this turn's completion and observation."""
    policy_version: int = 0
    """Version of the weights that sampled this turn."""
    generate_s: float = 0.0
    """Seconds spent waiting for the policy."""
    tools_s: float = 0.0
    """Seconds spent in tool calls."""
    replayed: bool = False
    """True for a turn copied from a stored episode as the prefix of a branched rollout
    (`EpisodeSpec.prefix`): its ids stay in the context exactly, but this episode's policy did
    not sample them, so the learner must not train on them (mask them out)."""

    @property
    def n_tool_calls(self) -> int:
        return len(self.tool_calls)


class Episode(Record):
    """One rollout of one task item."""

    episode_id: str
    """Unique within the run."""
    task_id: str
    """The task item's id."""
    group_id: str
    """Episodes of the same task rolled out together share it (GRPO groups)."""
    turns: list[Turn] = Field(default_factory=list)
    """The turns, in order."""
    stop_reason: StopReason
    """Why the episode ended."""
    answer: str | None = None
    """The final answer, if the policy gave one: in a multi-turn conversation, the answer to
    the last user message (earlier replies are in their turns' `answer`)."""
    outcome: dict[str, float] = Field(default_factory=dict)
    """Grader scores (`exact_match`, `f1`, ...); empty when not graded."""
    error: str | None = None
    """Error text for `POLICY_ERROR`/`ERROR` stops; for a branched rollout, also one
    `replay mismatch: ...` line per replayed tool call whose observation differed from the
    stored one."""
    cost: dict[str, float] = Field(default_factory=dict)
    """Total cost per cost kind."""
    wall_s: float = 0.0
    """Wall time of the episode."""
    step: int = 0
    """Training step whose rollouts include this episode (-1 for evaluation)."""

    def token_ids(self) -> list[int]:
        """The episode's whole context, exactly as the policy saw it."""
        ids: list[int] = []
        for t in self.turns:
            ids += t.prompt_ids
            ids += t.completion_ids
            ids += t.observation_ids
        return ids

    @property
    def n_tool_calls(self) -> int:
        return sum(t.n_tool_calls for t in self.turns)

    @property
    def n_completion_tokens(self) -> int:
        return sum(len(t.completion_ids) for t in self.turns)
