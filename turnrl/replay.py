"""`turnrl replay RUN`: reload a stored run and recompute grades, turn rewards and advantages
from what the episodes store, without the model.

With the run's own config the recomputed advantages must equal the stored ones bit for bit
(the estimators are pure functions of stored data); the report says how many differ. With a
different estimator or reward setting, the same command re-scores the run.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from turnrl.agent.chat import HFTokenizer
from turnrl.agent.model import load_model, load_tokenizer, tokenizer_dir
from turnrl.agent.records import Episode
from turnrl.agent.store import RunStore
from turnrl.config import RunConfig
from turnrl.report import summarize
from turnrl.rl.advantages import estimator_config
from turnrl.rl.credit import add_gold_signals
from turnrl.rl.reward_config import RewardConfig, SaturationReward, needs_gold_probs
from turnrl.rl.scoring import score
from turnrl.rollout import grade_all
from turnrl.sandboxes.config import open_sandbox
from turnrl.session import model_dir
from turnrl.suites import build_suite
from turnrl.tasks.base import TaskItem
from turnrl.tasks.grading import normalize_answer


def load_run(run_dir: Path) -> tuple[RunConfig, list[Episode]]:
    config = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    with RunStore.open_readonly(run_dir) as store:
        episodes = list(store.episodes())
    return config, episodes


def _measure(
    config: RunConfig,
    episodes: list[Episode],
    items: dict[str, TaskItem],
    checkpoint: Path | None,
) -> list[Episode]:
    """Episodes with the signals the reward config needs: measured again with `checkpoint`'s
    weights when given, else the stored ones (`gold_seen` is always recomputed: it reads only
    the stored tool outputs)."""
    rewards = config.rewards
    saturation = rewards.get("saturation")
    model = None
    if checkpoint is not None and needs_gold_probs(rewards):
        model = load_model(model_dir(config.model, checkpoint))
    elif needs_gold_probs(rewards):
        missing = [
            e.episode_id
            for e in episodes
            if e.step >= 0 and e.turns and e.gold_prob_initial is None
        ]
        if missing:
            raise ValueError(
                f"{len(missing)} stored episodes have no gold-answer probabilities (e.g. "
                f"{missing[0]}): pass --checkpoint to measure them"
            )
    if saturation is None and model is None:
        return episodes
    path = model_dir(config.model, checkpoint) if checkpoint else tokenizer_dir()
    encode = HFTokenizer(load_tokenizer(path)).encode
    if model is None:
        # Keep the stored probabilities: only `gold_seen` is recomputed.
        rewards = RewardConfig.model_validate(
            {"components": [SaturationReward(threshold=None).model_dump()]}
        )
    train = [e for e in episodes if e.step >= 0]
    measured = add_gold_signals(
        train,
        {task_id: item.answers for task_id, item in items.items()},
        rewards,
        model=model,
        encode=encode,
        normalize=normalize_answer,
        temperature=config.learner.temperature,
        micro_batch_tokens=config.learner.micro_batch_tokens,
    )
    by_id = {e.episode_id: e for e in measured}
    return [by_id.get(e.episode_id, e) for e in episodes]


async def _regrade(
    config: RunConfig, episodes: list[Episode]
) -> tuple[list[dict[str, float]], dict[str, TaskItem]]:
    """Grade every stored answer again (in a sandbox, for suites whose grader runs code)."""
    sandbox = open_sandbox(config.sandbox) if config.task.runs_code else None
    try:
        suite = build_suite(config.task, None, sandbox, chat=config.chat)
        items = {it.id: it for split in ("train", "test") for it in suite.items(split)}
        pairs = [(items[e.task_id], e) for e in episodes]
        return await grade_all(suite, pairs, 8, config.task.metrics), items
    finally:
        if sandbox is not None:
            await sandbox.close()


def _scorer(
    config: RunConfig,
    as_run: bool,
    episodes: list[Episode],
    outcomes: dict[str, dict[str, float]],
) -> Callable[[list[Episode]], tuple[list[Episode], list[float]]]:
    """How a step is scored again: as the run did (BoPO's boundary-relative scoring, its
    table rebuilt from the stored boundary runs, regraded), or with the configured rewards
    and estimator (any run, and a BoPO run re-scored with other settings)."""
    boundary = config.boundary
    if boundary is None or not as_run:
        return lambda graded: score(graded, config.rewards, config.train.estimator)
    from turnrl.bopo import CHEAP, EXPENSIVE, bopo_scored, boundary_table

    def side(tag: str) -> list[Episode]:
        return [
            e.model_copy(update={"outcome": outcomes[e.episode_id]})
            for e in episodes
            if e.group_id.startswith(f"{tag}/")
        ]

    metric = config.rewards.success_metric
    table = boundary_table(side(CHEAP), side(EXPENSIVE), metric, boundary.taxonomy.solve_threshold)

    def rescore(graded: list[Episode]) -> tuple[list[Episode], list[float]]:
        scored = bopo_scored(graded, table, boundary, metric)
        return scored.episodes, scored.returns

    return rescore


def replay(
    run_dir: Path,
    estimator: str | dict[str, Any] | None = None,
    outcome_metric: str | None = None,
    reward_weights: dict[str, float] | None = None,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Recompute and compare; returns per-step summaries and the mismatch count.

    `estimator` (a kind or a config dict) and `reward_weights` (component -> weight, replacing
    the run's) re-score the run. Gold-answer probabilities for information gain are the stored
    ones unless `checkpoint` names weights to measure them with (needed when the run did not
    weigh `info_gain` and the new weights do)."""
    config, episodes = load_run(run_dir)
    train_cfg = config.train
    if estimator is not None:
        train_cfg = train_cfg.model_copy(update={"estimator": estimator_config(estimator)})
    rewards = config.rewards
    if outcome_metric is not None:
        rewards = rewards.with_metric(outcome_metric)
    if reward_weights is not None:
        rewards = rewards.reweighted(reward_weights)
    # Validated again as a whole: the new settings must pass the run config's cross-checks
    # (an answer-text reward on a suite without gold answers, a value estimator without a head).
    config = RunConfig.model_validate(
        {**config.model_dump(), "train": train_cfg.model_dump(), "rewards": rewards.model_dump()}
    )
    outcomes, items = asyncio.run(_regrade(config, episodes))
    regraded_by_id = {e.episode_id: o for e, o in zip(episodes, outcomes, strict=True)}
    episodes = _measure(config, episodes, items, checkpoint)

    by_step: dict[int, list[Episode]] = defaultdict(list)
    for e in episodes:
        by_step[e.step].append(e)
    rescore = _scorer(
        config, estimator is None and reward_weights is None, episodes, regraded_by_id
    )
    steps: list[dict[str, float]] = []
    mismatched = compared = regraded = 0
    for step in sorted(by_step):
        stored = by_step[step]
        graded: list[Episode] = []
        for e in stored:
            outcome = regraded_by_id[e.episode_id]
            regraded += outcome != e.outcome
            graded.append(e.model_copy(update={"outcome": outcome}))
        row = {"step": float(step), **summarize(graded)}
        if step >= 0:
            rescored, returns = rescore(graded)
            row["reward"] = sum(returns) / len(returns)
            for old, new in zip(stored, rescored, strict=True):
                for t_old, t_new in zip(old.turns, new.turns, strict=True):
                    compared += 1
                    mismatched += t_old.advantage != t_new.advantage
        steps.append(row)
    return {
        "episodes": len(episodes),
        "steps": steps,
        "turns_compared": compared,
        "advantages_differing": mismatched,
        "grades_differing": regraded,
    }
