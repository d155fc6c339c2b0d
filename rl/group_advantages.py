"""Trajectory- and turn-index-baselined estimators over padded turn tensors.

Shapes: `N` episodes, `T` = the most turns of any episode. `rewards_N_T` holds each turn's
scalar reward (0 past an episode's end), `mask_N_T` is True on turns that exist, `group_N` is
the dense group index of each episode (`group_ids_to_index`). Every function is pure and
vectorised over the batch (loops run over the turn axis only), and reduces with `index_add_`,
which accumulates serially on the CPU: results do not depend on the thread count, so a replay
in another process reproduces them bit for bit.

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
per-turn-index baseline that includes the episode itself (GRPO-style mean or std over the
episodes that reached turn t) depends on the agent's own choice to still be running at t, and
the smaller the set, the larger that bias. TRLOO's baseline for episode i at index t is built
from the other episodes only, so it is independent of everything episode i did, its length
included: unbiased. What remains a choice is how the other episodes that already ended count
at index t (`ended`): `"exclude"` (default; Dr. Kernel's rule) averages over the other
episodes that reached t, with baseline 0 when none did; `"absorbing"` treats an ended episode
as sitting in an absorbing state with return-to-go 0, so every other episode of the group
counts at every index. Both are unbiased; "exclude" tracks E[G_t | still running] and so has
the lower variance when survival correlates with return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

EndedEpisodes = Literal["exclude", "absorbing"]


def group_ids_to_index(group_ids: Sequence[str]) -> torch.Tensor:
    """Dense group index (0..n_groups-1) for each episode, in order of first appearance."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in group_ids], dtype=torch.long)


def segment_sum(values_K: torch.Tensor, ids_K: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of `values_K` per id (0..n-1), accumulated in order (deterministic on the CPU)."""
    return torch.zeros(n, dtype=values_K.dtype).index_add_(0, ids_K, values_K)


def segment_mean_std(
    values_K: torch.Tensor, ids_K: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-id mean, population std and count, gathered back to each element."""
    count_S = segment_sum(torch.ones_like(values_K), ids_K, n)
    mean_S = segment_sum(values_K, ids_K, n) / count_S.clamp(min=1)
    dev_K = values_K - mean_S[ids_K]
    std_S = (segment_sum(dev_K**2, ids_K, n) / count_S.clamp(min=1)).sqrt()
    return mean_S[ids_K], std_S[ids_K], count_S[ids_K]


def _n_segments(ids: torch.Tensor) -> int:
    return int(ids.max()) + 1 if ids.numel() else 0


def _group_mean_std(
    returns_N: torch.Tensor, group_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    mean_N, std_N, _ = segment_mean_std(returns_N, group_N, _n_segments(group_N))
    return mean_N, std_N


def episode_returns(rewards_N_T: torch.Tensor) -> torch.Tensor:
    """R = sum_t r_t, added left to right: the same float as Python's `sum` of a turn list."""
    returns_N = torch.zeros(rewards_N_T.shape[0], dtype=rewards_N_T.dtype)
    for t in range(rewards_N_T.shape[1]):
        returns_N = returns_N + rewards_N_T[:, t]
    return returns_N


def returns_to_go(rewards_N_T: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1}; 0 past an episode's end (padding rewards are 0)."""
    returns_N_T = torch.zeros_like(rewards_N_T)
    running_N = torch.zeros(rewards_N_T.shape[0], dtype=rewards_N_T.dtype)
    for t in reversed(range(rewards_N_T.shape[1])):
        running_N = rewards_N_T[:, t] + gamma * running_N
        returns_N_T[:, t] = running_N
    return returns_N_T


def grpo(returns_N: torch.Tensor, group_N: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages (R - mean) / (std + eps); zero for constant groups."""
    mean_N, std_N = _group_mean_std(returns_N, group_N)
    return torch.where(std_N > 0, (returns_N - mean_N) / (std_N + eps), 0.0)


def dr_grpo(returns_N: torch.Tensor, group_N: torch.Tensor) -> torch.Tensor:
    """Group-centred advantages R - mean (no std normalisation)."""
    mean_N, _ = _group_mean_std(returns_N, group_N)
    return returns_N - mean_N


def rloo(returns_N: torch.Tensor, group_N: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages R_i - (S_g - R_i) / (n_g - 1); zero in a group of one."""
    n = _n_segments(group_N)
    sum_N = segment_sum(returns_N, group_N, n)[group_N]
    count_N = segment_sum(torch.ones_like(returns_N), group_N, n)[group_N]
    others_N = (sum_N - returns_N) / (count_N - 1).clamp(min=1)
    return torch.where(count_N > 1, returns_N - others_N, 0.0)


def reinforce_pp(
    rewards_N_T: torch.Tensor, mask_N_T: torch.Tensor, gamma: float = 1.0, eps: float = 1e-6
) -> torch.Tensor:
    """REINFORCE++: (G_t - mean) / (std + eps) with mean and std over every existing turn of
    the batch (each turn is one sample); 0 where the batch is constant and past each end."""
    returns_N_T = returns_to_go(rewards_N_T, gamma)
    flat_K = returns_N_T[mask_N_T]
    mean_K, std_K, _ = segment_mean_std(flat_K, torch.zeros_like(flat_K, dtype=torch.long), 1)
    out_N_T = torch.zeros_like(returns_N_T)
    out_N_T[mask_N_T] = torch.where(std_K > 0, (flat_K - mean_K) / (std_K + eps), 0.0)
    return out_N_T


def trloo(
    rewards_N_T: torch.Tensor,
    mask_N_T: torch.Tensor,
    group_N: torch.Tensor,
    gamma: float = 1.0,
    ended: EndedEpisodes = "exclude",
) -> torch.Tensor:
    """TRLOO: A_{i,t} = G_{i,t} - b_{i,t}, b_{i,t} the mean return-to-go at index t of the
    group's other episodes (see the module docstring for `ended`); 0 past each end."""
    n_episodes, n_turns = rewards_N_T.shape
    returns_N_T = returns_to_go(rewards_N_T, gamma) * mask_N_T
    # One bucket per (group, turn index): bucket = group * T + t.
    bucket_N_T = group_N[:, None] * n_turns + torch.arange(n_turns)[None, :]
    n_buckets = _n_segments(group_N) * n_turns
    sum_N_T = segment_sum(returns_N_T.flatten(), bucket_N_T.flatten(), n_buckets)[bucket_N_T]
    if ended == "exclude":
        present_N_T = mask_N_T.to(rewards_N_T.dtype)
        count_N_T = segment_sum(present_N_T.flatten(), bucket_N_T.flatten(), n_buckets)
        others_N_T = count_N_T[bucket_N_T] - 1
    else:
        group_size_N = segment_sum(
            torch.ones(n_episodes, dtype=rewards_N_T.dtype), group_N, _n_segments(group_N)
        )[group_N]
        others_N_T = (group_size_N - 1)[:, None].expand(n_episodes, n_turns)
    baseline_N_T = torch.where(
        others_N_T > 0, (sum_N_T - returns_N_T) / others_N_T.clamp(min=1), 0.0
    )
    return (returns_N_T - baseline_N_T) * mask_N_T
