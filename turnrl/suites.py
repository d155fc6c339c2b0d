"""From a task config to a live suite (with its tools and sandbox), and the oracle policy.

The oracle plays each item's gold solution through the real pipeline. A suite that knows its
gold solutions as turns (`tasks.base.Oracle`: function calls, device-API sessions, a walk
through a house) gives them; for the others the oracle calls the suite's tool first (the
search that finds the evidence, the Python that runs the reference solution against the
tests), reads nothing from the response, then answers with the gold answer. An oracle that
does not score 100% points at a broken tool, sandbox, parser or grader.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from turnrl.agent.chat import ChatML
from turnrl.agent.policy import Policy, SamplingParams
from turnrl.agent.runner import UserTurn
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.config import TaskConfig
from turnrl.sandboxes.base import Sandbox
from turnrl.tasks.base import Oracle, TaskItem, TaskSuite
from turnrl.tasks.embodied_tools import Costs, Generate
from turnrl.tools.base import tool_specs
from turnrl.tools.python import PythonTool

Encode = Callable[[str], Sequence[int]]


def needs_sandbox(cfg: TaskConfig) -> bool:
    """Whether the suite runs code (in its tools or its grader)."""
    return cfg.kind in ("humaneval", "gsm_symbolic")


def build_suite(
    cfg: TaskConfig,
    encode: Encode | None,
    sandbox: Sandbox | None,
    expert: Generate | None = None,
) -> TaskSuite:
    """The configured suite; `sandbox` is required when `needs_sandbox(cfg)` and the suite will
    run or grade code. Without `encode` (re-grading a stored run, listing) the suite's tools
    that need a tokenizer are not built. `expert` answers the embodied suite's `ask` when its
    config says `ask.answered_by: model`."""
    if cfg.kind == "search_qa":
        from turnrl.tasks.search_qa import SearchQA

        return SearchQA(
            seed=cfg.seed,
            n_train=cfg.n_train,
            n_test=cfg.n_test,
            encode=encode,
            search_k=cfg.search_k,
            result_tokens=cfg.result_tokens,
        )
    if cfg.kind == "bfcl_multi_turn":
        from turnrl.tasks.bfcl_multi import BfclMultiTurn

        return BfclMultiTurn(
            categories=tuple(cfg.categories), seed=cfg.seed, n_test=cfg.n_test, cost=cfg.cost
        )
    if cfg.kind == "bfcl_single":
        from turnrl.tasks.bfcl_single import BfclSingle

        return BfclSingle(
            categories=tuple(cfg.categories), seed=cfg.seed, test_fraction=cfg.test_fraction
        )
    if cfg.kind == "embodied_search":
        from turnrl.tasks.embodied import EmbodiedSearch

        return EmbodiedSearch(
            n_train=cfg.n_train,
            n_test=cfg.n_test,
            seed=cfg.seed,
            rooms=cfg.rooms,
            distractors=cfg.distractors,
            ambiguity=cfg.ambiguity,
            hint_rate=cfg.hint_rate,
            costs=Costs(**cfg.costs.model_dump()),
            expert=expert if cfg.ask.answered_by == "model" else None,
        )
    if sandbox is None and encode is not None:
        raise ValueError(f"task {cfg.kind!r} runs code and needs a sandbox")
    tool = None
    if cfg.python is not None and encode is not None and sandbox is not None:
        tool = PythonTool(
            sandbox,
            encode,
            max_tokens=cfg.python.max_tokens,
            stateful=cfg.python.stateful,
            limits=cfg.python.limits,
        )
    if cfg.kind == "humaneval":
        from turnrl.tasks.humaneval import HumanEval

        return HumanEval(sandbox=sandbox, python_tool=tool, seed=cfg.seed, timeout_s=cfg.timeout_s)
    from turnrl.tasks.math_python import MathPython

    return MathPython(seed=cfg.seed, n_train=cfg.n_train, n_test=cfg.n_test, python_tool=tool)


def model_expert(policy: Policy, renderer: ChatML, max_tokens: int) -> Generate:
    """A prompt-in, text-out function over a policy (greedy), for `ask`'s expert."""
    eot = renderer.end_of_turn_id()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=(eot,))

    async def generate(prompt: str) -> str:
        ids = renderer.initial("You answer questions briefly.", [], prompt)
        completion = await policy.generate(ids, params)
        return renderer.tokenizer.decode([t for t in completion.token_ids if t != eot])

    return generate


SUITE_KINDS: tuple[str, ...] = (
    "search_qa",
    "humaneval",
    "gsm_symbolic",
    "bfcl_multi_turn",
    "bfcl_single",
    "embodied_search",
)
"""Every suite `task.kind` names, in the order `turnrl tasks list` shows them."""


def describe_suites() -> list[dict[str, object]]:
    """What `turnrl tasks list` shows: each suite with its default config's item counts."""
    from pydantic import TypeAdapter

    adapter: TypeAdapter[TaskConfig] = TypeAdapter(TaskConfig)
    rows = []
    for kind in SUITE_KINDS:
        cfg = adapter.validate_python({"kind": kind})
        suite = build_suite(cfg, None, None)
        rows.append(
            {
                "kind": kind,
                "name": suite.name,
                "source": suite.source,
                "license": suite.license,
                "train": len(suite.items("train")),
                "test": len(suite.items("test")),
                "description": " ".join((type(cfg).__doc__ or "").split("\n\n")[0].split()),
            }
        )
    return rows


def oracle_turns(suite: TaskSuite, item: TaskItem) -> list[str]:
    """The replies the oracle gives for `item`, turn by turn."""
    tools = {spec.name for spec in tool_specs(suite.tools())}
    answer = item.answers[0]
    call: dict[str, object] | None = None
    if suite.name == "humaneval":
        prompt, test, entry = (str(item.meta[k]) for k in ("prompt", "test", "entry_point"))
        # The full function as the answer: robust to the answer's surrounding whitespace
        # being stripped, which a body-only completion is not.
        answer = prompt + answer
        code = f"{answer}\n{test}\ncheck({entry})\nprint('all tests passed')"
        call = {"name": "python", "arguments": {"code": code}}
    elif "python" in tools:
        call = {"name": "python", "arguments": {"code": f"print({answer!r})"}}
    elif "search" in tools and "evidence_query" in item.meta:
        call = {"name": "search", "arguments": {"query": str(item.meta["evidence_query"])}}
    turns = []
    if call is not None and call["name"] in tools:
        turns.append(f"<tool_call>{json.dumps(call)}</tool_call>")
    turns.append(f"<answer>{answer}</answer>")
    return turns


def oracle_policies(
    suite: TaskSuite, renderer: ChatML, end_of_turn: str
) -> Callable[[TaskItem], ScriptedPolicy]:
    """For each item, a `ScriptedPolicy` that plays the item's gold replies (given to the
    item's episodes as their own policy: two items can look the same to a policy, e.g. BFCL's
    long-context twin of a scenario, whose initial state differs but is never shown). In a
    conversation it follows the followups seen so far and plays the replies for the user
    message being served, the k-th at its k-th turn."""
    tokenizer = renderer.tokenizer
    header = tokenizer.decode([renderer.start_id, *tokenizer.encode("assistant\n")])
    made: dict[str, ScriptedPolicy] = {}

    def policy_for(item: TaskItem) -> ScriptedPolicy:
        policy = made.get(item.id)
        if policy is not None:
            return policy
        turns = suite.oracle_turns(item) if isinstance(suite, Oracle) else oracle_turns(suite, item)
        plan = _Plan(item.followups, _segments(turns))

        def script(context: Sequence[int]) -> str:
            text = tokenizer.decode(list(context))
            rest = text[text.find(item.question) + len(item.question) :]
            u, at = plan.served(rest)
            segment = plan.segments[min(u, len(plan.segments) - 1)]
            # Replies so far to this message: the assistant headers after it, less the last
            # one, which opens the reply being sampled now.
            k = rest.count(header, at) - 1
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
