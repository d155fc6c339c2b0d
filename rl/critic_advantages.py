"""Turn-level GAE with a learned value of each turn's start state (PPO/A2C), and T-PPO's
bootstrap at a truncation.

A turn is one decision: delta_t = r_t + gamma * V(s_{t+1}) - V(s_t), A_t = sum_l (gamma
lam)^l delta_{t+l} (Schulman et al. 2016, GAE, arXiv 1506.02438; PPO, arXiv 1707.06347; A2C,
Mnih et al. 2016, arXiv 1602.01783). V(s_t) is the value head's estimate of the state before
turn t (`Turn.signals["value"]`); the value targets are the lambda-returns A_t + V(s_t).

After the last turn, V(s_L) = `bootstrap_N`: 0 for an episode that ended (an answer, an
error: nothing follows), and for an episode cut short by a limit the estimate of the state at
the cut, as T-PPO's extended GAE bootstraps an unfinished response (Fan et al. 2025,
"Truncated Proximal Policy Optimization", arXiv 2506.15050). Treating a cut as terminal would
teach the critic and the policy that running out of turns is worth exactly the rewards seen
so far, although the state at the cut may well have been on the way to an answer.
"""

from __future__ import annotations

import numpy as np

from turnrl.rl.group_advantages import Bools, Floats


def gae(
    rewards_N_T: Floats,
    values_N_T: Floats,
    mask_N_T: Bools,
    bootstrap_N: Floats,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Floats, Floats]:
    """(advantages_N_T, value_targets_N_T); `bootstrap_N` is V after each episode's last
    turn. Both are 0 past each episode's end."""
    n_episodes, n_turns = rewards_N_T.shape
    lengths_N = mask_N_T.sum(axis=1)
    next_N_T = np.zeros_like(values_N_T)
    next_N_T[:, :-1] = values_N_T[:, 1:]
    rows_M = np.flatnonzero(lengths_N > 0)
    next_N_T[rows_M, lengths_N[rows_M] - 1] = bootstrap_N[rows_M]
    delta_N_T = np.where(mask_N_T, rewards_N_T + gamma * next_N_T - values_N_T, 0.0)
    advantages_N_T = np.zeros_like(delta_N_T)
    running_N = np.zeros(n_episodes)
    # Padding sits after each episode's end with delta 0, so the running sum starts at 0 there.
    for t in reversed(range(n_turns)):
        running_N = delta_N_T[:, t] + gamma * lam * running_N
        advantages_N_T[:, t] = running_N
    targets_N_T = np.where(mask_N_T, advantages_N_T + values_N_T, 0.0)
    return advantages_N_T, targets_N_T
