"""Task-level contextual bandit router: which model runs a whole episode, from task features.

Each arm (a named model) has a ridge-regression oracle of its reward on the task's features,
in closed form, theta_a = (X_a^T X_a + lambda I)^-1 X_a^T y_a over the decisions that chose
a (the regression-oracle reduction of contextual bandits; e.g. Foster & Rakhlin 2020,
"Beyond UCB", arXiv 2002.04926, and the least-squares oracle of Bietti, Agarwal & Langford
2021, "A contextual bandit bake-off", arXiv 1802.04064). The oracle's predictions become
action probabilities by an exploration rule that never gives an arm 0
(`turnrl.rl.bandit_config`), and every `Decision` carries the propensity of its arm, so the
logs support off-policy evaluation (`turnrl.rl.ope`).

The router is a value: `fit` and `updated` return a new router from its sufficient statistics
(each arm's Gram matrix and moment vector), so a generation's router is never mutated by the
next generation's data.

Oscillation. A bandit retrained on its own logs sees each arm's rewards only where it chose
that arm; with a misspecified reward model the fit extrapolates into the contexts it rarely
chose the arm for, the next generation chooses it there, and the fit swings back: the greedy
arm flips generation after generation (Adyen's warning on retraining bandits from their own
feedback loop; the selection bias itself is the one IPS corrects). `oscillation` measures it
over a sequence of generations' greedy choices on fixed probe contexts: the fraction of
contexts whose greedy arm flips between successive generations, its trend, and the fraction
that returns to the arm of two generations before (an A-B-A cycle, the signature of
oscillation rather than convergence or drift).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from turnrl.rl.bandit_config import BanditRouterConfig, EpsilonGreedyConfig, ExplorationConfig
from turnrl.rl.ope import FloatArray, IntArray


@dataclass(frozen=True)
class Decision:
    """One routing decision, as it is logged."""

    arm: str
    """The chosen model's name."""
    arm_index: int
    """Its index in the router's `arms`."""
    propensity: float
    """The probability the router gave the chosen arm, > 0."""
    probabilities: tuple[float, ...]
    """The router's probability of every arm (sums to 1, none 0)."""
    predictions: tuple[float, ...]
    """The oracle's predicted reward for every arm (DR's reward model, when logged)."""


def action_probabilities_N_A(
    predictions_N_A: FloatArray, exploration: ExplorationConfig
) -> FloatArray:
    """Each context's arm probabilities from predicted rewards; every entry > 0, rows sum to 1.

    epsilon-greedy splits 1 - epsilon evenly among the tied greedy arms and epsilon evenly over
    all arms; softmax is shifted by the row max before exp (no overflow), then mixed with the
    uniform floor."""
    a = predictions_N_A.shape[1]
    if isinstance(exploration, EpsilonGreedyConfig):
        eps = exploration.epsilon
        greedy_N_A = (predictions_N_A == predictions_N_A.max(axis=1, keepdims=True)).astype(
            np.float64
        )
        greedy_N_A /= greedy_N_A.sum(axis=1, keepdims=True)
        return np.asarray((1 - eps) * greedy_N_A + eps / a, dtype=np.float64)
    z_N_A = (predictions_N_A - predictions_N_A.max(axis=1, keepdims=True)) / (
        exploration.temperature
    )
    e_N_A = np.exp(z_N_A)
    soft_N_A = e_N_A / e_N_A.sum(axis=1, keepdims=True)
    floor = exploration.floor
    return np.asarray((1 - a * floor) * soft_N_A + floor, dtype=np.float64)


@dataclass(frozen=True)
class BanditRouter:
    """A ridge oracle per arm and an exploration rule; build with `new` or `fit`."""

    config: BanditRouterConfig
    """Arms, ridge lambda, exploration."""
    gram_A_D_D: FloatArray
    """Per arm, lambda I + sum of x x^T over the decisions that chose it."""
    moment_A_D: FloatArray
    """Per arm, sum of r x over the decisions that chose it."""

    @staticmethod
    def new(config: BanditRouterConfig, n_features: int) -> BanditRouter:
        """A router with no data: every arm predicts 0, so it explores uniformly."""
        d = n_features + int(config.intercept)
        a = len(config.arms)
        gram = np.broadcast_to(config.ridge * np.eye(d), (a, d, d)).copy()
        return BanditRouter(config, gram, np.zeros((a, d)))

    @staticmethod
    def fit(
        config: BanditRouterConfig,
        features_N_D: FloatArray,
        arms_N: IntArray,
        rewards_N: FloatArray,
    ) -> BanditRouter:
        """A router fitted from scratch on logged (features, arm, reward)."""
        return BanditRouter.new(config, features_N_D.shape[1]).updated(
            features_N_D, arms_N, rewards_N
        )

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms' names."""
        return self.config.arms

    def _design_N_D(self, features_N_D: FloatArray) -> FloatArray:
        x = np.asarray(features_N_D, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] + int(self.config.intercept) != self.gram_A_D_D.shape[1]:
            raise ValueError(f"features {x.shape} do not match the router's feature count")
        if self.config.intercept:
            x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
        return x

    def updated(
        self, features_N_D: FloatArray, arms_N: IntArray, rewards_N: FloatArray
    ) -> BanditRouter:
        """This router plus the logged decisions (the statistics add; nothing is mutated)."""
        x_N_D = self._design_N_D(features_N_D)
        a = len(self.arms)
        arms = np.asarray(arms_N, dtype=np.int64)
        if arms.shape != (x_N_D.shape[0],) or (arms < 0).any() or (arms >= a).any():
            raise ValueError(f"arms must be one index in [0, {a}) per decision")
        onehot_N_A = np.eye(a)[arms]
        gram = self.gram_A_D_D + np.einsum("na,nd,ne->ade", onehot_N_A, x_N_D, x_N_D)
        moment = self.moment_A_D + np.einsum("na,n,nd->ad", onehot_N_A, rewards_N, x_N_D)
        return BanditRouter(self.config, gram, moment)

    @property
    def theta_A_D(self) -> FloatArray:
        """Each arm's ridge coefficients (the last is the intercept, if any)."""
        solved = np.linalg.solve(self.gram_A_D_D, self.moment_A_D[..., None])[..., 0]
        return np.asarray(solved, dtype=np.float64)

    def predict_N_A(self, features_N_D: FloatArray) -> FloatArray:
        """Each arm's predicted reward on each context."""
        return np.asarray(self._design_N_D(features_N_D) @ self.theta_A_D.T, dtype=np.float64)

    def probabilities_N_A(self, features_N_D: FloatArray) -> FloatArray:
        """The router's action probabilities on each context (the target policy for OPE)."""
        return action_probabilities_N_A(self.predict_N_A(features_N_D), self.config.exploration)

    def greedy_N(self, features_N_D: FloatArray) -> IntArray:
        """Each context's arm of highest predicted reward (lowest index on ties)."""
        return np.asarray(self.predict_N_A(features_N_D).argmax(axis=1), dtype=np.int64)

    def choose(self, features: Sequence[float], rng: np.random.Generator) -> Decision:
        """Draws an arm for one task and returns it with its propensity."""
        x_1_D = np.asarray([list(features)], dtype=np.float64)
        preds_A = self.predict_N_A(x_1_D)[0]
        probs_A = action_probabilities_N_A(preds_A[None, :], self.config.exploration)[0]
        i = int(rng.choice(len(probs_A), p=probs_A))
        return Decision(
            arm=self.arms[i],
            arm_index=i,
            propensity=float(probs_A[i]),
            probabilities=tuple(float(p) for p in probs_A),
            predictions=tuple(float(r) for r in preds_A),
        )


@dataclass(frozen=True)
class OscillationReport:
    """How the greedy arm on fixed probe contexts moves over retraining generations."""

    flip_rates: tuple[float, ...]
    """Per pair of successive generations (g, g+1), the fraction of contexts whose greedy arm
    changed."""
    return_rates: tuple[float, ...]
    """Per generation g >= 2, the fraction of contexts whose greedy arm differs from
    generation g-1's and equals generation g-2's (an A-B-A flip)."""
    mean_flip_rate: float
    """Mean of `flip_rates` over the second half of the generations (after the start-up)."""
    trend: float
    """Least-squares slope of `flip_rates` per generation: < 0 settling, ~0 persistent."""


def oscillation(greedy_G_N: IntArray) -> OscillationReport:
    """The oscillation metrics of G >= 2 generations' greedy arms on the same N contexts."""
    g_n = np.asarray(greedy_G_N, dtype=np.int64)
    if g_n.ndim != 2 or g_n.shape[0] < 2 or g_n.shape[1] == 0:
        raise ValueError("need the greedy arms of at least 2 generations on at least 1 context")
    flips_G1 = (g_n[1:] != g_n[:-1]).mean(axis=1)
    returns_G2 = ((g_n[2:] != g_n[1:-1]) & (g_n[2:] == g_n[:-2])).mean(axis=1)
    half = flips_G1[len(flips_G1) // 2 :]
    t = np.arange(len(flips_G1), dtype=np.float64)
    trend = float(np.polyfit(t, flips_G1, 1)[0]) if len(flips_G1) > 1 else 0.0
    return OscillationReport(
        flip_rates=tuple(float(f) for f in flips_G1),
        return_rates=tuple(float(r) for r in returns_G2),
        mean_flip_rate=float(half.mean()),
        trend=trend,
    )
