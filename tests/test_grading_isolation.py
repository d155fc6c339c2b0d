"""Graders isolate each episode: one answer whose grading fails (its sandbox call raises, a reply
it forged does not validate, the suite's grader raises) is that episode's outcome, logged for a
person, while the other episodes of the step are still graded; cancellation still propagates.

The sandbox is injected: a fake whose `python()` raises for the hostile answer (independent of
how the backends treat forged reports), and the real `subprocess` backend with an answer that
forges its report."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest
from pydantic import ValidationError

from turnrl.agent.records import Episode, StopReason
from turnrl.report import summarize
from turnrl.rollout import GRADER_ERROR, grade_all, grader_outcome
from turnrl.sandboxes.base import ExecResult, Limits, Sandbox, SandboxError, SandboxSession
from turnrl.tasks.base import BaseSuite, GraderError, Split, TaskItem
from turnrl.tasks.humaneval import OUTCOMES, HumanEval, load_problems, outcome
from turnrl.tools.base import EpisodeTool, Tool

PROBLEMS = load_problems()
HONEST_IDS = ["HumanEval/0", "HumanEval/2", "HumanEval/23"]
HOSTILE_ID = "HumanEval/53"
HOSTILE = (
    "def add(x, y):\n    return x + y\n"
    'import os\nos.write(3, b\'{"completed": true, "exception": 5}\\n\')\nos._exit(0)\n'
)
"""Forges the worker's report with an `exception` that is not a string, then exits before the
nonce: under the official semantics a crash, never a pass."""


def _canonical(task_id: str) -> str:
    p = PROBLEMS[task_id]
    return str(p["prompt"] + p["canonical_solution"]).strip()


def _episode(item: TaskItem, answer: str | None, n: int = 0) -> Episode:
    return Episode(
        episode_id=f"s0/{item.id}/{n}",
        task_id=item.id,
        group_id=f"s0/{item.id}",
        stop_reason=StopReason.ANSWERED,
        answer=answer,
    )


def _kind(scores: dict[str, float]) -> str:
    assert set(scores) == set(OUTCOMES)
    (name,) = (k for k, v in scores.items() if v == 1.0)
    return name


def _forged_validation_error() -> ValidationError:
    try:
        ExecResult.model_validate({"completed": True, "exception": 5})
    except ValidationError as e:
        return e
    raise AssertionError("ExecResult accepted a non-string exception")


class FakeSandbox:
    """`Sandbox` whose one-shot `python()` raises `error` for a snippet containing `marker` and
    hands every other snippet to `inner` (or answers `AssertionError`, a wrong answer)."""

    def __init__(
        self, error: BaseException, marker: str = "os._exit", inner: Sandbox | None = None
    ) -> None:
        self.error = error
        self.marker = marker
        self.inner = inner
        self.calls = 0

    @property
    def name(self) -> str:
        return "fake"

    async def session(self) -> SandboxSession:
        raise NotImplementedError

    async def run(
        self, argv: list[str], stdin: bytes = b"", limits: Limits | None = None
    ) -> ExecResult:
        raise NotImplementedError

    async def python(self, code: str, limits: Limits | None = None) -> ExecResult:
        self.calls += 1
        if self.marker in code:
            raise self.error
        if self.inner is not None:
            return await self.inner.python(code, limits)
        return ExecResult(snippet=True, exception="AssertionError")

    async def close(self) -> None:
        if self.inner is not None:
            await self.inner.close()


def _humaneval(sandbox: Sandbox) -> tuple[HumanEval, dict[str, TaskItem]]:
    suite = HumanEval(sandbox=sandbox)
    items = {it.id: it for split in ("train", "test") for it in suite.items(split)}
    return suite, items


def _step(items: dict[str, TaskItem]) -> list[tuple[TaskItem, Episode]]:
    """A step's pairs: the honest answers, the hostile one in the middle."""
    honest = [(items[i], _episode(items[i], _canonical(i))) for i in HONEST_IDS]
    hostile = (items[HOSTILE_ID], _episode(items[HOSTILE_ID], HOSTILE))
    return [*honest[:2], hostile, *honest[2:]]


# --- HumanEval.grade ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [SandboxError("worker died"), _forged_validation_error(), RuntimeError("bug")],
    ids=["sandbox_error", "forged_report", "other"],
)
def test_a_sandbox_call_that_raises_is_that_answers_sandbox_error(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox = FakeSandbox(error)
    suite, items = _humaneval(sandbox)
    with caplog.at_level(logging.WARNING, logger="turnrl.tasks.humaneval"):
        scores = asyncio.run(suite.grade(items[HOSTILE_ID], HOSTILE))
    assert _kind(scores) == "sandbox_error"
    assert scores["correct"] == 0.0
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert HOSTILE_ID in record.getMessage()
    assert type(error).__name__ in record.getMessage()


def test_a_huge_exception_text_is_logged_bounded(caplog: pytest.LogCaptureFixture) -> None:
    suite, items = _humaneval(FakeSandbox(SandboxError("x" * 10**6)))
    with caplog.at_level(logging.WARNING, logger="turnrl.tasks.humaneval"):
        asyncio.run(suite.grade(items[HOSTILE_ID], HOSTILE))
    assert len(caplog.records[0].getMessage()) < 1000


def test_a_sandbox_error_result_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Failing(FakeSandbox):
        async def python(self, code: str, limits: Limits | None = None) -> ExecResult:
            return ExecResult(snippet=True, error="worker lost")

    suite, items = _humaneval(Failing(RuntimeError()))
    with caplog.at_level(logging.WARNING, logger="turnrl.tasks.humaneval"):
        scores = asyncio.run(suite.grade(items[HOSTILE_ID], HOSTILE))
    assert _kind(scores) == "sandbox_error"
    assert "worker lost" in caplog.records[0].getMessage()


def test_cancellation_propagates_out_of_grade() -> None:
    suite, items = _humaneval(FakeSandbox(asyncio.CancelledError()))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(suite.grade(items[HOSTILE_ID], HOSTILE))


@pytest.mark.parametrize(
    "fields",
    [
        {"completed": True, "exception": 5},
        {"completed": "yes", "exception": ["AssertionError"], "stdout": None},
        {"completed": 1, "stdout": b"nonce"},
        {"exception": {"x": 1}, "stdout": 3.5, "timed_out": None},
    ],
)
def test_outcome_never_raises_on_odd_fields(fields: dict[str, object]) -> None:
    """A result built without validation (as a future backend might) with fields the graded
    code shaped is a crash: never a pass, never an exception."""
    result = ExecResult.model_construct(**fields)
    assert outcome(result, "nonce") == "crashed"


def test_a_hostile_answer_does_not_stop_the_honest_ones_fake_sandbox() -> None:
    """Every honest answer is graded (the fake answers `wrong` for them) and the hostile one,
    whose sandbox call raises, is `sandbox_error`."""
    sandbox = FakeSandbox(_forged_validation_error())
    suite, items = _humaneval(sandbox)
    outcomes = asyncio.run(grade_all(suite, _step(items), concurrency=2))
    assert [_kind(o) for o in outcomes] == ["wrong", "wrong", "sandbox_error", "wrong"]
    assert sandbox.calls == 4


def _subprocess_sandbox() -> Sandbox:
    from turnrl.sandboxes.local import SubprocessSandbox

    return SubprocessSandbox(pool_size=4, warm=0)


@pytest.mark.parametrize("inject", [False, True], ids=["forged_report", "injected_error"])
def test_a_hostile_answer_in_a_step_with_honest_ones_subprocess(inject: bool) -> None:
    """The real `subprocess` backend: the honest answers pass; the hostile one fails. With
    `inject`, its call raises the validation error a forged report caused before the backends
    checked reports, so the outcome is exactly `sandbox_error`; without, the backend's own
    treatment of the forged report decides (`crashed` once reports are checked)."""

    async def main() -> list[dict[str, float]]:
        try:
            real = _subprocess_sandbox()
        except SandboxError as e:
            pytest.skip(f"no subprocess sandbox: {e}")
        sandbox: Sandbox = FakeSandbox(_forged_validation_error(), inner=real) if inject else real
        try:
            suite, items = _humaneval(sandbox)
            return await grade_all(suite, _step(items), concurrency=4)
        finally:
            await sandbox.close()

    kinds = [_kind(o) for o in asyncio.run(main())]
    hostile = kinds.pop(2)
    assert kinds == ["correct"] * len(HONEST_IDS)
    assert hostile == "sandbox_error" if inject else hostile in ("crashed", "sandbox_error")


# --- grade_all ------------------------------------------------------------------------------


class RaisingSuite(BaseSuite):
    """Grades `correct` and `f1` on the answer; raises `error` on the item `bad`."""

    def __init__(self, error: BaseException, bad: str = "b") -> None:
        self.error = error
        self.bad = bad
        self._items = [TaskItem(id=i, question="?", answers=("yes",)) for i in "abc"]

    @property
    def name(self) -> str:
        return "raising"

    @property
    def system_prompt(self) -> str:
        return ""

    def items(self, split: Split) -> Sequence[TaskItem]:
        return self._items

    def tools(self) -> Sequence[Tool | EpisodeTool]:
        return []

    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        await asyncio.sleep(0)
        if item.id == self.bad:
            raise self.error
        hit = float(answer == item.answers[0])
        return {"correct": hit, "f1": hit}


def _pairs(suite: RaisingSuite) -> list[tuple[TaskItem, Episode]]:
    return [(it, _episode(it, "yes", n)) for it in suite.items("train") for n in range(2)]


def test_grade_all_isolates_a_raising_grader(caplog: pytest.LogCaptureFixture) -> None:
    suite = RaisingSuite(GraderError("gold answer is not a number"))
    with caplog.at_level(logging.WARNING, logger="turnrl.rollout"):
        outcomes = asyncio.run(grade_all(suite, _pairs(suite), concurrency=2))
    failed = {"correct": 0.0, "f1": 0.0, GRADER_ERROR: 1.0}
    good = {"correct": 1.0, "f1": 1.0}
    assert outcomes == [good, good, failed, failed, good, good]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert "s0/b/0" in messages[0] and "s0/b/1" in messages[1]
    assert "GraderError: gold answer is not a number" in messages[0]
    assert "test_grading_isolation.py" in messages[0]  # where it was raised


def test_grade_all_failed_outcomes_are_distinct_dicts() -> None:
    suite = RaisingSuite(ValueError("x"))
    outcomes = asyncio.run(grade_all(suite, _pairs(suite), concurrency=8))
    outcomes[2]["correct"] = 0.5
    assert outcomes[3]["correct"] == 0.0


def test_grade_all_when_every_grader_raises_declared_metrics_still_appear() -> None:
    """With no episode graded, only the metrics the caller declares (and `correct`) are there
    for a reward to read."""
    suite = RaisingSuite(ValueError("x"))
    pairs = [p for p in _pairs(suite) if p[0].id == "b"]
    bare = asyncio.run(grade_all(suite, pairs, concurrency=2))
    assert bare == [{"correct": 0.0, GRADER_ERROR: 1.0}] * 2
    declared = asyncio.run(grade_all(suite, pairs, concurrency=2, metrics=("correct", "f1")))
    assert declared == [{"correct": 0.0, "f1": 0.0, GRADER_ERROR: 1.0}] * 2
    assert grader_outcome(("f1",)) == declared[0]


def test_grade_all_propagates_cancellation() -> None:
    suite = RaisingSuite(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(grade_all(suite, _pairs(suite), concurrency=2))


def test_grade_all_propagates_keyboard_interrupt() -> None:
    """Only `Exception`s are an episode's outcome; a person's ^C stops the run."""
    suite = RaisingSuite(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(grade_all(suite, _pairs(suite), concurrency=2))


def test_summaries_count_grader_errors_per_step() -> None:
    """The marker is one more outcome key: step summaries show the fraction of episodes whose
    grader failed, and the success rate counts them as failures."""
    suite = RaisingSuite(ValueError("x"))
    pairs = _pairs(suite)
    outcomes = asyncio.run(grade_all(suite, pairs, concurrency=2))
    graded = zip(pairs, outcomes, strict=True)
    episodes = [e.model_copy(update={"outcome": o}) for (_, e), o in graded]
    summary = summarize(episodes)
    assert summary[GRADER_ERROR] == pytest.approx(2 / 6)
    assert summary["success"] == pytest.approx(4 / 6)
    assert summary["f1"] == pytest.approx(4 / 6)


def test_an_episode_whose_grader_raised_is_not_trained() -> None:
    """A grader bug scores 0, which says nothing about the answer: the episode gets no
    advantage, and its group's baseline is taken from the others."""
    from turnrl.agent.records import Episode, StopReason, Turn
    from turnrl.rl.reward_config import RewardConfig
    from turnrl.rl.scoring import score

    def episode(i: int, outcome: dict[str, float]) -> Episode:
        turn = Turn(
            index=0,
            prompt_ids=[1, 2],
            completion_ids=[3],
            completion_logprobs=[-0.5],
            observation_ids=[],
            text="x",
            finish_reason="stop",
        )
        return Episode(
            episode_id=f"g/{i}",
            task_id="t",
            group_id="g",
            turns=[turn],
            stop_reason=StopReason.ANSWERED,
            outcome=outcome,
        )

    group = [
        episode(0, {"correct": 1.0}),
        episode(1, {"correct": 0.0}),
        episode(2, grader_outcome()),
    ]
    scored, _ = score(group, RewardConfig(), "grpo")
    assert scored[2].turns[0].advantage is None
    a, b = scored[0].turns[0].advantage, scored[1].turns[0].advantage
    assert a is not None and b is not None and a > 0 > b and a == pytest.approx(-b)
