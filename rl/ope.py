"""Off-policy evaluation of a task-level router from its logged decisions: IPS, SNIPS, DR.

A *log* holds, per decision i (one episode's choice of model), the task's features x_i, the
arm a_i the logging policy mu chose, its propensity p_i = mu(a_i | x_i) as logged at decision
time, and the observed reward r_i; for the doubly robust estimate also a reward model's
predictions r_hat(x_i, a) for every arm a. The *target* policy pi, the router being evaluated,
is given as its action probabilities on each logged context, `target_N_A[i, a] = pi(a | x_i)`.
With the importance weight w_i = pi(a_i | x_i) / p_i:

- IPS (Horvitz & Thompson 1952; for bandits, e.g. Dudík, Langford & Li 2011, "Doubly robust
  policy evaluation and learning", arXiv 1103.4601, eq. 1): V = mean_i w_i r_i. Unbiased when
  mu(a | x) > 0 wherever pi(a | x) > 0.
- SNIPS (self-normalised IPS; Swaminathan & Joachims 2015, "The self-normalized estimator for
  counterfactual learning", NeurIPS): V = sum_i w_i r_i / sum_i w_i. Biased (consistent),
  invariant to a constant added to the rewards, lower variance when weights are large.
- DR (Dudík, Langford & Li 2011, eq. 3): V = mean_i [ sum_a pi(a | x_i) r_hat(x_i, a)
  + w_i (r_i - r_hat(x_i, a_i)) ]. Unbiased if either the propensities or the reward model
  are right; its variance shrinks as r_hat improves.

Confidence intervals are 95% normal-approximation intervals on the per-sample terms, not a
bootstrap: IPS and DR are means of i.i.d. terms, so V +- 1.96 s / sqrt(n) with s the terms'
sample std (n - 1); SNIPS is a ratio of means, and its interval uses the delta method, whose
per-sample terms are w_i (r_i - V) / mean_i w_i (Swaminathan & Joachims 2015, sec. 4). Why not
the bootstrap: the estimators stay pure, deterministic functions (no rng in the signature) and
cost O(n); the price is under-coverage when n is small or the weights are heavy-tailed (a few
decisions with tiny propensities), which the bootstrap shares in part; the router's exploration
floor (`turnrl.rl.bandit`) bounds the weights, max w <= 1 / min propensity.

Shapes: `_N` one entry per logged decision, `_A` one per arm, `_D` one per feature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

Z_95 = 1.959963984540054
"""The standard normal's 97.5% quantile: a two-sided 95% interval is the estimate +- Z_95 se."""


@dataclass(frozen=True)
class LoggedDecision:
    """One routing decision as the logging router recorded it, and what the episode earned."""

    features: tuple[float, ...]
    """The task's features x, as the router saw them."""
    arm: int
    """Index of the chosen arm (model) in the router's arm list."""
    propensity: float
    """mu(arm | x): the probability the logging router gave the chosen arm, at decision time."""
    reward: float
    """The episode's observed reward."""
    predictions: tuple[float, ...] | None = None
    """A reward model's r_hat(x, a) for every arm (DR's direct-method part); None if absent."""


@dataclass(frozen=True)
class BanditLog:
    """A batch of logged decisions as arrays (`from_decisions`), the estimators' input."""

    features_N_D: FloatArray
    """Each decision's task features."""
    arms_N: IntArray
    """Each decision's chosen arm index."""
    propensities_N: FloatArray
    """Each decision's logged propensity mu(a_i | x_i); NaN where it was not logged."""
    rewards_N: FloatArray
    """Each decision's observed reward."""
    predictions_N_A: FloatArray | None = None
    """The reward model's r_hat(x_i, a) per arm; None if no decision carries predictions."""

    @staticmethod
    def from_decisions(decisions: Sequence[LoggedDecision]) -> BanditLog:
        """Stacks decisions; predictions are kept only if every decision has them."""
        if not decisions:
            raise ValueError("an empty log has no off-policy estimate")
        preds = [d.predictions for d in decisions]
        predictions_N_A = (
            None
            if any(p is None for p in preds)
            else np.asarray([list(p) for p in preds if p is not None], dtype=np.float64)
        )
        return BanditLog(
            features_N_D=np.asarray([list(d.features) for d in decisions], dtype=np.float64),
            arms_N=np.asarray([d.arm for d in decisions], dtype=np.int64),
            propensities_N=np.asarray([d.propensity for d in decisions], dtype=np.float64),
            rewards_N=np.asarray([d.reward for d in decisions], dtype=np.float64),
            predictions_N_A=predictions_N_A,
        )


@dataclass(frozen=True)
class OpeEstimate:
    """An off-policy estimate of a target policy's mean reward, with its 95% interval."""

    value: float
    """The point estimate of E_x E_{a ~ pi(.|x)} [r]."""
    stderr: float
    """Standard error of the estimate (normal approximation; delta method for SNIPS)."""
    low: float
    """Lower end of the 95% interval, value - Z_95 stderr."""
    high: float
    """Upper end of the 95% interval, value + Z_95 stderr."""
    n: int
    """Number of logged decisions used."""

    def covers(self, x: float) -> bool:
        """Whether x lies inside the 95% interval (ends included)."""
        return self.low <= x <= self.high


def _checked_weights_N(log: BanditLog, target_N_A: FloatArray) -> FloatArray:
    """w_i = pi(a_i | x_i) / p_i, after refusing logs the estimators cannot use."""
    n = log.arms_N.shape[0]
    if n == 0:
        raise ValueError("an empty log has no off-policy estimate")
    p_N = log.propensities_N
    if p_N.shape != (n,) or log.rewards_N.shape != (n,):
        raise ValueError(
            f"propensities {p_N.shape} and rewards {log.rewards_N.shape} must be ({n},)"
        )
    missing = ~np.isfinite(p_N)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} decision(s) have no logged propensity (first at index "
            f"{int(np.argmax(missing))}); a decision logged without mu(a | x) cannot be reweighted"
        )
    bad = (p_N <= 0) | (p_N > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"propensities must lie in (0, 1]; decision {i} has {p_N[i]!r}: a zero-propensity "
            "arm was never explored, and no reweighting can estimate its reward"
        )
    if target_N_A.ndim != 2 or target_N_A.shape[0] != n:
        raise ValueError(f"target probabilities {target_N_A.shape} must be ({n}, arms)")
    if (log.arms_N < 0).any() or (log.arms_N >= target_N_A.shape[1]).any():
        raise ValueError(f"logged arms must index the target's {target_N_A.shape[1]} arms")
    if not np.allclose(target_N_A.sum(axis=1), 1.0) or (target_N_A < 0).any():
        raise ValueError("each row of the target probabilities must be a distribution")
    pi_N = target_N_A[np.arange(n), log.arms_N]
    return np.asarray(pi_N / p_N, dtype=np.float64)


def _mean_interval(terms_N: FloatArray) -> OpeEstimate:
    """The mean of i.i.d. terms with its normal-approximation 95% interval."""
    n = terms_N.shape[0]
    value = float(terms_N.mean())
    # One decision has no spread to estimate: the interval is unbounded, not zero-width.
    stderr = float(terms_N.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return OpeEstimate(value, stderr, value - Z_95 * stderr, value + Z_95 * stderr, n)


def ips(log: BanditLog, target_N_A: FloatArray) -> OpeEstimate:
    """Inverse propensity scoring: mean_i w_i r_i (Dudík, Langford & Li 2011, eq. 1)."""
    w_N = _checked_weights_N(log, target_N_A)
    return _mean_interval(w_N * log.rewards_N)


def snips(log: BanditLog, target_N_A: FloatArray) -> OpeEstimate:
    """Self-normalised IPS: sum_i w_i r_i / sum_i w_i (Swaminathan & Joachims 2015).

    Interval by the delta method: the terms w_i (r_i - V) / mean(w) have mean 0 and the
    ratio's asymptotic variance as their variance. If the target gives every logged arm
    probability 0 (sum w = 0) there is nothing to normalise by: ValueError."""
    w_N = _checked_weights_N(log, target_N_A)
    n = w_N.shape[0]
    w_mean = float(w_N.mean())
    if w_mean == 0.0:
        raise ValueError("the target policy gives every logged action probability 0")
    value = float((w_N * log.rewards_N).sum() / w_N.sum())
    terms_N = w_N * (log.rewards_N - value) / w_mean
    stderr = float(terms_N.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return OpeEstimate(value, stderr, value - Z_95 * stderr, value + Z_95 * stderr, n)


def doubly_robust(log: BanditLog, target_N_A: FloatArray) -> OpeEstimate:
    """Doubly robust: mean_i [ sum_a pi(a|x_i) r_hat(x_i,a) + w_i (r_i - r_hat(x_i,a_i)) ].

    Dudík, Langford & Li 2011, eq. 3; needs the log's `predictions_N_A`."""
    w_N = _checked_weights_N(log, target_N_A)
    r_hat_N_A = log.predictions_N_A
    if r_hat_N_A is None:
        raise ValueError("doubly robust needs the reward model's predictions in the log")
    if r_hat_N_A.shape != target_N_A.shape:
        raise ValueError(f"predictions {r_hat_N_A.shape} and target {target_N_A.shape} must match")
    n = w_N.shape[0]
    direct_N = (target_N_A * r_hat_N_A).sum(axis=1)
    residual_N = log.rewards_N - r_hat_N_A[np.arange(n), log.arms_N]
    return _mean_interval(direct_N + w_N * residual_N)


OpeName = Literal["ips", "snips", "dr"]
"""The estimators by name, as a report or config names them."""

ESTIMATORS: dict[OpeName, Callable[[BanditLog, FloatArray], OpeEstimate]] = {
    "ips": ips,
    "snips": snips,
    "dr": doubly_robust,
}
"""Each estimator's function by its name."""
