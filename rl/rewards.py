"""Turn-level reward components: each turn gets a vector of named rewards, never pre-summed.

Every component is a pure function of stored records (and of the episode's group where it
needs one), so `turnrl replay` recomputes them without a model; quantities a model measured
(`gold_prob`, `Episode.gold_prob_initial`) are read from the typed `Turn.signals`, where
`turnrl.rl.info_gain` stored them; grader metrics are read strictly (`metric`: a metric the
grader did not emit raises, naming the episode). A
component's value lands on the turn whose action earned it. Components:

- `outcome`: the grader's score `outcome[metric]` on the episode's last turn.
- `format`: -1 on a turn with a format error (bad call, unterminated tag, or neither a call
  nor an answer: SimpleTIR's "void turn", Xue et al. 2025, arXiv 2509.02479), else 0.
- `tool_cost`: minus the turn's tool-call cost vectors weighted by kind,
  -sum_calls sum_kind |cost_weights[kind] * cost[kind]| (heterogeneous costs: time, money,
  tokens, human attention: the heterogeneous costs of HC-GRPO in ESearch-R1, Zhou et al. 2025,
  arXiv 2512.18571). Never positive.
- `info_gain`: IGPO (Wang et al. 2025, arXiv 2510.14967): p_t - p_{t-1}, the change in the
  policy's teacher-forced probability of the gold answer from before turn t to after its
  observation (p_{-1}: given the initial prompt only). As in IGPO the answer turn gets 0 here:
  its credit is the outcome. Over an episode the gains telescope to p_last - p_{-1}, where
  p_last is the probability after the last turn that did not answer.
- `otc`: optimal tool calls (OTC-GRPO, Wang et al. 2025, arXiv 2504.14870). The paper's reward
  is r_phi * r_tool(m, n): correctness times a tool-efficiency coefficient in [0, 1] that peaks
  (1) when the episode's m calls equal n, the fewest calls among the group's correct episodes.
  Kept as its own component it is r_phi * (r_tool(m, n) - 1) on the last turn, so that
  `outcome + otc` (equal weights) is exactly the paper's multiplicative reward. It is never
  positive and is 0 for a wrong answer (r_phi = 0) and for a group with no correct episode
  (no target n): making calls is never rewarded, and a wrong episode is not told to call less.
- `saturation`: a saturation penalty (the SPAE idea of the issue): -1 per tool call made in a
  turn that starts when the answer was already reachable. Reachable, operationally, before
  turn t: the gold answer appeared in an earlier turn's tool output (`signals.gold_seen`,
  see `mark_gold_seen`), or the policy's gold probability before turn t (`gold_prob` of turn
  t-1, `Episode.gold_prob_initial` for turn 0) was at least `threshold`. Never positive.
- `eapo`: the geometric turn discount of the terminal reward (IterResearch's Efficiency-Aware
  Policy Optimization, Chen et al. 2025, arXiv 2511.07327, gives round t of T the reward
  gamma^(T-t) * R_T). Kept separate from `outcome`, it is the delay cost that turns the outcome
  into the discounted one: -(1 - gamma) * gamma^(T-2-t) * R on turn t < T-1 (0-based), 0 on the
  last turn. With equal weights, `outcome + eapo` has returns-to-go gamma^(T-1-t) * R from
  every turn t (the paper's per-round reward) and episode return gamma^(T-1) * R, so that any
  estimator that sums rewards sees the discounted terminal reward.
- `coverage`: marginal coverage of a search: the k-th distinct passage (`ToolResult.items`)
  the episode sees (k = 0, 1, ...) earns `decay ** k`, a passage seen before earns 0
  (diminishing returns; the episode total 1 + d + d^2 + ... is bounded).

`outcome`, `format` and `tool_cost` are always filled in (stored runs and reports rely on
them); the others when the config lists them (`turnrl.rl.reward_config`). Weights combine
components into a scalar only where an estimator asks for one (`weighted`, `episode_return`);
GDPO-style
decoupled normalisation (`decoupled_returns`, `decoupled_turn_rewards`, selected by
`RewardConfig.combine: gdpo`) is the other way to combine them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from turnrl.agent.records import Episode
from turnrl.rl.reward_config import (
    BASE_COMPONENTS,
    COMPONENTS,
    CoverageReward,
    EapoReward,
    FormatReward,
    InfoGainReward,
    OtcReward,
    OutcomeReward,
    RewardComponent,
    RewardConfig,
    SaturationReward,
    ToolCostReward,
)

__all__ = [
    "BASE_COMPONENTS",
    "COMPONENTS",
    "RewardConfig",
    "coverage_rewards",
    "decoupled_returns",
    "decoupled_turn_rewards",
    "eapo_rewards",
    "episode_return",
    "format_rewards",
    "group_rewards",
    "info_gain_rewards",
    "mark_gold_seen",
    "metric",
    "otc_rewards",
    "otc_target",
    "otc_tool_reward",
    "outcome_rewards",
    "saturation_rewards",
    "tool_cost_rewards",
    "turn_rewards",
    "weighted",
]

# --- components of one episode ------------------------------------------------------------


def metric(episode: Episode, name: str) -> float:
    """The grader's score `name` of `episode`; raises naming the episode when the grader did
    not emit it (a missing metric is a configuration or grading bug, never a score of 0)."""
    try:
        return episode.outcome[name]
    except KeyError:
        graded = sorted(episode.outcome) or "nothing (not graded)"
        raise ValueError(
            f"episode {episode.episode_id}: no outcome metric {name!r}; its grader emitted {graded}"
        ) from None


def outcome_rewards(episode: Episode, metric_name: str) -> list[float]:
    """`outcome[metric_name]` on the last turn, 0 elsewhere."""
    last = len(episode.turns) - 1
    score = metric(episode, metric_name)
    return [score if t == last else 0.0 for t in range(len(episode.turns))]


def format_rewards(episode: Episode) -> list[float]:
    """-1 on a malformed (or void) turn, else 0."""
    return [-1.0 if t.format_error else 0.0 for t in episode.turns]


def tool_cost_rewards(episode: Episode, cost_weights: Mapping[str, float]) -> list[float]:
    """Minus each turn's weighted cost vectors; each term counts by its magnitude, so a
    negative entry cannot offset another (never positive)."""
    out = []
    for turn in episode.turns:
        cost = 0.0
        for result in turn.tool_results:
            cost += sum(abs(cost_weights.get(k, 0.0) * v) for k, v in result.cost.items())
        out.append(-cost)
    return out


def info_gain_rewards(episode: Episode) -> list[float]:
    """IGPO's p_t - p_{t-1} on every turn without an answer, 0 on answer turns."""
    if not episode.turns:
        return []
    if episode.gold_prob_initial is None:
        raise _missing(episode, "gold_prob_initial", None)
    # Answer turns are skipped entirely (their probability too), so the gains telescope.
    previous = episode.gold_prob_initial
    out = []
    for t, turn in enumerate(episode.turns):
        if turn.answer is not None:
            out.append(0.0)
            continue
        current = turn.signals.gold_prob
        if current is None:
            raise _missing(episode, "signals.gold_prob", t)
        out.append(current - previous)
        previous = current
    return out


def otc_tool_reward(m: int, n: int, c: float = 1.0) -> float:
    """OTC-GRPO's r_tool(m, n) in [0, 1] (arXiv 2504.14870): 1 when m = n; for n = 0,
    cos(m pi / (2m + c)); otherwise sin(f pi / (2n)) with f = 2nm / (m + n), which rises to 1
    at m = n and falls back to 0 both at m = 0 and as m grows."""
    if n == 0:
        return 1.0 if m == 0 else math.cos(m * math.pi / (2 * m + c))
    f = 2 * n * m / (m + n)
    return math.sin(f * math.pi / (2 * n))


def otc_target(group: Sequence[Episode], success_metric: str) -> int | None:
    """The fewest tool calls among the group's correct episodes; None when none is correct."""
    calls = [e.n_tool_calls for e in group if metric(e, success_metric) >= 1.0]
    return min(calls) if calls else None


def otc_rewards(episode: Episode, target: int | None, metric_name: str, c: float) -> list[float]:
    """r_phi * (r_tool(m, n) - 1) on the last turn (see the module docstring), r_phi the
    outcome score (taken as 0 when negative); 0 when the group has no target."""
    out = [0.0] * len(episode.turns)
    if out and target is not None:
        r_phi = max(metric(episode, metric_name), 0.0)
        out[-1] = r_phi * (otc_tool_reward(episode.n_tool_calls, target, c) - 1.0)
    return out


def saturation_rewards(episode: Episode, threshold: float | None) -> list[float]:
    """-(number of calls) on each turn that starts with the answer already reachable."""
    turns = episode.turns
    if not turns:
        return []
    has_seen = all(t.signals.gold_seen is not None for t in turns)
    has_prob = (
        threshold is not None
        and episode.gold_prob_initial is not None
        and all(t.signals.gold_prob is not None for t in turns[:-1])
    )
    if not (has_seen or has_prob):
        raise ValueError(
            f"episode {episode.episode_id}: the saturation reward needs `signals.gold_seen` on "
            "every turn (see `mark_gold_seen`) or, with a `threshold`, `gold_prob_initial` and "
            "`signals.gold_prob` (see `turnrl.rl.info_gain`)"
        )
    out = []
    seen = False
    for t, turn in enumerate(turns):
        reachable = seen
        if has_prob and threshold is not None:
            before = episode.gold_prob_initial if t == 0 else turns[t - 1].signals.gold_prob
            assert before is not None  # has_prob
            reachable = reachable or before >= threshold
        out.append(-float(turn.n_tool_calls) if reachable else 0.0)
        seen = seen or (has_seen and bool(turn.signals.gold_seen))
    return out


def eapo_rewards(episode: Episode, metric_name: str, gamma: float) -> list[float]:
    """-(1 - gamma) gamma^(T-2-t) R before the last turn, 0 on it (see the module docstring)."""
    n = len(episode.turns)
    score = metric(episode, metric_name)
    return [-(1.0 - gamma) * gamma ** (n - 2 - t) * score if t < n - 1 else 0.0 for t in range(n)]


def coverage_rewards(episode: Episode, decay: float) -> list[float]:
    """decay**k for the k-th distinct passage the episode sees, summed per turn."""
    seen: set[str] = set()
    out = []
    for turn in episode.turns:
        reward = 0.0
        for result in turn.tool_results:
            for item in result.items:
                if item not in seen:
                    reward += decay ** len(seen)
                    seen.add(item)
        out.append(reward)
    return out


def mark_gold_seen(
    episode: Episode, golds: Sequence[str], normalize: Callable[[str], str]
) -> Episode:
    """`episode` with `signals.gold_seen` on every turn: True when some gold answer occurs, as
    whole words after `normalize` (the suite grader's normalisation, e.g. SQuAD's), in the
    turn's tool outputs. Call it where the task's gold answers are known (training and replay),
    before scoring, when the `saturation` component is configured."""
    needles = [f" {g} " for g in (normalize(x) for x in golds) if g]
    turns = []
    for turn in episode.turns:
        hay = f" {normalize(' '.join(r.text for r in turn.tool_results))} "
        signals = turn.signals.model_copy(update={"gold_seen": any(n in hay for n in needles)})
        turns.append(turn.model_copy(update={"signals": signals}))
    return episode.model_copy(update={"turns": turns})


def _missing(episode: Episode, signal: str, turn: int | None) -> ValueError:
    where = f"episode {episode.episode_id}" + ("" if turn is None else f" turn {turn}")
    return ValueError(
        f"{where}: the info_gain reward needs `{signal}`; compute gold probabilities with "
        "`turnrl.rl.info_gain.gold_probabilities` and store them with `with_gold_probs` "
        "before scoring"
    )


# --- whole batches -----------------------------------------------------------------------


def group_rewards(episodes: Sequence[Episode], config: RewardConfig) -> list[Episode]:
    """Graded episodes (any number of groups) with every turn's `rewards` filled in with the
    configured components, in `COMPONENTS` order; same order out. `otc` reads each episode's
    group (`group_id`)."""
    components = [c for k in config.computed() if (c := config.get(k)) is not None]
    targets: dict[str, int | None] = {}
    if config.get("otc") is not None:
        groups: dict[str, list[Episode]] = {}
        for e in episodes:
            groups.setdefault(e.group_id, []).append(e)
        targets = {g: otc_target(members, config.success_metric) for g, members in groups.items()}
    out = []
    for episode in episodes:
        columns = {c.kind: _component(c, episode, config, targets) for c in components}
        turns = [
            turn.model_copy(update={"rewards": {name: col[t] for name, col in columns.items()}})
            for t, turn in enumerate(episode.turns)
        ]
        out.append(episode.model_copy(update={"turns": turns}))
    return out


def turn_rewards(episode: Episode, config: RewardConfig) -> Episode:
    """One episode's rewards, the episode being its own group (`otc`'s target is then its own
    call count when correct). Prefer `group_rewards`."""
    return group_rewards([episode], config)[0]


def _component(
    c: RewardComponent, episode: Episode, config: RewardConfig, targets: Mapping[str, int | None]
) -> list[float]:
    if isinstance(c, OutcomeReward):
        return outcome_rewards(episode, c.metric)
    if isinstance(c, FormatReward):
        return format_rewards(episode)
    if isinstance(c, ToolCostReward):
        return tool_cost_rewards(episode, c.cost_weights)
    if isinstance(c, InfoGainReward):
        return info_gain_rewards(episode)
    if isinstance(c, OtcReward):
        return otc_rewards(episode, targets.get(episode.group_id), c.metric, c.c)
    if isinstance(c, SaturationReward):
        return saturation_rewards(episode, c.threshold)
    if isinstance(c, EapoReward):
        return eapo_rewards(episode, c.metric, c.gamma)
    assert isinstance(c, CoverageReward)
    return coverage_rewards(episode, c.decay)


def weighted(rewards: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """One turn's scalar reward."""
    return sum(w * rewards.get(name, 0.0) for name, w in weights.items())


def episode_return(episode: Episode, weights: Mapping[str, float]) -> float:
    """Undiscounted sum of the turns' weighted rewards."""
    return sum(weighted(t.rewards, weights) for t in episode.turns)


# --- GDPO: decoupled normalisation ---------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    # Population std (ddof=0), as GRPO's.
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _decoupled(
    episodes: Sequence[Episode], config: RewardConfig, eps: float
) -> tuple[list[list[float]], float, float]:
    """Per-turn group-normalised weighted rewards, and the batch mean and std of their sums."""
    names = list(config.weights)
    for e in episodes:
        for turn in e.turns:
            missing = [n for n in names if n not in turn.rewards]
            if missing:
                raise ValueError(
                    f"episode {e.episode_id} turn {turn.index} has no reward {missing}; "
                    "fill rewards with `group_rewards` first"
                )
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(episodes):
        groups.setdefault(e.group_id, []).append(i)
    totals = [{n: sum(t.rewards[n] for t in e.turns) for n in names} for e in episodes]
    stats: dict[tuple[str, str], tuple[float, float]] = {}
    for g, members in groups.items():
        for n in names:
            stats[(g, n)] = _mean_std([totals[i][n] for i in members])
    rows = []
    for e in episodes:
        last = len(e.turns) - 1
        row = []
        for t, turn in enumerate(e.turns):
            value = 0.0
            for n in names:
                mean, std = stats[(e.group_id, n)]
                # A component constant within the group carries no signal there (as in GRPO).
                if std > 0:
                    centred = turn.rewards[n] - (mean if t == last else 0.0)
                    value += config.weights[n] * centred / (std + eps)
            row.append(value)
        rows.append(row)
    sums = [sum(r) for r in rows]
    batch_mean, batch_std = _mean_std(sums) if sums else (0.0, 0.0)
    return rows, batch_mean, batch_std


def decoupled_returns(
    episodes: Sequence[Episode], config: RewardConfig, *, eps: float = 1e-6
) -> list[float]:
    """GDPO (Liu et al. 2026, arXiv 2601.05242): per episode, each weighted component's
    episode total is normalised within its group, A_k = (R_k - mean_g) / (std_g + eps) (0 for
    a component constant in the group), the weighted sum S = sum_k w_k A_k is then normalised
    over the whole batch, (S - mean_B) / (std_B + eps).

    The result is already an advantage, with zero mean in every group: broadcast it to the
    turns as it is (or through `dr_grpo`, whose centring leaves it unchanged), not through
    `grpo`, which would rescale each group again. Needs `rewards` filled by `group_rewards`.
    """
    rows, mean, std = _decoupled(episodes, config, eps)
    return [(sum(r) - mean) / (std + eps) for r in rows]


def decoupled_turn_rewards(
    episodes: Sequence[Episode], config: RewardConfig, *, eps: float = 1e-6
) -> list[list[float]]:
    """GDPO per turn, for turn-level estimators: each component's turn rewards are divided by
    its group std and the group mean of its episode total is subtracted on the last turn,
    weighted and summed, then the batch mean is subtracted on the last turn and everything is
    divided by the batch std. Each episode's turns sum to its `decoupled_returns` (up to
    rounding); where each component's reward lands is kept."""
    rows, mean, std = _decoupled(episodes, config, eps)
    out = []
    for row in rows:
        scaled = [v / (std + eps) for v in row]
        if scaled:
            scaled[-1] -= mean / (std + eps)
        out.append(scaled)
    return out
