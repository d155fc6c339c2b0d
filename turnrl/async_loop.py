"""The asynchronous off-policy loop (`train.mode: async`): rollouts go on while the learner
steps, within a staleness bound.

Batch b is exactly the synchronous loop's step b (`turnrl.loop`): the same task items (the
same `random.Random(seed)` draws as `turnrl.train.train_steps`), the same episode specs
(`turnrl.rollout.episode_specs`: ids `s{b}/...`, seeds `seed + 1_000_000 * (b + 1)`), and the
same stage functions grade, measure, score, store and learn it; its metrics row is
`StepReport.row()` plus three figures (below). What changes is when episodes run:

- Admission control, never discarding. Batch b's episodes may start only once the learner has
  taken at least b - `max_staleness` steps, skipped steps included (a step without signal
  keeps the version and must not stall admission). A step moves the version by at most one,
  so every turn of batch b is at most `max_staleness` versions behind the learner that trains
  it; 0 is the synchronous schedule. Nothing finished is ever dropped: discarding stale groups
  biases training toward short, easy episodes (tinker-cookbook PR #822); AReaL
  (`max_head_offpolicyness`) and SkyRL (`max_staleness_steps`) bound staleness this way too.
- In order. The learner trains batch b once all of its groups are graded; groups of later
  batches that end first wait in a buffer. Trained in order, each batch is trained at the
  step it was admitted for, so the bound above is exact; and nothing is reordered toward the
  batches whose episodes end first, i.e. toward short episodes: a straggler holds the
  learner (`learner_wait_s`), never the data.
- Partial rollouts. An episode in flight when the weights change goes on; each turn keeps the
  `policy_version` that sampled it. The in-process policy (`HFPolicy`) samples with the very
  module the learner trains, so the learn stage runs between `begin_update` (rows being
  decoded finish first, on the old weights; new requests wait) and `end_update`; tool calls
  in flight go on meanwhile, and their episodes' next turns sample with the new version. With
  a vLLM server the learner trains its own copy while the server keeps sampling; the loop
  calls `begin_update` only once the step is done: requests in flight finish on the old
  weights and keep the old version, later ones wait while `end_update` writes and pushes the
  new weights, then go out on them.
- Each episode is journaled as it ends (`RunStore.append_rollout`, as the synchronous loop
  does) and graded at once, holding its concurrency slot (`RunConfig.concurrency` bounds
  episodes and graders in flight together, across batches). The measure stage runs on the
  learner's side, with the weights at training time, which may be up to `max_staleness`
  versions newer than those that sampled a turn.

Each metrics row adds `batch_lag_mean` and `batch_lag_max` (the learner's version at training
time minus each turn's `policy_version`, over every turn of the batch; the learner's own
`version_lag_*` count only the turns it trains) and `learner_wait_s` (how long the learner
waited for the batch); `rollout_s` is the batch's time from admission to its last grade, which
overlaps other steps. `Pending` holds what the loop holds between steps (batches admitted,
episodes in flight, ended and buffered groups), for a checkpoint to save.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from turnrl.agent.policy import WeightSync
from turnrl.agent.records import Episode
from turnrl.agent.runner import EpisodeSpec
from turnrl.agent.store import RunStore
from turnrl.config import RunConfig
from turnrl.loop import (
    Resumed,
    Rollouts,
    StepReport,
    grade,
    laps,
    learn,
    learn_and_sync,
    measure,
    score_episodes,
    store_episodes,
    synced,
)
from turnrl.resume import save_state
from turnrl.rl.learner import Learner, StepResult
from turnrl.rollout import episode_specs
from turnrl.session import Session
from turnrl.tasks.base import TaskItem

AfterStep = Callable[[StepReport, dict[str, float]], Awaitable[None]]
"""Awaited after each step's row is stored (printing, checkpoints); the learner takes the next
batch once it returns, while rollouts go on."""


@dataclass(frozen=True)
class Batch:
    """One learner step's rollouts: the synchronous loop's step `step`."""

    step: int
    items: tuple[TaskItem, ...]
    specs: tuple[EpisodeSpec, ...]
    """G per item, in item order (`episode_specs`): the order the learner gets them in."""


@dataclass
class Pending:
    """What the loop holds between learner steps; a checkpoint that saves it (and the specs a
    batch's step and items give back) loses no finished episode and trains none twice."""

    learned: int = 0
    """Learner steps taken, skipped ones included: batch b may start once
    `learned >= b - max_staleness`."""
    admitted: int = 0
    """Batches admitted so far (0 .. admitted-1); their episodes not yet started are queued
    for a concurrency slot."""
    in_flight: dict[str, int] = field(default_factory=dict)
    """The episodes running now (rollout or grading), by episode id: their batch."""
    ended: dict[str, list[Episode]] = field(default_factory=dict)
    """Graded episodes of groups still running, by group id."""
    buffered: dict[int, dict[str, list[Episode]]] = field(default_factory=dict)
    """Finished groups of admitted, untrained batches: by batch, then group id."""

    def may_admit(self, batch: int, max_staleness: int) -> bool:
        return self.learned >= batch - max_staleness


@dataclass(frozen=True)
class AsyncHooks:
    """Where a caller watches the loop; none of them steers it."""

    on_episode: Callable[[Episode], None] | None = None
    """Sees each episode as its rollout ends (ungraded)."""
    on_event: Callable[[str, int], None] | None = None
    """Sees each scheduling event with its batch, in the order they happen: `admit`, `start`
    (one per episode), `ready` (every group graded), `learn` (the learner takes the batch),
    `learned` (its step and weight sync are done)."""


def version_lag(episodes: Sequence[Episode], version: int) -> dict[str, float]:
    """`batch_lag_mean` and `batch_lag_max`: `version` minus each turn's `policy_version`,
    over every turn of `episodes` (0 and 0 when there is none)."""
    lags = [version - t.policy_version for e in episodes for t in e.turns]
    if not lags:
        return {"batch_lag_mean": 0.0, "batch_lag_max": 0.0}
    return {"batch_lag_mean": sum(lags) / len(lags), "batch_lag_max": float(max(lags))}


async def run_async(
    batches: Sequence[Sequence[TaskItem]],
    r: Rollouts,
    config: RunConfig,
    learner: Learner,
    sync: WeightSync,
    store: RunStore,
    encode: Callable[[str], Sequence[int]],
    *,
    shared_weights: bool = True,
    hooks: AsyncHooks | None = None,
    after_step: AfterStep | None = None,
    pending: Pending | None = None,
    first: int = 0,
    resumed: Resumed | None = None,
) -> list[dict[str, float]]:
    """Train one learner step per entry of `batches` (step b's task items) from step `first`
    on, with rollouts admitted up to `config.train.max_staleness` steps ahead (module
    docstring); returns the metrics rows of those steps (also appended to `store`).
    `shared_weights`: the policy samples with the learner's module (in-process), so
    generation is held while the learner changes it; else only while the new weights are
    pushed. `pending` is the state to keep (a fresh one by default). `resumed`: what a killed
    run left (`turnrl.resume`): journaled rollouts are graded, not run again (the buffered and
    the finished-but-ungraded alike), episodes it stored are not stored again; the episodes
    that were in flight run again from their start. An error in the learner, a grader's
    suite or a chat template ends the loop: the rollouts in flight are cancelled and the
    error is raised as it is."""
    pending = pending or Pending(learned=first)
    loop = _Loop(
        [_batch(r, config, step, items) for step, items in enumerate(batches) if step >= first],
        r,
        config,
        learner,
        sync,
        store,
        encode,
        shared_weights,
        hooks or AsyncHooks(),
        after_step,
        pending,
        resumed or Resumed(),
    )
    try:
        return await loop.run()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _batch(r: Rollouts, config: RunConfig, step: int, items: Sequence[TaskItem]) -> Batch:
    specs = episode_specs(
        r.suite,
        items,
        config.train.group_size,
        step,
        # The synchronous loop's seeds (`turnrl.loop.train_step`).
        config.seed + 1_000_000 * (step + 1),
        f"s{step}",
        r.extra_tools,
        r.policy_for,
        r.route_spec,
    )
    return Batch(step, tuple(items), tuple(specs))


class _Loop:
    """The scheduler: an admission task that starts episodes as the bound allows, one task per
    episode, and the learner, which takes batches in order."""

    def __init__(
        self,
        batches: list[Batch],
        r: Rollouts,
        config: RunConfig,
        learner: Learner,
        sync: WeightSync,
        store: RunStore,
        encode: Callable[[str], Sequence[int]],
        shared_weights: bool,
        hooks: AsyncHooks,
        after_step: AfterStep | None,
        pending: Pending,
        resumed: Resumed,
    ) -> None:
        self.batches = batches
        self.r = r
        self.config = config
        self.learner = learner
        self.sync = sync
        self.store = store
        self.encode = encode
        self.shared_weights = shared_weights
        self.hooks = hooks
        self.after_step = after_step
        self.pending = pending
        self.resumed = resumed
        self.slots = asyncio.Semaphore(r.concurrency)
        self.stepped = asyncio.Condition()
        self.ready = {batch.step: asyncio.Event() for batch in batches}
        self.admitted_at: dict[int, float] = {}
        self.ready_at: dict[int, float] = {}

    def event(self, name: str, step: int) -> None:
        if self.hooks.on_event is not None:
            self.hooks.on_event(name, step)

    async def run(self) -> list[dict[str, float]]:
        rows = []
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.admit(tasks))
            for batch in self.batches:
                rows.append(await self.train(batch))
        return rows

    async def admit(self, tasks: asyncio.TaskGroup) -> None:
        bound = self.config.train.max_staleness
        for batch in self.batches:

            def admissible(step: int = batch.step) -> bool:
                return self.pending.may_admit(step, bound)

            async with self.stepped:
                await self.stepped.wait_for(admissible)
            self.pending.admitted = batch.step + 1
            self.pending.buffered[batch.step] = {}
            self.admitted_at[batch.step] = time.monotonic()
            self.event("admit", batch.step)
            for spec in batch.specs:
                tasks.create_task(self.episode(batch, spec))

    async def episode(self, batch: Batch, spec: EpisodeSpec) -> None:
        """Roll out and grade one episode in one concurrency slot; buffer its group once the
        group is complete."""
        async with self.slots:
            self.pending.in_flight[spec.episode_id] = batch.step
            self.event("start", batch.step)
            ended = self.resumed.rollouts.get(spec.episode_id)
            if ended is None:
                ended = await self.r.runner.run_episode(spec)
                self.store.append_rollout(ended)  # one write(): it survives a kill -9
            if self.hooks.on_episode is not None:
                self.hooks.on_episode(ended)
            graded = await grade(self.r.suite, batch.items, [ended], 1, self.r.metrics)
            del self.pending.in_flight[spec.episode_id]
        group = self.pending.ended.setdefault(spec.group_id, [])
        group.append(graded[0])
        if len(group) < self.config.train.group_size:
            return
        del self.pending.ended[spec.group_id]
        buffered = self.pending.buffered[batch.step]
        buffered[spec.group_id] = group
        if sum(len(g) for g in buffered.values()) == len(batch.specs):
            self.ready_at[batch.step] = time.monotonic()
            self.event("ready", batch.step)
            self.ready[batch.step].set()

    async def train(self, batch: Batch) -> dict[str, float]:
        """Wait for `batch`, then measure, score, store, learn and sync as `train_step` does."""
        step = batch.step
        waited = time.monotonic()
        await self.ready[step].wait()
        wait_s = time.monotonic() - waited
        self.event("learn", step)
        by_id = {e.episode_id: e for g in self.pending.buffered.pop(step).values() for e in g}
        episodes = [by_id[spec.episode_id] for spec in batch.specs]
        lag = version_lag(episodes, self.learner.version)
        seconds = {"rollout": self.ready_at[step] - self.admitted_at[step]}
        lap = laps(seconds)

        items = list(batch.items)
        episodes = await asyncio.to_thread(
            measure, episodes, items, self.config, self.learner, self.encode
        )
        lap("measure")
        score = self.r.score
        scored = score_episodes(episodes, self.config) if score is None else score(episodes)
        lap("score")
        store_episodes(self.store, scored.episodes, self.resumed.stored)
        lap("store")
        learn_routes = self.r.learn_routes
        routing = {} if learn_routes is None else learn_routes(scored.episodes)
        result = await self.learn(step, scored.episodes, lap)
        async with self.stepped:
            self.pending.learned += 1
            self.stepped.notify_all()
        self.event("learned", step)
        report = StepReport(step, scored, result, seconds, routing)
        row = report.row() | lag | {"learner_wait_s": wait_s}
        self.store.append_metrics(row)
        self.store.flush()
        if self.after_step is not None:
            await self.after_step(report, row)
        return row

    async def learn(
        self, step: int, episodes: list[Episode], lap: Callable[[str], None]
    ) -> StepResult:
        """The learn and sync stages (module docstring: when generation is held); a failed
        sync names `step`, as `train_step`'s does."""
        if not self.shared_weights:
            result = await asyncio.to_thread(learn, self.learner, episodes, self.config)
            lap("learn")
            await synced(step, self.sync.begin_update())
            await synced(step, self.sync.end_update(result.version))
            lap("sync")
            return result
        return await learn_and_sync(step, episodes, self.config, self.learner, self.sync, lap)


async def train_async(s: Session) -> list[dict[str, float]]:
    """`train.mode: async` over a session: the same batches as `turnrl.train.train_steps`,
    with progress, a line per step and checkpoints every `train.checkpoint_every` steps;
    returns the metrics rows (also appended to the store)."""
    assert s.learner is not None
    cfg = s.config
    first = len(s.stored.rows)  # a resumed run's learned steps (`turnrl.train.relearn_unsaved`)
    journal = {k: e for k, e in s.stored.journal.items() if e.step >= first}
    resumed = Resumed(journal, s.stored.stored)
    train_items = list(s.suite.items("train"))
    rng = random.Random(cfg.seed)
    batches = [
        rng.sample(train_items, min(cfg.train.tasks_per_step, len(train_items)))
        for _ in range(cfg.train.steps)
    ]
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=s.console,
        transient=True,
    )
    total = sum(len(b) for b in batches[first:]) * cfg.train.group_size
    bar = progress.add_task(f"async (staleness {cfg.train.max_staleness}): rollouts", total=total)

    async def after_step(report: StepReport, row: dict[str, float]) -> None:
        s.console.print(_step_line(report, row))
        every = cfg.train.checkpoint_every
        if every and (report.step + 1) % every == 0:
            folder = cfg.run_dir / "checkpoints" / f"step-{report.step + 1}"
            # Off the event loop: rollouts go on (the weights do not change meanwhile).
            await asyncio.to_thread(s.save_checkpoint, folder)
        resume_every, last = cfg.train.resume_every, report.step + 1 == cfg.train.steps
        if (
            s.learner is not None
            and resume_every
            and ((report.step + 1) % resume_every == 0 or last)
        ):
            s.progress = await asyncio.to_thread(
                save_state, cfg.run_dir, s.learner, report.step + 1, s.progress
            )

    with progress:
        return await run_async(
            batches,
            s.rollouts(cfg.sampling.temperature),
            cfg,
            s.learner,
            s.sync,
            s.store,
            s.renderer.tokenizer.encode,
            shared_weights=s.backend is None,
            hooks=AsyncHooks(on_episode=lambda _: progress.advance(bar)),
            after_step=after_step,
            first=first,
            resumed=resumed,
        )


def _step_line(report: StepReport, row: dict[str, float]) -> str:
    loss = "skipped (no signal)" if report.learn.skipped else f"{row['loss']:+.4f}"
    return (
        f"step {report.step}: reward {row['reward']:+.3f}  success {row['success']:.3f}  "
        f"tool calls/ep {row['tool_calls_per_episode']:.2f}  loss {loss}  "
        f"lag {row['batch_lag_mean']:.2f} (max {row['batch_lag_max']:.0f})  "
        f"waited {row['learner_wait_s']:.0f} s  learn {row['learn_s']:.0f} s"
    )
