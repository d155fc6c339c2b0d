"""Turn-level reward components: each turn gets a vector of named rewards, never pre-summed.

Every component is a pure function of stored records (and of the episode's group where it
needs one), so `turnrl replay` recomputes them without a model; quantities a model measured
(`gold_prob`) are read from `Turn.signals`, where `turnrl.rl.info_gain` stored them. A
component's value lands on the turn whose action earned it. Components:

- `outcome`: the grader's score `outcome[outcome_metric]` on the episode's last turn.
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
  turn t: the gold answer appeared in an earlier turn's tool output (`signals["gold_seen"]`,
  see `mark_gold_seen`), or the policy's gold probability before turn t (`gold_prob` of turn
  t-1, `gold_prob_initial` for turn 0) was at least `saturation_threshold`. Never positive.
- `eapo`: the geometric turn discount of the terminal reward (IterResearch's Efficiency-Aware
  Policy Optimization, Chen et al. 2025, arXiv 2511.07327, gives round t of T the reward
  gamma^(T-t) * R_T). Kept separate from `outcome`, it is the delay cost that turns the outcome
  into the discounted one: -(1 - gamma) * gamma^(T-2-t) * R on turn t < T-1 (0-based), 0 on the
  last turn. With equal weights, `outcome + eapo` has returns-to-go gamma^(T-1-t) * R from
  every turn t (the paper's per-round reward) and episode return gamma^(T-1) * R, so that any
  estimator that sums rewards sees the discounted terminal reward.
- `coverage`: marginal coverage of a search: the k-th distinct passage (`ToolResult.items`)
  the episode sees (k = 0, 1, ...) earns `coverage_decay ** k`, a passage seen before earns 0
  (diminishing returns; the episode total 1 + d + d^2 + ... is bounded).

`outcome`, `format` and `tool_cost` are always filled in (stored runs and reports rely on
them); the others when `weights` names them. `RewardConfig.weights` combine components into a
scalar only where an estimator asks for one (`weighted`, `episode_return`); GDPO-style
decoupled normalisation (`decoupled_returns`, `decoupled_turn_rewards`, selected by
`RewardConfig.decoupled`) is the other way to combine them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from turnrl.agent.records import Episode
from turnrl.tasks.grading import normalize_answer

BASE_COMPONENTS = ("outcome", "format", "tool_cost")
"""Filled in on every turn, weighted or not."""
COMPONENTS = (*BASE_COMPONENTS, "info_gain", "otc", "saturation", "eapo", "coverage")


class RewardConfig(BaseModel):
    """Which components count, how much, and their parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: dict[str, float] = Field(
        default_factory=lambda: {"outcome": 1.0, "format": 0.1, "tool_cost": 0.01}
    )
    """Weight of each component in the scalar return; names must be in `COMPONENTS`. A named
    component is computed even at weight 0 (so that it is logged)."""
    outcome_metric: str = "f1"
    """Which grader score is the outcome reward (`correct`, `exact_match`, `f1`)."""
    cost_weights: dict[str, float] = Field(default_factory=lambda: {"calls": 1.0})
    """Price of each cost kind in the `tool_cost` component (>= 0)."""
    success_metric: str = "correct"
    """The grader score that makes an episode correct (when >= 1) for `otc`'s target: the
    fewest calls among the group's correct episodes."""
    otc_c: float = Field(1.0, gt=0)
    """`otc`'s smoothing constant c in cos(m * pi / (2m + c)), the coefficient used when the
    target is 0 calls: smaller c punishes each extra call harder."""
    saturation_threshold: float | None = Field(0.5, gt=0, le=1)
    """`saturation`: the answer counts as reachable once the gold probability reached this;
    None to use only `gold_seen`."""
    eapo_gamma: float = Field(0.9, gt=0, le=1)
    """`eapo`'s discount per turn. IterResearch runs hundreds of rounds with gamma near 1; with
    a handful of turns a smaller gamma is needed for the discount to matter."""
    coverage_decay: float = Field(0.5, gt=0, le=1)
    """`coverage`: the k-th new passage earns decay**k (1: every new passage earns 1)."""
    decoupled: bool = False
    """Combine the weighted components GDPO-style (`decoupled_turn_rewards`: each normalised
    within its group, summed, then normalised over the batch) instead of by a plain weighted
    sum per turn."""

    def model_post_init(self, context: object) -> None:
        unknown = sorted(set(self.weights) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown reward components {unknown}; known: {list(COMPONENTS)}")
        negative = sorted(k for k, w in self.cost_weights.items() if w < 0)
        if negative:
            raise ValueError(f"cost weights must be >= 0 (a cost is never a reward): {negative}")

    def metrics_read(self) -> list[tuple[str, str]]:
        """Every grader metric these rewards read, as `(config field, metric)` pairs (e.g.
        `("rewards.outcome_metric", "f1")`), so a run config can check them against the
        metrics its suite emits."""
        return [
            ("rewards.outcome_metric", self.outcome_metric),
            ("rewards.success_metric", self.success_metric),
        ]

    def components(self) -> list[str]:
        """The components `group_rewards` fills in, in `COMPONENTS` order."""
        return [c for c in COMPONENTS if c in BASE_COMPONENTS or c in self.weights]


# --- components of one episode ------------------------------------------------------------


def outcome_rewards(episode: Episode, metric: str) -> list[float]:
    """`outcome[metric]` on the last turn, 0 elsewhere."""
    last = len(episode.turns) - 1
    score = episode.outcome.get(metric, 0.0)
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
    first = episode.turns[0].signals
    if "gold_prob_initial" not in first:
        raise _missing(episode, "gold_prob_initial", 0)
    # Answer turns are skipped entirely (their probability too), so the gains telescope.
    previous = first["gold_prob_initial"]
    out = []
    for t, turn in enumerate(episode.turns):
        if turn.answer is not None:
            out.append(0.0)
            continue
        current = turn.signals.get("gold_prob")
        if current is None:
            raise _missing(episode, "gold_prob", t)
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
    calls = [e.n_tool_calls for e in group if e.outcome.get(success_metric, 0.0) >= 1.0]
    return min(calls) if calls else None


def otc_rewards(episode: Episode, target: int | None, metric: str, c: float) -> list[float]:
    """r_phi * (r_tool(m, n) - 1) on the last turn (see the module docstring), r_phi the
    outcome score (taken as 0 when negative); 0 when the group has no target."""
    out = [0.0] * len(episode.turns)
    if out and target is not None:
        r_phi = max(episode.outcome.get(metric, 0.0), 0.0)
        out[-1] = r_phi * (otc_tool_reward(episode.n_tool_calls, target, c) - 1.0)
    return out


def saturation_rewards(episode: Episode, threshold: float | None) -> list[float]:
    """-(number of calls) on each turn that starts with the answer already reachable."""
    turns = episode.turns
    if not turns:
        return []
    has_seen = all("gold_seen" in t.signals for t in turns)
    has_prob = (
        threshold is not None
        and "gold_prob_initial" in turns[0].signals
        and all("gold_prob" in t.signals for t in turns[:-1])
    )
    if not (has_seen or has_prob):
        raise ValueError(
            f"episode {episode.episode_id}: the saturation reward needs `gold_seen` on every "
            "turn's signals (see `mark_gold_seen`) or, with a `saturation_threshold`, "
            "`gold_prob_initial` and `gold_prob` (see `turnrl.rl.info_gain`)"
        )
    out = []
    seen = False
    for t, turn in enumerate(turns):
        reachable = seen
        if has_prob and threshold is not None:
            before = (
                turns[0].signals["gold_prob_initial"]
                if t == 0
                else turns[t - 1].signals["gold_prob"]
            )
            reachable = reachable or before >= threshold
        out.append(-float(turn.n_tool_calls) if reachable else 0.0)
        seen = seen or (has_seen and turn.signals["gold_seen"] >= 0.5)
    return out


def eapo_rewards(episode: Episode, metric: str, gamma: float) -> list[float]:
    """-(1 - gamma) gamma^(T-2-t) R before the last turn, 0 on it (see the module docstring)."""
    n = len(episode.turns)
    score = episode.outcome.get(metric, 0.0)
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


def mark_gold_seen(episode: Episode, golds: Sequence[str]) -> Episode:
    """`episode` with `signals["gold_seen"]` on every turn: 1.0 when some gold answer occurs,
    as whole words after SQuAD normalisation (the grader's), in the turn's tool outputs, else
    0.0. Call it where the task's gold answers are known (training and replay), before
    scoring, when the `saturation` component is weighted."""
    needles = [f" {g} " for g in (normalize_answer(x) for x in golds) if g]
    turns = []
    for turn in episode.turns:
        hay = f" {normalize_answer(' '.join(r.text for r in turn.tool_results))} "
        signals = {**turn.signals, "gold_seen": float(any(n in hay for n in needles))}
        turns.append(turn.model_copy(update={"signals": signals}))
    return episode.model_copy(update={"turns": turns})


def _missing(episode: Episode, signal: str, turn: int) -> ValueError:
    return ValueError(
        f"episode {episode.episode_id} turn {turn}: the info_gain reward needs "
        f"`signals[{signal!r}]`; compute gold probabilities with "
        "`turnrl.rl.info_gain.gold_probabilities` and store them with `with_gold_probs` "
        "before scoring"
    )


# --- whole batches -----------------------------------------------------------------------


def group_rewards(episodes: Sequence[Episode], config: RewardConfig) -> list[Episode]:
    """Graded episodes (any number of groups) with every turn's `rewards` filled in with
    `config.components()`; same order out. `otc` reads each episode's group (`group_id`)."""
    names = config.components()
    targets: dict[str, int | None] = {}
    if "otc" in names:
        groups: dict[str, list[Episode]] = {}
        for e in episodes:
            groups.setdefault(e.group_id, []).append(e)
        targets = {g: otc_target(members, config.success_metric) for g, members in groups.items()}
    out = []
    for episode in episodes:
        columns = {name: _component(name, episode, config, targets) for name in names}
        turns = [
            turn.model_copy(update={"rewards": {name: columns[name][t] for name in names}})
            for t, turn in enumerate(episode.turns)
        ]
        out.append(episode.model_copy(update={"turns": turns}))
    return out


def turn_rewards(episode: Episode, config: RewardConfig) -> Episode:
    """One episode's rewards, the episode being its own group (`otc`'s target is then its own
    call count when correct). Prefer `group_rewards`."""
    return group_rewards([episode], config)[0]


def _component(
    name: str, episode: Episode, config: RewardConfig, targets: Mapping[str, int | None]
) -> list[float]:
    if name == "outcome":
        return outcome_rewards(episode, config.outcome_metric)
    if name == "format":
        return format_rewards(episode)
    if name == "tool_cost":
        return tool_cost_rewards(episode, config.cost_weights)
    if name == "info_gain":
        return info_gain_rewards(episode)
    if name == "otc":
        return otc_rewards(
            episode, targets.get(episode.group_id), config.outcome_metric, config.otc_c
        )
    if name == "saturation":
        return saturation_rewards(episode, config.saturation_threshold)
    if name == "eapo":
        return eapo_rewards(episode, config.outcome_metric, config.eapo_gamma)
    if name == "coverage":
        return coverage_rewards(episode, config.coverage_decay)
    raise ValueError(f"unknown reward component {name!r}")


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
