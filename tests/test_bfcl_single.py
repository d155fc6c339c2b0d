"""BFCL single-turn suite: our AST checker agrees with bfcl-eval's own on every shipped ground
truth and on perturbations of it; the suite's items, split, tools, grading and oracle.

bfcl-eval's checker module imports `bfcl_eval.constants.model_config` only to read one flag in
`convert_func_name`, and that module imports every model handler and with them anthropic,
openai, cohere, mistralai, google-genai, boto3, qwen-agent, writer-sdk, ... (bfcl-eval is
installed without its dependencies). `bfcl_checker` therefore executes the checker's own source
with that one import left out and `MODEL_CONFIG_MAPPING` bound to a model whose names are shown
unchanged (`underscore_to_dot=False`, as our tools keep dotted names). It is a private module
object: nothing in `sys.modules` is replaced, and every other line (type converters, enums
included) is bfcl-eval's, imported normally.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import importlib.metadata
import importlib.util
import json
import random
import types
from collections import Counter
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest
from fakes import CharTokenizer

from turnrl.agent.chat import ChatML
from turnrl.agent.chat_config import ChatConfig
from turnrl.agent.parse import parse_completion
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode, StopReason, Turn
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.agent.tool_formats import ToolFormatName, make_tool_format, rewrite_hermes
from turnrl.suites import build_suite
from turnrl.tasks.base import BaseSuite, TaskItem, TaskSuite
from turnrl.tasks.bfcl_ast import check_calls, standardize
from turnrl.tasks.bfcl_single import (
    CATEGORIES,
    DONE_ANSWER,
    FILES,
    NO_CALL_ANSWER,
    RECORDED,
    UNSATISFIABLE,
    BfclSingle,
    BfclSingleConfig,
    _load,
    oracle_arguments,
    prompt_for,
    question_text,
    split_groups,
)
from turnrl.tools.base import Tool

Calls = list[tuple[str, dict[str, Any]]]
AST_CATEGORIES = [c for c in CATEGORIES if "irrelevance" not in c]


@cache
def bfcl_checker() -> types.ModuleType:
    """bfcl-eval's `ast_checker` module without its model-config import (module docstring)."""
    spec = importlib.util.find_spec("bfcl_eval.eval_checker.ast_eval.ast_checker")
    assert spec is not None and spec.origin is not None
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    dropped = [
        n
        for n in tree.body
        if isinstance(n, ast.ImportFrom) and n.module == "bfcl_eval.constants.model_config"
    ]
    assert len(dropped) == 1, "bfcl-eval's checker imports changed: look again"
    tree.body = [n for n in tree.body if n not in dropped]
    module = types.ModuleType("bfcl_ast_checker_without_model_config")
    module.__dict__["MODEL_CONFIG_MAPPING"] = {
        "turnrl": types.SimpleNamespace(underscore_to_dot=False)
    }
    exec(compile(tree, spec.origin, "exec"), module.__dict__)
    return module


def bfcl_valid(calls: Calls, item: dict[str, Any]) -> bool | None:
    """bfcl-eval's verdict on `calls`; None when its checker raised."""
    from bfcl_eval.constants.enums import Language

    output = [{name: copy.deepcopy(args)} for name, args in calls]
    try:
        result = bfcl_checker().ast_checker(
            item["function"], output, item["truth"], Language.PYTHON, item["category"], "turnrl"
        )
    except Exception:
        return None
    return bool(result["valid"])


@cache
def ast_items() -> tuple[dict[str, Any], ...]:
    """Every item of the AST categories (the unsatisfiable ones too), with its ground truth."""
    out = []
    for category in AST_CATEGORIES:
        stem = FILES[category]
        for entry, answer in zip(_load(stem, False), _load(stem, True), strict=True):
            assert entry["id"] == answer["id"]
            out.append({**entry, "category": stem, "truth": answer["ground_truth"]})
    return tuple(out)


def gold_calls(item: dict[str, Any]) -> Calls:
    docs = {d["name"]: d for d in item["function"]}
    calls: Calls = []
    for call in item["truth"]:
        ((name, accepted),) = call.items()
        calls.append((name, json.loads(json.dumps(oracle_arguments(docs[name], accepted)))))
    return calls


# --- agreement with bfcl-eval ----------------------------------------------------------------


def test_ground_truth_passes_both_checkers() -> None:
    """Every shipped ground truth (first accepted values, optional ones left out) is valid for
    both checkers, except the four `UNSATISFIABLE` items, which both reject."""
    items = ast_items()
    assert len(items) == 2351
    rejected = set()
    for item in items:
        calls = gold_calls(item)
        ours = check_calls(calls, item["truth"], item["function"], item["category"]).valid
        assert ours == bfcl_valid(calls, item), item["id"]
        if not ours:
            rejected.add(item["id"])
    assert rejected == UNSATISFIABLE


def _mutations(value: Any) -> Iterator[tuple[str, Any]]:
    """(kind, changed value) for one argument: wrong values and wrong types, plus changes
    BFCL accepts (case and punctuation, int for float)."""
    if type(value) is bool:
        yield "wrong_value", not value
        yield "int_for_bool", int(value)
        yield "string_for_bool", str(value).lower()
    elif type(value) is int:
        yield "wrong_value", value + 1
        yield "string_for_int", str(value)
        yield "float_for_int", float(value)
        yield "bool_for_int", True
    elif type(value) is float:
        yield "wrong_value", value + 1.5
        yield "string_for_float", str(value)
        if value == int(value):
            yield "int_for_float", int(value)
    elif type(value) is str:
        yield "wrong_value", value + " zz"
        yield "case_and_punctuation", value.upper().replace(" ", "_") + "."
        yield "int_for_string", 7
        yield "empty_string", ""
    elif type(value) is list:
        yield "wrong_value", [*value, value[-1]] if value else ["zz"]
        yield "empty_list", []
        yield "string_for_list", ",".join(map(str, value))
        if value and all(type(v) is float for v in value):
            yield "ints_in_float_list", [int(v) for v in value]
        if value and all(type(v) is int for v in value):
            yield "floats_in_int_list", [float(v) for v in value]
        if value and type(value[0]) is dict:
            first = dict(value[0])
            first.pop(next(iter(first)), None)
            yield "dict_in_list_missing_key", [first, *value[1:]]
            yield "list_item_not_dict", ["zz", *value[1:]]
        elif value:
            yield "wrong_list_element", ["zz", *value[1:]]
    elif type(value) is dict:
        if value:
            key = next(iter(value))
            yield "dict_wrong_value", {**value, key: "zz"}
            yield "dict_missing_key", {k: v for k, v in value.items() if k != key}
        yield "dict_extra_key", {**value, "zz_key": 1}
        yield "string_for_dict", json.dumps(value)


def perturbations(item: dict[str, Any], rng: random.Random) -> Iterator[tuple[str, Calls]]:
    """Variants of an item's gold calls: each argument mutated, arguments dropped and added,
    other accepted values, wrong names, calls added, dropped and reordered."""
    gold = gold_calls(item)
    docs = {d["name"]: d for d in item["function"]}
    truth = [next(iter(c.values())) for c in item["truth"]]

    def edit(i: int, args: dict[str, Any]) -> Calls:
        return [(n, args) if j == i else (n, a) for j, (n, a) in enumerate(gold)]

    yield "gold", gold
    for i, (name, args) in enumerate(gold):
        doc = docs[name]
        for param, value in args.items():
            for kind, changed in _mutations(value):
                yield kind, edit(i, {**args, param: changed})
            if param in doc["parameters"]["required"]:
                yield "missing_required", edit(i, {k: v for k, v in args.items() if k != param})
            else:
                yield "missing_optional", edit(i, {k: v for k, v in args.items() if k != param})
        for param, accepted in truth[i].items():
            others = [a for a in accepted if a != ""][1:]
            if others and param in args:
                yield "other_accepted_value", edit(i, {**args, param: rng.choice(others)})
            if param not in args:
                present = [a for a in accepted if a != ""]
                if present:
                    yield "optional_given", edit(i, {**args, param: present[0]})
        undocumented = [p for p in doc["parameters"]["properties"] if p not in truth[i]]
        if undocumented:
            value = args[next(iter(args))] if args else 1
            yield "documented_but_unexpected", edit(i, {**args, undocumented[0]: value})
        yield "extra_unknown_argument", edit(i, {**args, "zz_unknown": 1})
        yield "wrong_name", [(n + "_v2", a) if j == i else (n, a) for j, (n, a) in enumerate(gold)]
        other_docs = [d["name"] for d in item["function"] if d["name"] != name]
        if other_docs:
            other = rng.choice(other_docs)
            yield (
                "other_function",
                [(other, a) if j == i else (n, a) for j, (n, a) in enumerate(gold)],
            )
    yield "extra_call", [*gold, gold[0]]
    yield "no_call", []
    if len(gold) > 1:
        yield "missing_call", gold[:-1]
        yield "reordered", list(reversed(gold))
        shuffled = list(gold)
        rng.shuffle(shuffled)
        yield "shuffled", shuffled
        same = [(i, j) for i in range(len(gold)) for j in range(i) if gold[i][0] == gold[j][0]]
        if same:
            i, j = rng.choice(same)
            swapped = list(gold)
            swapped[i], swapped[j] = (gold[i][0], gold[j][1]), (gold[j][0], gold[i][1])
            yield "arguments_swapped_between_calls", swapped
            key = rng.choice(sorted(set(gold[i][1]) & set(gold[j][1])) or [""])
            if key:
                mixed = list(gold)
                mixed[i] = (gold[i][0], {**gold[i][1], key: gold[j][1][key]})
                yield "one_argument_from_sibling_call", mixed


def test_perturbations_agree_with_bfcl() -> None:
    """On every perturbation of every item, ours and bfcl-eval's verdicts agree (where
    bfcl-eval's checker would crash, ours must reject; see the test below)."""
    rng = random.Random(0)
    counts: Counter[str] = Counter()
    valid: Counter[str] = Counter()
    crashed: Counter[str] = Counter()
    disagreements = []
    for item in ast_items():
        for kind, calls in perturbations(item, rng):
            ours = check_calls(calls, item["truth"], item["function"], item["category"]).valid
            theirs = bfcl_valid(calls, item)
            counts[kind] += 1
            valid[kind] += ours
            if theirs is None:
                crashed[kind] += 1
                if ours:
                    disagreements.append((item["id"], kind, calls))
            elif theirs != ours:
                disagreements.append((item["id"], kind, calls))
    for kind in sorted(counts):
        print(f"{kind:36s} {counts[kind]:6d} cases {valid[kind]:6d} valid {crashed[kind]:3d} crash")
    print(f"total {sum(counts.values())} cases, {len(disagreements)} disagreements")
    assert disagreements == []
    assert sum(counts.values()) > 30_000
    # Not vacuous: each kind that must fail fails, and the tolerated changes pass.
    assert valid["gold"] == counts["gold"] - len(UNSATISFIABLE)
    for kind in ("wrong_name", "extra_unknown_argument", "extra_call", "no_call", "missing_call"):
        assert valid[kind] == 0, kind
    assert valid["missing_required"] == 0 and valid["string_for_int"] == 0
    # A float for an int passes only where the parameter is a float that the gold gives as 0.
    assert valid["bool_for_int"] == 0 and valid["float_for_int"] <= 2
    assert valid["int_for_float"] == counts["int_for_float"] > 0
    # Order is free, but matching is greedy: in parallel_178 the first ground-truth call also
    # accepts "Apple", so reversed calls pair wrongly, in bfcl-eval as here.
    assert valid["reordered"] == counts["reordered"] - 1 > 0
    assert valid["case_and_punctuation"] > 0.9 * counts["case_and_punctuation"]
    assert valid["other_accepted_value"] > 0 and 0 < valid["wrong_value"] < counts["wrong_value"]


@pytest.mark.parametrize(
    ("value", "accepted", "ok"),
    [
        ("April 1, 2024", ["april 1 2024"], True),
        ("it's", ['it"s'], True),
        ("New-York", ["new york"], True),
        ("Paris!", ["paris"], False),
    ],
)
def test_strings_compare_in_bfcl_normal_form(value: str, accepted: list[str], ok: bool) -> None:
    doc = {
        "name": "f",
        "parameters": {"type": "dict", "properties": {"s": {"type": "string"}}, "required": ["s"]},
    }
    truth = [{"f": {"s": accepted}}]
    assert check_calls([("f", {"s": value})], truth, [doc], "simple_python").valid == ok
    assert (
        bfcl_valid(
            [("f", {"s": value})], {"function": [doc], "truth": truth, "category": "simple_python"}
        )
        == ok
    )
    assert standardize("A_b-C.d/e,f*g^h i") == "abcdefghi"


def test_parallel_matching_is_greedy_like_bfcl() -> None:
    """bfcl-eval takes, for each ground-truth call in order, the first call that fits; a
    response that only a different pairing would accept fails in both checkers."""
    doc = {
        "name": "f",
        "parameters": {
            "type": "dict",
            "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
            "required": ["x"],
        },
    }
    # Ground truth 0 accepts both calls; ground truth 1 only the first one.
    truth = [{"f": {"x": [1], "y": ["", 2, 3]}}, {"f": {"x": [1], "y": [2]}}]
    calls: Calls = [("f", {"x": 1, "y": 2}), ("f", {"x": 1, "y": 3})]
    item = {"function": [doc], "truth": truth, "category": "parallel"}
    assert not check_calls(calls, truth, [doc], "parallel").valid
    assert bfcl_valid(calls, item) is False
    assert check_calls(calls[::-1], truth, [doc], "parallel").valid
    assert bfcl_valid(calls[::-1], item) is True


def test_non_dict_in_an_optional_list_of_dicts_is_rejected_where_bfcl_crashes() -> None:
    """bfcl-eval skips the item type check when the accepted list starts with the optional
    mark "", then calls `.items()` on each item: a string item crashes it. Ours rejects."""
    doc = {
        "name": "f",
        "parameters": {
            "type": "dict",
            "properties": {"rows": {"type": "array", "items": {"type": "dict"}}},
            "required": [],
        },
    }
    truth = [{"f": {"rows": ["", [{"a": [1]}]]}}]
    item = {"function": [doc], "truth": truth, "category": "simple_python"}
    assert bfcl_valid([("f", {"rows": ["zz"]})], item) is None
    assert not check_calls([("f", {"rows": ["zz"]})], truth, [doc], "simple_python").valid
    assert check_calls([("f", {"rows": [{"a": 1}]})], truth, [doc], "simple_python").valid
    assert check_calls([("f", {"rows": []})], truth, [doc], "simple_python").valid  # "" as []


# --- the suite -----------------------------------------------------------------------------


@cache
def suite() -> BfclSingle:
    return BfclSingle()


def all_items() -> list[TaskItem]:
    return [*suite().items("train"), *suite().items("test")]


def episode_of(item: TaskItem, texts: list[str]) -> Episode:
    turns = []
    for i, text in enumerate(texts):
        parsed = parse_completion(text, i)
        turns.append(
            Turn(
                index=i,
                prompt_ids=[1] if i == 0 else [],
                completion_ids=[],
                completion_logprobs=[],
                observation_ids=[],
                text=text,
                finish_reason="stop",
                tool_calls=parsed.tool_calls,
                answer=parsed.answer,
                format_error=parsed.format_error,
                calls_not_run=parsed.calls_not_run,
            )
        )
    return Episode(
        episode_id="e",
        task_id=item.id,
        group_id="g",
        turns=turns,
        stop_reason=StopReason.ANSWERED,
        answer=turns[-1].answer if turns else None,
    )


def grade(item: TaskItem, texts: list[str]) -> float:
    scores = asyncio.run(suite().grade_episode(item, episode_of(item, texts)))
    return float(scores["correct"])


def test_suite_protocols_and_metadata() -> None:
    s: TaskSuite = suite()
    # Per-item tools, episode grading and a scripted oracle, each the suite's own.
    assert s.tools_for(s.items("test")[0])
    assert BfclSingle.grade_episode is not BaseSuite.grade_episode
    assert BfclSingle.oracle_turns is not BaseSuite.oracle_turns
    assert s.name == "bfcl_single" and s.system_prompt == HERMES_PROMPT
    # The package says "Apache 2.0"; the suite gives the SPDX id, as every suite does.
    assert importlib.metadata.metadata("bfcl-eval")["License"] == "Apache 2.0"
    assert BfclSingle.license == "Apache-2.0"
    assert BfclSingle.source == f"bfcl-eval {importlib.metadata.version('bfcl-eval')} (BFCL v4)"
    assert s.tools() == [] and s.few_shot() == []


def test_items_cover_every_category_once_without_the_unsatisfiable() -> None:
    items = all_items()
    ids = [it.id for it in items]
    # Less the 4 unsatisfiable items and the 6 of 3 contradictory pairs.
    assert len(ids) == len(set(ids)) == 2351 - 4 + 240 + 884 - 6
    assert not UNSATISFIABLE & set(ids)
    per = Counter(it.meta["category"] for it in items)
    assert per["simple"] == 400 and per["live_irrelevance"] == 884 - 3
    assert per["live_simple"] == 256 - 2
    assert all(it.id.startswith(FILES[it.meta["category"]]) for it in items)


def test_split_is_seeded_disjoint_grouped_and_prefix_stable() -> None:
    train, test = suite().items("train"), suite().items("test")
    assert not {it.id for it in train} & {it.id for it in test}
    assert 0.4 < len(test) / (len(train) + len(test)) < 0.6
    groups = {it.meta["group"] for it in train}
    assert not groups & {it.meta["group"] for it in test}
    assert not {it.question for it in train} & {it.question for it in test}
    assert any(it.meta["group"] != it.id for it in test)  # live items share groups
    again = BfclSingle(seed=0, n_test=50, n_train=10)
    assert [it.id for it in again.items("test")] == [it.id for it in test[:50]]
    assert [it.id for it in again.items("train")] == [it.id for it in train[:10]]
    simple = [BfclSingle(categories=("simple",), seed=seed).items("test") for seed in (0, 1)]
    assert [it.id for it in simple[0]] == [it.id for it in test if it.meta["category"] == "simple"]
    assert {it.id for it in simple[0]} != {it.id for it in simple[1]}
    assert Counter(it.meta["category"] for it in test[:200]).keys() >= {"live_multiple", "simple"}


def test_split_groups_join_shared_questions_and_function_sets() -> None:
    def item(id_: str, question: str) -> TaskItem:
        category = id_.rsplit("_", 1)[0] if id_.startswith("live_") else "simple"
        return TaskItem(id_, question, (), {"category": category})

    items = [
        item("simple_python_1", "q1"),
        item("multiple_5", "q1"),  # same question as simple_python_1
        item("live_simple_0-3-0", "q2"),
        item("live_simple_1-3-1", "q3"),  # same function set as live_simple_0-3-0
        item("live_multiple_9-3-0", "q1"),  # same question, joins the first group
        item("parallel_7", "q4"),
    ]
    assert split_groups(items) == {
        "simple_python_1": "live_multiple_9-3-0",
        "multiple_5": "live_multiple_9-3-0",
        "live_multiple_9-3-0": "live_multiple_9-3-0",
        "live_simple_0-3-0": "live_simple_0-3-0",
        "live_simple_1-3-1": "live_simple_0-3-0",
        "parallel_7": "parallel_7",
    }


def test_category_selection_and_validation() -> None:
    s = BfclSingle(categories=("parallel", "irrelevance"))
    assert {it.meta["category"] for it in [*s.items("train"), *s.items("test")]} == {
        "parallel",
        "irrelevance",
    }
    with pytest.raises(ValueError, match="unknown categories"):
        BfclSingle(categories=("simple_java",))


def test_question_folds_system_and_earlier_turns() -> None:
    assert question_text([{"role": "user", "content": "Hi there"}]) == "Hi there"
    text = question_text(
        [
            {"role": "system", "content": "You sell shoes."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "size 42?"},
        ]
    )
    assert text == (
        "Instructions from the application:\nYou sell shoes.\n\n"
        "Conversation so far:\nUser: hi\nAssistant: Hello!\n\n"
        "User request:\nsize 42?"
    )
    item = next(it for it in all_items() if it.id == "live_simple_58-27-0")
    assert item.question.startswith("Instructions from the application:\n")
    assert item.question.endswith("User request:\nlist movies in Mumbai?")
    with pytest.raises(ValueError):
        question_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_oracle_is_correct_on_every_item() -> None:
    """The oracle's completions, parsed by the agent's parser, grade correct on every item."""
    wrong = [it.id for it in all_items() if grade(it, suite().oracle_turns(it)) != 1.0]
    assert wrong == []


def test_grading_reads_the_first_turn_only() -> None:
    item = next(it for it in all_items() if it.id == "simple_python_0")
    call, done = suite().oracle_turns(item)
    assert call.startswith('<tool_call>{"name": "calculate_triangle_area"')
    assert grade(item, [call, done]) == 1.0
    assert grade(item, ["<answer>I would rather not</answer>", call, done]) == 0.0
    assert grade(item, [call + "\n" + call, done]) == 0.0  # an extra call
    assert grade(item, [call + "<tool_call>{not json</tool_call>", done]) == 0.0
    assert grade(item, [call + done]) == 0.0  # calls beside an answer are not run
    assert grade(item, [call + '\n<tool_call>{"name": "calculate_tri', done]) == 0.0
    assert grade(item, []) == 0.0
    assert asyncio.run(suite().grade(item, "done")) == {"correct": 0.0}


def test_irrelevance_is_correct_only_without_any_call() -> None:
    item = next(it for it in all_items() if it.meta["category"] == "irrelevance")
    name = item.meta["functions"][0]["name"]
    call = f'<tool_call>{{"name": "{name}", "arguments": {{}}}}</tool_call>'
    assert suite().oracle_turns(item) == ["<answer>none of the functions applies</answer>"]
    assert grade(item, ["<answer>nothing fits</answer>"]) == 1.0
    assert grade(item, ["I cannot help with that."]) == 1.0
    assert grade(item, [call, "<answer>done</answer>"]) == 0.0
    assert grade(item, ["<tool_call>{broken</tool_call>"]) == 0.0
    assert grade(item, [call + "<answer>x</answer>"]) == 0.0
    assert grade(item, []) == 0.0


def test_tools_record_calls_under_the_doc_names() -> None:
    rng = random.Random(0)
    for item in rng.sample(all_items(), 40):
        tools = suite().tools_for(item)
        docs = item.meta["functions"]
        assert [t.spec.name for t in tools if isinstance(t, Tool)] == [d["name"] for d in docs]
        first = tools[0]
        assert isinstance(first, Tool)
        out = asyncio.run(first({}))
        assert out.text == RECORDED
        assert suite().tools_for(item) is tools


def test_grade_matches_checker_on_a_handwritten_call() -> None:
    """A call the agent wrote by hand, with a float for an integer: wrong in both."""
    item = next(it for it in all_items() if it.id == "simple_python_1")
    assert (
        grade(
            item, ['<tool_call>{"name": "math.factorial", "arguments": {"number": 5}}</tool_call>']
        )
        == 1.0
    )
    assert (
        grade(
            item,
            ['<tool_call>{"name": "math.factorial", "arguments": {"number": 5.0}}</tool_call>'],
        )
        == 0.0
    )
    assert (
        grade(
            item, ['<tool_call>{"name": "math_factorial", "arguments": {"number": 5}}</tool_call>']
        )
        == 0.0
    )


# --- end to end ----------------------------------------------------------------------------


def test_oracle_through_the_episode_runner() -> None:
    """A few items of each kind played by a scripted oracle through the real runner, with the
    item's tools as the episode's tools: every episode answers and grades correct."""
    tok = CharTokenizer()
    s = suite()
    picks = {"simple_python_0", "parallel_multiple_0", "irrelevance_0", "live_simple_58-27-0"}
    picks |= {
        next(it.id for it in all_items() if it.meta["category"] == c)
        for c in ("live_parallel", "multiple")
    }
    items = [it for it in all_items() if it.id in picks]
    assert len(items) == len(picks)

    async def play(item: TaskItem) -> tuple[Episode, str]:
        turns = iter(s.oracle_turns(item))
        policy = ScriptedPolicy(lambda ctx: next(turns) + "<|im_end|>", tok)
        runner = EpisodeRunner(
            policy, ChatML(tok), [], Budget(max_context_tokens=100_000), SamplingParams()
        )
        spec = EpisodeSpec(
            episode_id=item.id,
            group_id="g",
            task_id=item.id,
            instructions=s.system_prompt,
            question=item.question,
            tools=tuple(s.tools_for(item)),
        )
        return await runner.run_episode(spec), tok.decode(policy.prompts[0])

    for item in items:
        ep, prompt = asyncio.run(play(item))
        assert all(f'"name": "{d["name"]}"' in prompt for d in item.meta["functions"])
        assert ep.stop_reason == StopReason.ANSWERED, (item.id, ep.error)
        results = [r for t in ep.turns for r in t.tool_results]
        assert all(r.error is None and r.text == RECORDED for r in results), item.id
        assert len(results) == len(item.meta["ground_truth"] or [])
        assert asyncio.run(s.grade_episode(item, ep)) == {"correct": 1.0}, item.id


# --- tool-call formats ---------------------------------------------------------------------

FORMATS: tuple[ToolFormatName, ...] = ("hermes", "llama3_json", "mistral")


def play_first(
    item: TaskItem, reply: str, fmt: ToolFormatName, max_context_tokens: int = 100_000
) -> tuple[Episode, float]:
    """An episode through the real runner whose policy writes tool calls in the format `fmt`:
    `reply` first, then `<answer>done</answer>` if the episode goes on; and its grade."""
    tok = CharTokenizer()
    replies = iter([reply, f"<answer>{DONE_ANSWER}</answer>"])
    policy = ScriptedPolicy(lambda ctx: next(replies) + "<|im_end|>", tok)
    renderer = ChatML(tok, make_tool_format(fmt, ("<|im_end|>",)))
    budget = Budget(max_context_tokens=max_context_tokens)
    runner = EpisodeRunner(policy, renderer, [], budget, SamplingParams())
    spec = EpisodeSpec(
        episode_id=item.id,
        group_id="g",
        task_id=item.id,
        instructions=prompt_for(renderer.tool_format),
        question=item.question,
        tools=tuple(suite().tools_for(item)),
    )
    episode = asyncio.run(runner.run_episode(spec))
    return episode, asyncio.run(suite().grade_episode(item, episode))["correct"]


def gold_reply(item: TaskItem, fmt: ToolFormatName) -> str:
    """The item's ground-truth calls as a model of the format `fmt` writes them."""
    return rewrite_hermes(suite().oracle_turns(item)[0], make_tool_format(fmt))


def irrelevance_item() -> TaskItem:
    return next(it for it in all_items() if it.meta["category"] == "irrelevance")


HERMES_PROMPT = (
    "You are given functions you can call. Read the request, then in ONE reply call the "
    "function or functions that carry it out, with the right arguments: one <tool_call> per "
    "call, several when the request needs several, e.g. "
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>. '
    "The calls are checked, not executed: each only returns an acknowledgement. Write only the "
    "calls in that reply (an answer in the same reply cancels them); once the acknowledgements "
    "come back, reply <answer>done</answer>. If none of the functions fits the request, or the "
    "request lacks values a function requires, call nothing and answer at once, e.g. "
    "<answer>none of the functions applies</answer>."
)
"""The prompt as runs were stored and the demo was trained with (before tool formats)."""
PROMPT_CALLS: dict[ToolFormatName, tuple[str, str]] = {
    "hermes": (
        "one <tool_call> per call",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    ),
    "llama3_json": (
        "one JSON object per call",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    ),
    "mistral": (
        "one object in the [TOOL_CALLS] list per call",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    ),
}
"""How the prompt names one call, and its example call, in each format."""


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_prompt_shows_calls_in_the_run_format(fmt: ToolFormatName) -> None:
    """Regression lock, not to be changed without a decision: under hermes the prompt is byte
    for byte `HERMES_PROMPT` (stored runs and the trained demo hold its token ids); under
    another format it is the same text with that format's call, and the system message the
    model sees holds no `<tool_call>`."""
    cfg = BfclSingleConfig(categories=("simple",))
    s = build_suite(cfg, None, None, chat=ChatConfig(tool_format=fmt))
    unit, example = PROMPT_CALLS[fmt]
    hermes_unit, hermes_example = PROMPT_CALLS["hermes"]
    expected = HERMES_PROMPT.replace(hermes_unit, unit).replace(hermes_example, example)
    assert s.system_prompt == expected
    (call,) = make_tool_format(fmt).parse(example, 0).tool_calls
    assert (call.name, call.arguments) == ("get_weather", {"city": "Paris"})
    renderer = ChatML(CharTokenizer(), make_tool_format(fmt))
    system = renderer.system_text(s.system_prompt, s.items("test")[0].meta["functions"])
    assert ("<tool_call>" in system) == (fmt == "hermes")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_correct_call_is_correct_in_every_format(fmt: ToolFormatName) -> None:
    for item_id in ("simple_python_0", "parallel_multiple_0"):
        item = next(it for it in all_items() if it.id == item_id)
        reply = gold_reply(item, fmt)
        assert (fmt == "hermes") == ("<tool_call>" in reply)
        episode, correct = play_first(item, reply, fmt)
        first = episode.turns[0]
        assert len(first.tool_calls) == len(item.meta["ground_truth"]), first.format_error
        assert first.calls_not_run == 0
        assert correct == 1.0, item_id


@pytest.mark.parametrize("fmt", FORMATS)
def test_irrelevance_without_a_call_is_correct_in_every_format(fmt: ToolFormatName) -> None:
    item = irrelevance_item()
    assert play_first(item, f"<answer>{NO_CALL_ANSWER}</answer>", fmt)[1] == 1.0
    assert play_first(item, "I cannot help with that.", fmt)[1] == 1.0
    name = item.meta["functions"][0]["name"]
    call = f'<tool_call>{{"name": "{name}", "arguments": {{}}}}</tool_call>'
    assert play_first(item, rewrite_hermes(call, make_tool_format(fmt)), fmt)[1] == 0.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_malformed_call_attempt_is_wrong_in_every_format(fmt: ToolFormatName) -> None:
    """A call cut off halfway (hermes: no closing tag, so no call is parsed; llama3_json and
    mistral: a call with a JSON `parse_error`), calls written beside an answer (not run), and
    calls the runner dropped because they filled the context: all wrong, on an item that wants
    those calls and on an irrelevance item."""
    item = next(it for it in all_items() if it.id == "simple_python_0")
    reply = gold_reply(item, fmt)
    irrelevant = irrelevance_item()
    for cut in (reply[: len(reply) // 2], reply + f"<answer>{DONE_ANSWER}</answer>"):
        episode, correct = play_first(item, cut, fmt)
        first = episode.turns[0]
        assert first.format_error is not None and correct == 0.0, cut
        assert first.calls_not_run or any(c.parse_error for c in first.tool_calls)
        assert play_first(irrelevant, cut, fmt)[1] == 0.0, cut
    # Exactly enough context for the prompt and the calls: the runner runs none of them.
    episode, _ = play_first(item, reply, fmt)
    fits = len(episode.turns[0].prompt_ids) + len(episode.turns[0].completion_ids)
    episode, correct = play_first(item, reply, fmt, max_context_tokens=fits)
    assert episode.stop_reason == StopReason.CONTEXT_FULL
    assert (episode.turns[0].tool_calls, episode.turns[0].calls_not_run) == ([], 1)
    assert correct == 0.0


def test_records_from_before_calls_not_run_are_graded_as_before() -> None:
    """A stored turn without `calls_not_run` (hermes, the only format then) still loads, and
    a `<tool_call>` tag beyond its parsed calls counts as a call attempt, as it used to."""
    item = irrelevance_item()
    name = item.meta["functions"][0]["name"]
    call = f'<tool_call>{{"name": "{name}", "arguments": {{}}}}</tool_call>'
    for text, correct in ((call + "<answer>x</answer>", 0.0), ("<answer>x</answer>", 1.0)):
        stored = episode_of(item, [text]).model_dump(mode="json")
        for turn in stored["turns"]:
            del turn["calls_not_run"]
        old = Episode.model_validate(stored)
        assert old.turns[0].calls_not_run is None
        assert asyncio.run(suite().grade_episode(item, old)) == {"correct": correct}


def test_requests_that_contradict_each_other_are_not_offered() -> None:
    """BFCL ships a few requests with the same functions marked both irrelevant (no call) and
    expecting a call; no policy can get both right, so neither is offered."""
    from turnrl.tasks.bfcl_single import _category_items, contradictory

    everything = [it for c in CATEGORIES for it in _category_items(c)]
    excluded = contradictory(everything)
    assert excluded == {
        "live_irrelevance_118-7-8",
        "live_simple_29-7-2",
        "live_irrelevance_565-173-0",
        "live_multiple_262-125-1",
        "live_irrelevance_567-175-0",
        "live_simple_176-102-0",
    }
    offered = [it for split in ("train", "test") for it in suite().items(split)]  # type: ignore[arg-type]
    assert not excluded & {it.id for it in offered}
    assert contradictory(offered) == frozenset()
