"""Step-level estimators that group turns by the states a task group's rollouts share.

The trajectory graph of a group (`turnrl.agent.graph`) keys every turn by the state it starts
from (its history of actions and observations) and by the state its action and observation
lead to. `turn_graph` hashes those keys once per batch into dense integer ids (`TurnGraph`);
the estimators then reduce over ids with `np.bincount` (no Python loop over turns; numpy for
the reasons `group_advantages` gives), so GiGPO, SALT and TEMPO cost a few vector passes.

Notation: G_{i,t} is the return-to-go of episode i from turn t, R_i its return, s_{i,t} the
state turn t starts from and e_{i,t} its edge (the state the turn leads to). With history keys
an edge is the (state, action) pair, split further only where the same action drew different
observations.

- `gigpo` (Feng et al. 2025, GiGPO, arXiv 2505.10978, Eqs. 3-8): A = A^E(i) + omega * A^S(i,t).
  A^E is GRPO (`scale="std"`) or Dr. GRPO (`scale="none"`) on R. A^S normalises the
  discounted return-to-go G^gamma_{i,t} within the anchor-state group {(j,u): s_{j,u} =
  s_{i,t}}: (G - mean) / (std + eps), 0 for a singleton or constant group (verl-agent's
  reference gives a singleton 0 too; it uses the Bessel-corrected std, we use the population
  std as GRPO does here). Anchors are whole histories (`TurnGraph`) or, as in the paper's
  environments, the last observation alone (`anchor="observation"` in `turn_graph`).
- `salt` (Li et al. 2025, SALT, arXiv 2510.20022): the step advantage of turn t is the mean
  trajectory-level advantage of the group's episodes that take the same edge: steps every
  rollout shares average out toward 0, steps unique to one rollout keep its advantage.
- `tempo` (Tran et al. 2025, TEMPO, arXiv 2509.18314): prefix-tree values V(s) = mean
  return-to-go of the group's episodes through s, Q(s, a) the same over those taking edge a.
  `form="td"` (the paper): A = A_GRPO(i) + (Q(s,a) - V(s)) / sigma_g, a correction that is
  exactly 0 wherever the tree does not branch; `form="node_baseline"`: A = (G_{i,t} - V(s)) /
  sigma_g, a per-node baseline. sigma_g is the group's return std + eps (1 when it is 0),
  the paper's normalised rewards.

Length. Every group here is keyed by state, not by turn index: a baseline never mixes turns
that merely share a position, and an episode that ended simply has no turn at later states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from turnrl.agent.graph import after_keys, observation_key
from turnrl.agent.records import Episode
from turnrl.rl.estimator_config import Anchor, StepScale, TempoForm
from turnrl.rl.group_advantages import (
    Bools,
    Floats,
    Ints,
    divide,
    dr_grpo,
    grpo,
    returns_to_go,
    segment_mean_std,
)


@dataclass(frozen=True)
class TurnGraph:
    """Dense integer ids of every turn's states, unique across the batch's groups."""

    state_N_T: Ints
    """Id of the state turn t of episode n starts from; -1 past the episode's end."""
    edge_N_T: Ints
    """Id of the state the turn leads to (its edge); -1 past the episode's end."""


def turn_graph(
    episodes: Sequence[Episode],
    group_N: Ints,
    anchor: Anchor = "history",
    after_keys_NT: Sequence[Sequence[str]] | None = None,
) -> TurnGraph:
    """Hash each turn's state keys once into dense ids (keys are compared within a group).

    `history`: a state is the whole history (`agent.graph.after_keys`, or `after_keys_NT`
    where a similarity-merged `TrajectoryGraph` gives them; state t+1 is the after-state of
    turn t, so one chain per episode gives both). `observation`: a state is the last
    observation alone (turn 0: the group's root), GiGPO's environment-state anchor; the edge
    is then the next observation."""
    rows: Sequence[Sequence[str]]
    if after_keys_NT is not None:
        rows = after_keys_NT
        if [len(r) for r in rows] != [len(e.turns) for e in episodes]:
            raise ValueError("after_keys_NT needs one row per episode and one key per turn")
    elif anchor == "history":
        rows = [after_keys(e) for e in episodes]
    else:
        rows = [[observation_key(t) for t in e.turns] for e in episodes]
    lengths_N = np.fromiter(map(len, rows), np.int64, len(rows))
    flat = list(chain.from_iterable(rows))
    # Strings to ints once (C-level dict passes); then (group, code) pairs to dense ids with
    # one sort, so keys are only ever equal within a group. Code 0 is each group's root.
    index = dict(zip(dict.fromkeys(flat), range(1, len(flat) + 1), strict=False))
    code_K = np.fromiter(map(index.__getitem__, flat), np.int64, len(flat))
    n_codes = len(index) + 1
    pair_K = np.repeat(group_N, lengths_N) * n_codes + code_K
    _, dense = np.unique(np.concatenate([pair_K, group_N * n_codes]), return_inverse=True)
    dense = dense.reshape(-1).astype(np.int64)
    n_turns = int(lengths_N.max()) if lengths_N.size else 0
    mask_N_T = lengths_N[:, None] > np.arange(n_turns)[None, :]
    edge_N_T = np.full((len(rows), n_turns), -1, np.int64)
    edge_N_T[mask_N_T] = dense[: len(flat)]
    state_N_T = np.full_like(edge_N_T, -1)
    if n_turns:
        state_N_T[:, 1:] = edge_N_T[:, :-1]
        state_N_T[:, 0] = dense[len(flat) :]
    state_N_T[~mask_N_T] = -1
    return TurnGraph(state_N_T=state_N_T, edge_N_T=edge_N_T)


def _scatter(values_K: Floats, mask_N_T: Bools) -> Floats:
    out_N_T = np.zeros(mask_N_T.shape)
    out_N_T[mask_N_T] = values_K
    return out_N_T


def _per_turn(values_N: Floats, mask_N_T: Bools) -> Floats:
    return np.broadcast_to(values_N[:, None], mask_N_T.shape)[mask_N_T]


def gigpo(
    returns_N: Floats,
    rewards_N_T: Floats,
    mask_N_T: Bools,
    group_N: Ints,
    state_N_T: Ints,
    gamma: float = 0.95,
    omega: float = 1.0,
    scale: StepScale = "std",
    eps: float = 1e-6,
) -> Floats:
    """GiGPO: episode advantage of R (`returns_N`, the caller's episode returns) plus omega
    times the step advantage of the discounted return-to-go within its anchor-state group."""
    episode_N = grpo(returns_N, group_N, eps) if scale == "std" else dr_grpo(returns_N, group_N)
    step_K = returns_to_go(rewards_N_T, gamma)[mask_N_T]
    mean_K, std_K, _ = segment_mean_std(step_K, state_N_T[mask_N_T])
    step_K = step_K - mean_K
    if scale == "std":
        step_K = divide(step_K, std_K + eps, std_K > 0)
    return _scatter(_per_turn(episode_N, mask_N_T) + omega * step_K, mask_N_T)


def salt(advantages_N: Floats, mask_N_T: Bools, edge_N_T: Ints) -> Floats:
    """SALT: each turn gets the mean trajectory advantage over the episodes taking its edge."""
    mean_K, _, _ = segment_mean_std(_per_turn(advantages_N, mask_N_T), edge_N_T[mask_N_T])
    return _scatter(mean_K, mask_N_T)


def tempo(
    returns_N: Floats,
    rewards_N_T: Floats,
    mask_N_T: Bools,
    group_N: Ints,
    graph: TurnGraph,
    form: TempoForm = "td",
    eps: float = 1e-6,
) -> Floats:
    """TEMPO: GRPO plus the branch-gated TD term (Q(s,a) - V(s)) / sigma_g (`td`), or the
    return-to-go against its node's value, (G - V(s)) / sigma_g (`node_baseline`)."""
    _, std_N, _ = segment_mean_std(returns_N, group_N)
    sigma_K = _per_turn(np.where(std_N > 0, std_N + eps, 1.0), mask_N_T)
    togo_K = returns_to_go(rewards_N_T, 1.0)[mask_N_T]
    value_K, _, _ = segment_mean_std(togo_K, graph.state_N_T[mask_N_T])
    if form == "node_baseline":
        return _scatter((togo_K - value_K) / sigma_K, mask_N_T)
    q_K, _, _ = segment_mean_std(togo_K, graph.edge_N_T[mask_N_T])
    base_K = _per_turn(grpo(returns_N, group_N, eps), mask_N_T)
    return _scatter(base_K + (q_K - value_K) / sigma_K, mask_N_T)
