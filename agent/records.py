"""The records every stage shares: tool calls and results, turns, episodes, stop reasons.

They are pydantic models because they cross the disk boundary (the trajectory store) and the
wire (later: Ray actors); all are frozen. Token ids are the truth: a `Turn` keeps the exact ids
the policy sampled and the exact ids appended around them, so that the concatenation over an
episode's turns *is* the context the policy saw, and training never re-tokenizes text.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION: Literal[2] = 2
"""Layout version of stored `Episode` records (`Episode.schema_version`)."""


GRADER_ERROR = "grader_error"
"""The outcome key marking an episode whose grader raised (a bug in the grader, not a wrong
answer; `turnrl.rollout.grade_all`); only such episodes carry it."""


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


@dataclass(frozen=True)
class UserTurn:
    """A user message that follows an answer (`EpisodeSpec.followups`). Not a stored record:
    what the policy saw of it is the observation of the turn that answered before it."""

    text: str
    """The message."""
    reveal: tuple[str, ...] = ()
    """Hidden tools that become available with this message (their schemas are shown in it)."""


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


class ToolErrorKind(StrEnum):
    """Why a tool call failed (`ToolResult.error`), named by where the call stopped. The values
    are what stored records hold."""

    PARSE = "parse"
    """The call could not be read (invalid JSON, no tool name, over the parser's size limit);
    no tool was looked up."""
    UNKNOWN_TOOL = "unknown_tool"
    """No tool the agent can see has that name (a hidden tool counts as unknown until a user
    turn reveals it)."""
    TOO_LARGE = "too_large"
    """The raw arguments are longer than the tool's `max_argument_chars`; not validated."""
    INVALID_ARGUMENTS = "invalid_arguments"
    """The arguments do not fit the tool's schema; the text names each bad field."""
    TIMEOUT = "timeout"
    """The tool did not answer within its `timeout_s` and was cancelled (or raised
    `TimeoutError` itself: a deadline of its own ran out)."""
    TOOL_ERROR = "tool_error"
    """The tool refused or failed and said why: it raised `ToolError` (a missing file, a blank
    question, a server's error reply). The text is its message, with no Python class name:
    the agent can act on it."""
    BAD_OUTPUT = "bad_output"
    """The tool returned something that is not text and has no faithful text form (bytes, an
    arbitrary object)."""
    BUDGET = "budget"
    """Not run: the episode's tool-call or cost budget had run out."""
    TOOL_BUG = "tool_bug"
    """The tool is broken: it raised an exception that is not a `ToolError`, or its argument
    schema could not be checked. The text names the exception's class (for the person who
    fixes it); the agent can only try something else."""


class ToolResult(Record):
    """What came back from one tool call."""

    call_id: str
    """The `ToolCall.id` this answers."""
    text: str
    """The observation text the agent sees (already truncated)."""
    error: ToolErrorKind | None = None
    """Why the call failed; None on success."""
    truncated: bool = False
    """True when `text` was cut to the tool's token budget."""
    latency_s: float = 0.0
    """Wall time of the call in seconds."""
    cost: dict[str, float] = Field(default_factory=dict)
    """Cost vector of the call by cost kind (`time_s`, `money_usd`, `tokens`, `calls`, ...)."""
    items: list[str] = Field(default_factory=list)
    """Ids of what the result showed (search passages, files), in order: what coverage
    rewards count as seen."""


class TurnSignals(Record):
    """Per-turn quantities measured for credit assignment, filled in before scoring (None: not
    measured). Models measured `gold_prob` and `value`; `gold_seen` reads the tool outputs."""

    gold_prob: float | None = None
    """The policy's teacher-forced probability of the gold answer after this turn's
    observation (information gain, IGPO; `turnrl.rl.info_gain`)."""
    gold_seen: bool | None = None
    """Whether a gold answer occurs in this turn's tool outputs (`saturation`)."""
    value: float | None = None
    """A value head's estimate V(s) of the state before this turn (`gae`, `tppo`)."""


_NO_SIGNALS = TurnSignals()
"""Every new turn's signals: one shared value (records are frozen), not one built per turn."""


class ApiUsage(Record):
    """What an API model's provider counted and charged for one turn's request
    (`model.kind: openai`): its own token counts, not local re-counts."""

    input_tokens: int = Field(ge=0)
    """Prompt tokens (`usage.prompt_tokens`)."""
    cached_input_tokens: int = Field(0, ge=0)
    """Of those, the ones served from the provider's prompt cache."""
    output_tokens: int = Field(ge=0)
    """Completion tokens (`usage.completion_tokens`, reasoning tokens included)."""
    cost_usd: float = Field(ge=0)
    """Their price under the run's price table (`model.price`)."""


class Route(Record):
    """One routing decision (`turnrl.agent.routing`): which priced model wrote a turn (on
    `Turn.route`), or ran a whole episode (a task-level router's pick, on `Episode.route`),
    with the probability the router gave it, so that the logs support off-policy evaluation."""

    model: str
    """The chosen model's name (a key of the run's `models:`)."""
    router: str
    """The router's kind that chose it (`fixed`, `delegate`, `learned`, `bandit`)."""
    propensity: float = Field(1.0, gt=0, le=1)
    """The probability the router gave this choice (1 for a deterministic router)."""
    probabilities: dict[str, float] = Field(default_factory=dict)
    """The router's probability of every model (empty for a deterministic router)."""
    features: list[float] = Field(default_factory=list)
    """What the router saw (a learned router's feature vector; empty otherwise)."""


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
    calls_not_run: int | None = None
    """Call attempts in the completion that are not in `tool_calls` and were never run (written
    beside an answer, left without their closing tag, cut off by a full context), whatever the
    tool-call format: with `tool_calls`, what graders of calls read instead of the text. None
    in records from before it existed."""
    rewards: dict[str, float] = Field(default_factory=dict)
    """Per-turn reward components by name, never pre-summed (filled in by `rl.rewards`)."""
    state_key: str | None = None
    """Key of the trajectory-graph state after this turn (`turnrl.agent.graph`), hashed by the
    runner as the turn is recorded (while its data is in cache), so that credit assignment on
    a large batch need not hash every turn again; None in records from before it existed."""
    signals: TurnSignals = Field(default_factory=lambda: _NO_SIGNALS)
    """What a model measured about this turn for credit assignment (stored, so replay needs no
    model)."""
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
    api_usage: ApiUsage | None = None
    """For a turn an API model wrote (`model.kind: openai`): the provider's token counts and
    price of its request (also summed into `Episode.cost`). Such a turn's ids are the local
    tokenizer's encoding of the reply, not ids a model of this run sampled, and its logprobs
    are placeholders (0.0): it is never trained on. None for every other turn."""

    route: Route | None = None
    """Which priced model wrote this turn, when the run routes among several (`models:`);
    None in a run of one policy."""
    foreign: bool = False
    """True for a turn another model than the trained policy wrote (per-step routing): its
    ids stay in the context exactly, and they are never trained on, like a `replayed` turn."""

    @property
    def n_tool_calls(self) -> int:
        return len(self.tool_calls)

    @property
    def context_only(self) -> bool:
        """Whether this turn's completion is context the learner must not train on: copied
        from a stored episode (`replayed`) or written by another model (`foreign`)."""
        return self.replayed or self.foreign


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
    gold_prob_initial: float | None = None
    """The policy's teacher-forced probability of the gold answer given the initial prompt
    only, before any turn (information gain's p_{-1}); None when not measured."""
    value_after: float | None = None
    """A value head's estimate of the state after the last turn: T-PPO's bootstrap value of
    a truncated episode; None when not measured."""
    route: Route | None = None
    """A task-level router's pick of the model that ran this whole episode (with its
    propensity); None when no task-level router chose."""
    refused_route: Route | None = None
    """The router's choice of a turn the budget refused (the episode ended there, with
    `budget_exhausted`): logged so that a learned router learns what that choice cost."""
    schema_version: Literal[2] = SCHEMA_VERSION
    """Version of this record's layout. Records without one are version 1 (signals as a
    string-keyed dict on the turns); `upgrade_episode` reads them."""

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


def upgrade_episode(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored episode's JSON object in the current layout, from any earlier one.

    Version 1 (no `schema_version`) kept `Turn.signals` as a dict of floats: `gold_prob`,
    `gold_seen` (1.0 or 0.0), `value` on every turn, plus `gold_prob_initial` on the first turn
    and `value_after` on the last, which are per-episode quantities and now live on `Episode`.
    """
    version = raw.get("schema_version", 1)
    if version == SCHEMA_VERSION:
        return raw
    if version != 1:
        raise ValueError(
            f"episode {raw.get('episode_id')!r}: unknown record schema version {version!r} "
            f"(this turnrl reads 1 to {SCHEMA_VERSION})"
        )
    out = dict(raw)
    turns = []
    for turn in raw.get("turns", []):
        signals = dict(turn.get("signals") or {})
        if "gold_prob_initial" in signals:
            out["gold_prob_initial"] = signals.pop("gold_prob_initial")
        if "value_after" in signals:
            out["value_after"] = signals.pop("value_after")
        if "gold_seen" in signals:
            signals["gold_seen"] = signals["gold_seen"] >= 0.5
        unknown = sorted(set(signals) - set(TurnSignals.model_fields))
        if unknown:
            raise ValueError(
                f"episode {raw.get('episode_id')!r}: version-1 signals {unknown} are unknown"
            )
        turns.append({**turn, "signals": signals})
    out["turns"] = turns
    out["schema_version"] = SCHEMA_VERSION
    return out
