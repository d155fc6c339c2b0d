"""PPO's reuse of a rollout batch: several epochs of minibatch updates, each minibatch one
optimizer step, with an optional early stop on the policy's drift (Schulman et al. 2017,
arXiv 1707.06347, Algorithm 1: K epochs of minibatch SGD on the surrogate).

- Minibatches are sets of whole episodes: each epoch shuffles the episode indices with a
  generator seeded from the step (`seed`) and the epoch, and cuts them into `minibatches`
  near-equal parts (fewer when there are fewer episodes). An episode is never split, so its
  turns and its value targets travel together, and the "episode" loss weighting still sees
  every episode whole. Within a part, episodes keep their order in the batch.
- Every update takes the PPO ratio against the *rollout* logprobs stored with the episodes, so
  after the first optimizer step the ratio moves away from 1 and the clip engages.
- Early stop (`target_kl`): after each update, the approximate KL(pi_rollout || pi_theta) on
  the updated minibatch is measured under the new weights with k3, `(r - 1) - log r` with
  `r = pi_theta / pi_rollout` on the rollout's samples (unbiased and >= 0; Schulman,
  "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html), the same estimate as
  `ppo_clip_loss`'s `approx_kl`; above `target_kl` the step's remaining updates are dropped
  (as Stable-Baselines3 and OpenAI Spinning Up do, those against 1.5x their target).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from turnrl.agent.records import Episode
from turnrl.rl.learner_config import LossWeighting

COUNT_KEYS = ("n_tokens", "n_sequences", "n_value_targets")
"""Scalars that count the whole batch (taken once, not averaged over updates)."""
WORK_KEYS = ("n_micro_batches", "n_padded_tokens")
"""Scalars that count work done: summed over the updates, skipped ones included."""


def split_episodes(n: int, parts: int, seed: int) -> list[list[int]]:
    """`0..n-1` shuffled by `seed` and cut into `min(parts, n)` near-equal parts, each sorted;
    one part is all of them in order (no shuffle)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if parts == 1 or n <= 1:
        return [list(range(n))]
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(parts, n)
    size, extra = divmod(n, k)
    out: list[list[int]] = []
    at = 0
    for i in range(k):
        width = size + (1 if i < extra else 0)
        out.append(sorted(order[at : at + width]))
        at += width
    return out


@dataclass(frozen=True)
class Update:
    """One minibatch's accumulation and (unless skipped) optimizer step."""

    skipped: bool
    """No learning signal in the minibatch: no optimizer step was taken."""
    policy_updated: bool
    scalars: dict[str, float]
    epoch: int = 0
    """Which epoch it belongs to (`run_epochs` sets it)."""


@dataclass
class Schedule:
    """What the epochs did: every update in order, and whether the KL stop cut them short."""

    updates: list[Update] = field(default_factory=list)
    early_stopped: bool = False
    kl_after_update: float | None = None
    """The last post-update KL measured (`target_kl` set), None when none was."""


def plan_updates(
    n_episodes: int, epochs: int, minibatches: int, seed: int
) -> list[tuple[int, list[int]]]:
    """Every update of a step in order, `(epoch, episode indices)`: each epoch's episodes
    shuffled by `seed` and the epoch, cut into `minibatches` parts (`split_episodes`)."""
    return [
        (epoch, part)
        for epoch in range(epochs)
        for part in split_episodes(n_episodes, minibatches, seed * epochs + epoch)
    ]


def run_epochs(
    n_episodes: int,
    epochs: int,
    minibatches: int,
    seed: int,
    update: Callable[[list[int]], Update],
    *,
    target_kl: float | None = None,
    kl_after: Callable[[list[int]], float] | None = None,
) -> Schedule:
    """Run `update` on each minibatch (a list of episode indices) of each epoch, in the order
    of `plan_updates`; with `target_kl`, measure `kl_after` on the minibatch after every
    update that moved the policy, except the last, and stop when it exceeds `target_kl`."""
    plan = plan_updates(n_episodes, epochs, minibatches, seed)
    schedule = Schedule()
    for k, (epoch, part) in enumerate(plan):
        done = dataclasses.replace(update(part), epoch=epoch)
        schedule.updates.append(done)
        if target_kl is None or kl_after is None or not done.policy_updated:
            continue
        if k == len(plan) - 1:
            break
        schedule.kl_after_update = kl_after(part)
        if schedule.kl_after_update > target_kl:
            schedule.early_stopped = True
            break
    return schedule


def merge_scalars(schedule: Schedule, counts: dict[str, float], epochs: int) -> dict[str, float]:
    """The step's scalars: `counts` (the whole batch), work summed over the updates, every
    other scalar averaged over the optimizer steps that ran, `n_optimizer_steps`; with
    several epochs also `clip_frac_last_epoch` and `approx_kl_last_epoch` (the mean over the
    last epoch that ran); with a KL stop measured, `early_stopped` and `kl_after_update`."""
    out = dict(counts)
    for key in WORK_KEYS:
        out[key] = sum(u.scalars.get(key, 0.0) for u in schedule.updates)
    steps = [u for u in schedule.updates if not u.skipped]
    out |= _means(steps)
    out["n_optimizer_steps"] = float(len(steps))
    if epochs > 1 and steps:
        last = [u for u in steps if u.epoch == steps[-1].epoch]
        means = _means(last)
        for key in ("clip_frac", "approx_kl"):
            if key in means:
                out[f"{key}_last_epoch"] = means[key]
    if schedule.kl_after_update is not None:
        out["early_stopped"] = float(schedule.early_stopped)
        out["kl_after_update"] = schedule.kl_after_update
    return out


def _means(updates: Sequence[Update]) -> dict[str, float]:
    sums: dict[str, float] = {}
    seen: dict[str, int] = {}
    for u in updates:
        for key, value in u.scalars.items():
            if key in COUNT_KEYS or key in WORK_KEYS or key == "seconds":
                continue
            sums[key] = sums.get(key, 0.0) + value
            seen[key] = seen.get(key, 0) + 1
    return {key: sums[key] / seen[key] for key in sums}


def batch_counts(
    episodes: Sequence[Episode], value_targets: Sequence[Sequence[float | None]] | None
) -> dict[str, float]:
    """The whole batch's counts (what `micro_batches` would train), however it is split."""
    n_tokens = sum(
        len(t.completion_ids)
        for e in episodes
        for t in e.turns
        if t.advantage is not None and not t.context_only
    )
    counts = {"n_tokens": float(n_tokens), "n_sequences": float(len(episodes))}
    if value_targets is not None:
        counts["n_value_targets"] = float(sum(v is not None for row in value_targets for v in row))
    return counts


def trained_size(episodes: Sequence[Episode], weighting: LossWeighting) -> int:
    """What a step's loss is a mean over: trained tokens (`"token"`), or episodes with a
    trained token (`"episode"`)."""
    sizes = [
        sum(
            len(t.completion_ids) for t in e.turns if t.advantage is not None and not t.context_only
        )
        for e in episodes
    ]
    return sum(sizes) if weighting == "token" else sum(n > 0 for n in sizes)
