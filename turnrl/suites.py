"""From a task config to a live suite (with its tools and sandbox), the expert model that
answers `ask`, and the oracle policy.

The oracle plays each item's gold solution (`TaskSuite.oracle_turns`) through the real
pipeline: function calls, device-API sessions, a walk through a house, or the suite's tool
first (the searches that find the evidence, planned by the suite on its own deterministic
search, two-hop questions clue first; the Python that runs the reference solution against the
tests), then the gold answer. An oracle that does not score 100% points at a broken tool,
sandbox, parser or grader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from turnrl.agent.chat import ChatML, HFTokenizer, Renderer
from turnrl.agent.chat_config import ChatConfig
from turnrl.agent.model_config import ExpertConfig
from turnrl.agent.policy import Policy, SamplingParams
from turnrl.agent.records import UserTurn
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.agent.tool_formats import make_tool_format, rewrite_hermes
from turnrl.sandboxes.base import Sandbox
from turnrl.tasks.base import TaskItem, TaskSuite
from turnrl.tasks.registry import SUITE_CONFIGS, SUITE_KINDS, TaskConfig
from turnrl.tasks.suite_config import BuildContext, Generate

if TYPE_CHECKING:
    from turnrl.agent.hf_policy import HFPolicy

__all__ = [
    "SUITE_KINDS",
    "Expert",
    "build_suite",
    "describe_suites",
    "model_expert",
    "open_expert",
    "oracle_policies",
]

Encode = Callable[[str], Sequence[int]]


def build_suite(
    cfg: TaskConfig,
    encode: Encode | None,
    sandbox: Sandbox | None,
    expert: Generate | None = None,
    *,
    chat: ChatConfig,
) -> TaskSuite:
    """The configured suite; `sandbox` is required when the config `runs_code` and the suite
    will run or grade code. Without `encode` (re-grading a stored run, listing) the suite's
    tools that need a tokenizer are not built. `expert` answers `ask` when the config names an
    expert model (`cfg.expert()`). `chat` is the run's: its tool format writes the example
    calls in the suite's prompt."""
    fmt = make_tool_format(chat.tool_format)
    return cfg.build(BuildContext(encode=encode, sandbox=sandbox, expert=expert, tool_format=fmt))


def model_expert(policy: Policy, renderer: Renderer, max_tokens: int) -> Generate:
    """A prompt-in, text-out function over a policy (greedy), for `ask`'s expert."""
    eot = renderer.end_of_turn_id()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=(eot,))

    async def generate(prompt: str) -> str:
        ids = renderer.initial("You answer questions briefly.", [], prompt)
        completion = await policy.generate(ids, params)
        return renderer.tokenizer.decode([t for t in completion.token_ids if t != eot])

    return generate


@dataclass(frozen=True)
class Expert:
    """A model loaded to answer `ask` (`open_expert`); close it when the run ends."""

    path: Path
    """The folder its weights came from."""
    policy: HFPolicy
    """Its policy (greedy generation)."""
    generate: Generate
    """A prompt in, its answer out."""

    def close(self) -> None:
        self.policy.close()


def open_expert(spec: ExpertConfig) -> Expert:
    """Load the expert model `spec` names (blocking: seconds)."""
    from turnrl.agent.hf_policy import HFPolicy
    from turnrl.agent.model import embedded_model_dir, load_model, load_tokenizer, tiny_model_dir

    weights = spec.model
    if weights.kind == "embedded":
        path = embedded_model_dir()
    elif weights.kind == "tiny":
        path = tiny_model_dir()
    else:
        path = weights.path
    tokenizer = load_tokenizer(path)
    renderer = ChatML(HFTokenizer(tokenizer))
    policy = HFPolicy(load_model(path), tokenizer, max_batch_size=8)
    return Expert(path, policy, model_expert(policy, renderer, spec.max_new_tokens))


def describe_suites() -> list[dict[str, object]]:
    """What `turnrl tasks list` shows: each suite with its default config's item counts and
    declared metrics."""
    rows = []
    for config in SUITE_CONFIGS:
        cfg = config()
        suite = cfg.build(BuildContext())
        rows.append(
            {
                "kind": config.kind_name(),
                "name": suite.name,
                "source": suite.source,
                "license": suite.license,
                "train": len(suite.items("train")),
                "test": len(suite.items("test")),
                "metrics": list(config.metrics),
                "description": " ".join((config.__doc__ or "").split("\n\n")[0].split()),
            }
        )
    return rows


def oracle_policies(
    suite: TaskSuite, renderer: Renderer, end_of_turn: str
) -> Callable[[TaskItem], ScriptedPolicy]:
    """For each item, a `ScriptedPolicy` that plays the item's gold replies (given to the
    item's episodes as their own policy: two items can look the same to a policy, e.g. BFCL's
    long-context twin of a scenario, whose initial state differs but is never shown). In a
    conversation it follows the followups seen so far and plays the replies for the user
    message being served, the k-th at its k-th turn. Gold calls (written by the suites as
    `<tool_call>` JSON) are played in the renderer's tool format."""
    tokenizer = renderer.tokenizer
    header = renderer.generation_prompt
    fmt = renderer.tool_format
    made: dict[str, ScriptedPolicy] = {}

    def policy_for(item: TaskItem) -> ScriptedPolicy:
        policy = made.get(item.id)
        if policy is not None:
            return policy
        turns = [rewrite_hermes(t, fmt) for t in suite.oracle_turns(item)]
        plan = _Plan(item.followups, _segments(turns))
        question_end: list[int] = []

        def script(context: Sequence[int]) -> str:
            text = tokenizer.decode(list(context))
            if not question_end:
                # The first call is a turn-0 prompt, which ends with the item's own question:
                # its last copy (a few-shot example may hold an earlier one, which would make
                # the oracle read the example's replies as its own). Every later context
                # starts with that same prompt, so the position holds for them too.
                question_end.append(text.rfind(item.question) + len(item.question))
            rest = text[question_end[0] :]
            u, at = plan.served(rest)
            segment = plan.segments[min(u, len(plan.segments) - 1)]
            # Replies so far to this message: the assistant headers after it, less the last
            # one, which opens the reply being sampled now. A template without a header
            # (Mistral's) closes each reply with the end-of-turn text instead.
            k = rest.count(header, at) - 1 if header else rest.count(end_of_turn, at)
            return segment[min(max(k, 0), len(segment) - 1)] + end_of_turn

        policy = made[item.id] = ScriptedPolicy(script, tokenizer)
        return policy

    return policy_for


@dataclass(frozen=True)
class _Plan:
    followups: tuple[UserTurn, ...]
    segments: list[list[str]]
    """The oracle's replies, one list per user message (each ends with an answer)."""

    def served(self, rest: str) -> tuple[int, int]:
        """(how many of this plan's followups appear in `rest`, in order; where the last ends)."""
        u = at = 0
        for followup in self.followups:
            found = rest.find(followup.text, at)
            if found < 0:
                break
            u, at = u + 1, found + len(followup.text)
        return u, at


def _segments(turns: list[str]) -> list[list[str]]:
    segments: list[list[str]] = [[]]
    for turn in turns:
        segments[-1].append(turn)
        if "<answer>" in turn:
            segments.append([])
    return [seg for seg in segments if seg]
