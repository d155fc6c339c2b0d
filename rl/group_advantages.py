"""Trajectory- and turn-index-baselined estimators over padded turn arrays.

Shapes: `N` episodes, `T` = the most turns of any episode. `rewards_N_T` holds each turn's
scalar reward (0 past an episode's end), `mask_N_T` is True on turns that exist, `group_N` is
the dense group index of each episode (`dense_index`). Every function is pure and vectorised
over the batch (loops run over the turn axis only).

They are numpy, float64, on purpose: a batch is ~10^4-10^5 turns, where torch's intra-op
threads cost more than they save and, on a machine whose cores are busy (the learner, the
rollout workers), stall each op for milliseconds while a thread waits for a core; numpy runs
each op on the calling thread. Reductions are `np.bincount`, which accumulates in element
order: results do not depend on threads or the machine's load, so a replay reproduces them
bit for bit.

- `grpo`: (R - mean_g) / (std_g + eps), population std; zero for a constant group (Shao et
  al. 2024, DeepSeekMath, arXiv 2402.03300).
- `dr_grpo`: R - mean_g (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv
  2503.20783): no std division, which removes the bias toward low-variance groups.
- `rloo`: R_i - mean_{j != i} R_j, zero for a group of one (Kool et al. 2019, "Buy 4 REINFORCE
  Samples, Get a Baseline for Free!"; Ahmadian et al. 2024, arXiv 2402.14740).
- `reinforce_pp`: REINFORCE++ (Hu 2025, arXiv 2501.03262): discounted return-to-go of each
  turn, normalised by the mean and std over every turn of the batch (no group baseline).
- `trloo`: turn-level REINFORCE leave-one-out (Dr. Kernel, Liu et al. 2026, arXiv
  2602.05885): return-to-go G_{i,t} minus the mean return-to-go at turn index t of the *other*
  episodes of the group.

Length bias (TRLOO). A baseline may depend on anything but the action it scores. A
per-turn-index baseline that includes the episode itself (a GRPO-style mean or std over the
episodes that reached turn t) depends on the agent's own choice to still be running at t, and
the fewer episodes reach t, the larger that bias. TRLOO's baseline for episode i at index t is
built from the other episodes only, so it is independent of everything episode i did, its
length included: unbiased. What remains a choice is how the other episodes that already
ended count at index t (`ended`): `"exclude"` (default; Dr. Kernel's rule) averages over the
other episodes that reached t, with baseline 0 when none did; `"absorbing"` treats an ended
episode as sitting in an absorbing state with return-to-go 0, so every other episode of the
group counts at every index. Both are unbiased; "exclude" tracks E[G_t | still running], the
lower-variance baseline when survival correlates with return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from turnrl.rl.estimator_config import EndedEpisodes

Floats: TypeAlias = npt.NDArray[np.float64]
Ints: TypeAlias = npt.NDArray[np.int64]
Bools: TypeAlias = npt.NDArray[np.bool_]


def dense_index(labels: Sequence[str]) -> Ints:
    """Dense index (0..n-1) of each label, in order of first appearance."""
    index: dict[str, int] = {}
    return np.fromiter((index.setdefault(g, len(index)) for g in labels), np.int64, len(labels))


def segment_sum(values_K: Floats, ids_K: Ints, n: int) -> Floats:
    """Sum of `values_K` per id (0..n-1), accumulated in element order."""
    return np.bincount(ids_K, weights=values_K, minlength=n).astype(np.float64, copy=False)


def segment_varies(values_K: Floats, ids_K: Ints) -> Bools:
    """Whether each element's id holds two different values, gathered back to each element."""
    n = int(ids_K.max()) + 1 if ids_K.size else 0
    high_S, low_S = np.full(n, -np.inf), np.full(n, np.inf)
    np.maximum.at(high_S, ids_K, values_K)
    np.minimum.at(low_S, ids_K, values_K)
    return (high_S > low_S)[ids_K]


def segment_mean_std(values_K: Floats, ids_K: Ints) -> tuple[Floats, Floats, Floats]:
    """Per-id mean, population std and count, gathered back to each element."""
    n = int(ids_K.max()) + 1 if ids_K.size else 0
    count_S = np.maximum(np.bincount(ids_K, minlength=n), 1).astype(np.float64)
    mean_S = segment_sum(values_K, ids_K, n) / count_S
    dev_K = values_K - mean_S[ids_K]
    std_S = np.sqrt(segment_sum(dev_K**2, ids_K, n) / count_S)
    return mean_S[ids_K], std_S[ids_K], count_S[ids_K]


def divide(num: Floats, den: Floats, where: Bools) -> Floats:
    """num / den where `where`, else 0 (the division is not even attempted there)."""
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=where)


def batch_mean(values_K: Floats) -> float:
    """Mean of every element, added in order."""
    return float(segment_sum(values_K, np.zeros(values_K.size, np.int64), 1)[0]) / max(
        values_K.size, 1
    )


def returns_to_go(rewards_N_T: Floats, gamma: float) -> Floats:
    """G_t = r_t + gamma * G_{t+1}; 0 past an episode's end (padding rewards are 0)."""
    returns_N_T = np.zeros_like(rewards_N_T)
    running_N = np.zeros(rewards_N_T.shape[0])
    for t in reversed(range(rewards_N_T.shape[1])):
        running_N = rewards_N_T[:, t] + gamma * running_N
        returns_N_T[:, t] = running_N
    return returns_N_T


def grpo(returns_N: Floats, group_N: Ints, eps: float = 1e-6) -> Floats:
    """Group-normalised advantages (R - mean) / (std + eps); zero for constant groups."""
    mean_N, std_N, _ = segment_mean_std(returns_N, group_N)
    return divide(returns_N - mean_N, std_N + eps, std_N > 0)


def dr_grpo(returns_N: Floats, group_N: Ints) -> Floats:
    """Group-centred advantages R - mean (no std normalisation)."""
    mean_N, _, _ = segment_mean_std(returns_N, group_N)
    return returns_N - mean_N


def rloo(returns_N: Floats, group_N: Ints) -> Floats:
    """Leave-one-out advantages R_i - (S_g - R_i) / (n_g - 1); zero in a group of one."""
    n = int(group_N.max()) + 1 if group_N.size else 0
    sum_N = segment_sum(returns_N, group_N, n)[group_N]
    count_N = np.bincount(group_N, minlength=n)[group_N]
    others_N = (sum_N - returns_N) / np.maximum(count_N - 1, 1)
    return np.where(count_N > 1, returns_N - others_N, 0.0)


def reinforce_pp(
    rewards_N_T: Floats, mask_N_T: Bools, gamma: float = 1.0, eps: float = 1e-6
) -> Floats:
    """REINFORCE++: (G_t - mean) / (std + eps) with mean and std over every masked turn of
    the batch (each turn is one sample); 0 where the batch is constant and off the mask."""
    flat_K = returns_to_go(rewards_N_T, gamma)[mask_N_T]
    mean_K, std_K, _ = segment_mean_std(flat_K, np.zeros(flat_K.size, np.int64))
    out_N_T = np.zeros(mask_N_T.shape)
    out_N_T[mask_N_T] = divide(flat_K - mean_K, std_K + eps, std_K > 0)
    return out_N_T


def trloo(
    rewards_N_T: Floats,
    mask_N_T: Bools,
    group_N: Ints,
    gamma: float = 1.0,
    ended: EndedEpisodes = "exclude",
) -> Floats:
    """TRLOO: A_{i,t} = G_{i,t} - b_{i,t}, b_{i,t} the mean return-to-go at index t of the
    group's other episodes (see the module docstring for `ended`); 0 past each end."""
    n_episodes, n_turns = rewards_N_T.shape
    returns_N_T = np.where(mask_N_T, returns_to_go(rewards_N_T, gamma), 0.0)
    # One bucket per (group, turn index): bucket = group * T + t.
    bucket_N_T = group_N[:, None] * n_turns + np.arange(n_turns)[None, :]
    n_buckets = (int(group_N.max()) + 1 if group_N.size else 0) * n_turns
    flat = bucket_N_T.reshape(-1)
    sum_N_T = segment_sum(returns_N_T.reshape(-1), flat, n_buckets)[bucket_N_T]
    if ended == "exclude":
        count_N_T = np.bincount(flat, weights=mask_N_T.reshape(-1), minlength=n_buckets)
        others_N_T = count_N_T[bucket_N_T] - 1
    else:
        size_N = np.bincount(group_N, minlength=int(group_N.max()) + 1 if group_N.size else 0)
        others_N_T = np.broadcast_to((size_N[group_N] - 1)[:, None], (n_episodes, n_turns))
    baseline_N_T = np.where(
        others_N_T > 0, (sum_N_T - returns_N_T) / np.maximum(others_N_T, 1), 0.0
    )
    return np.where(mask_N_T, returns_N_T - baseline_N_T, 0.0)
