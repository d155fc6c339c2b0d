"""The BFCL multi-turn suite: its checker agrees with bfcl-eval's own, its toolkit keeps
episodes apart and shows errors as BFCL does, and its oracle scores through the real runner."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker
from fakes import CharTokenizer

from turnrl.agent.chat import ChatML
from turnrl.agent.chat_config import ChatConfig
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode, StopReason, ToolCall, ToolResult, Turn, UserTurn
from turnrl.agent.runner import Budget, EpisodeRunner
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.agent.tool_formats import ToolFormatName, make_tool_format
from turnrl.rollout import episode_specs
from turnrl.suites import build_suite
from turnrl.tasks.base import TaskItem
from turnrl.tasks.bfcl_multi import (
    ADDED_FUNCTIONS_TEXT,
    CATEGORIES,
    EXCLUDED_ENTRIES,
    EXCLUDED_SCENARIOS,
    BfclMultiTurn,
    BfclMultiTurnConfig,
    Call,
    Entry,
    check_calls,
    entries,
    entry,
    gold_calls,
    state_differences,
)
from turnrl.tools.bfcl import (
    ERROR_PREFIX,
    BfclToolkit,
    execute,
    new_instances,
    owners,
    parse_call,
)

TOK = CharTokenizer()
KINDS = ("drop", "change_arg", "extra", "extra_state", "swap", "wrong_turn", "empty_turn")
"""Perturbations of a ground truth (see `perturb`)."""
SAMPLE = 120
"""Entries per default test run of the perturbation agreement (all in the `slow` run)."""


@pytest.fixture(scope="module")
def suite() -> BfclMultiTurn:
    return BfclMultiTurn()


def all_entries() -> list[Entry]:
    return [e for c in CATEGORIES for e in entries(c).values()]


# --- running both checkers ---------------------------------------------------------------


def call_string(name: str, arguments: dict[str, Any]) -> str:
    """A call as BFCL's decoders write it (`repr` of JSON values is a Python literal)."""
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def bfcl_valid(e: Entry, calls: Sequence[Sequence[Call]]) -> bool:
    """bfcl-eval's verdict: its `multi_turn_checker` on the calls, one step per call, under a
    fresh model name (it keeps simulators in module globals by name; removed afterwards)."""
    model = f"turnrl_{uuid.uuid4().hex}"
    decoded = [[[call_string(n, a)] for n, a in turn] for turn in calls]
    entry_ = {"id": e.id, "initial_config": e.initial_config, "involved_classes": list(e.classes)}
    try:
        result = multi_turn_checker(
            decoded, [list(t) for t in e.ground_truth], entry_, f"multi_turn_{e.category}", model
        )
    finally:
        names = vars(multi_turn_utils)
        for key in [k for k in names if k.startswith(model)]:
            del names[key]
    return bool(result["valid"])


def episode_of(e: Entry, calls: Sequence[Sequence[Call]]) -> Episode:
    """A stored episode that made `calls` (each answered by the simulators) and answered
    every user turn."""
    turns: list[Turn] = []

    def turn(user_turn: int, call: Call | None) -> Turn:
        i = len(turns)
        tool_calls, results, answer = [], [], None
        if call is None:
            answer = "done"
        else:
            tool_calls = [ToolCall(id=f"t{i}c0", name=call[0], raw="", arguments=call[1])]
            results = [ToolResult(call_id=f"t{i}c0", text="")]
        return Turn(
            index=i,
            prompt_ids=[],
            completion_ids=[],
            completion_logprobs=[],
            observation_ids=[],
            text="",
            finish_reason="stop",
            tool_calls=tool_calls,
            tool_results=results,
            answer=answer,
            user_turn=user_turn,
        )

    for k in range(len(e.messages)):
        for c in calls[k] if k < len(calls) else []:
            turns.append(turn(k, c))
        turns.append(turn(k, None))
    return Episode(
        episode_id="e",
        task_id=e.id,
        group_id="g",
        turns=turns,
        stop_reason=StopReason.ANSWERED,
        answer="done",
    )


async def ours_correct(suite: BfclMultiTurn, e: Entry, calls: Sequence[Sequence[Call]]) -> bool:
    item = TaskItem(id=e.id, question="", answers=())
    scores = await suite.grade_episode(item, episode_of(e, calls))
    return scores["correct"] == 1.0


# --- perturbations -----------------------------------------------------------------------


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "_x" if value else "x"
    if isinstance(value, list):
        return value[:-1] if value else ["x"]
    return "x"


def _state_differs(e: Entry, calls: Sequence[Sequence[Call]]) -> bool:
    """Whether `calls` leave the simulators in another state than the ground truth does."""
    owner = owners(e.classes)
    states = []
    for per_turn in (calls, gold_calls(e)):
        instances = new_instances(e.classes, e.initial_config, e.long_context)
        for name, args in (c for turn in per_turn for c in turn):
            execute(instances[owner[name]], name, args)
        states.append(instances)
    return bool(state_differences(*states))


def perturb(
    e: Entry, gold: list[list[Call]], kind: str, rng: random.Random
) -> list[list[Call]] | None:
    """The ground truth with one mistake of `kind`; None when it has no place for one.
    drop: one call left out; change_arg: one argument value changed; extra: a copy of one
    call added at the end of some turn; extra_state: a copy of one call added at the end of
    its turn where that changes the final state (up to 8 calls tried); swap: two neighbouring
    calls of a turn exchanged; wrong_turn: a turn's last call made at the start of the next
    turn (or its first at the end of the previous); empty_turn: all calls of one turn left
    out."""
    calls = [list(t) for t in gold]
    spots = [(k, i) for k, t in enumerate(calls) for i in range(len(t))]
    if not spots:
        return None
    if kind == "drop":
        k, i = rng.choice(spots)
        del calls[k][i]
    elif kind == "change_arg":
        with_args = [(k, i) for k, i in spots if calls[k][i][1]]
        if not with_args:
            return None
        k, i = rng.choice(with_args)
        name, args = calls[k][i]
        key = rng.choice(sorted(args))
        calls[k][i] = (name, {**args, key: _changed(args[key])})
    elif kind == "extra":
        k, i = rng.choice(spots)
        calls[rng.randrange(len(calls))].append(calls[k][i])
    elif kind == "extra_state":
        for k, i in rng.sample(spots, min(len(spots), 8)):
            calls[k].append(calls[k][i])
            if _state_differs(e, calls):
                break
            calls[k].pop()
        else:
            return None
    elif kind == "swap":
        pairs = [(k, i) for k, i in spots if i + 1 < len(calls[k])]
        if not pairs:
            return None
        k, i = rng.choice(pairs)
        calls[k][i], calls[k][i + 1] = calls[k][i + 1], calls[k][i]
    elif kind == "wrong_turn":
        moves = [(k, +1) for k, t in enumerate(calls) if t and k + 1 < len(calls)]
        moves += [(k, -1) for k, t in enumerate(calls) if t and k > 0]
        if not moves:
            return None
        k, step = rng.choice(moves)
        if step > 0:
            calls[k + 1].insert(0, calls[k].pop())
        else:
            calls[k - 1].append(calls[k].pop(0))
    elif kind == "empty_turn":
        k = rng.choice(sorted({k for k, _ in spots}))
        calls[k] = []
    else:
        raise ValueError(kind)
    return calls


def agreement(suite: BfclMultiTurn, sample: Sequence[Entry]) -> dict[str, list[int]]:
    """Per case kind (`gold` and each perturbation): [cases, ours correct, disagreements];
    the disagreeing cases' ids are collected in `disagree`."""
    stats: dict[str, list[int]] = {k: [0, 0, 0] for k in ("gold", *KINDS)}

    async def go() -> None:
        for e in sample:
            gold = gold_calls(e)
            rng = random.Random(e.id)
            cases = [("gold", gold)] + [(k, perturb(e, gold, k, rng)) for k in KINDS]
            for kind, calls in cases:
                if calls is None:
                    continue
                ours = await ours_correct(suite, e, calls)
                theirs = bfcl_valid(e, calls)
                stats[kind][0] += 1
                stats[kind][1] += ours
                stats[kind][2] += ours != theirs
                if ours != theirs:
                    raise AssertionError(f"{e.id} {kind}: ours {ours}, bfcl {theirs}: {calls}")

    asyncio.run(go())
    return stats


def test_gold_and_perturbations_agree_with_bfcl_sample(suite: BfclMultiTurn) -> None:
    """Every case of a seeded sample of entries gets the same verdict from our checker and
    bfcl-eval's; gold is always right, and each kind of mistake is caught somewhere."""
    sample = random.Random(0).sample(all_entries(), SAMPLE)
    stats = agreement(suite, sample)
    assert stats["gold"] == [SAMPLE, SAMPLE, 0]
    for kind in KINDS:
        cases, right, _ = stats[kind]
        assert cases > SAMPLE // 4 and right < cases


@pytest.mark.slow
def test_gold_and_perturbations_agree_with_bfcl_everywhere(suite: BfclMultiTurn) -> None:
    """As the sample test, on all 800 entries (excluded scenarios included: the checkers
    must agree on them too)."""
    stats = agreement(suite, all_entries())
    assert stats["gold"] == [800, 800, 0]
    assert all(stats[k][2] == 0 for k in KINDS)


def test_check_reports_the_failing_turn() -> None:
    e = entries("base")["multi_turn_base_0"]
    gold = gold_calls(e)
    assert check_calls(e, gold).turns_correct == 1.0
    no_mkdir = [gold[0][:1] + gold[0][2:], *gold[1:]]
    check = check_calls(e, no_mkdir)
    assert not check.correct and check.turns[0] is False
    assert check.failure is not None and "turn 0" in check.failure
    assert check_calls(e, [gold[0]]).turns == (True, False, False, False)


# --- the toolkit -------------------------------------------------------------------------


def toolkit_of(item_id: str, suite: BfclMultiTurn) -> BfclToolkit:
    item = next(i for s in ("train", "test") for i in suite.items(s) if i.id == item_id)
    (toolkit,) = suite.tools_for(item)
    assert isinstance(toolkit, BfclToolkit)
    return toolkit


def test_sessions_do_not_share_state(suite: BfclMultiTurn) -> None:
    toolkit = toolkit_of("multi_turn_base_0", suite)
    config_before = json.dumps(entry("multi_turn_base_0").initial_config, sort_keys=True)

    async def go() -> tuple[str, str, str]:
        one, two = toolkit.session(), toolkit.session()
        await one.call("cd", {"folder": "document"})
        await one.call("mkdir", {"dir_name": "fresh"})
        seen_one = (await one.call("ls", {})).text
        await two.call("cd", {"folder": "document"})
        seen_two = (await two.call("ls", {})).text
        await one.aclose()
        await one.aclose()  # idempotent
        three = toolkit.session()
        await three.call("cd", {"folder": "document"})
        return seen_one, seen_two, (await three.call("ls", {})).text

    seen_one, seen_two, seen_three = asyncio.run(go())
    assert "fresh" in seen_one and "fresh" not in seen_two and seen_three == seen_two
    assert json.dumps(entry("multi_turn_base_0").initial_config, sort_keys=True) == config_before


def test_results_and_errors_read_as_bfcl_shows_them(suite: BfclMultiTurn) -> None:
    toolkit = toolkit_of("multi_turn_base_0", suite)

    async def go() -> list[str]:
        s = toolkit.session()
        out = [(await s.call(n, a)).text for n, a in [("pwd", {}), ("cd", {}), ("cat", {})]]
        out.append((await s.call("cd", {"folder": "nowhere"})).text)
        return out

    pwd, missing_arg, missing_file_arg, bad_folder = asyncio.run(go())
    assert json.loads(pwd) == {"current_working_directory": "/workspace"}
    assert missing_arg.startswith(ERROR_PREFIX) and "folder" in missing_arg
    assert missing_file_arg.startswith(ERROR_PREFIX) and "file_name" in missing_file_arg
    assert "error" in json.loads(bad_folder)  # the simulator's own error result, not an exception


def test_parse_call_names_positional_arguments_and_never_evaluates() -> None:
    classes = ("GorillaFileSystem",)
    assert parse_call("sort('final_report.pdf')", classes) == (
        "sort",
        {"file_name": "final_report.pdf"},
    )
    assert parse_call("mv(source='a', destination='b')", classes)[1] == {
        "source": "a",
        "destination": "b",
    }
    with pytest.raises(ValueError):
        parse_call("cd(folder=__import__('os').getcwd())", classes)


# --- the suite ---------------------------------------------------------------------------


def test_split_is_by_scenario_and_seeded(suite: BfclMultiTurn) -> None:
    test = suite.items("test")
    train = suite.items("train")
    scenarios = {s: {i.meta["scenario"] for i in suite.items(s)} for s in ("train", "test")}
    assert not scenarios["train"] & scenarios["test"]
    assert len(scenarios["test"]) == 50 and len(scenarios["train"]) == 199 - 50
    assert set(EXCLUDED_SCENARIOS).isdisjoint(scenarios["train"] | scenarios["test"])
    assert len(train) + len(test) == 199 * 4 - len(EXCLUDED_ENTRIES)
    again = BfclMultiTurn()
    assert [i.id for i in again.items("test")] == [i.id for i in test]
    other = BfclMultiTurn(categories=("base",), seed=1, n_test=10)
    assert len(other.items("test")) == 10 and other.items("test") != test[:10]
    json.dumps([i.meta for i in train])  # serialisable


def test_ground_truth_never_calls_a_function_before_its_reveal() -> None:
    """The rule the runner enforces holds for every kept entry (the one that breaks it is
    excluded)."""
    early = set()
    for e in entries("miss_func").values():
        for k, names in e.missed.items():
            if any(n in names for turn in gold_calls(e)[:k] for n, _ in turn):
                early.add(e.id)
    assert early == set(EXCLUDED_ENTRIES)


def test_items_carry_the_conversation(suite: BfclMultiTurn) -> None:
    items = {i.id: i for s in ("train", "test") for i in suite.items(s)}
    base = items["multi_turn_base_0"]
    e = entry(base.id)
    assert base.question == e.messages[0]
    assert [f.text for f in base.followups] == list(e.messages[1:]) and not base.hidden_tools
    missed = items["multi_turn_miss_func_0"]  # `sort` held out until turn 3
    assert missed.hidden_tools == ("sort",)
    assert missed.followups[2] == UserTurn(ADDED_FUNCTIONS_TEXT, reveal=("sort",))
    toolkit = toolkit_of(missed.id, suite)
    assert toolkit.hidden == ("sort",) and "sort" in {s.name for s in toolkit.specs}
    assert asyncio.run(suite.grade(missed, "done")) == {"correct": 0.0}


def _run(suite: BfclMultiTurn, item: TaskItem, replies: list[str]) -> Episode:
    it = iter(replies)
    policy = ScriptedPolicy(lambda ctx: next(it, "<answer>out of script</answer><|im_end|>"), TOK)
    budget = Budget(
        max_turns=200, max_tool_calls=200, max_context_tokens=10**7, max_new_tokens=10**5
    )
    runner = EpisodeRunner(policy, ChatML(TOK), [], budget, SamplingParams())  # type: ignore[arg-type]
    (spec,) = episode_specs(suite, [item], group_size=1, step=-1, seed=0)
    return asyncio.run(runner.run_episode(spec))


@pytest.mark.parametrize(
    "item_id",
    [
        "multi_turn_base_0",
        "multi_turn_miss_func_0",
        "multi_turn_miss_param_5",
        "multi_turn_long_context_17",
        "multi_turn_base_150",
    ],
)
def test_oracle_through_the_runner_is_correct(suite: BfclMultiTurn, item_id: str) -> None:
    item = next(i for s in ("train", "test") for i in suite.items(s) if i.id == item_id)
    episode = _run(suite, item, [t + "<|im_end|>" for t in suite.oracle_turns(item)])
    assert episode.stop_reason == StopReason.ANSWERED
    assert all(r.error is None for t in episode.turns for r in t.tool_results)
    scores = asyncio.run(suite.grade_episode(item, episode))
    assert scores == {"correct": 1.0, "turns_correct": 1.0, "finished": 1.0}


@pytest.mark.slow
def test_oracle_through_the_runner_is_correct_on_every_item(suite: BfclMultiTurn) -> None:
    wrong = []
    for item in [*suite.items("train"), *suite.items("test")]:
        episode = _run(suite, item, [t + "<|im_end|>" for t in suite.oracle_turns(item)])
        if asyncio.run(suite.grade_episode(item, episode))["correct"] != 1.0:
            wrong.append(item.id)
    assert wrong == []


def test_hidden_function_is_refused_until_revealed(suite: BfclMultiTurn) -> None:
    """Calling `sort` before BFCL adds it fails as an unknown tool, never runs, and so the
    turn that needs it (after the reveal) still lacks it: not correct."""
    item = next(i for s in ("train", "test") for i in suite.items(s) if i.id.endswith("func_0"))
    turns = suite.oracle_turns(item)
    sort_call = next(t for t in turns if '"sort"' in t)
    early = [sort_call] + [t for t in turns if t != sort_call]
    episode = _run(suite, item, [t + "<|im_end|>" for t in early])
    assert episode.turns[0].tool_results[0].error == "unknown_tool"
    scores = asyncio.run(suite.grade_episode(item, episode))
    assert scores["correct"] == 0.0 and scores["finished"] == 1.0


def test_unfinished_episode_is_not_correct(suite: BfclMultiTurn) -> None:
    item = next(i for s in ("train", "test") for i in suite.items(s) if i.id.endswith("base_0"))
    complete = episode_of(entry(item.id), gold_calls(entry(item.id)))
    cut = complete.model_copy(update={"turns": complete.turns[:-1]})
    assert asyncio.run(suite.grade_episode(item, cut))["correct"] == 0.0


# --- the prompt in each tool-call format ---------------------------------------------------

HERMES_PROMPT = (
    "You are an assistant that acts on a user's requests by calling the functions you are "
    "given; they operate on the user's devices and accounts, and each returns its result. Make "
    "the calls a request needs, one or more per message, e.g. "
    '<tool_call>{"name": "cd", "arguments": {"folder": "documents"}}</tool_call>, and read '
    "their results. When the request is done, or cannot be done with the functions and "
    "information you have (say what is missing), reply to the user inside answer tags, e.g. "
    "<answer>Done: the file is in archive.</answer>. The user may then ask for more."
)
"""The prompt as runs were stored and the demo was trained with (before tool formats)."""
PROMPT_CALLS: dict[ToolFormatName, str] = {
    "hermes": '<tool_call>{"name": "cd", "arguments": {"folder": "documents"}}</tool_call>',
    "llama3_json": '{"name": "cd", "parameters": {"folder": "documents"}}',
    "mistral": '[TOOL_CALLS] [{"name": "cd", "arguments": {"folder": "documents"}}]',
}
"""The prompt's example call in each format."""


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_the_prompt_shows_calls_in_the_run_format(fmt: ToolFormatName) -> None:
    """Regression lock, not to be changed without a decision: under hermes the prompt is byte
    for byte `HERMES_PROMPT` (stored runs and the trained demo hold its token ids); under
    another format it is the same text with that format's call, and no `<tool_call>`."""
    cfg = BfclMultiTurnConfig(categories=("base",))
    s = build_suite(cfg, None, None, chat=ChatConfig(tool_format=fmt))
    assert s.system_prompt == HERMES_PROMPT.replace(PROMPT_CALLS["hermes"], PROMPT_CALLS[fmt])
    assert ("<tool_call>" in s.system_prompt) == (fmt == "hermes")
    (call,) = make_tool_format(fmt).parse(PROMPT_CALLS[fmt], 0).tool_calls
    assert (call.name, call.arguments) == ("cd", {"folder": "documents"})
