"""The task-level bandit router: one model runs a whole episode, picked from the task's text
(`TaskBanditConfig`); its logs, their off-policy evaluation, and the retraining monitor.

- Features (`task_features`): a hashed bag of words of the question (the hashing trick,
  Weinberger et al. 2009, "Feature hashing for large scale multitask learning", arXiv
  0902.2206, here without the sign hash, so counts stay nonnegative), L2-normalised, plus two
  length features. The hash is `zlib.crc32`, not Python's `hash()` (salted per process): the
  same question gives the same features in every process and every run.
- The router (`TaskRouter`) draws a model from a `turnrl.rl.bandit.BanditRouter` (ridge oracle
  per arm, exploration that never gives an arm 0) and gives the episode a `FixedRouter` of its
  pick and the logged decision (`EpisodeSpec.router`, `EpisodeSpec.route`, kept in
  `Episode.route`). Evaluation (`greedy`) takes the arm of highest prediction and logs
  propensity 1 with one-hot probabilities, as `turnrl.rl.step_router` does.
- Logs (`bandit_log`) and off-policy estimates (`ope_estimates`: IPS, SNIPS and doubly robust,
  Dudík, Langford & Li 2011, arXiv 1103.4601; `turnrl.rl.ope`) of another router's value on
  the logged tasks. A decision's reward is its episode's (`turnrl.rl.step_router.episode_reward`:
  success minus the weighted, scaled `model_usd` cost).
- Retraining on the router's own logs can oscillate with a misspecified oracle
  (`turnrl.rl.bandit`); `retraining_oscillation` measures it over generations.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from turnrl.agent.records import Episode, Route
from turnrl.agent.routing import FixedRouter
from turnrl.rl.bandit import BanditRouter, OscillationReport, oscillation
from turnrl.rl.bandit_config import TaskBanditConfig
from turnrl.rl.ope import BanditLog, FloatArray, OpeEstimate, doubly_robust, ips, snips
from turnrl.rl.step_router import episode_reward, scored

ROUTER = "bandit"
"""`Route.router` of this router's decisions."""

N_HASH = 16
"""Hash buckets of the bag of words, by default."""

LENGTH_FEATURES: tuple[str, ...] = ("log_words", "digit_words")
"""The features after the buckets (`task_features`):

- `log_words`: log(1 + words) / `LOG_WORDS_SCALE`, about 1 at 150 words.
- `digit_words`: the fraction of words that hold a digit (arithmetic, ids, dates)."""

LOG_WORDS_SCALE = 5.0
"""Divides log(1 + words), so a question's length is O(1) like the buckets."""

_WORD = re.compile(r"[a-z0-9]+")


def task_features(question: str, n_hash: int = N_HASH) -> tuple[float, ...]:
    """The question's features: `n_hash` buckets, then `LENGTH_FEATURES`.

    Words are the runs of letters and digits of the lower-cased text; each adds 1 to bucket
    `crc32(word) % n_hash`; the bucket vector is divided by its L2 norm (all 0 for no words)."""
    if n_hash < 1:
        raise ValueError(f"n_hash must be >= 1, got {n_hash}")
    words = _WORD.findall(question.lower())
    counts = [0.0] * n_hash
    for w in words:
        counts[zlib.crc32(w.encode()) % n_hash] += 1.0
    norm = math.sqrt(sum(c * c for c in counts))
    buckets = [c / norm for c in counts] if norm > 0 else counts
    n = len(words)
    digits = sum(any(ch.isdigit() for ch in w) for w in words) / n if n else 0.0
    return (*buckets, math.log1p(n) / LOG_WORDS_SCALE, digits)


@dataclass(frozen=True)
class TaskRouter:
    """Picks the model that runs a task's episode."""

    bandit: BanditRouter
    """The oracle and exploration rule; its arms are the routed models' names."""
    rng: np.random.Generator
    """The draws (advanced by each exploring pick)."""
    greedy: bool = False
    """Take the arm of highest predicted reward and log propensity 1 (evaluation)."""
    n_hash: int = N_HASH
    """Hash buckets of `task_features`."""

    def __post_init__(self) -> None:
        d = self.n_hash + len(LENGTH_FEATURES) + int(self.bandit.config.intercept)
        if self.bandit.gram_A_D_D.shape[1] != d:
            raise ValueError(
                f"the bandit has {self.bandit.gram_A_D_D.shape[1]} inputs; task features need {d}"
            )

    @staticmethod
    def new(
        config: TaskBanditConfig,
        arms: tuple[str, ...],
        rng: np.random.Generator,
        greedy: bool = False,
        n_hash: int = N_HASH,
    ) -> TaskRouter:
        """A router with no data yet (it explores uniformly) over `arms`."""
        bandit = BanditRouter.new(config.router_config(arms), n_hash + len(LENGTH_FEATURES))
        return TaskRouter(bandit, rng, greedy, n_hash)

    def pick(self, question: str) -> tuple[FixedRouter, Route]:
        """The episode's router (every turn by the picked model) and the logged decision."""
        features = task_features(question, self.n_hash)
        arms = self.bandit.arms
        if self.greedy:
            i = int(self.bandit.greedy_N(np.asarray([features], dtype=np.float64))[0])
            route = Route(
                model=arms[i],
                router=ROUTER,
                propensity=1.0,
                probabilities={a: float(j == i) for j, a in enumerate(arms)},
                features=list(features),
            )
        else:
            d = self.bandit.choose(features, self.rng)
            route = Route(
                model=d.arm,
                router=ROUTER,
                propensity=d.propensity,
                probabilities=dict(zip(arms, d.probabilities, strict=True)),
                features=list(features),
            )
        return FixedRouter(route.model), route


def bandit_log(
    episodes: Sequence[Episode],
    arms: Sequence[str],
    cost_weight: float,
    usd_scale: float,
    success_metric: str = "correct",
    reward_model: BanditRouter | None = None,
) -> BanditLog:
    """The logged decisions (`Episode.route` with `router == "bandit"`) of the scored episodes
    (`turnrl.rl.step_router.scored`), each rewarded with its episode's reward.

    `reward_model` gives doubly robust its r_hat(x, a) (None: the log has no predictions, and
    only IPS and SNIPS apply). Pass the logging router: its oracle was fitted before these
    decisions, independent of their rewards, so DR stays unbiased whenever the propensities
    are right, and its predictions are the ones the router chose with. A model fitted on this
    same log fits the noise of the rewards it then corrects (an in-sample bias, usually small,
    with lower variance); cross-fitting on held-out halves would remove it."""
    index = {a: i for i, a in enumerate(arms)}
    routed = [
        (e, e.route)
        for e in episodes
        if e.route is not None and e.route.router == ROUTER and scored(e)
    ]
    if not routed:
        raise ValueError("no scored episode carries a bandit decision: nothing to evaluate")
    for e, r in routed:
        if r.model not in index:
            raise ValueError(f"episode {e.episode_id}: {r.model!r} is not in {arms}")
    widths = {len(r.features) for _, r in routed}
    if len(widths) != 1:
        raise ValueError(f"the decisions' feature vectors differ in length: {sorted(widths)}")
    features_N_D = np.asarray([r.features for _, r in routed], dtype=np.float64)
    predictions_N_A = None
    if reward_model is not None:
        if reward_model.arms != tuple(arms):
            raise ValueError(f"the reward model's arms {reward_model.arms} are not {tuple(arms)}")
        predictions_N_A = reward_model.predict_N_A(features_N_D)
    return BanditLog(
        features_N_D=features_N_D,
        arms_N=np.asarray([index[r.model] for _, r in routed], dtype=np.int64),
        propensities_N=np.asarray([r.propensity for _, r in routed], dtype=np.float64),
        rewards_N=np.asarray(
            [episode_reward(e, success_metric, cost_weight, usd_scale) for e, _ in routed],
            dtype=np.float64,
        ),
        predictions_N_A=predictions_N_A,
    )


@dataclass(frozen=True)
class OpeReport:
    """Off-policy estimates of a target router's mean reward on a log's tasks."""

    ips: OpeEstimate
    """Inverse propensity scoring."""
    snips: OpeEstimate
    """Self-normalised IPS."""
    dr: OpeEstimate | None
    """Doubly robust; None when the log has no reward-model predictions."""


def target_probabilities_N_A(
    target: BanditRouter, features_N_D: FloatArray, greedy: bool
) -> FloatArray:
    """The target router's action probabilities: its exploring ones, or one-hot on its greedy
    arm when `greedy` (how it runs in evaluation)."""
    if greedy:
        return np.asarray(np.eye(len(target.arms))[target.greedy_N(features_N_D)], np.float64)
    return target.probabilities_N_A(features_N_D)


def ope_estimates(log: BanditLog, target: BanditRouter, greedy: bool) -> OpeReport:
    """IPS, SNIPS and DR estimates of `target`'s value on the logged tasks (`turnrl.rl.ope`)."""
    target_N_A = target_probabilities_N_A(target, log.features_N_D, greedy)
    return OpeReport(
        ips=ips(log, target_N_A),
        snips=snips(log, target_N_A),
        dr=None if log.predictions_N_A is None else doubly_robust(log, target_N_A),
    )


def retraining_oscillation(
    generations: Sequence[BanditRouter], probe_features_N_D: FloatArray
) -> OscillationReport:
    """How the greedy arm on the probe tasks moves over successive generations of a router
    (`turnrl.rl.bandit.oscillation`): probe with a fixed set of tasks' features."""
    return oscillation(np.stack([g.greedy_N(probe_features_N_D) for g in generations]))
