"""Advantage estimators: per-turn advantages from per-turn rewards, selected by config.

`compute_advantages(episodes, rewards_NT, cfg)` is the one entry point: `rewards_NT[n][t]` is
the weighted scalar reward of turn t of episode n (the outcome sits on the last turn), `cfg`
one member of the `EstimatorConfig` union, chosen by its `kind`. It pads the batch into
`[N, T]` numpy arrays (float64, 0 and masked past each episode's end; numpy rather than torch
for the reason `group_advantages` gives), runs one of the pure functions below, and returns
one advantage per existing turn; nothing past an episode's end is ever assigned. The learner
then broadcasts each turn's value to its sampled tokens.

| kind           | A_{i,t}                                                  | module            |
|----------------|----------------------------------------------------------|-------------------|
| `grpo`         | (R_i - mean_g) / (std_g + eps)                           | group_advantages  |
| `dr_grpo`      | R_i - mean_g                                             | group_advantages  |
| `rloo`         | R_i - mean of the group's other R_j                      | group_advantages  |
| `reinforce_pp` | return-to-go, normalised over the batch's turns          | group_advantages  |
| `trloo`        | G_{i,t} - mean of the other episodes' G_{j,t}            | group_advantages  |
| `gigpo`        | A^E_i + omega * anchor-state-normalised G^gamma_{i,t}    | step_advantages*  |
| `salt`         | mean trajectory advantage over the turn's graph edge     | step_advantages   |
| `tempo`        | A_GRPO + (Q(s,a) - V(s)) / sigma (or G - V(s))           | step_advantages   |
| `gae`          | GAE over turns, V(s_t) from `signals.value`              | critic_advantages |
| `tppo`         | `gae`, bootstrapping V at a truncation                   | critic_advantages |
| `empg`         | entropy modulation of another estimator's advantages     | entropy_advantages |

Formulas and papers are in each module's docstring (modules `turnrl.rl.*`); * the
conventions below are applied here (`trajectory_advantages`, `gigpo`, `whiten`). R_i = sum_t
r_{i,t} is added with Python's `sum`, the same float as `rl.rewards.episode_return`, so GRPO
here reproduces the runs scored before per-turn rewards, bit for bit.

Episode length. A baseline may depend on anything except the action it scores, and the agent
chooses how long its episode runs, so no turn's baseline may depend on its own episode still
running. Trajectory-level estimators compare whole episodes. TRLOO's per-index baseline
leaves the episode out (its own length never enters; `TrlooConfig.ended` says how the other,
already ended, episodes count). GiGPO, SALT and TEMPO group turns by state, never by turn
index. GAE's baseline is V(s_t). REINFORCE++ and EMPG's centring use one mean over the whole
batch's turns, the same shift for every turn.

Conventions (each an option with turnrl's default; verl and TRL differ, see DESIGN.md).
`std`: population (default) or sample (n - 1) std of a group (verl, verl-agent's GiGPO and TRL
use `torch.std`, the sample std). `singleton`: a group of one gets 0 (default; TRL) or its
return (verl: mean 0, std 1, so GRPO gives R / (1 + eps)). `whiten` (GAE, T-PPO): none
(default), or verl's `masked_whiten` over the batch's trained turns or tokens. TEMPO keeps the
population std (its paper's normalised rewards); REINFORCE++ its batch normalisation.

Replayed turns (a branched rollout's restored prefix) count as visits of their states, so
they inform the statistics of the states they pass through, but get advantage exactly 0 and
stay out of batch-wide statistics: this episode's policy did not sample them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np
import torch

from turnrl.agent.records import Episode, StopReason
from turnrl.rl import group_advantages as group_adv
from turnrl.rl.critic_advantages import gae
from turnrl.rl.entropy_advantages import empg
from turnrl.rl.estimator_config import (
    ESTIMATORS,
    BaseEstimatorConfig,
    DrGrpoConfig,
    EmpgConfig,
    Estimator,
    EstimatorConfig,
    GaeConfig,
    GigpoConfig,
    GroupStd,
    GrpoConfig,
    ReinforcePPConfig,
    RlooConfig,
    SaltConfig,
    Singleton,
    StepScale,
    TempoConfig,
    TppoConfig,
    TrlooConfig,
    Whiten,
    estimator_config,
)
from turnrl.rl.group_advantages import (
    Bools,
    Floats,
    Ints,
    dense_index,
    divide,
    reinforce_pp,
    returns_to_go,
    segment_mean_std,
    segment_sum,
    segment_varies,
    trloo,
)
from turnrl.rl.step_advantages import (
    TurnGraph,
    salt,
    tempo,
    turn_graph,
)

__all__ = [
    "ESTIMATORS",
    "TRUNCATIONS",
    "BaseEstimatorConfig",
    "DrGrpoConfig",
    "EmpgConfig",
    "Estimator",
    "EstimatorConfig",
    "GaeConfig",
    "GigpoConfig",
    "GroupStd",
    "GrpoConfig",
    "ReinforcePPConfig",
    "RlooConfig",
    "SaltConfig",
    "Singleton",
    "TempoConfig",
    "TppoConfig",
    "TrlooConfig",
    "TurnBatch",
    "TurnGraph",
    "Whiten",
    "compute_advantages",
    "dr_grpo",
    "estimator_config",
    "gigpo",
    "group_ids_to_index",
    "group_mean_std",
    "group_normalised",
    "grpo",
    "trajectory_advantages",
    "turn_advantages",
    "turn_batch",
    "turn_graph",
    "value_targets",
    "whiten",
]

TRUNCATIONS = frozenset(
    {
        StopReason.MAX_TURNS,
        StopReason.MAX_TOOL_CALLS,
        StopReason.BUDGET_EXHAUSTED,
        StopReason.CONTEXT_FULL,
        StopReason.TIMEOUT,
    }
)
"""Stops where a limit cut the episode short: the state at the cut has a future (T-PPO
bootstraps it). An answer or an error ends the episode for good."""


@dataclass(frozen=True)
class TurnBatch:
    """A batch of episodes as padded turn arrays (`N` episodes, `T` most turns)."""

    returns_N: Floats
    """Each episode's return: Python's `sum` of its turn rewards."""
    rewards_N_T: Floats
    """Turn rewards; 0 past each episode's end."""
    mask_N_T: Bools
    """True on turns that exist (they all count in group and state statistics)."""
    train_N_T: Bools
    """True on turns the learner trains on: existing and not context only (a branch's
    restored prefix, another model's turn: `Turn.context_only`). Only these get an advantage
    and count in batch-wide statistics."""
    group_N: Ints
    """Dense group index of each episode."""
    lengths: list[int]
    """Number of turns of each episode."""


def turn_batch(episodes: Sequence[Episode], rewards_NT: Sequence[Sequence[float]]) -> TurnBatch:
    """Pad `rewards_NT` (one row per episode, one reward per turn) into arrays."""
    if len(rewards_NT) != len(episodes):
        raise ValueError(f"{len(rewards_NT)} reward rows for {len(episodes)} episodes")
    # One pass over the episodes (each is a scattered object graph: touch it once).
    lengths: list[int] = []
    groups: list[str] = []
    branched: list[int] = []
    for n, e in enumerate(episodes):
        turns = e.turns
        lengths.append(len(turns))
        groups.append(e.group_id)
        # Context-only turns: a branch's restored prefix (`replayed`), or turns another model
        # wrote under per-step routing (`foreign`, anywhere in the episode).
        if any(t.context_only for t in turns):
            branched.append(n)
    if [len(row) for row in rewards_NT] != lengths:
        n = next(i for i, row in enumerate(rewards_NT) if len(row) != lengths[i])
        raise ValueError(
            f"episode {episodes[n].episode_id}: {len(rewards_NT[n])} rewards for {lengths[n]} "
            "turns (one reward per turn is required)"
        )
    n_turns = max(lengths, default=0)
    mask_N_T = np.array(lengths, np.int64).reshape(-1, 1) > np.arange(n_turns)[None, :]
    rewards_N_T = np.zeros(mask_N_T.shape)
    rewards_N_T[mask_N_T] = np.fromiter(chain.from_iterable(rewards_NT), np.float64, sum(lengths))
    train_N_T = mask_N_T.copy() if branched else mask_N_T
    for n in branched:
        for t, turn in enumerate(episodes[n].turns):
            train_N_T[n, t] = not turn.context_only
    return TurnBatch(
        returns_N=np.array([sum(row) for row in rewards_NT], np.float64),
        rewards_N_T=rewards_N_T,
        mask_N_T=mask_N_T,
        train_N_T=train_N_T,
        group_N=dense_index(groups),
        lengths=lengths,
    )


def _value(episode: Episode, t: int) -> float:
    value = episode.turns[t].signals.value
    if value is None:
        raise ValueError(
            f"episode {episode.episode_id} turn {t}: no signals.value (GAE needs V of each "
            "turn); store the value head's estimates on the turns before scoring"
        )
    return value


def _value_after(episode: Episode) -> float:
    if episode.value_after is None:
        raise ValueError(
            f"episode {episode.episode_id}: no value_after (T-PPO bootstraps the "
            f"{episode.stop_reason.value} cut with V after the last turn); store the value "
            "head's estimates with `bootstrap=True` before scoring"
        )
    return episode.value_after


def _values(
    episodes: Sequence[Episode], batch: TurnBatch, bootstrap_truncated: bool
) -> tuple[Floats, Floats]:
    n_turns = batch.mask_N_T.shape[1]
    rows, bootstrap = [], []
    for e in episodes:
        row = [_value(e, t) for t in range(len(e.turns))]
        rows.append(row + [0.0] * (n_turns - len(row)))
        cut = bootstrap_truncated and e.stop_reason in TRUNCATIONS and bool(e.turns)
        bootstrap.append(_value_after(e) if cut else 0.0)
    values_N_T = np.array(rows, np.float64).reshape(batch.mask_N_T.shape)
    return values_N_T, np.array(bootstrap, np.float64)


def _entropies(episodes: Sequence[Episode], mask_N_T: Bools) -> tuple[Floats, Bools]:
    """Mean surprisal of each turn's sampled tokens, and which turns sampled any."""
    logprobs = [t.completion_logprobs for e in episodes for t in e.turns]
    counts_K = np.fromiter(map(len, logprobs), np.int64, len(logprobs))
    flat = np.fromiter(chain.from_iterable(logprobs), np.float64, int(counts_K.sum()))
    turn_of_token = np.repeat(np.arange(len(logprobs)), counts_K)
    sums_K = segment_sum(flat, turn_of_token, len(logprobs))
    entropy_N_T = np.zeros(mask_N_T.shape)
    entropy_N_T[mask_N_T] = divide(-sums_K, counts_K.astype(np.float64), counts_K > 0)
    measured_N_T = np.zeros(mask_N_T.shape, np.bool_)
    measured_N_T[mask_N_T] = counts_K > 0
    return entropy_N_T, measured_N_T


def _broadcast(advantages_N: Floats, mask_N_T: Bools) -> Floats:
    return np.where(mask_N_T, advantages_N[:, None], 0.0)


def group_mean_std(values_K: Floats, ids_K: Ints, std: GroupStd) -> tuple[Floats, Floats, Floats]:
    """Per-id mean, std and count, gathered back to each element. `population` divides the
    squared deviations by n, `sample` by n - 1 (Bessel; 0 for an id seen once, where it is
    undefined). The population path is `segment_mean_std`, to the bit."""
    mean_K, std_K, count_K = segment_mean_std(values_K, ids_K)
    if std == "population":
        return mean_K, std_K, count_K
    n = int(ids_K.max()) + 1 if ids_K.size else 0
    squares_K = segment_sum((values_K - mean_K) ** 2, ids_K, n)[ids_K]
    return mean_K, np.sqrt(squares_K / np.maximum(count_K - 1.0, 1.0)), count_K


def group_normalised(values_K: Floats, ids_K: Ints, std: GroupStd, eps: float) -> Floats:
    """(x - mean_id) / (std_id + eps), exactly 0 in a constant group (whose rounded mean can
    leave deviations of ~1e-16, which eps would turn into ~1e-10 advantages) and in a group
    of one under the sample std."""
    mean_K, std_K, _ = group_mean_std(values_K, ids_K, std)
    varies_K = segment_varies(values_K, ids_K)
    return divide(values_K - mean_K, std_K + eps, varies_K & (std_K > 0))


def trajectory_advantages(
    kind: Literal["grpo", "dr_grpo", "rloo"],
    returns_N: Floats,
    group_N: Ints,
    eps: float = 1e-6,
    std: GroupStd = "population",
    singleton: Singleton = "zero",
) -> Floats:
    """One advantage per episode from its return: GRPO (with the `std` convention), Dr. GRPO
    or RLOO; a group of one gets 0 or, with `singleton="return"`, its return as verl gives it
    (mean 0 and std 1 for GRPO: R / (1 + eps); R for the others)."""
    if kind == "grpo":
        adv_N = group_normalised(returns_N, group_N, std, eps)
    elif kind == "dr_grpo":
        adv_N = group_adv.dr_grpo(returns_N, group_N)
    else:
        adv_N = group_adv.rloo(returns_N, group_N)
    if singleton == "zero":
        return adv_N
    alone_N = np.bincount(group_N)[group_N] == 1
    passed_N = returns_N / (1.0 + eps) if kind == "grpo" else returns_N
    return np.where(alone_N, passed_N, adv_N)


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
    std: GroupStd = "population",
    singleton: Singleton = "zero",
) -> Floats:
    """GiGPO (`step_advantages` gives the formula and paper) with the std and group-of-one
    conventions: A^E from `trajectory_advantages`, A^S the discounted return-to-go normalised
    within its anchor state (a singleton state: 0). With the defaults it is
    `step_advantages.gigpo`, to the bit."""
    episode_N = trajectory_advantages(
        "grpo" if scale == "std" else "dr_grpo", returns_N, group_N, eps, std, singleton
    )
    step_K = returns_to_go(rewards_N_T, gamma)[mask_N_T]
    state_K = state_N_T[mask_N_T]
    if scale == "std":
        step_K = group_normalised(step_K, state_K, std, eps)
    else:
        step_K = step_K - segment_mean_std(step_K, state_K)[0]
    out_N_T = np.zeros(mask_N_T.shape)
    out_N_T[mask_N_T] = np.broadcast_to(episode_N[:, None], mask_N_T.shape)[mask_N_T] + (
        omega * step_K
    )
    return out_N_T


# verl's `masked_whiten` divides by sqrt(var + 1e-8), a fixed floor rather than an eps config.
_WHITEN_FLOOR = 1e-8


def whiten(advantages_N_T: Floats, weights_N_T: Floats) -> Floats:
    """Whitening over the batch (verl's `masked_whiten`, shift_mean=True): (A - m) /
    sqrt(v + 1e-8) with m and the Bessel-corrected v weighted by `weights_N_T` (1 per trained
    turn, or its number of sampled tokens: each token one sample), the mean not added back;
    0 where the weight is 0."""
    where_N_T = weights_N_T > 0
    w_K, a_K = weights_N_T[where_N_T], advantages_N_T[where_N_T]
    total = float(w_K.sum())
    if total == 0.0:
        return np.zeros(advantages_N_T.shape)
    mean = float((w_K * a_K).sum()) / total
    var = float((w_K * (a_K - mean) ** 2).sum()) / max(total - 1.0, 1.0)
    out_N_T = np.zeros(advantages_N_T.shape)
    out_N_T[where_N_T] = (a_K - mean) / np.sqrt(var + _WHITEN_FLOOR)
    return out_N_T


def _whiten_weights(episodes: Sequence[Episode], batch: TurnBatch, mode: Whiten) -> Floats:
    if mode == "turns":
        return batch.train_N_T.astype(np.float64)
    weights_N_T = np.zeros(batch.mask_N_T.shape)
    weights_N_T[batch.mask_N_T] = [len(t.completion_ids) for e in episodes for t in e.turns]
    return np.where(batch.train_N_T, weights_N_T, 0.0)


def _gae(episodes: Sequence[Episode], batch: TurnBatch, cfg: GaeConfig | TppoConfig) -> Floats:
    values, bootstrap = _values(episodes, batch, isinstance(cfg, TppoConfig))
    adv_N_T = gae(batch.rewards_N_T, values, batch.mask_N_T, bootstrap, cfg.gamma, cfg.lam)[0]
    if cfg.whiten == "none":
        return adv_N_T
    return whiten(adv_N_T, _whiten_weights(episodes, batch, cfg.whiten))


def _estimate(
    episodes: Sequence[Episode],
    batch: TurnBatch,
    cfg: EstimatorConfig,
    graph: TurnGraph | None,
) -> Floats:
    mask, train, group = batch.mask_N_T, batch.train_N_T, batch.group_N
    returns = batch.returns_N
    match cfg:
        case GrpoConfig(eps=eps, std=std, singleton=singleton):
            return _broadcast(
                trajectory_advantages("grpo", returns, group, eps, std, singleton), mask
            )
        case DrGrpoConfig(singleton=singleton):
            return _broadcast(
                trajectory_advantages("dr_grpo", returns, group, singleton=singleton), mask
            )
        case RlooConfig(singleton=singleton):
            return _broadcast(
                trajectory_advantages("rloo", returns, group, singleton=singleton), mask
            )
        case ReinforcePPConfig(gamma=gamma, eps=eps):
            return reinforce_pp(batch.rewards_N_T, train, gamma, eps)
        case TrlooConfig(gamma=gamma, ended=ended):
            return trloo(batch.rewards_N_T, mask, group, gamma, ended)
        case GigpoConfig(anchor=anchor):
            if graph is None or anchor != "history":
                graph = turn_graph(episodes, group, anchor)
            return gigpo(
                returns,
                batch.rewards_N_T,
                mask,
                group,
                graph.state_N_T,
                cfg.gamma,
                cfg.omega,
                cfg.scale,
                cfg.eps,
                cfg.std,
                cfg.singleton,
            )
        case SaltConfig(base=base, eps=eps, std=std, singleton=singleton):
            graph = graph or turn_graph(episodes, group)
            base_N = trajectory_advantages(base, returns, group, eps, std, singleton)
            return salt(base_N, mask, graph.edge_N_T)
        case TempoConfig(form=form, eps=eps):
            graph = graph or turn_graph(episodes, group)
            return tempo(returns, batch.rewards_N_T, mask, group, graph, form, eps)
        case GaeConfig() | TppoConfig():
            return _gae(episodes, batch, cfg)
        case EmpgConfig():
            base_N_T = _estimate(episodes, batch, cfg.base, graph)
            entropy, measured = _entropies(episodes, mask)
            measured = measured & train
            return empg(base_N_T, entropy, train, measured, cfg.k, cfg.k_f, cfg.zeta, cfg.center)
    raise TypeError(f"not an estimator config: {cfg!r}")


def _rows(values_N_T: Floats, lengths: Sequence[int]) -> list[list[float]]:
    return [row[:n] for row, n in zip(values_N_T.tolist(), lengths, strict=True)]


def compute_advantages(
    episodes: Sequence[Episode],
    rewards_NT: Sequence[Sequence[float]],
    cfg: EstimatorConfig,
    *,
    graph: TurnGraph | None = None,
) -> list[list[float]]:
    """Per-episode, per-turn advantages (module docstring): exactly 0 on `replayed` turns.
    Episodes of any number of groups, in any order. `graph` (`turn_graph` of the same
    episodes, history anchors) lets several estimators share one hashing of the turns."""
    batch = turn_batch(episodes, rewards_NT)
    advantages_N_T = np.where(batch.train_N_T, _estimate(episodes, batch, cfg, graph), 0.0)
    return _rows(advantages_N_T, batch.lengths)


def value_targets(
    episodes: Sequence[Episode], rewards_NT: Sequence[Sequence[float]], cfg: EstimatorConfig
) -> list[list[float]]:
    """Value-head regression targets per turn: GAE's lambda-returns A_t + V(s_t) for `gae` and
    `tppo` (bootstrapped at a cut for `tppo`), else the return-to-go G_t, discounted by the
    config's gamma where it has one (EMPG: its base's)."""
    batch = turn_batch(episodes, rewards_NT)
    inner = cfg.base if isinstance(cfg, EmpgConfig) else cfg
    match inner:
        case GaeConfig(gamma=gamma, lam=lam) | TppoConfig(gamma=gamma, lam=lam):
            values, bootstrap = _values(episodes, batch, isinstance(inner, TppoConfig))
            targets = gae(batch.rewards_N_T, values, batch.mask_N_T, bootstrap, gamma, lam)[1]
        case ReinforcePPConfig(gamma=gamma) | TrlooConfig(gamma=gamma) | GigpoConfig(gamma=gamma):
            targets = returns_to_go(batch.rewards_N_T, gamma)
        case _:
            targets = returns_to_go(batch.rewards_N_T, 1.0)
    return _rows(np.where(batch.mask_N_T, targets, 0.0), batch.lengths)


def group_ids_to_index(group_ids: Sequence[str]) -> torch.Tensor:
    """Dense group index (0..n_groups-1) for each episode, in order of first appearance."""
    return torch.from_numpy(dense_index(group_ids))


def grpo(returns_N: torch.Tensor, group_N: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages (R - mean) / (std + eps); zero for constant groups (torch
    in, torch out; `group_advantages.grpo` is the numpy function)."""
    return torch.from_numpy(group_adv.grpo(_f64(returns_N), group_N.numpy(), eps))


def dr_grpo(returns_N: torch.Tensor, group_N: torch.Tensor) -> torch.Tensor:
    """Group-centred advantages R - mean (torch in, torch out)."""
    return torch.from_numpy(group_adv.dr_grpo(_f64(returns_N), group_N.numpy()))


def _f64(values: torch.Tensor) -> Floats:
    return values.detach().cpu().numpy().astype(np.float64, copy=False)


def turn_advantages(
    episodes: Sequence[Episode], returns: Sequence[float], estimator: Estimator
) -> list[list[float]]:
    """Per-episode, per-turn advantages of a trajectory-level estimator (`grpo`, `dr_grpo`,
    `rloo`) from episode returns: the episode's advantage on each of its turns. The others
    need per-turn rewards: `compute_advantages`."""
    if estimator != "grpo" and estimator != "dr_grpo" and estimator != "rloo":
        raise ValueError(f"{estimator} needs per-turn rewards: use compute_advantages")
    returns_N = np.array(list(returns), np.float64)
    group_N = dense_index([e.group_id for e in episodes])
    adv_N = trajectory_advantages(estimator, returns_N, group_N)
    return [[a] * len(e.turns) for e, a in zip(episodes, adv_N.tolist(), strict=True)]
