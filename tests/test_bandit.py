"""The task-level bandit router (`turnrl.rl.bandit`): action probabilities that sum to one and
are never zero, the ridge oracle's closed form, its config surface, and the oscillation
monitor on constructed two-arm cases, one that oscillates and one that does not."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from turnrl.rl.bandit import BanditRouter, action_probabilities_N_A, oscillation
from turnrl.rl.bandit_config import (
    BanditRouterConfig,
    EpsilonGreedyConfig,
    ExplorationConfig,
    SoftmaxConfig,
)

EXPLORATIONS: list[ExplorationConfig] = [
    EpsilonGreedyConfig(epsilon=0.1),
    EpsilonGreedyConfig(epsilon=1e-6),
    SoftmaxConfig(temperature=0.1, floor=0.01),
    SoftmaxConfig(temperature=1e-4, floor=1e-6),
]


@settings(max_examples=60, deadline=None)
@given(
    preds=st.lists(st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3), min_size=1, max_size=8),
    which=st.integers(0, len(EXPLORATIONS) - 1),
)
def test_probabilities_sum_to_one_and_are_never_zero(preds: list[list[float]], which: int) -> None:
    """Also where exp underflows: gaps of 1e6 temperatures."""
    probs = action_probabilities_N_A(np.asarray(preds), EXPLORATIONS[which])
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert (probs > 0).all()


def test_epsilon_greedy_and_softmax_by_hand() -> None:
    preds = np.array([[0.2, 0.5, 0.5], [1.0, 0.0, 0.0]])
    # ties split 1 - eps: 0.9 / 2 + 0.1 / 3 for each greedy arm, 0.1 / 3 for the other
    eg = action_probabilities_N_A(preds, EpsilonGreedyConfig(epsilon=0.1))
    assert eg[0] == pytest.approx([0.1 / 3, 0.45 + 0.1 / 3, 0.45 + 0.1 / 3])
    assert eg[1] == pytest.approx([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    # softmax at temperature 1 of (1, 0, 0): e / (e + 2), 1 / (e + 2); floor 0.01 mixes
    # (1 - 0.03) p + 0.01
    sm = action_probabilities_N_A(preds[1:], SoftmaxConfig(temperature=1.0, floor=0.01))
    e = np.e
    assert sm[0] == pytest.approx([0.97 * e / (e + 2) + 0.01] + [0.97 / (e + 2) + 0.01] * 2)


def test_choose_logs_its_propensity() -> None:
    cfg = BanditRouterConfig(arms=("cheap", "big", "oracle"))
    router = BanditRouter.fit(
        cfg, np.array([[0.0], [1.0], [0.5]]), np.array([0, 1, 2]), np.array([1.0, 0.0, 0.3])
    )
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        d = router.choose([0.2], rng)
        assert d.arm == cfg.arms[d.arm_index]
        assert d.propensity == d.probabilities[d.arm_index] > 0
        assert sum(d.probabilities) == pytest.approx(1.0)
        assert len(d.predictions) == 3
        seen.add(d.arm)
    assert seen == set(cfg.arms)


def test_ridge_oracle_closed_form() -> None:
    """One feature, intercept: arm 0 sees x = 0, 1 with r = 1, 3 and lambda = 1:
    X = [[0, 1], [1, 1]], X^T X + I = [[2, 1], [1, 3]], X^T y = [3, 4];
    theta = [[3, -1], [-1, 2]] / 5 @ [3, 4] = [1, 1]. Arm 1 has no data: theta 0."""
    router = BanditRouter.fit(
        BanditRouterConfig(arms=("a", "b"), ridge=1.0),
        np.array([[0.0], [1.0]]),
        np.array([0, 0]),
        np.array([1.0, 3.0]),
    )
    assert router.theta_A_D == pytest.approx(np.array([[1.0, 1.0], [0.0, 0.0]]))
    assert router.predict_N_A(np.array([[2.0]]))[0] == pytest.approx([3.0, 0.0])
    # updating in two batches gives the same statistics as one fit
    again = BanditRouter.fit(
        router.config, np.array([[0.0]]), np.array([0]), np.array([1.0])
    ).updated(np.array([[1.0]]), np.array([0]), np.array([3.0]))
    assert again.theta_A_D == pytest.approx(router.theta_A_D)


def test_config_round_trips_and_refuses_bad_values() -> None:
    cfg = BanditRouterConfig(
        arms=("cheap", "big"), exploration=SoftmaxConfig(temperature=0.5, floor=0.1)
    )
    assert TypeAdapter(BanditRouterConfig).validate_python(cfg.model_dump()) == cfg
    with pytest.raises(ValidationError):
        EpsilonGreedyConfig(epsilon=0.0)
    with pytest.raises(ValidationError, match="below 1"):
        BanditRouterConfig(arms=("a", "b"), exploration=SoftmaxConfig(floor=0.5))
    with pytest.raises(ValidationError, match="distinct"):
        BanditRouterConfig(arms=("a", "a"))
    with pytest.raises(ValidationError):
        BanditRouterConfig(arms=("a",))


def test_oscillation_metric_by_hand() -> None:
    # Rows are 4 generations, columns 4 contexts: context 0 flips every generation
    # (0, 1, 0, 1), context 1 flips once and stays (0, 1, 1, 1), contexts 2 and 3 never move.
    greedy = np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    rep = oscillation(greedy)
    # flips g0->g1: contexts 0 and 1, 2/4; g1->g2 and g2->g3: context 0 alone, 1/4
    assert rep.flip_rates == pytest.approx((0.5, 0.25, 0.25))
    # returns at g2: context 0 (1 -> 0 == g0's 0): 1/4; at g3: context 0 again: 1/4
    assert rep.return_rates == pytest.approx((0.25, 0.25))
    assert rep.mean_flip_rate == pytest.approx(0.25)  # the second half: flip_rates[1:]
    assert rep.trend == pytest.approx(-0.125)  # slope of (0.5, 0.25, 0.25) over 0, 1, 2
    with pytest.raises(ValueError):
        oscillation(np.array([[0, 1]]))


def _tent(x_N: np.ndarray) -> np.ndarray:
    """The cheap arm's mean reward: good near x = 0, bad at both ends (the big arm's is 0)."""
    return np.asarray(0.5 - np.abs(x_N))


def _self_trained_greedy(features: str, generations: int = 12, seed: int = 0) -> np.ndarray:
    """Greedy arms on 101 probe contexts over generations of a router retrained each time on
    its own logs only (400 tasks a generation), starting from a biased logging policy (cheap
    for 90% of the x > 0 tasks, 10% of the others). `features`: "linear" gives the router x
    alone, a misspecified model of the tent; "tent" gives it (x, |x|), a well-specified one."""
    rng = np.random.default_rng(seed)
    cfg = BanditRouterConfig(arms=("cheap", "big"), exploration=EpsilonGreedyConfig(epsilon=0.1))

    def feats(x_N: np.ndarray) -> np.ndarray:
        cols = [x_N] if features == "linear" else [x_N, np.abs(x_N)]
        return np.stack(cols, axis=1)

    def rewards(x_N: np.ndarray, arms_N: np.ndarray) -> np.ndarray:
        mean_N = np.where(arms_N == 0, _tent(x_N), 0.0)
        return mean_N + 0.05 * rng.standard_normal(len(x_N))

    probe = feats(np.linspace(-1, 1, 101))
    x = rng.uniform(-1, 1, 400)
    arms = (rng.uniform(size=400) > np.where(x > 0, 0.9, 0.1)).astype(np.int64)
    router = BanditRouter.fit(cfg, feats(x), arms, rewards(x, arms))
    greedy = [router.greedy_N(probe)]
    for _ in range(generations):
        x = rng.uniform(-1, 1, 400)
        probs = router.probabilities_N_A(feats(x))
        arms = (rng.uniform(size=400) > probs[:, 0]).astype(np.int64)
        router = BanditRouter.fit(cfg, feats(x), arms, rewards(x, arms))
        greedy.append(router.greedy_N(probe))
    return np.array(greedy)


def test_self_training_oscillates_with_a_misspecified_oracle() -> None:
    """Fit on x > 0 (where it was chosen), the cheap arm's line slopes down, so it predicts
    high rewards at x < 0; the next generation routes x < 0 to it, the refit line slopes up,
    and so on: more than 40% of contexts flip every generation, A-B-A, with no downward
    trend."""
    rep = oscillation(_self_trained_greedy("linear"))
    assert rep.mean_flip_rate > 0.4
    assert min(rep.return_rates[-5:]) > 0.4
    assert abs(rep.trend) < 0.01


def test_self_training_settles_with_a_well_specified_oracle() -> None:
    """Same environment and biased start, features (x, |x|): the fit is right wherever the
    arm was chosen, and the greedy arms settle (|x| < 0.5 cheap, else big)."""
    greedy = _self_trained_greedy("tent")
    rep = oscillation(greedy)
    assert rep.mean_flip_rate < 0.05
    assert max(rep.return_rates[-5:]) < 0.05
    x = np.linspace(-1, 1, 101)
    assert (greedy[-1] == (np.abs(x) >= 0.5)).mean() > 0.9
