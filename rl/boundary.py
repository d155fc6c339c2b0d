"""Boundary-guided training for a per-step cheap/expensive router (BoPO), as pure functions.

Zhang, Xia, Zhang, Madrigal, Mallick, Kessler, Ruehle, Rajmohan, "Budget-Aware Agentic Routing
via Boundary-Guided Training", arXiv 2602.21227 (Feb 2026). At every step of an episode a
router picks the cheap model or the expensive one; the objective trades success against cost
(soft budget: E[success - lambda * cost]). Two *boundary policies* run on each training task,
always-cheap and always-expensive, K times each (K = 5 in the paper). They give:

1. A difficulty taxonomy (`classify_difficulty`): Easy (always-cheap solves it), Hard (only
   always-expensive does), Intractable (neither does). A boundary policy "solves" a task when
   its success rate over its K runs is at least `solve_threshold` (ties count as solved). The
   case the paper's three classes leave out, cheap solves and expensive fails, is its own
   class, `Difficulty.INVERTED`, handled as Easy downstream.
2. Warm-start (SFT) data (`select_warm_start`), one trajectory per task by its class: Easy
   (and Inverted) tasks are labelled with the cheapest successful always-cheap run;
   Intractable ones with the cheapest always-cheap run, failed or not, which teaches the
   router to fail cheaply; Hard ones with the cheapest successful run among N rollouts drawn
   at stratified mixes P(expensive) = k / N (`stratified_large_probs`) plus the boundary runs,
   tau* = argmin_{tau successful} cost(tau). Ties on cost go to the run with the lower
   P(expensive), then the lower index. A class can be capped to a number of tasks, drawn
   uniformly from a given `np.random.Generator`.
3. The boundary-relative reward (`boundary_relative_rewards`) of a routed trajectory on task g:
   R = s + beta * s * [g is Hard] - lambda * C_norm, where s is its success (0/1, or a score in
   [0, 1]) and C_norm = clip((C - C_lo_g) / (C_hi_g - C_lo_g), 0, 1) places its cost C between
   the cheaper (C_lo) and the dearer (C_hi) of the two boundary policies' mean costs on the
   task. The cost penalty is thereby scaled per task: the same lambda means "what fraction of
   the way from the cheap boundary to the expensive one did this run spend".
4. The reference-guided advantage (`reference_guided_advantages`): GRPO (Shao et al. 2024, arXiv
   2402.03300) whose group mean and std also count a reference reward, the better boundary
   policy's reward on the task (`boundary_reference_rewards`), with weight w:
   mu_g = (sum_i R_i + w R_ref) / (n + w), sigma_g^2 = (sum_i (R_i - mu_g)^2 + w (R_ref -
   mu_g)^2) / (n + w), A_i = (R_i - mu_g) / (sigma_g + eps). The reference gets no gradient.
   Why: under sparse terminal reward a group of all-cheap, all-failed rollouts on a Hard task
   is constant, so plain GRPO gives it zero advantage; and in a group of failures the cheapest
   failure has the highest reward, so plain GRPO pushes toward it. With the always-expensive
   run's reward (it succeeds) in the baseline, every failure on that task sits below the
   baseline and is pushed down: the "always cheap and fail" policy is no longer a fixed point.

Provenance. While this module was written, only the paper's abstract was readable in the
stored copy; the component names above (Easy/Hard/Intractable from K = 5 boundary runs, P(large)
= k/N strata with N = 10-20, cheapest successful trajectory, R = r_success + r_hard - lambda *
C_norm, boundary references against the always-cheap collapse) come from summaries of the paper.
The exact forms of C_norm, r_hard and the reference-guided advantage, the paper's equation
numbers, and its default lambda are not checked against the text; the forms here are this
module's choices, stated so they can be compared with the paper and changed.

Choices where the paper is silent (or unread):
- A task's boundary cost is the mean cost of that boundary policy's runs on it.
- C_norm is clipped to [0, 1]: a run cheaper than the cheap boundary earns no bonus, one dearer
  than the expensive boundary pays the full penalty and no more, so R stays in [-lambda, 1 +
  beta] on every task. If the expensive boundary is the cheaper one on a task, the two swap.
- Equal boundary costs (no span): C_norm = clip((C - C_lo) / C_lo, 0, 1), the excess over the
  shared boundary cost as a fraction of it; both zero (free models): C_norm = 0.
- Missing boundary data (NaN rates or costs) or negative costs raise `ValueError`: a task
  without both boundaries cannot be classified, rewarded or referenced, and that is a pipeline
  bug to surface, not to paper over.
- Intractable tasks get no success or bonus term, only the cost term: failing cheaply is their
  best reward, which is what their warm-start label teaches.
- A group whose reference is NaN (no boundary data) falls back to plain GRPO; a group with
  zero std (all rewards equal, reference included) gets zero advantage. Population std, as
  `turnrl.rl.group_advantages.grpo`.

Shapes: `N` routed trajectories, `G` groups (tasks; `group_N` is dense 0..G-1), `T` tasks, `K`
candidate trajectories, `R` rollouts. numpy float64, reductions by `np.bincount` in element
order (as `turnrl.rl.group_advantages`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from turnrl.rl.boundary_config import Difficulty
from turnrl.rl.group_advantages import divide, segment_sum

Floats: TypeAlias = npt.NDArray[np.float64]
Ints: TypeAlias = npt.NDArray[np.int64]
Bools: TypeAlias = npt.NDArray[np.bool_]

__all__ = [
    "BoundaryRewards",
    "Candidate",
    "Difficulty",
    "WarmStartSelection",
    "boundary_reference_rewards",
    "boundary_relative_rewards",
    "boundary_success_rates",
    "classify_difficulty",
    "normalized_cost",
    "reference_guided_advantages",
    "select_warm_start",
    "stratified_large_probs",
]

# `classify_difficulty`'s class by code, code = 2 * cheap_solves + expensive_solves.
_BY_CODE = (Difficulty.INTRACTABLE, Difficulty.HARD, Difficulty.INVERTED, Difficulty.EASY)


# ---- difficulty taxonomy ---------------------------------------------------------------------


def boundary_success_rates(
    success_K: npt.ArrayLike, task_K: npt.ArrayLike, num_tasks: int
) -> Floats:
    """Each task's success rate over one boundary policy's runs on it (`task_K` dense
    0..num_tasks-1); NaN for a task with no runs."""
    success = _floats(success_K, "success_K")
    task = _group_index(task_K, num_tasks, success)
    runs_T = np.bincount(task, minlength=num_tasks).astype(np.float64)
    rate_T: Floats = np.full(num_tasks, np.nan)
    np.divide(segment_sum(success, task, num_tasks), runs_T, out=rate_T, where=runs_T > 0)
    return rate_T


def classify_difficulty(
    cheap_rate_T: npt.ArrayLike, expensive_rate_T: npt.ArrayLike, solve_threshold: float = 0.5
) -> tuple[Difficulty, ...]:
    """Each task's class from the boundary policies' success rates on it: a policy solves the
    task when its rate is >= `solve_threshold`. Raises on a NaN rate (a missing boundary)."""
    if not 0 < solve_threshold <= 1:
        raise ValueError(f"solve_threshold must be in (0, 1], got {solve_threshold}")
    cheap = _finite(cheap_rate_T, "cheap_rate_T")
    expensive = _finite(expensive_rate_T, "expensive_rate_T")
    _same_length(cheap, expensive)
    code_T = 2 * (cheap >= solve_threshold) + (expensive >= solve_threshold)
    return tuple(_BY_CODE[c] for c in code_T.tolist())


# ---- warm-start data ------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One trajectory that may become a warm-start (SFT) example for its task."""

    task_id: str
    """The task it ran on."""
    index: int
    """Its id in the caller's store; unique across the candidates."""
    success: bool
    """Whether it solved the task."""
    cost: float
    """Its total cost, in the unit of the boundary costs (>= 0)."""
    large_prob: float
    """P(expensive) of the stratum that drew it: 0 for an always-cheap run, 1 for an
    always-expensive one, k / N for the k-th stratified rollout."""


@dataclass(frozen=True)
class WarmStartSelection:
    """The chosen warm-start trajectories, one per kept task."""

    indices: tuple[int, ...]
    """`Candidate.index` of each chosen trajectory, in the order of `difficulty_by_task`."""
    task_ids: tuple[str, ...]
    """The task of each chosen trajectory (parallel to `indices`)."""
    dropped_task_ids: tuple[str, ...]
    """Tasks with no eligible candidate (a Hard task none of whose runs succeeded, or a task
    with no always-cheap run where its class needs one)."""
    unsampled_task_ids: tuple[str, ...]
    """Tasks with an eligible candidate left out by their class's cap."""


def stratified_large_probs(num_rollouts: int) -> Floats:
    """P(expensive) of each stratified rollout on a Hard task: k / N for k = 1..N. The sweep
    starts above 0 because the always-cheap boundary runs already cover P = 0; it ends at 1,
    one more always-expensive sample."""
    if num_rollouts < 1:
        raise ValueError(f"num_rollouts must be >= 1, got {num_rollouts}")
    return np.arange(1, num_rollouts + 1, dtype=np.float64) / num_rollouts


def select_warm_start(
    candidates: Sequence[Candidate],
    difficulty_by_task: Mapping[str, Difficulty],
    *,
    tasks_per_difficulty: Mapping[Difficulty, int] | None = None,
    rng: np.random.Generator | None = None,
) -> WarmStartSelection:
    """One warm-start trajectory per task, chosen by its class (module docstring, item 2),
    then each class capped to `tasks_per_difficulty[class]` tasks drawn uniformly with `rng`.
    Every candidate's task must be in `difficulty_by_task`."""
    caps = dict(tasks_per_difficulty or {})
    if any(cap < 0 for cap in caps.values()):
        raise ValueError(f"tasks_per_difficulty must be >= 0: {caps}")
    order = list(difficulty_by_task)
    position = {task: t for t, task in enumerate(order)}
    unknown = sorted({c.task_id for c in candidates} - position.keys())
    if unknown:
        raise ValueError(f"candidates for tasks without a difficulty: {unknown}")
    index_K = np.array([c.index for c in candidates], np.int64)
    if np.unique(index_K).size != index_K.size:
        raise ValueError("candidate indices must be unique")
    task_K = np.array([position[c.task_id] for c in candidates], np.int64)
    success_K = np.array([c.success for c in candidates], np.bool_)
    cost_K = _nonnegative([c.cost for c in candidates], "cost")
    large_K = _finite([c.large_prob for c in candidates], "large_prob")
    if np.any((large_K < 0) | (large_K > 1)):
        raise ValueError("large_prob must be in [0, 1]")

    kind_K = np.array([difficulty_by_task[order[t]] for t in task_K.tolist()], dtype=object)
    cheap_K = large_K == 0
    needs_cheap_win_K = (kind_K == Difficulty.EASY) | (kind_K == Difficulty.INVERTED)
    eligible_K = np.where(
        needs_cheap_win_K,
        success_K & cheap_K,
        np.where(kind_K == Difficulty.HARD, success_K, cheap_K),
    ).astype(np.bool_)

    # Sort the eligible ones by (task, cost, P(expensive), index); the first of each task wins.
    pos = np.flatnonzero(eligible_K)
    ranked = pos[np.lexsort((index_K[pos], large_K[pos], cost_K[pos], task_K[pos]))]
    first = np.ones(ranked.size, np.bool_)
    first[1:] = task_K[ranked[1:]] != task_K[ranked[:-1]]
    winner_by_task: dict[int, int] = dict(
        zip(task_K[ranked[first]].tolist(), ranked[first].tolist(), strict=True)
    )

    kept = set(winner_by_task)
    unsampled: set[int] = set()
    for kind in Difficulty:
        cap = caps.get(kind)
        members = [t for t in winner_by_task if difficulty_by_task[order[t]] == kind]
        if cap is None or len(members) <= cap:
            continue
        if rng is None:
            raise ValueError(f"capping {kind} at {cap} of {len(members)} tasks needs an rng")
        drawn = {members[i] for i in rng.choice(len(members), size=cap, replace=False).tolist()}
        unsampled.update(set(members) - drawn)
    kept -= unsampled

    chosen = sorted(kept)
    return WarmStartSelection(
        indices=tuple(int(index_K[winner_by_task[t]]) for t in chosen),
        task_ids=tuple(order[t] for t in chosen),
        dropped_task_ids=tuple(order[t] for t in range(len(order)) if t not in winner_by_task),
        unsampled_task_ids=tuple(order[t] for t in sorted(unsampled)),
    )


# ---- boundary-relative reward ---------------------------------------------------------------


@dataclass(frozen=True)
class BoundaryRewards:
    """A batch's boundary-relative rewards, by component (summed in `total_N`)."""

    success_N: Floats
    """s, each trajectory's success (0/1 or a score in [0, 1])."""
    hard_bonus_N: Floats
    """beta * s on a Hard task, else 0 (the paper's `r_hard`)."""
    cost_norm_N: Floats
    """C_norm in [0, 1]: the cost placed between the task's cheaper and dearer boundary."""
    total_N: Floats
    """R = s + beta * s * [Hard] - lambda * C_norm."""


def normalized_cost(
    cost_N: npt.ArrayLike, cheap_cost_N: npt.ArrayLike, expensive_cost_N: npt.ArrayLike
) -> Floats:
    """C_norm = clip((C - C_lo) / (C_hi - C_lo), 0, 1) with C_lo, C_hi the lesser and greater
    boundary cost; (C - C_lo) / C_lo where they are equal; 0 where both are 0."""
    cost = _nonnegative(cost_N, "cost_N")
    cheap = _nonnegative(cheap_cost_N, "cheap_cost")
    expensive = _nonnegative(expensive_cost_N, "expensive_cost")
    low, high = np.minimum(cheap, expensive), np.maximum(cheap, expensive)
    span = high - low
    scale = np.where(span > 0, span, high)
    return np.clip(divide(cost - low, scale, scale > 0), 0.0, 1.0)


def boundary_relative_rewards(
    success_N: npt.ArrayLike,
    cost_N: npt.ArrayLike,
    group_N: npt.ArrayLike,
    cheap_cost_G: npt.ArrayLike,
    expensive_cost_G: npt.ArrayLike,
    hard_G: npt.ArrayLike,
    *,
    cost_weight: float,
    hard_bonus: float,
) -> BoundaryRewards:
    """R = s + hard_bonus * s * [Hard] - cost_weight * C_norm for each routed trajectory, its
    task's boundary costs (mean cost of each boundary policy's runs) gathered by `group_N`."""
    success = _finite(success_N, "success_N")
    if np.any((success < 0) | (success > 1)):
        raise ValueError("success_N must be in [0, 1]")
    cost = _floats(cost_N, "cost_N")
    hard = _bools(hard_G, "hard_G")
    cheap = _floats(cheap_cost_G, "cheap_cost_G")
    expensive = _floats(expensive_cost_G, "expensive_cost_G")
    _same_length(cheap, expensive, hard)
    group = _group_index(group_N, cheap.size, success)
    _same_length(success, cost)
    cost_norm = normalized_cost(cost, cheap[group], expensive[group])
    bonus = hard_bonus * success * hard[group]
    return BoundaryRewards(
        success_N=success,
        hard_bonus_N=bonus,
        cost_norm_N=cost_norm,
        total_N=success + bonus - cost_weight * cost_norm,
    )


# ---- reference-guided advantage -------------------------------------------------------------


def boundary_reference_rewards(
    cheap_success_G: npt.ArrayLike,
    expensive_success_G: npt.ArrayLike,
    cheap_cost_G: npt.ArrayLike,
    expensive_cost_G: npt.ArrayLike,
    hard_G: npt.ArrayLike,
    *,
    cost_weight: float,
    hard_bonus: float,
) -> Floats:
    """Each task's reference reward: the greater of the two boundary policies' expected
    boundary-relative rewards (success rate, mean cost) under the routed trajectories' reward."""
    cheap_success = _finite(cheap_success_G, "cheap_success_G")
    expensive_success = _finite(expensive_success_G, "expensive_success_G")
    cheap = _nonnegative(cheap_cost_G, "cheap_cost_G")
    expensive = _nonnegative(expensive_cost_G, "expensive_cost_G")
    hard = _bools(hard_G, "hard_G")
    _same_length(cheap_success, expensive_success, cheap, expensive, hard)
    bonus = 1.0 + hard_bonus * hard
    cheap_reward = cheap_success * bonus - cost_weight * normalized_cost(cheap, cheap, expensive)
    expensive_reward = expensive_success * bonus - cost_weight * normalized_cost(
        expensive, cheap, expensive
    )
    return np.maximum(cheap_reward, expensive_reward)


def reference_guided_advantages(
    rewards_N: npt.ArrayLike,
    group_N: npt.ArrayLike,
    reference_reward_G: npt.ArrayLike,
    *,
    reference_weight: float = 1.0,
    eps: float = 1e-6,
) -> Floats:
    """GRPO advantages whose group mean and population std count the group's reference
    reward as `reference_weight` extra members: (R_i - mu_g) / (sigma_g + eps); 0 where
    sigma_g = 0. A NaN reference leaves its group plain GRPO."""
    if reference_weight < 0:
        raise ValueError(f"reference_weight must be >= 0, got {reference_weight}")
    rewards = _finite(rewards_N, "rewards_N")
    reference = _floats(reference_reward_G, "reference_reward_G")
    if np.any(np.isinf(reference)):
        raise ValueError("reference_reward_G must be finite or NaN")
    num_groups = reference.size
    group = _group_index(group_N, num_groups, rewards)
    weight_G = np.where(np.isnan(reference), 0.0, reference_weight)
    reference = np.nan_to_num(reference, nan=0.0)
    count_G = np.bincount(group, minlength=num_groups).astype(np.float64) + weight_G
    total_G = segment_sum(rewards, group, num_groups) + weight_G * reference
    mean_G = divide(total_G, count_G, count_G > 0)
    deviation_N = rewards - mean_G[group]
    square_G = segment_sum(deviation_N**2, group, num_groups) + weight_G * (reference - mean_G) ** 2
    std_G = np.sqrt(divide(square_G, count_G, count_G > 0))
    # A constant group (reference included) is tested exactly, not through a rounded std.
    high_G, low_G = np.full(num_groups, -np.inf), np.full(num_groups, np.inf)
    np.maximum.at(high_G, group, rewards)
    np.minimum.at(low_G, group, rewards)
    anchored_G = weight_G > 0
    high_G = np.where(anchored_G, np.maximum(high_G, reference), high_G)
    low_G = np.where(anchored_G, np.minimum(low_G, reference), low_G)
    varies_N = (high_G > low_G)[group]
    return divide(deviation_N, std_G[group] + eps, varies_N)


# ---- validation -----------------------------------------------------------------------------


def _floats(values: npt.ArrayLike, name: str) -> Floats:
    array = np.asarray(values, np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _bools(values: npt.ArrayLike, name: str) -> Bools:
    array = np.asarray(values)
    if array.dtype != np.bool_ or array.ndim != 1:
        raise ValueError(f"{name} must be a one-dimensional bool array, got {array.dtype}")
    return array


def _finite(values: npt.ArrayLike, name: str) -> Floats:
    array = _floats(values, name)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(array)))} NaN or infinite values")
    return array


def _nonnegative(values: npt.ArrayLike, name: str) -> Floats:
    array = _finite(values, name)
    if np.any(array < 0):
        raise ValueError(f"{name} must be >= 0")
    return array


def _group_index(group_N: npt.ArrayLike, num_groups: int, like_N: Floats) -> Ints:
    group = np.asarray(group_N, np.int64)
    _same_length(group, like_N)
    if group.size and (group.min() < 0 or group.max() >= num_groups):
        raise ValueError(f"group_N must be in 0..{num_groups - 1}")
    return group


def _same_length(*arrays: npt.NDArray[np.generic]) -> None:
    sizes = {a.shape[0] if a.ndim else 0 for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"arrays must have the same length, got {sorted(sizes)}")
