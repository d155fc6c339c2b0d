"""Boundary-guided training (BoPO) of a delegate-routed run: the stage between the warm start
and RL, and the scoring that replaces `rewards` and `train.estimator` during RL.

Budget-Aware Agentic Routing via Boundary-Guided Training (Zhang et al. 2026, arXiv
2602.21227; the definitions and the choices made where the paper is silent are in
`turnrl.rl.boundary`). In a run whose router is `delegate`, the trained policy decides, turn by
turn, whether to write the next turn itself or hand it to the expensive model (a `delegate`
call, trained with the rest of its turn). The stage:

1. **Boundary runs.** On every training task the RL steps will use (and `n_items` more for the
   warm start), the two boundary policies run `runs` times each: the trained model alone
   (always-cheap, at the sampling temperature) and the delegate target alone
   (always-expensive). Their episodes are stored under the tags `boundary-cheap` and
   `boundary-expensive` (step -1), and each task gets its success rates, mean `model_usd`
   costs and difficulty class (`BoundaryTable`).
2. **Routed warm start** (`sft_epochs` > 0): one trajectory per task, the cheapest successful
   one by its class: an Easy task's cheapest successful always-cheap run (the policy's own
   sampled ids); a Hard task's routed trajectory in which the trained policy plays the
   oracle's searches, then calls `delegate`, and the expensive model writes the rest (a
   delegate router's one mixing point: the latest delegation is the cheapest; with it the
   stratified P(expensive) mixes of the paper reduce to where the delegation falls, and here it
   falls before the answer). Intractable tasks are left out: cloning a failure teaches its
   wrong answer (`turnrl.rl.boundary` would label them with the cheapest always-cheap run;
   this run declines). Trained with `Learner.sft_step`, stored under `boundary-sft`.
3. **RL scoring** (`bopo_scored`): each episode's reward is the boundary-relative R = s +
   hard_bonus * s * [Hard] - cost_weight * C_norm (on its last turn, as the component `bopo`)
   and its advantage the reference-guided group advantage, the better boundary policy's
   expected reward joining each group's baseline, broadcast to the trained policy's turns
   (the expensive model's turns get none).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from turnrl.agent.policy import Policy
from turnrl.agent.records import Episode
from turnrl.agent.routing import FixedRouter
from turnrl.agent.routing_config import MODEL_USD, DelegateRouterConfig
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.agent.tool_formats import ToolFormat, rewrite_hermes
from turnrl.bopo_config import BoundaryTrainingConfig
from turnrl.loop import Scored, grade, rollout, store_episodes
from turnrl.resume import mark
from turnrl.rl.boundary import (
    Difficulty,
    boundary_reference_rewards,
    boundary_relative_rewards,
    classify_difficulty,
    reference_guided_advantages,
)
from turnrl.rl.boundary_config import BestBoundaryReference
from turnrl.rl.scoring import trainable
from turnrl.session import Session
from turnrl.sft import cheapest, sft_learner_config, sft_targets, train_items, train_on
from turnrl.sft_config import WarmStartConfig
from turnrl.tasks.base import TaskItem, TaskSuite

CHEAP, EXPENSIVE, SFT = "boundary-cheap", "boundary-expensive", "boundary-sft"
"""The tags of the stage's stored episodes."""

STAGE = "boundary"
"""The stage's name in `progress.json`."""

STAGE_SEED = 2_000_000
"""Offset of the stage's seeds from the run's (far from the RL steps' and evaluations')."""

REWARD = "bopo"
"""The reward component BoPO's scoring writes (on each episode's last turn)."""


@dataclass(frozen=True)
class TaskBoundary:
    """What the two boundary policies did on one task."""

    cheap_rate: float
    """Always-cheap's success rate over its runs."""
    expensive_rate: float
    """Always-expensive's success rate."""
    cheap_cost: float
    """Always-cheap's mean `model_usd` cost per run."""
    expensive_cost: float
    """Always-expensive's mean `model_usd` cost per run."""
    difficulty: Difficulty
    """The task's class (`turnrl.rl.boundary.classify_difficulty`)."""


def boundary_table(
    cheap: Sequence[Episode],
    expensive: Sequence[Episode],
    success_metric: str,
    solve_threshold: float,
) -> dict[str, TaskBoundary]:
    """Each task's boundary record from the boundary policies' graded episodes (every task
    must have runs of both)."""
    tasks = sorted({e.task_id for e in cheap} | {e.task_id for e in expensive})
    stats: dict[str, list[list[float]]] = {t: [[], [], [], []] for t in tasks}
    for side, episodes in ((0, cheap), (1, expensive)):
        for e in episodes:
            stats[e.task_id][side].append(_success(e, success_metric))
            stats[e.task_id][2 + side].append(e.cost.get(MODEL_USD, 0.0))
    missing = [t for t, (c, x, _, _) in stats.items() if not c or not x]
    if missing:
        raise ValueError(f"boundary runs missing for tasks {missing[:5]}")
    mean = {t: [float(np.mean(v)) for v in s] for t, s in stats.items()}
    classes = classify_difficulty(
        [mean[t][0] for t in tasks], [mean[t][1] for t in tasks], solve_threshold
    )
    return {
        t: TaskBoundary(mean[t][0], mean[t][1], mean[t][2], mean[t][3], d)
        for t, d in zip(tasks, classes, strict=True)
    }


def _success(e: Episode, success_metric: str) -> float:
    """An episode's success in [0, 1] (0 for one whose grader raised or never ran)."""
    return float(min(1.0, max(0.0, e.outcome.get(success_metric, 0.0))))


def bopo_scored(
    episodes: Sequence[Episode],
    table: Mapping[str, TaskBoundary],
    cfg: BoundaryTrainingConfig,
    success_metric: str,
) -> Scored:
    """Boundary-relative rewards and reference-guided advantages (module docstring, item 3).
    Episodes a failure outside the policy ended get their reward but no advantage, and stay
    out of their group's baseline, as in `turnrl.rl.scoring`."""
    missing = sorted({e.task_id for e in episodes} - table.keys())
    if missing:
        raise ValueError(f"no boundary runs for tasks {missing[:5]}: BoPO cannot score them")
    b = cfg.bopo
    groups = sorted({e.group_id for e in episodes})
    task_of = {e.group_id: e.task_id for e in episodes}
    rows = [table[task_of[g]] for g in groups]
    position = {g: i for i, g in enumerate(groups)}
    group_N = np.array([position[e.group_id] for e in episodes], np.int64)
    hard_G = [r.difficulty == Difficulty.HARD for r in rows]
    cheap_cost_G = [r.cheap_cost for r in rows]
    expensive_cost_G = [r.expensive_cost for r in rows]
    rewards = boundary_relative_rewards(
        [_success(e, success_metric) for e in episodes],
        [e.cost.get(MODEL_USD, 0.0) for e in episodes],
        group_N,
        cheap_cost_G,
        expensive_cost_G,
        hard_G,
        cost_weight=b.cost_weight,
        hard_bonus=b.hard_bonus,
    ).total_N
    reference_G = np.full(len(groups), np.nan)  # NaN: plain GRPO (the ablation)
    weight = 1.0
    if isinstance(b.reference, BestBoundaryReference):
        weight = b.reference.weight
        reference_G = boundary_reference_rewards(
            [r.cheap_rate for r in rows],
            [r.expensive_rate for r in rows],
            cheap_cost_G,
            expensive_cost_G,
            hard_G,
            cost_weight=b.cost_weight,
            hard_bonus=b.hard_bonus,
        )
    kept = np.array([trainable(e) for e in episodes], np.bool_)
    advantages = np.full(len(episodes), np.nan)
    if kept.any():
        advantages[kept] = reference_guided_advantages(
            rewards[kept], group_N[kept], reference_G, reference_weight=weight, eps=b.eps
        )
    scored = []
    for e, r, a in zip(episodes, rewards.tolist(), advantages.tolist(), strict=True):
        last = len(e.turns) - 1
        turns = [
            t.model_copy(
                update={
                    "rewards": {REWARD: r if i == last else 0.0},
                    "advantage": None if t.context_only or np.isnan(a) else a,
                }
            )
            for i, t in enumerate(e.turns)
        ]
        scored.append(e.model_copy(update={"turns": turns}))
    return Scored(scored, rewards.tolist())


def delegating_replies(
    suite: TaskSuite, item: TaskItem, fmt: ToolFormat, end_of_turn: str, tool_name: str
) -> list[str]:
    """The trained policy's replies in a synthesised Hard trajectory: the oracle's calls (all
    its turns but the answer), then a `delegate` call; the expensive model writes the rest."""
    calls = suite.oracle_turns(item)[:-1]
    delegate = f'<tool_call>{{"name": "{tool_name}", "arguments": {{}}}}</tool_call>'
    return [rewrite_hermes(t, fmt) + end_of_turn for t in [*calls, delegate]]


async def run_boundary_stage(
    s: Session, rl_items: Sequence[TaskItem], version: int
) -> tuple[dict[str, TaskBoundary], int]:
    """Boundary runs on `rl_items` and `n_items` more train items, the table, and the routed
    warm start (module docstring, items 1-2); returns the table and the policy version RL
    continues from. A resumed run that finished the stage rebuilds the table from its stored
    boundary episodes (and, before its first resume state, trains the routed warm start again
    on the stored trajectories: its weights are in no checkpoint)."""
    config = s.config
    cfg = config.boundary
    router = config.router
    assert cfg is not None and isinstance(router, DelegateRouterConfig)
    trained = config.trained_model_name()
    assert trained is not None and s.routing is not None
    metric = config.rewards.success_metric
    if STAGE in s.progress.stages:
        runs = s.stored.evaluations
        table = boundary_table(
            runs.get(CHEAP, []), runs.get(EXPENSIVE, []), metric, cfg.taxonomy.solve_threshold
        )
        if s.progress.resume is None and runs.get(SFT):
            version = await _train_routed(s, runs[SFT], version)
        return table, version
    train = list(s.suite.items("train"))
    extra = train_items(train, cfg.n_items, config.seed + STAGE_SEED)
    items = list({it.id: it for it in [*rl_items, *extra]}.values())
    sides = []
    for tag, model, temperature in (
        (CHEAP, trained, config.sampling.temperature),
        (EXPENSIVE, router.to, config.sampling.temperature),
    ):
        r = s.rollouts(temperature, FixedRouter(model))
        episodes = await rollout(r, items, cfg.runs, -1, config.seed + STAGE_SEED, tag)
        episodes = await grade(s.suite, items, episodes, r.concurrency, r.metrics)
        store_episodes(s.store, episodes)
        s.evaluations[tag] = episodes
        sides.append(episodes)
    table = boundary_table(sides[0], sides[1], metric, cfg.taxonomy.solve_threshold)
    counts = {d: sum(t.difficulty == d for t in table.values()) for d in Difficulty}
    s.console.print(
        f"[bold]boundary[/]: {len(items)} tasks x {cfg.runs} runs of each boundary policy: "
        + ", ".join(f"{n} {d}" for d, n in counts.items())
    )
    if cfg.sft_epochs:
        chosen = await _routed_trajectories(s, extra, table, sides[0])
        store_episodes(s.store, chosen)
        s.evaluations[SFT] = chosen
        version = await _train_routed(s, chosen, version)
    s.progress = mark(config.run_dir, s.progress, STAGE)
    return table, version


async def _routed_trajectories(
    s: Session,
    items: Sequence[TaskItem],
    table: Mapping[str, TaskBoundary],
    cheap: Sequence[Episode],
) -> list[Episode]:
    """One warm-start trajectory per Easy or Hard task of `items` (module docstring, item 2),
    graded, with its SFT weights set."""
    config = s.config
    router = config.router
    assert isinstance(router, DelegateRouterConfig)
    metric = config.rewards.success_metric
    easy = {Difficulty.EASY, Difficulty.INVERTED}
    chosen: list[Episode] = []
    wins: dict[str, list[Episode]] = {}
    for e in cheap:
        if _success(e, metric) >= 1.0:
            wins.setdefault(e.task_id, []).append(e)
    for it in items:
        if table[it.id].difficulty in easy and it.id in wins:
            chosen.append(sft_targets(cheapest(wins[it.id])))
    hard = [it for it in items if table[it.id].difficulty == Difficulty.HARD]
    if hard:
        eot = str(s.tokenizer.convert_ids_to_tokens(s.renderer.end_of_turn_id()))
        fmt = s.renderer.tool_format

        def plays(item: TaskItem) -> Policy:
            replies = iter(delegating_replies(s.suite, item, fmt, eot, router.tool_name))
            return ScriptedPolicy(lambda _: next(replies, eot), s.renderer.tokenizer)

        r = dataclasses.replace(s.rollouts(0.0), policy_for=plays)
        episodes = await rollout(r, hard, 1, -1, config.seed + STAGE_SEED, f"{SFT}-draft")
        episodes = await grade(s.suite, hard, episodes, r.concurrency, r.metrics)
        chosen += [sft_targets(e) for e in episodes if _success(e, metric) >= 1.0]
    # Stored under the stage's tag, whatever group they were run in.
    return [
        e.model_copy(update={"group_id": f"{SFT}/{e.task_id}", "episode_id": f"{SFT}/{e.task_id}"})
        for e in chosen
    ]


async def _train_routed(s: Session, episodes: Sequence[Episode], version: int) -> int:
    """The routed warm start: SFT on `episodes` with a learner of its own; the policy is
    paused meanwhile and resumes at the new version."""
    cfg = s.config.boundary
    assert cfg is not None
    ws = WarmStartConfig(
        epochs=cfg.sft_epochs, batch_episodes=cfg.sft_batch_episodes, lr=cfg.sft_lr
    )
    learner = s.new_learner(sft_learner_config(s.config.learner, ws), version)
    await s.sync.begin_update()
    try:
        rows = await asyncio.to_thread(train_on, learner, list(episodes), ws, s.config.seed)
        learner.merge_adapters()
    finally:
        await s.sync.end_update(learner.version)
    nll = [r["nll"] for r in rows if "nll" in r]
    s.console.print(
        f"[bold]boundary[/]: routed warm start on {len(episodes)} trajectories, {len(rows)} "
        + (f"steps, nll {nll[0]:.3f} -> {nll[-1]:.3f}" if nll else "steps")
    )
    return learner.version


async def boundary_stage(s: Session, version: int) -> int:
    """The stage on the RL steps' items (`Session.rl_plan`); its table then scores the RL
    steps (`Session.score`). Returns the version RL continues from."""
    cfg = s.config
    assert cfg.boundary is not None
    items = list({it.id: it for step in s.rl_plan() for it in step}.values())
    table, version = await run_boundary_stage(s, items, version)
    boundary, metric = cfg.boundary, cfg.rewards.success_metric
    s.score = lambda episodes: bopo_scored(episodes, table, boundary, metric)
    return version
