"""Warm start: supervised fine-tuning on trajectories, before RL (`turnrl sft`, and the
`warm_start` stage of `turnrl train`).

A 135M model that never calls a tool gives RL nothing to reinforce: every rollout of a search
task answers from memory, and the group's rewards say nothing about searching. Cloning
trajectories that do use the tools first (behaviour cloning, then RL: the recipe of
DeepSeek-R1's cold start, arXiv 2501.12948, and of most agent-RL papers) puts tool use into
the policy's samples, where RL can then weigh it.

The data path:
- **collect** episodes from the configured sources (`turnrl.sft_config`): the suite's oracle
  on train items, the policy's own successes (rejection sampling), or a stored run's episodes,
  filtered. All of them are real episodes: run through the runner, the tools and the grader,
  so the observations are what the tools return.
- **check evidence**: for suites whose answers are text, an episode whose answer no tool
  output supported is dropped (or flagged): cloning an answer the observations did not contain
  teaches the model to guess.
- **train** `Learner.sft_step` on the stored ids: every turn of a kept episode gets advantage
  1.0 (its weight in the NLL), except malformed turns (None: context, not a target); prompts,
  observations and few-shot examples are never targets.
- **store** the kept episodes and the per-step losses in the run folder's `warm_start/`
  (a run store of its own), and the weights in `checkpoints/warm_start/`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from turnrl.agent.policy import Policy
from turnrl.agent.records import Episode
from turnrl.agent.store import RunStore
from turnrl.loop import Rollouts, grade, rollout
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import ConstantLR, LearnerConfig
from turnrl.rl.rewards import metric
from turnrl.sft_config import OracleSource, RunSource, WarmStartConfig
from turnrl.tasks.base import TaskItem, TaskSuite
from turnrl.tasks.grading import normalize_answer

WARM_START_DIR = "warm_start"
"""The run folder's sub-folder that holds the warm start's episodes and losses."""


@dataclass(frozen=True)
class WarmStartData:
    """The episodes a warm start trains on, and what was left out."""

    episodes: list[Episode]
    """Kept episodes, each turn's `advantage` set to its SFT weight (1.0, or None for a
    malformed turn)."""
    collected: dict[str, int]
    """Episodes collected per source kind, before filtering."""
    failed: int
    """Collected episodes that did not succeed (dropped)."""
    unsupported: int
    """Successful episodes whose answer no observation supported (dropped under
    `evidence: require`, kept under `flag`)."""


@dataclass
class WarmStartReport:
    """What one warm start did."""

    data: WarmStartData
    rows: list[dict[str, float]] = field(default_factory=list)
    """Per optimizer step: epoch, nll, n_tokens, grad_norm, seconds."""
    collect_s: float = 0.0
    train_s: float = 0.0
    version: int = 0
    """The learner's version after the warm start (its optimizer steps)."""


def succeeded(episode: Episode, success_metric: str) -> bool:
    """Whether the graded `episode` solved its item (`success_metric` reaches 1)."""
    return metric(episode, success_metric) >= 1.0


def answer_supported(
    episode: Episode, golds: Sequence[str], normalize: Callable[[str], str] = normalize_answer
) -> bool:
    """Whether a gold answer occurs, as whole words after `normalize`, in a tool output the
    agent received before the turn that gave its final answer: the evidence the answer rests
    on. An episode with no answer is unsupported."""
    needles = [f" {g} " for g in (normalize(x) for x in golds) if g]
    for turn in episode.turns:
        if turn.answer is not None and turn.answer == episode.answer:
            return False
        hay = f" {normalize(' '.join(r.text for r in turn.tool_results))} "
        if any(n in hay for n in needles):
            return True
    return False


def cheapest(episodes: Sequence[Episode]) -> Episode:
    """The episode with the fewest tool calls, then the fewest sampled tokens (first wins)."""
    return min(episodes, key=lambda e: (e.n_tool_calls, e.n_completion_tokens))


def sft_targets(episode: Episode) -> Episode:
    """`episode` with every turn's SFT weight in `advantage`: 1.0 for a well-formed turn the
    policy (or oracle) produced, None for a malformed or replayed turn (kept as context)."""
    turns = [
        t.model_copy(
            update={"advantage": None if t.format_error is not None or t.context_only else 1.0}
        )
        for t in episode.turns
    ]
    return episode.model_copy(update={"turns": turns})


def train_items(items: Sequence[TaskItem], n: int | None, seed: int) -> list[TaskItem]:
    """The first `n` (all when None) of a seeded shuffle of `items`."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order if n is None else order[:n]


def filter_successes(episodes: Sequence[Episode], keep: str, success_metric: str) -> list[Episode]:
    """Successes of `episodes`: all of them (`all`, `successes`), or the cheapest one per item
    (`best`, `cheapest_success`), in first-seen item order."""
    wins = [e for e in episodes if succeeded(e, success_metric)]
    if keep in ("all", "successes"):
        return wins
    by_item: dict[str, list[Episode]] = {}
    for e in wins:
        by_item.setdefault(e.task_id, []).append(e)
    return [cheapest(group) for group in by_item.values()]


def batches(episodes: Sequence[Episode], size: int, epochs: int, seed: int) -> list[list[Episode]]:
    """`epochs` passes over `episodes`, each in a fresh seeded order, cut into `size`-episode
    batches (the last of a pass may be smaller)."""
    rng = random.Random(seed)
    out = []
    for _ in range(epochs):
        order = list(episodes)
        rng.shuffle(order)
        out += [order[i : i + size] for i in range(0, len(order), size)]
    return out


def train_on(
    learner: Learner,
    episodes: Sequence[Episode],
    cfg: WarmStartConfig,
    seed: int,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """`cfg.epochs` passes of `Learner.sft_step` over `episodes` (SFT weights already in their
    turns' `advantage`); returns one metrics row per optimizer step."""
    rows = []
    plan = batches(episodes, cfg.batch_episodes, cfg.epochs, seed)
    per_epoch = max(1, len(plan) // cfg.epochs)
    for i, batch in enumerate(plan):
        result = learner.sft_step(batch)
        row = {"sft_step": float(i), "epoch": float(i // per_epoch), **result.scalars}
        rows.append(row)
        if on_step is not None:
            on_step(row)
    return rows


# --- collection: the sources ---------------------------------------------------------------


async def collect(
    cfg: WarmStartConfig,
    *,
    rollouts_at: Callable[[float], Rollouts],
    oracle: Callable[[TaskItem], Policy] | None,
    suite: TaskSuite,
    temperature: float,
    seed: int,
    success_metric: str,
    answer_in_observations: bool,
) -> WarmStartData:
    """Successful, graded episodes from every source of `cfg`, evidence-checked, with their
    SFT weights set. `rollouts_at(t)` gives the rollout stage at temperature `t` with the
    run's policy; `oracle` gives each item its oracle (None: the suite has none)."""
    train = list(suite.items("train"))
    answers = {it.id: it.answers for split in ("train", "test") for it in suite.items(split)}
    kept: list[Episode] = []
    collected: dict[str, int] = {}
    failed = unsupported = 0
    for i, source in enumerate(cfg.sources):
        keep: str
        if isinstance(source, RunSource):
            episodes = _stored_episodes(source, {it.id for it in train})
            keep = source.keep
        else:
            items = train_items(train, source.n_items, seed + i)
            if isinstance(source, OracleSource):
                if oracle is None:
                    raise ValueError(f"warm_start: task {suite.name!r} has no oracle")
                r = dataclasses.replace(rollouts_at(0.0), policy_for=oracle)
                group, keep, tag = 1, "all", "oracle"
            else:
                t = temperature if source.temperature is None else source.temperature
                r = rollouts_at(t)
                group, keep, tag = source.samples, source.keep, "rejection"
            episodes = await rollout(r, items, group, -1, seed + i, f"warm/{tag}{i}")
            episodes = await grade(suite, items, episodes, r.concurrency, r.metrics)
        collected[source.kind] = collected.get(source.kind, 0) + len(episodes)
        wins = filter_successes(episodes, keep, success_metric)
        failed += sum(not succeeded(e, success_metric) for e in episodes)
        for e in wins:
            supported = not answer_in_observations or answer_supported(
                e, answers.get(e.task_id, ())
            )
            unsupported += not supported
            if supported or cfg.evidence != "require":
                kept.append(sft_targets(e))
    return WarmStartData(kept, collected, failed, unsupported)


def _stored_episodes(source: RunSource, train_ids: set[str]) -> list[Episode]:
    if not (source.path / "episodes.rec").is_file():
        raise FileNotFoundError(f"warm_start source {source.path}: not a run folder")
    with RunStore.open_readonly(source.path) as run:
        # An API model's turns are its text re-encoded, with placeholder logprobs: not
        # trajectories a model of ours sampled, and never trained on (`Turn.api_usage`).
        episodes = [
            e for e in run.episodes() if e.outcome and all(t.api_usage is None for t in e.turns)
        ]
    if source.split == "train":
        episodes = [e for e in episodes if e.task_id in train_ids]
    return episodes


def store_warm_start(run_dir: Path, report: WarmStartReport, config_yaml: str) -> None:
    """The kept episodes and per-step losses, in `run_dir/warm_start/` (a run store)."""
    with RunStore(run_dir / WARM_START_DIR) as store:
        store.write_config(config_yaml)
        for e in report.data.episodes:
            store.append_episode(e)
        for row in report.rows:
            store.append_metrics(row)


def sft_learner_config(learner: LearnerConfig, cfg: WarmStartConfig) -> LearnerConfig:
    """The run's learner settings for the warm start: its own learning rate and weighting,
    logprobs at temperature 1 (plain NLL), no KL reference, no value head, no PPO epochs, a
    constant learning rate (the RL schedule counts RL's optimizer steps)."""
    return learner.model_copy(
        update={
            "lr": cfg.lr,
            "loss_weighting": cfg.weighting,
            "temperature": 1.0,
            "kl_coef": 0.0,
            "value_head": None,
            "lr_schedule": ConstantLR(),
        }
    )
