"""The task-level bandit router (`turnrl.rl.task_router`): stable task features, logged picks
that agree with the bandit, the log's rewards worked out by hand, off-policy estimates that
cover a target router's exact value on a synthetic problem, and the retraining monitor on a
misspecified oracle retrained on its own logs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from turnrl.agent.records import GRADER_ERROR, Episode, Route, StopReason
from turnrl.rl.bandit import BanditRouter
from turnrl.rl.bandit_config import BanditRouterConfig, EpsilonGreedyConfig, TaskBanditConfig
from turnrl.rl.task_router import (
    LENGTH_FEATURES,
    TaskRouter,
    bandit_log,
    ope_estimates,
    retraining_oscillation,
    target_probabilities_N_A,
    task_features,
)

ARMS = ("cheap", "expensive")


def test_task_features_are_a_fixed_vector() -> None:
    """Regression lock: stored routes hold these features, and a router fitted on them reads
    new tasks with the same function; do not change without a decision (and a refit).

    Words: what, is, 12, plus, 7, what; crc32(word) % 8 puts what in 2 (twice), 7 in 2,
    is in 7, 12 in 5, plus in 1: counts (0, 1, 3, 0, 0, 1, 0, 1), norm sqrt(12); then
    log(1 + 6) / 5 and 2 of 6 words with a digit."""
    got = task_features("What is 12 plus 7? What!", n_hash=8)
    r = 1 / math.sqrt(12)
    assert got == pytest.approx((0, r, 3 * r, 0, 0, r, 0, r, math.log(7) / 5, 1 / 3), abs=1e-12)
    assert len(task_features("x")) == 16 + len(LENGTH_FEATURES)
    # case and punctuation do not matter; no words is all zeros
    assert task_features("WHAT is 12 plus 7 what") == task_features("What is 12 plus 7? What!")
    assert task_features(" ?! ") == (0.0,) * (16 + len(LENGTH_FEATURES))


def _fitted(epsilon: float, favour: str, n_hash: int = 16) -> BanditRouter:
    """A router fitted so that `favour` looks best on arithmetic questions and the other
    arm on trivia ones (`favour="right"`: cheap on arithmetic, expensive on trivia, the true
    optimum of `_problem`), or one arm everywhere (`favour` an arm's name)."""
    cfg = BanditRouterConfig(arms=ARMS, exploration=EpsilonGreedyConfig(epsilon=epsilon))
    rng = np.random.default_rng(7)
    x, arms, rewards = [], [], []
    for _ in range(100):
        family = "math" if rng.uniform() < 0.5 else "trivia"
        for arm in (0, 1):
            x.append(task_features(_question(family, rng), n_hash))
            arms.append(arm)
            if favour == "right":
                rewards.append(_MEANS[family][ARMS[arm]])
            else:
                rewards.append(float(ARMS[arm] == favour))
    return BanditRouter.fit(cfg, np.array(x), np.array(arms), np.array(rewards))


_TITLES = ("dune", "emma", "ulysses", "beloved", "middlemarch", "rebecca", "kindred", "possession")

_RATES = {"math": {"cheap": 0.9, "expensive": 0.95}, "trivia": {"cheap": 0.2, "expensive": 0.8}}
"""Each family's success rate per model."""
_USD = {"cheap": 0.02, "expensive": 0.3}
"""Each model's cost of an episode (cost_weight 1, usd_scale 1)."""
_MEANS = {f: {m: _RATES[f][m] - _USD[m] for m in ARMS} for f in _RATES}
"""Each family's mean reward per model: math cheap 0.88, expensive 0.65; trivia cheap 0.18,
expensive 0.5."""


def _question(family: str, rng: np.random.Generator) -> str:
    if family == "math":
        return f"What is {rng.integers(100)} plus {rng.integers(100)}?"
    return f"Who wrote the novel {_TITLES[rng.integers(len(_TITLES))]}?"


def test_picks_agree_with_the_bandit_and_greedy_takes_greedy_arm() -> None:
    bandit = _fitted(0.3, "right")
    router = TaskRouter(bandit, np.random.default_rng(0))
    question = "Who wrote the novel dune?"
    x = task_features(question)
    probs = bandit.probabilities_N_A(np.array([x]))[0]
    seen = set()
    for _ in range(300):
        fixed, route = router.pick(question)
        assert fixed.model == route.model and route.router == "bandit"
        assert route.features == list(x)
        assert route.probabilities == pytest.approx(dict(zip(ARMS, probs, strict=True)))
        assert sum(route.probabilities.values()) == pytest.approx(1.0)
        assert route.propensity == route.probabilities[route.model] > 0
        seen.add(route.model)
    assert seen == set(ARMS)
    greedy = TaskRouter(bandit, np.random.default_rng(0), greedy=True)
    questions = ["What is 3 plus 4?", question, "Who wrote the novel emma?", "What is 90 plus 1?"]
    expected = bandit.greedy_N(np.array([task_features(q) for q in questions]))
    picks = [greedy.pick(q)[1] for q in questions]
    assert [p.model for p in picks] == [ARMS[i] for i in expected]
    assert [p.model for p in picks] == ["cheap", "expensive", "expensive", "cheap"]
    assert all(p.propensity == 1.0 and sorted(p.probabilities.values()) == [0, 1] for p in picks)
    with pytest.raises(ValueError, match="task features"):
        TaskRouter(bandit, np.random.default_rng(0), n_hash=8)
    fresh = TaskRouter.new(TaskBanditConfig(), ARMS, np.random.default_rng(0), n_hash=8)
    assert fresh.pick(question)[1].propensity == pytest.approx(0.5)  # no data: uniform


def _episode(i: int, route: Route | None, outcome: dict[str, float], usd: float) -> Episode:
    return Episode(
        episode_id=f"e{i}",
        task_id=f"q{i}",
        group_id=f"g{i}",
        stop_reason=StopReason.ANSWERED,
        outcome=outcome,
        cost={"model_usd": usd},
        route=route,
    )


def test_bandit_log_by_hand() -> None:
    def route(model: str, p: float, x: float) -> Route:
        return Route(model=model, router="bandit", propensity=p, features=[x, 1.0])

    episodes = [
        _episode(0, route("expensive", 0.8, 0.0), {"correct": 1.0}, 0.4),
        _episode(1, None, {"correct": 1.0}, 0.0),  # no task-level router
        _episode(2, Route(model="cheap", router="fixed"), {"correct": 1.0}, 0.0),
        _episode(3, route("cheap", 0.2, 1.0), {"correct": 0.0}, 0.1),
        _episode(4, route("cheap", 0.2, 1.0), {"correct": 0.0, GRADER_ERROR: 1.0}, 0.1),
    ]
    reward_model = BanditRouter.fit(
        BanditRouterConfig(arms=ARMS, intercept=False),
        np.array([[1.0, 0.0], [0.0, 1.0]]),
        np.array([0, 1]),
        np.array([2.0, 4.0]),
    )
    log = bandit_log(episodes, ARMS, cost_weight=2.0, usd_scale=0.8, reward_model=reward_model)
    # episode 0: 1 - 2 * 0.4 / 0.8 = 0; episode 3: 0 - 2 * 0.1 / 0.8 = -0.25
    assert log.rewards_N == pytest.approx([0.0, -0.25])
    assert log.arms_N.tolist() == [1, 0]
    assert log.propensities_N == pytest.approx([0.8, 0.2])
    assert log.features_N_D.tolist() == [[0.0, 1.0], [1.0, 1.0]]
    # ridge 1, no intercept: cheap's theta = (diag(2, 1))^-1 (2, 0) = (1, 0); expensive's
    # (diag(1, 2))^-1 (0, 4) = (0, 2); so r_hat(x) = (x_0, 2 x_1)
    assert log.predictions_N_A is not None
    assert log.predictions_N_A == pytest.approx(np.array([[0.0, 2.0], [1.0, 2.0]]))
    assert bandit_log(episodes, ARMS, 2.0, 0.8).predictions_N_A is None
    with pytest.raises(ValueError, match="not in"):
        bandit_log(episodes, ("cheap", "big"), 2.0, 0.8)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        bandit_log(episodes[1:3], ARMS, 2.0, 0.8)


def test_ope_covers_a_target_routers_exact_value() -> None:
    """A logging router that favours the expensive model everywhere (epsilon 0.3: cheap gets
    0.15) runs 3000 tasks, half arithmetic, half trivia, whose success rates per model are
    known (`_RATES`). The target, fitted to the true means, prefers cheap on arithmetic and
    expensive on trivia. Its exact value on the logged tasks is the mean over them of
    sum_a pi(a | x_i) mean(family_i, a); IPS, SNIPS and DR (the logging router's oracle as
    the reward model) all cover it, greedy and exploring, while the log's own mean reward
    (the logging router's value, about 0.57) is far from it."""
    rng = np.random.default_rng(0)
    logger = TaskRouter(_fitted(0.3, "expensive"), rng)
    episodes, families = [], []
    for i in range(3000):
        family = "math" if rng.uniform() < 0.5 else "trivia"
        _, route = logger.pick(_question(family, rng))
        success = float(rng.uniform() < _RATES[family][route.model])
        episodes.append(_episode(i, route, {"correct": success}, _USD[route.model]))
        families.append(family)
    log = bandit_log(episodes, ARMS, 1.0, 1.0, reward_model=logger.bandit)
    means_N_A = np.array([[_MEANS[f][a] for a in ARMS] for f in families])
    target = _fitted(0.1, "right")
    right = np.array([ARMS.index("cheap" if f == "math" else "expensive") for f in families])
    assert (target.greedy_N(log.features_N_D) == right).mean() > 0.95
    for greedy in (True, False):
        true = float(
            (target_probabilities_N_A(target, log.features_N_D, greedy) * means_N_A).sum(1).mean()
        )
        report = ope_estimates(log, target, greedy)
        assert report.dr is not None
        for est in (report.ips, report.snips, report.dr):
            assert est.n == 3000
            assert est.covers(true), (greedy, est, true)
            assert est.high - est.low < 0.2
        assert abs(float(log.rewards_N.mean()) - true) > 0.1
    without = ope_estimates(bandit_log(episodes, ARMS, 1.0, 1.0), target, True)
    assert without.dr is None


def _tent(x_N: np.ndarray) -> np.ndarray:
    """The cheap arm's mean reward, good near 0 and bad at both ends (expensive's is 0)."""
    return np.asarray(0.5 - np.abs(x_N))


def _self_trained(features: str, generations: int = 10) -> list[BanditRouter]:
    """Generations of a router each fitted only on the previous one's logs (300 tasks),
    starting from a log biased to cheap on x > 0. `features` "linear" gives the oracle x
    alone, a misspecified model of the tent; "tent" gives (x, |x|)."""
    rng = np.random.default_rng(3)
    cfg = BanditRouterConfig(arms=ARMS, exploration=EpsilonGreedyConfig(epsilon=0.1))

    def feats(x_N: np.ndarray) -> np.ndarray:
        return np.stack([x_N] if features == "linear" else [x_N, np.abs(x_N)], axis=1)

    def fit(x_N: np.ndarray, arms_N: np.ndarray) -> BanditRouter:
        mean_N = np.where(arms_N == 0, _tent(x_N), 0.0)
        return BanditRouter.fit(cfg, feats(x_N), arms_N, mean_N + 0.05 * rng.standard_normal(300))

    x = rng.uniform(-1, 1, 300)
    routers = [fit(x, (rng.uniform(size=300) > np.where(x > 0, 0.9, 0.1)).astype(np.int64))]
    for _ in range(generations):
        x = rng.uniform(-1, 1, 300)
        p_cheap = routers[-1].probabilities_N_A(feats(x))[:, 0]
        routers.append(fit(x, (rng.uniform(size=300) > p_cheap).astype(np.int64)))
    return routers


def test_retraining_monitor_flags_a_misspecified_oracle() -> None:
    """A line fitted to the tent where cheap was chosen (one side) predicts cheap is best on
    the other side; the next generation chooses it there and the line tips back: A-B-A flips
    on a large share of the probes. With (x, |x|) the fit is right and nothing flips."""
    probe = np.linspace(-1, 1, 101)
    flipping = retraining_oscillation(_self_trained("linear"), probe[:, None])
    assert len(flipping.flip_rates) == 10
    assert flipping.mean_flip_rate > 0.3
    assert min(flipping.return_rates[-4:]) > 0.3
    settled = retraining_oscillation(
        _self_trained("tent"), np.stack([probe, np.abs(probe)], axis=1)
    )
    assert settled.mean_flip_rate < 0.05
