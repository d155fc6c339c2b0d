"""One RL step as a pipeline of stages, each a function typed in and out:

    rollout -> grade -> measure -> score -> store -> learn -> sync

`train_step` runs them in that order and returns a `StepReport`; there is no console code here
(`turnrl.train` wires a session, shows progress through `StepHooks` and prints). The loop is
synchronous: rollouts and learning alternate, never overlap. The learner changes the weights
between the policy's `WeightSync.begin_update` and `end_update`, so every rollout turn is
stamped with the version that sampled it.

- rollout: G episodes per task item through the episode runner (`turnrl.rollout`); each is
  journaled in the store as it ends (`RunStore.append_rollout`), and a resumed step runs only
  the rollouts its journal lacks (`Resumed`).
- grade: the suite grades each stored episode (a pure function of it: replay re-grades).
- measure: the model measurements credit needs, taken with the weights that sampled the
  episodes, before the learner changes them (`turnrl.rl.credit`: gold-answer probabilities,
  `gold_seen`; values from the value head).
- score: turn reward components, per-turn scalars, advantages (`turnrl.rl.scoring`: the same
  path `turnrl replay` runs).
- store: the scored episodes are appended to the run store and flushed before the learner
  runs (a resumed step skips those stored before the crash).
- learn: one learner step over the episodes (`Learner.step` reads `Turn.advantage`).
- sync: the new version reaches the policy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from turnrl.agent.policy import Policy, WeightSync
from turnrl.agent.records import Episode
from turnrl.agent.runner import EpisodeRunner, EpisodeSpec
from turnrl.agent.store import RunStore
from turnrl.config import RunConfig
from turnrl.report import summarize
from turnrl.rl.advantages import value_targets
from turnrl.rl.credit import add_gold_signals
from turnrl.rl.learner import Learner, StepResult
from turnrl.rl.scoring import score, trainable, turn_scalar_rewards
from turnrl.rl.value_head import with_values
from turnrl.rollout import episode_specs, grade_all
from turnrl.tasks.base import TaskItem, TaskSuite
from turnrl.tasks.grading import normalize_answer
from turnrl.tools.base import AnyTool


@dataclass(frozen=True)
class StepHooks:
    """Where a caller watches a step (progress bars); none of them steers it."""

    on_episode: Callable[[Episode], None] | None = None
    """Sees each episode as its rollout ends."""
    on_stage: Callable[[str], None] | None = None
    """Sees the name of each stage as it starts (`rollout`, `grade`, ..., `sync`)."""

    def stage(self, name: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name)


@dataclass(frozen=True)
class Rollouts:
    """What the rollout stage needs besides the items: the runner and the suite's tools."""

    runner: EpisodeRunner
    suite: TaskSuite
    concurrency: int
    """Episodes (and graders) in flight at once."""
    extra_tools: Sequence[AnyTool] = ()
    """The run's own tools, offered besides the suite's (`RunConfig.tools`)."""
    policy_for: Callable[[TaskItem], Policy] | None = None
    """Each item's own policy (the oracle's script), instead of the runner's."""
    route_spec: Callable[[TaskItem, EpisodeSpec], EpisodeSpec] | None = None
    """A routed run's spec for an item (its routed models, a task-level router's pick)."""
    learn_routes: Callable[[Sequence[Episode]], dict[str, float]] | None = None
    """A routed run's learned router, trained on each step's scored episodes (their logged
    decisions); the metrics it returns join the step's row."""
    score: Callable[[Sequence[Episode]], Scored] | None = None
    """Scoring in place of `rewards` and `train.estimator` (BoPO's, `turnrl.bopo`)."""
    metrics: Sequence[str] = ()
    """The metrics the suite's grader emits: an episode whose grader raised scores 0 on each
    (with `grader_error`), so rewards that read them still find them."""


@dataclass(frozen=True)
class Resumed:
    """What a killed run left of a step it resumes (`turnrl.resume`): the journaled rollouts,
    which are not run again, and the ids already in `episodes.rec`, which are not stored
    again. Grading, measuring and scoring are functions of the episodes and the weights, so
    redoing them gives what the killed run computed."""

    rollouts: Mapping[str, Episode] = field(default_factory=dict)
    """Finished, ungraded episodes by episode id."""
    stored: Collection[str] = frozenset()
    """Episode ids already stored, scored."""


@dataclass(frozen=True)
class Scored:
    """Episodes with rewards and advantages filled in, and their returns."""

    episodes: list[Episode]
    returns: list[float]
    """Each episode's sum of its turns' scalar rewards (what the `reward` curve averages)."""


@dataclass(frozen=True)
class StepReport:
    """What one training step did: its scored episodes, the learner's result, timings."""

    step: int
    scored: Scored
    learn: StepResult
    seconds: Mapping[str, float] = field(default_factory=dict)
    """Wall time of each stage by name (`rollout`, `grade`, `measure`, ...)."""
    routing: Mapping[str, float] = field(default_factory=dict)
    """The learned router's metrics for this step (`Rollouts.learn_routes`)."""

    @property
    def reward(self) -> float:
        returns = self.scored.returns
        return sum(returns) / len(returns) if returns else 0.0

    def row(self) -> dict[str, float]:
        """The metrics row stored for this step (`metrics.rec`): reward, the episodes'
        summary, the learner's scalars, stage timings."""
        row: dict[str, float] = {
            "step": float(self.step),
            "policy_version": float(self.learn.version),
        }
        row["reward"] = self.reward
        row |= summarize(self.scored.episodes)
        row |= {
            "skipped": float(self.learn.skipped),
            "policy_updated": float(self.learn.policy_updated),
        }
        row |= dict(self.learn.scalars)
        row |= dict(self.routing)
        row |= {f"{stage}_s": s for stage, s in self.seconds.items()}
        # The curves' historical names: rollouts include grading, learning includes the sync.
        row["rollout_s"] = self.seconds.get("rollout", 0.0) + self.seconds.get("grade", 0.0)
        row["learn_s"] = self.seconds.get("learn", 0.0) + self.seconds.get("sync", 0.0)
        return row


async def rollout(
    r: Rollouts,
    items: Sequence[TaskItem],
    group_size: int,
    step: int,
    seed: int,
    tag: str | None = None,
    on_episode: Callable[[Episode], None] | None = None,
    done: Mapping[str, Episode] | None = None,
) -> list[Episode]:
    """`group_size` episodes per item, ungraded, in item order; the specs whose episode id is
    in `done` (a resumed step's journal) are taken from it instead of run again."""
    specs = episode_specs(
        r.suite, items, group_size, step, seed, tag, r.extra_tools, r.policy_for, r.route_spec
    )
    done = done or {}
    todo = [spec for spec in specs if spec.episode_id not in done]
    ran = await r.runner.run_many(todo, r.concurrency, on_episode)
    by_id = {**done, **{e.episode_id: e for e in ran}}
    return [by_id[spec.episode_id] for spec in specs]


async def grade(
    suite: TaskSuite,
    items: Sequence[TaskItem],
    episodes: Sequence[Episode],
    concurrency: int,
    metrics: Sequence[str] = (),
) -> list[Episode]:
    """The episodes with `outcome` filled in by the suite's grader (`metrics` as in
    `grade_all`)."""
    by_id = {it.id: it for it in items}
    pairs = [(by_id[e.task_id], e) for e in episodes]
    outcomes = await grade_all(suite, pairs, concurrency, metrics)
    return [e.model_copy(update={"outcome": o}) for e, o in zip(episodes, outcomes, strict=True)]


def measure(
    episodes: Sequence[Episode],
    items: Sequence[TaskItem],
    config: RunConfig,
    learner: Learner,
    encode: Callable[[str], Sequence[int]],
) -> list[Episode]:
    """The model measurements credit needs (gold-answer probabilities and `gold_seen`, values),
    taken with the weights that sampled `episodes`, before the learner changes them."""
    out = add_gold_signals(
        episodes,
        {it.id: it.answers for it in items},
        config.rewards,
        model=learner.model,
        encode=encode,
        normalize=normalize_answer,
        temperature=config.learner.temperature,
        micro_batch_tokens=config.learner.micro_batch_tokens,
    )
    if learner.value_head is not None:
        # One value more per episode: the state after the last turn, T-PPO's bootstrap at a cut.
        out = with_values(out, learner.values(out, bootstrap=True))
    return out


def score_episodes(episodes: Sequence[Episode], config: RunConfig) -> Scored:
    """Rewards and advantages (`turnrl.rl.scoring.score`, the path replay runs)."""
    scored, returns = score(episodes, config.rewards, config.train.estimator)
    return Scored(scored, returns)


def store_episodes(
    store: RunStore, episodes: Sequence[Episode], stored: Collection[str] = ()
) -> None:
    """Append (all but the ids in `stored`) and flush: what is stored survives a crash in the
    stages after."""
    for e in episodes:
        if e.episode_id not in stored:
            store.append_episode(e)
    store.flush()


def learn(learner: Learner, episodes: Sequence[Episode], config: RunConfig) -> StepResult:
    """One learner step over scored episodes; value targets when the learner has a value
    head."""
    targets: list[list[float | None]] | None = None
    if config.learner.value_head is not None:
        rewards_NT = turn_scalar_rewards(episodes, config.rewards)
        all_targets = value_targets(episodes, rewards_NT, config.train.estimator)
        # An episode a failure ended says nothing about the policy's values either.
        targets = [
            list(row) if trainable(e) else [None] * len(row)
            for e, row in zip(episodes, all_targets, strict=True)
        ]
    return learner.step(episodes, targets)


def laps(into: dict[str, float]) -> Callable[[str], None]:
    """A stopwatch: each call `lap(name)` stores in `into[name]` the seconds since the last
    call (or since `laps` was called)."""
    last = time.monotonic()

    def lap(name: str) -> None:
        nonlocal last
        now = time.monotonic()
        into[name] = now - last
        last = now

    return lap


async def synced(step: int, call: Awaitable[None]) -> None:
    """Await a weight-sync call; a failure says which RL step's sync it was."""
    try:
        await call
    except Exception as e:
        e.add_note(f"in the weight sync after RL step {step}")
        raise


async def learn_and_sync(
    step: int,
    episodes: Sequence[Episode],
    config: RunConfig,
    learner: Learner,
    sync: WeightSync,
    lap: Callable[[str], None] | None = None,
) -> StepResult:
    """The learn and sync stages with the policy held (`begin_update` .. `end_update`), as
    an in-process policy that samples with the learner's module needs; `lap` sees `learn`
    and `sync` end. After a failed step the weights may be half-changed: the version stays
    the old one and the caller sees the exception. A resumed run learns a stored step again
    through this too (`turnrl.resume`)."""
    await synced(step, sync.begin_update())
    result: StepResult | None = None
    try:
        result = await asyncio.to_thread(learn, learner, episodes, config)
    finally:
        if lap is not None:
            lap("learn")
        await synced(step, sync.end_update(result.version if result is not None else sync.version))
        if lap is not None:
            lap("sync")
    return result


async def train_step(
    step: int,
    items: Sequence[TaskItem],
    r: Rollouts,
    config: RunConfig,
    learner: Learner,
    sync: WeightSync,
    store: RunStore,
    encode: Callable[[str], Sequence[int]],
    hooks: StepHooks | None = None,
    resumed: Resumed | None = None,
) -> StepReport:
    """Roll out `items` (`train.group_size` each), grade, measure, score, store, take one
    learner step and sync the new weights to the policy. `resumed`: what a killed run left
    of this step."""
    hooks = hooks or StepHooks()
    resumed = resumed or Resumed()

    def ended(e: Episode) -> None:
        store.append_rollout(e)  # one write(): it survives a kill of this process
        if hooks.on_episode is not None:
            hooks.on_episode(e)

    seconds: dict[str, float] = {}
    timed = laps(seconds)

    def lap(name: str) -> None:
        timed(name)
        if name == "learn":
            hooks.stage("sync")

    hooks.stage("rollout")
    episodes = await rollout(
        r,
        items,
        config.train.group_size,
        step,
        # Each step's rollouts draw their own seeds, far from evaluation's.
        seed=config.seed + 1_000_000 * (step + 1),
        tag=f"s{step}",
        on_episode=ended,
        done=resumed.rollouts,
    )
    lap("rollout")
    hooks.stage("grade")
    episodes = await grade(r.suite, items, episodes, r.concurrency, r.metrics)
    lap("grade")
    hooks.stage("measure")
    episodes = await asyncio.to_thread(measure, episodes, items, config, learner, encode)
    lap("measure")
    hooks.stage("score")
    scored = score_episodes(episodes, config) if r.score is None else r.score(episodes)
    lap("score")
    hooks.stage("store")
    store_episodes(store, scored.episodes, resumed.stored)
    lap("store")
    routing = {} if r.learn_routes is None else r.learn_routes(scored.episodes)
    hooks.stage("learn")
    result = await learn_and_sync(step, scored.episodes, config, learner, sync, lap)
    return StepReport(step, scored, result, seconds, routing)
