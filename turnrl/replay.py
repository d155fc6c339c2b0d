"""`turnrl replay RUN`: reload a stored run and recompute grades, turn rewards and advantages
from what the episodes store, without the model.

With the run's own config the recomputed advantages must equal the stored ones bit for bit
(the estimators are pure functions of stored data); the report says how many differ. With a
different estimator or reward setting, the same command re-scores the run.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from turnrl.agent.records import Episode
from turnrl.agent.store import RunStore
from turnrl.config import RunConfig
from turnrl.report import summarize
from turnrl.rl.advantages import Estimator
from turnrl.rl.rollout import grade_all
from turnrl.rl.scoring import score
from turnrl.sandboxes.config import open_sandbox
from turnrl.suites import build_suite, needs_sandbox


def load_run(run_dir: Path) -> tuple[RunConfig, list[Episode]]:
    config = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    with RunStore.open_readonly(run_dir) as store:
        episodes = list(store.episodes())
    return config, episodes


async def _regrade(config: RunConfig, episodes: list[Episode]) -> list[dict[str, float]]:
    """Grade every stored answer again (in a sandbox, for suites whose grader runs code)."""
    sandbox = open_sandbox(config.sandbox) if needs_sandbox(config.task) else None
    try:
        suite = build_suite(config.task, None, sandbox)
        items = {it.id: it for split in ("train", "test") for it in suite.items(split)}
        pairs = [(items[e.task_id], e.answer) for e in episodes]
        return await grade_all(suite, pairs, concurrency=8)
    finally:
        if sandbox is not None:
            await sandbox.close()


def replay(
    run_dir: Path, estimator: Estimator | None = None, outcome_metric: str | None = None
) -> dict[str, Any]:
    """Recompute and compare; returns per-step summaries and the mismatch count."""
    config, episodes = load_run(run_dir)
    train_cfg = config.train
    if estimator is not None:
        train_cfg = train_cfg.model_copy(update={"estimator": estimator})
    rewards = config.rewards
    if outcome_metric is not None:
        rewards = rewards.model_copy(update={"outcome_metric": outcome_metric})
    config = config.model_copy(update={"train": train_cfg, "rewards": rewards})
    outcomes = asyncio.run(_regrade(config, episodes))
    regraded_by_id = {e.episode_id: o for e, o in zip(episodes, outcomes, strict=True)}

    by_step: dict[int, list[Episode]] = defaultdict(list)
    for e in episodes:
        by_step[e.step].append(e)
    steps: list[dict[str, float]] = []
    mismatched = compared = regraded = 0
    for step in sorted(by_step):
        stored = by_step[step]
        graded = []
        for e in stored:
            outcome = regraded_by_id[e.episode_id]
            regraded += outcome != e.outcome
            graded.append(e.model_copy(update={"outcome": outcome}))
        row = {"step": float(step), **summarize(graded)}
        if step >= 0:
            rescored, returns = score(graded, config.rewards, config.train.estimator)
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
