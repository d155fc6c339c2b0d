"""Off-policy estimators (`turnrl.rl.ope`) against numbers worked out by hand on a tiny log,
their refusals, and a seeded simulation where each estimate's 95% interval covers the
target router's on-policy mean."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from turnrl.rl.bandit import BanditRouter
from turnrl.rl.bandit_config import BanditRouterConfig, EpsilonGreedyConfig, SoftmaxConfig
from turnrl.rl.ope import (
    ESTIMATORS,
    Z_95,
    BanditLog,
    LoggedDecision,
    OpeEstimate,
    doubly_robust,
    ips,
    snips,
)

# Four decisions, two arms. Per decision: logged arm a, propensity p, reward r, the target's
# pi(.|x) and the reward model's r_hat(x, .).
TINY = [
    LoggedDecision((0.0,), arm=0, propensity=0.5, reward=1.0, predictions=(0.6, 0.2)),
    LoggedDecision((1.0,), arm=1, propensity=0.25, reward=0.0, predictions=(0.5, 0.4)),
    LoggedDecision((2.0,), arm=0, propensity=0.8, reward=0.0, predictions=(0.2, 0.6)),
    LoggedDecision((3.0,), arm=1, propensity=0.5, reward=1.0, predictions=(0.3, 0.7)),
]
TARGET = np.array([[0.8, 0.2], [0.5, 0.5], [0.2, 0.8], [0.4, 0.6]])
# w = pi(a|x) / p = 0.8/0.5, 0.5/0.25, 0.2/0.8, 0.6/0.5 = 1.6, 2.0, 0.25, 1.2


def test_ips_by_hand() -> None:
    est = ips(BanditLog.from_decisions(TINY), TARGET)
    # terms w r = 1.6, 0, 0, 1.2; mean 2.8 / 4 = 0.7
    assert est.value == pytest.approx(0.7)
    # deviations 0.9, -0.7, -0.7, 0.5; squares sum 0.81 + 0.49 + 0.49 + 0.25 = 2.04;
    # sample var 2.04 / 3 = 0.68; se = sqrt(0.68 / 4) = 0.41231
    assert est.stderr == pytest.approx(math.sqrt(0.68 / 4))
    assert est.low == pytest.approx(0.7 - Z_95 * math.sqrt(0.17))
    assert est.high == pytest.approx(0.7 + Z_95 * math.sqrt(0.17))
    assert est.n == 4


def test_snips_by_hand() -> None:
    est = snips(BanditLog.from_decisions(TINY), TARGET)
    # sum w r = 2.8, sum w = 1.6 + 2 + 0.25 + 1.2 = 5.05; V = 2.8 / 5.05 = 0.554455...
    v = 2.8 / 5.05
    assert est.value == pytest.approx(v)
    # delta-method terms w (r - V) / mean w, mean w = 5.05 / 4 = 1.2625:
    # 1.6 (1 - V), -2 V, -0.25 V, 1.2 (1 - V), each / 1.2625 (their mean is 0 by construction)
    terms = np.array([1.6 * (1 - v), -2 * v, -0.25 * v, 1.2 * (1 - v)]) / 1.2625
    assert terms.sum() == pytest.approx(0.0)
    assert est.stderr == pytest.approx(math.sqrt((terms**2).sum() / 3 / 4))


def test_doubly_robust_by_hand() -> None:
    est = doubly_robust(BanditLog.from_decisions(TINY), TARGET)
    # direct part sum_a pi r_hat: 0.8*0.6 + 0.2*0.2 = 0.52; 0.5*0.5 + 0.5*0.4 = 0.45;
    #   0.2*0.2 + 0.8*0.6 = 0.52; 0.4*0.3 + 0.6*0.7 = 0.54
    # correction w (r - r_hat(a)): 1.6 * 0.4 = 0.64; 2 * -0.4 = -0.8; 0.25 * -0.2 = -0.05;
    #   1.2 * 0.3 = 0.36
    # terms 1.16, -0.35, 0.47, 0.90; mean 2.18 / 4 = 0.545
    assert est.value == pytest.approx(0.545)
    # deviations 0.615, -0.895, -0.075, 0.355; squares sum 1.3109; var 1.3109 / 3
    assert est.stderr == pytest.approx(math.sqrt(1.3109 / 3 / 4))


def test_perfect_reward_model_makes_dr_the_direct_method() -> None:
    """With r_hat equal to every observed reward the correction vanishes: DR = mean direct."""
    log = BanditLog.from_decisions(
        [
            LoggedDecision((0.0,), 0, 0.5, 1.0, (1.0, 0.0)),
            LoggedDecision((0.0,), 1, 0.5, 0.0, (1.0, 0.0)),
        ]
    )
    target = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert doubly_robust(log, target).value == pytest.approx(0.9)
    assert doubly_robust(log, target).stderr == pytest.approx(0.0)


@pytest.mark.parametrize("bad", [0.0, -0.1, math.nan, 1.5])
@pytest.mark.parametrize("estimator", list(ESTIMATORS.values()), ids=list(ESTIMATORS))
def test_refuses_zero_or_missing_propensities(
    estimator: Callable[[BanditLog, np.ndarray], OpeEstimate], bad: float
) -> None:
    decisions = [*TINY[:3], LoggedDecision((3.0,), 1, bad, 1.0, (0.3, 0.7))]
    with pytest.raises(ValueError, match="propensit"):
        estimator(BanditLog.from_decisions(decisions), TARGET)


def test_refuses_dr_without_predictions_and_bad_targets() -> None:
    log = BanditLog.from_decisions([LoggedDecision((0.0,), 0, 0.5, 1.0)] * 2)
    with pytest.raises(ValueError, match="predictions"):
        doubly_robust(log, np.array([[0.5, 0.5]] * 2))
    with pytest.raises(ValueError, match="distribution"):
        ips(log, np.array([[0.5, 0.6]] * 2))
    with pytest.raises(ValueError, match="empty"):
        BanditLog.from_decisions([])


def _true_means_N_A(x_N_D: np.ndarray) -> np.ndarray:
    """Expected reward per arm: a cheap model good on easy tasks (x0 low), a big one flat."""
    cheap = 0.8 - 0.6 * x_N_D[:, 0] + 0.1 * x_N_D[:, 1]
    big = np.full(len(x_N_D), 0.55)
    return np.stack([cheap, big], axis=1)


def test_ope_interval_covers_on_policy_mean() -> None:
    """Log 3,000 decisions with a broad softmax router, estimate from them a new epsilon-greedy
    router (fitted on 1,000 other decisions of the same logger), then run the new router
    on-policy (40,000 episodes): every estimator's 95% interval covers the on-policy mean."""
    rng = np.random.default_rng(7)

    def env(x_N_D: np.ndarray, arms_N: np.ndarray) -> np.ndarray:
        p_N = _true_means_N_A(x_N_D)[np.arange(len(arms_N)), arms_N]
        return np.asarray(rng.uniform(size=len(arms_N)) < p_N, dtype=np.float64)

    def draw(probs_N_A: np.ndarray) -> np.ndarray:
        return (rng.uniform(size=len(probs_N_A)) > probs_N_A[:, 0]).astype(np.int64)

    arms = ("cheap", "big")
    logging = BanditRouter.new(
        BanditRouterConfig(arms=arms, exploration=SoftmaxConfig(temperature=0.5, floor=0.05)), 2
    )
    x0 = rng.uniform(0, 1, (200, 2))
    a0 = draw(logging.probabilities_N_A(x0))
    logging = logging.updated(x0, a0, env(x0, a0))

    x = rng.uniform(0, 1, (3000, 2))
    mu_N_A = logging.probabilities_N_A(x)
    a = draw(mu_N_A)
    r = env(x, a)
    # choose() and the vectorised probabilities agree on the logged propensity.
    d = logging.choose(x[0], np.random.default_rng(0))
    assert d.propensity == pytest.approx(mu_N_A[0, d.arm_index])

    # The new router learns from its own batch of the logging router's decisions, so the
    # policy being evaluated does not depend on the log that evaluates it.
    x1 = rng.uniform(0, 1, (1000, 2))
    a1 = draw(logging.probabilities_N_A(x1))
    target = BanditRouter.fit(
        BanditRouterConfig(arms=arms, exploration=EpsilonGreedyConfig(epsilon=0.2)),
        x1,
        a1,
        env(x1, a1),
    )
    log = BanditLog(x, a, mu_N_A[np.arange(len(a)), a], r, logging.predict_N_A(x))
    target_N_A = target.probabilities_N_A(x)

    x_on = rng.uniform(0, 1, (40_000, 2))
    on_policy = float(env(x_on, draw(target.probabilities_N_A(x_on))).mean())
    for name, estimator in ESTIMATORS.items():
        est = estimator(log, target_N_A)
        assert est.covers(on_policy), (name, est, on_policy)
        assert est.high - est.low < 0.1, (name, est)
