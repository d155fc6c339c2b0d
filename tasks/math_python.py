"""Math with Python: grade-school word problems from reasoning-gym's `gsm_symbolic` generators
(GSM-Symbolic, Mirzadeh et al. 2024, arXiv:2410.05229), solved with an optional `python` tool
and graded numerically.

Items. reasoning-gym 0.1.25 defines 100 templates, one generator each, and samples from the 85
it marks as working. Its dataset with seed `s` draws item `i` from `Random(s + i)` and picks its
template from `Random(s).choices(...)` (prefix-stable, so a longer dataset only appends). The
train split reads the dataset seeded `seed * 2**33`, the test split the one seeded
`seed * 2**33 + 2**32`: the two splits never share a `Random(s + i)` stream. Each split keeps
items in stream order and drops an item that repeats a question already kept in the split,
whose gold answer is negative (only template 24 yields one: a comet seen at the age of -1, a
generator bug that reasoning-gym's own scorer cannot match either), and, for the test split,
whose question appears among the first `max(10_000, consumed)` questions of the train stream.
That horizon makes the test split independent of `n_train` up to 10,000, so evaluation tables
stay comparable across runs of different sizes. Ids name the template and hash the question
(`gsm20:3fa2b9c1d0e4`): the same question has the same id under any seed.

Grading (`parse_number`, `score_numeric`). The answer is read as one number, exactly, as a
fraction: `$`, `%` (a unit: each question that asks for a percentage has the percent number as
its gold, "25" for 25%), words and LaTeX around it are ignored, thousands separators must be
well formed ("1,234"; "12,5" is refused, not guessed), "3/4" and "\\frac{3}{4}" are fractions,
"1e3" is 1000, and after an `=` only the right side counts ("x = 12"). Text holding two
different numbers ("12 or 13") is unparsed: hedging must not be rewarded. An integer gold
needs an exact match ("12.0" is right, the float noise "12.000000000000002" is not); another
gold needs a relative error within 1e-6. On every gold answer this agrees with reasoning-gym's
`GSMSymbolicDataset.score_answer`, which takes the first number in the text; they differ on
purpose on hedges (it accepts "12 or 13"), thousands separators (it rejects "1,234") and
negative numbers (it reads "-1" as 1).

reasoning-gym is imported on first generation only: its package `__init__` imports every
generator family, and with them matplotlib (about a second, and it writes a font cache under
`~/.cache/matplotlib` the first time), which a re-grade of a stored run does not need.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any, ClassVar, Literal

from pydantic import Field

from turnrl.agent.tool_formats import Hermes, ToolFormat, write_call
from turnrl.sandboxes.base import ExecResult, Limits
from turnrl.tasks.base import BaseSuite, GraderError, Split, TaskItem
from turnrl.tasks.suite_config import BuildContext, SuiteConfig
from turnrl.tools.base import EpisodeTool, Tool
from turnrl.tools.python import format_result
from turnrl.tools.python_config import PythonToolConfig

SPLIT_STRIDE = 2**32
"""Distance between the reasoning-gym seeds of consecutive streams (train, test, next seed's
train...): no split can reach the next stream's `Random(s + i)` seeds."""
TRAIN_HORIZON = 10_000
"""Test questions are checked against at least this many train-stream questions."""
REL_TOL = Fraction(1, 10**6)
"""Relative tolerance for a gold answer that is not an integer."""
CLOSE_TOL = Fraction(1, 100)
"""Relative error under which a wrong answer still counts as `close` (rounding, float noise)."""
MAX_DIGITS = 64
"""A number written with more characters, or an exponent above this, is refused unparsed: no
gold is that large, and `Fraction` would spend seconds on `1e999999999`."""

SYSTEM_PROMPT_TOOL = """\
Solve the math word problem. You can run Python with the `{tool}` tool: write code that \
prints the result, e.g. {example}, and read what it printed. Give the final answer as a number \
only, inside answer tags, e.g. <answer>42</answer>."""
"""The system prompt with a tool, to `format` with its name and an `example` call."""
SYSTEM_PROMPT_PLAIN = """\
Solve the math word problem. Give the final answer as a number only, inside answer tags, \
e.g. <answer>42</answer>."""

CODE_TEMPLATES: dict[int, str] = {
    0: "print({total_amount} // {peel_rate} + {total_amount} // {batch_size} * {time_per_batch})",
    5: "print({goal} - {signatures1} - {signatures2})",
    20: "print({total_items} - {capacity_per_tray} * {num_trays})",
    31: "a = {first_person_slices}\nb = a + {second_person_extra}\n"
    "c = b + {third_person_extra}\nprint(a + b + c)",
    54: "print({total_time} - {library_time} - {station_time})",
    56: "print({total} - {n1} - {n2})",
}
"""Python that solves a template from its item's `variables`, for the few-shot examples (the
tests run each one on the generated items and compare its output with the gold answer)."""


# --- parsing and scoring -------------------------------------------------------------------

_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_NUM = r"[0-9]+(?:,[0-9]+)*(?:\.[0-9]+)?|\.[0-9]+"
_NUMBER = re.compile(
    rf"(?<![\w.])(?P<sign>[-+]?)(?P<num>{_NUM})(?:[eE](?P<exp>[-+]?[0-9]+))?"
    rf"(?:\s*/\s*(?P<den>{_NUM}))?(?!\.?[0-9])"
)
_THOUSANDS = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")
_EQUALS = re.compile(r"[=≈]")


def _decimal(text: str) -> Fraction | None:
    """A decimal numeral, commas as thousands separators; None when malformed or too long."""
    if len(text) > MAX_DIGITS or ("," in text and not _THOUSANDS.fullmatch(text)):
        return None
    return Fraction(text.replace(",", ""))


def _value(m: re.Match[str]) -> Fraction | None:
    exp = m["exp"] or "0"
    if len(exp) > 4 or abs(int(exp)) > MAX_DIGITS:
        return None
    num = _decimal(m["num"])
    den = _decimal(m["den"]) if m["den"] else Fraction(1)
    if num is None or den is None or den == 0:
        return None
    value = num * Fraction(10) ** int(exp) / den
    return -value if m["sign"] == "-" else value


def parse_number(text: str) -> Fraction | None:
    """The one number `text` states, exactly; None when it states none, several different ones,
    or a malformed one (see the module docstring). Never raises."""
    text = _FRAC.sub(r"\1/\2", text.replace("−", "-"))
    text = _EQUALS.split(text)[-1]
    values: set[Fraction] = set()
    for m in _NUMBER.finditer(text):
        value = _value(m)
        if value is None:
            return None
        values.add(value)
    return values.pop() if len(values) == 1 else None


def score_numeric(answer: str | None, gold: str) -> dict[str, float]:
    """`correct` (exact for an integer gold, else within `REL_TOL`), `close` (within
    `CLOSE_TOL`) and `parsed` (one number was read); all zero when there is no answer."""
    expected = parse_number(gold)
    if expected is None:
        raise GraderError(f"gsm_symbolic: gold answer {gold!r} is not a number")
    value = None if answer is None else parse_number(answer)
    if value is None:
        return {"correct": 0.0, "close": 0.0, "parsed": 0.0}
    error = abs(value - expected)
    tol = 0 if expected.denominator == 1 else REL_TOL * abs(expected)
    return {
        "correct": float(error <= tol),
        "close": float(error <= CLOSE_TOL * abs(expected)),
        "parsed": 1.0,
    }


# --- items ---------------------------------------------------------------------------------


def _stream(rg_seed: int, start: int, stop: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """`(index, template, example)` of reasoning-gym's gsm_symbolic dataset seeded `rg_seed`,
    for indices in `[start, stop)`."""
    from reasoning_gym.arithmetic.gsm_symbolic import (
        GSMSymbolicDataset,
        GSMSymbolicDatasetConfig,
    )

    dataset = GSMSymbolicDataset(GSMSymbolicDatasetConfig(seed=rg_seed, size=max(stop, 1)))
    for index in range(start, stop):
        yield index, int(dataset.task_indices[index]), dataset[index]


def _item(split: Split, rg_seed: int, index: int, template: int, ex: dict[str, Any]) -> TaskItem:
    question = str(ex["question"])
    digest = hashlib.sha1(question.encode()).hexdigest()[:12]
    answer = str(ex["answer"])
    return TaskItem(
        id=f"gsm{template:02d}:{digest}",
        question=question,
        answers=(answer,),
        meta={
            "template": template,
            "split": split,
            "rg_seed": rg_seed,
            "rg_index": index,
            "integer": "." not in answer,
            "answer_cot": str(ex["metadata"]["answer_cot"]),
            "variables": dict(ex["metadata"]["variables"]),
        },
    )


def _usable(example: dict[str, Any]) -> bool:
    gold = parse_number(str(example["answer"]))
    return gold is not None and gold >= 0


def _take(split: Split, rg_seed: int, n: int, exclude: set[str]) -> tuple[list[TaskItem], set[str]]:
    """The first `n` usable items of a stream whose questions are neither in `exclude` nor
    kept already, and the questions of every stream item read. Reads at most `2 * n + 1000`
    items."""
    items: list[TaskItem] = []
    read: set[str] = set()
    limit = 2 * n + 1000
    for index, template, ex in _stream(rg_seed, 0, limit if n > 0 else 0):
        question = str(ex["question"])
        if question not in read and question not in exclude and _usable(ex):
            items.append(_item(split, rg_seed, index, template, ex))
        read.add(question)
        if len(items) == n:
            break
    if len(items) < n:
        raise ValueError(
            f"gsm_symbolic: only {len(items)} distinct {split} questions in {limit} draws, "
            f"{n} were asked for; lower n_{split}"
        )
    return items, read


def generate_splits(seed: int, n_train: int, n_test: int) -> dict[Split, list[TaskItem]]:
    """The train and test items for `seed` (see the module docstring)."""
    if seed < 0 or n_train < 0 or n_test < 0:
        raise ValueError("gsm_symbolic: seed, n_train and n_test must be >= 0")
    train_seed = 2 * seed * SPLIT_STRIDE
    train, read = _take("train", train_seed, n_train, set())
    if n_test > 0:
        consumed = int(train[-1].meta["rg_index"]) + 1 if train else 0
        read |= {str(ex["question"]) for _, _, ex in _stream(train_seed, consumed, TRAIN_HORIZON)}
    test, _ = _take("test", train_seed + SPLIT_STRIDE, n_test, read)
    return {"train": train, "test": test}


# --- the suite -----------------------------------------------------------------------------


def _tool_response(stdout: str) -> str:
    """The observation the runner renders for a tool whose output text is `stdout`."""
    return f"<tool_response>\n{stdout}\n</tool_response>"


def _printed(stdout: str) -> str:
    """The python tool's observation text for a call that printed `stdout`."""
    return format_result(ExecResult(stdout=stdout), Limits())


def _worked(item: TaskItem) -> str:
    """The item's reasoning-gym solution, without its `#### answer` line, then the answer tag."""
    steps = [s for s in str(item.meta["answer_cot"]).splitlines() if not s.startswith("####")]
    return "\n".join([*steps, f"<answer>{item.answers[0]}</answer>"])


class MathPython(BaseSuite):
    """The gsm_symbolic task suite (see the module docstring)."""

    source = "reasoning-gym 0.1.25 (gsm_symbolic generators)"
    license = "Apache-2.0"

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 400,
        n_test: int = 100,
        python_tool: EpisodeTool | Tool | None = None,
        tool_format: ToolFormat | None = None,
    ) -> None:
        """`python_tool` runs a snippet given as its `code` argument and returns what it
        printed; without it the agent answers unaided. `tool_format` writes the prompt's
        example call (default hermes)."""
        if python_tool is not None and "code" not in python_tool.spec.args_model.model_fields:
            raise ValueError(
                f"gsm_symbolic: tool {python_tool.spec.name!r} takes no `code` argument"
            )
        self._tool = python_tool
        self._format = tool_format or Hermes()
        self._splits = generate_splits(seed, n_train, n_test)
        self._few_shot: list[tuple[str, str]] | None = None

    @property
    def name(self) -> str:
        return "gsm_symbolic"

    @property
    def system_prompt(self) -> str:
        if self._tool is None:
            return SYSTEM_PROMPT_PLAIN
        tool = self._tool.spec.name
        example = write_call(self._format, tool, {"code": "print(2 + 3)"})
        return SYSTEM_PROMPT_TOOL.format(tool=tool, example=example)

    def items(self, split: Split) -> Sequence[TaskItem]:
        return self._splits[split]

    def tools(self) -> Sequence[Tool | EpisodeTool]:
        return [] if self._tool is None else [self._tool]

    def few_shot(self) -> Sequence[tuple[str, str]]:
        """Two worked train items of different templates with a `CODE_TEMPLATES` entry: the
        first solved in words (reasoning-gym's own solution), the second with one python call
        whose response is what the code prints. Direct first: the order search_qa measured to
        make SmolLM2-135M tag its answers (not measured on this suite). Without a tool, only the
        direct example. A train split with a single coded item gets its first other item as
        the direct example; one with none gets no call example."""
        if self._few_shot is None:
            self._few_shot = self._build_few_shot()
        return self._few_shot

    def _build_few_shot(self) -> list[tuple[str, str]]:
        train = self._splits["train"]
        coded: dict[int, TaskItem] = {}
        for item in train:
            if item.meta["template"] in CODE_TEMPLATES:
                coded.setdefault(item.meta["template"], item)
        first_coded = list(coded.values())
        computed = None
        if self._tool is not None and first_coded:
            computed = first_coded[1] if len(first_coded) > 1 else first_coded[0]
        direct = next((it for it in [*first_coded, *train] if it is not computed), None)
        examples: list[tuple[str, str]] = []
        if direct is not None:
            examples += [("user", direct.question), ("assistant", _worked(direct))]
        if self._tool is not None and computed is not None:
            code = CODE_TEMPLATES[computed.meta["template"]].format(**computed.meta["variables"])
            call = json.dumps({"name": self._tool.spec.name, "arguments": {"code": code}})
            examples += [
                ("user", computed.question),
                ("assistant", f"<tool_call>{call}</tool_call>"),
                ("user", _tool_response(_printed(f"{computed.answers[0]}\n"))),
                ("assistant", f"<answer>{computed.answers[0]}</answer>"),
            ]
        return examples

    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        return score_numeric(answer, item.answers[0])

    def oracle_turns(self, item: TaskItem) -> list[str]:
        """The gold answer printed with the python tool (when offered), then given."""
        answer = item.answers[0]
        turns = []
        if self._tool is not None and self._tool.spec.name == "python":
            call = json.dumps({"name": "python", "arguments": {"code": f"print({answer!r})"}})
            turns.append(f"<tool_call>{call}</tool_call>")
        return [*turns, f"<answer>{answer}</answer>"]


class MathPythonConfig(SuiteConfig):
    """Grade-school math word problems (reasoning-gym `gsm_symbolic`), computed with Python."""

    metrics: ClassVar[tuple[str, ...]] = ("correct", "close", "parsed")
    runs_code: ClassVar[bool] = True
    answer_in_observations: ClassVar[bool] = True

    kind: Literal["gsm_symbolic"] = "gsm_symbolic"
    seed: int = 0
    """Seed of item generation."""
    n_train: int = Field(400, ge=1)
    """Train items generated."""
    n_test: int = Field(100, ge=1)
    """Test items generated (disjoint from train)."""
    python: PythonToolConfig | None = Field(default_factory=PythonToolConfig)
    """The python tool offered to the agent; null for none."""

    def build(self, ctx: BuildContext) -> MathPython:
        tool = ctx.python_tool(self.kind, self.python)
        return MathPython(
            seed=self.seed,
            n_train=self.n_train,
            n_test=self.n_test,
            python_tool=tool,
            tool_format=ctx.tool_format,
        )
