"""Rollout collection: G episodes per task item through the runner, graded by the suite.

Grading happens here, after the runner (which knows nothing about tasks), and depends only
on the stored episode (its answer, or for some suites its calls), so `turnrl replay` can
re-grade a run without the model. Episodes are graded independently: a grader that raises
on one episode marks that episode (`GRADER_ERROR`) and never aborts its step.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from turnrl.agent.policy import Policy
from turnrl.agent.records import GRADER_ERROR, Episode
from turnrl.agent.runner import EpisodeRunner, EpisodeSpec
from turnrl.tasks.base import TaskItem, TaskSuite
from turnrl.tools.base import AnyTool

log = logging.getLogger(__name__)

MAX_LOGGED_CHARS = 1000
"""Characters of a grader's exception text logged at most."""


def episode_specs(
    suite: TaskSuite,
    items: Sequence[TaskItem],
    group_size: int,
    step: int,
    seed: int,
    tag: str | None = None,
    extra_tools: Sequence[AnyTool] = (),
    policy_for: Callable[[TaskItem], Policy] | None = None,
    route_spec: Callable[[TaskItem, EpisodeSpec], EpisodeSpec] | None = None,
) -> list[EpisodeSpec]:
    """One spec per rollout; the G rollouts of an item share a group id and differ in seed.
    Group ids are `{tag}/{item id}` with `tag` defaulting to `s{step}`. An item with tools of
    its own (`TaskSuite.tools_for`) gets the suite's shared tools, its own, then `extra_tools`
    (the run's) in each spec; the other items' specs name no tools, so the runner offers the
    set it holds (built once, not per item). `policy_for` gives an item's episodes their own
    policy (the oracle's script for that item) instead of the runner's; `route_spec` gives a
    routed run's spec its item's routed models (an oracle's script) and, under a task-level
    router, its pick (`turnrl.routing`)."""
    specs = []
    examples = tuple(suite.few_shot())
    for i, item in enumerate(items):
        group = f"{tag or f's{step}'}/{item.id}"
        own = suite.tools_for(item)
        tools = (*suite.tools(), *own, *extra_tools) if own else None
        for g in range(group_size):
            spec = EpisodeSpec(
                episode_id=f"{group}/{g}",
                group_id=group,
                task_id=item.id,
                instructions=suite.system_prompt,
                question=item.question,
                # Seeds far apart so that per-turn offsets never collide across rollouts.
                seed=seed + 10_000 * (i * group_size + g),
                step=step,
                examples=examples,
                tools=tools,
                followups=item.followups,
                hidden_tools=frozenset(item.hidden_tools),
                policy=None if policy_for is None else policy_for(item),
            )
            specs.append(spec if route_spec is None else route_spec(item, spec))
    return specs


async def collect(
    runner: EpisodeRunner,
    suite: TaskSuite,
    items: Sequence[TaskItem],
    group_size: int,
    step: int,
    seed: int,
    concurrency: int,
    on_episode: Callable[[Episode], None] | None = None,
    tag: str | None = None,
    extra_tools: Sequence[AnyTool] = (),
    policy_for: Callable[[TaskItem], Policy] | None = None,
) -> list[Episode]:
    """Roll out every item `group_size` times and grade each episode (`extra_tools` as in
    `episode_specs`; for items without tools of their own the runner already holds them)."""
    specs = episode_specs(suite, items, group_size, step, seed, tag, extra_tools, policy_for)
    episodes = await runner.run_many(specs, concurrency, on_episode)
    by_id = {it.id: it for it in items}
    outcomes = await grade_all(suite, [(by_id[e.task_id], e) for e in episodes], concurrency)
    return [e.model_copy(update={"outcome": o}) for e, o in zip(episodes, outcomes, strict=True)]


async def grade_all(
    suite: TaskSuite,
    pairs: Sequence[tuple[TaskItem, Episode]],
    concurrency: int,
    metrics: Sequence[str] = (),
) -> list[dict[str, float]]:
    """Grade `(item, episode)` pairs with at most `concurrency` graders running at once (a
    code grader holds a sandbox while it runs). Each pair is graded on its own: a grader that
    raises gives that episode `grader_outcome` (logged with the exception), and the others
    are still graded; only cancellation propagates."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: TaskItem, episode: Episode) -> dict[str, float] | None:
        async with gate:
            try:
                return await suite.grade_episode(item, episode)
            except Exception as e:
                log.warning(
                    "%s: grading episode %s (item %s) failed, scored %s=1: %s",
                    suite.name,
                    episode.episode_id,
                    item.id,
                    GRADER_ERROR,
                    _describe(e),
                )
                return None

    graded = await asyncio.gather(*(one(i, e) for i, e in pairs))
    emitted = {k for o in graded if o is not None for k in o}
    failed = grader_outcome([*metrics, *sorted(emitted)])
    return [dict(failed) if o is None else o for o in graded]


def _describe(e: BaseException) -> str:
    """The exception with where it was raised (the last frames), bounded: its text may quote
    an answer the model wrote, of any size."""
    frames = traceback.extract_tb(e.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    text = str(e)
    text = text if len(text) <= MAX_LOGGED_CHARS else text[:MAX_LOGGED_CHARS] + "…"
    return f"{type(e).__name__}: {text} (at {where or '?'})"


def grader_outcome(metrics: Sequence[str] = ()) -> dict[str, float]:
    """The outcome of an episode whose grader raised: every score in `metrics` (the scores
    the suite's other episodes got, so a reward reading any of them finds it) and `correct`
    at 0, and `GRADER_ERROR` at 1, so summaries count such episodes per step."""
    return {**dict.fromkeys(metrics, 0.0), "correct": 0.0, GRADER_ERROR: 1.0}
