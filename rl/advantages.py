"""Advantage estimators: pure, vectorised functions from returns to advantages.

Each estimator maps a group-structured batch of episode returns to per-episode advantages;
`turn_advantages` broadcasts them to every turn (the learner then broadcasts each turn's value
to its sampled tokens; prompt and observation tokens are masked out there). Step-level
estimators that give each turn its own value plug in at the same seam.

- `grpo`: (R - mean_group) / (std_group + eps) (Shao et al. 2024, DeepSeekMath,
  arXiv 2402.03300). A group whose returns are all equal gives zeros: it carries no signal.
- `dr_grpo`: R - mean_group, no std division (Liu et al. 2025, "Understanding R1-Zero-Like
  Training", arXiv 2503.20783), which removes the bias toward low-variance groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from turnrl.agent.records import Episode

Estimator = Literal["grpo", "dr_grpo"]


def group_ids_to_index(group_ids: Sequence[str]) -> torch.Tensor:
    """Dense group index (0..n_groups-1) for each episode, in order of first appearance."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in group_ids], dtype=torch.long)


def _group_mean_std(
    returns_N: torch.Tensor, group_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n_groups = int(group_N.max()) + 1 if len(group_N) else 0
    count_G = torch.zeros(n_groups, dtype=returns_N.dtype).index_add_(
        0, group_N, torch.ones_like(returns_N)
    )
    mean_G = torch.zeros(n_groups, dtype=returns_N.dtype).index_add_(0, group_N, returns_N)
    mean_G = mean_G / count_G
    dev_N = returns_N - mean_G[group_N]
    # Population std (ddof=0), as in the GRPO reference implementations.
    var_G = torch.zeros(n_groups, dtype=returns_N.dtype).index_add_(0, group_N, dev_N**2)
    std_G = (var_G / count_G).sqrt()
    return mean_G[group_N], std_G[group_N]


def grpo(returns_N: torch.Tensor, group_N: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages (R - mean) / (std + eps); zero for constant groups."""
    mean_N, std_N = _group_mean_std(returns_N, group_N)
    return torch.where(std_N > 0, (returns_N - mean_N) / (std_N + eps), 0.0)


def dr_grpo(returns_N: torch.Tensor, group_N: torch.Tensor) -> torch.Tensor:
    """Group-centred advantages R - mean (no std normalisation)."""
    mean_N, _ = _group_mean_std(returns_N, group_N)
    return returns_N - mean_N


ESTIMATORS: dict[Estimator, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
}


def turn_advantages(
    episodes: Sequence[Episode], returns: Sequence[float], estimator: Estimator
) -> list[list[float]]:
    """Per-episode, per-turn advantages: the episode's advantage on each of its turns."""
    returns_N = torch.tensor(list(returns), dtype=torch.float64)
    group_N = group_ids_to_index([e.group_id for e in episodes])
    adv_N = ESTIMATORS[estimator](returns_N, group_N).tolist()
    return [[a] * len(e.turns) for e, a in zip(episodes, adv_N, strict=True)]
