"""EMPG: entropy-modulated step advantages, a wrapper over any estimator's turn advantages.

Wang et al. 2025, "Harnessing Uncertainty: Entropy-Modulated Policy Gradients for
Long-Horizon LLM Agents" (arXiv 2509.09265), Eqs. 10-12 and the reference pseudocode of its
project page:

    H_norm = (H - min H) / (max H - min H + 1e-8)         min, max over the batch's turns
    g(H)   = exp(-k H_norm) / (mean_batch exp(-k H_norm) + 1e-8)
    f(H)   = exp(-k_f H_norm)
    A'_t   = g(H_t) A_t + zeta f(H_{t+1})                 the bonus only where a turn t+1 exists

g amplifies confident (low-entropy) steps and damps uncertain ones, with mean 1 over the
batch; the future-clarity bonus rewards a step that leads to a confident next step. With
`center`, A' is then shifted to zero mean over the batch's turns (the bonus is never
negative, so without it every step drifts upward).

H_t is the step's mean token entropy. Stored turns keep only the sampled ids' logprobs, so we
use the mean surprisal of the sampled tokens, -mean log pi(y_k | ...), an unbiased estimate of
the mean token entropy under the sampling policy. A turn with no sampled token has no
entropy: it is left out of the statistics, keeps g = 1 and gives no bonus.
"""

from __future__ import annotations

import numpy as np

from turnrl.rl.group_advantages import Bools, Floats, batch_mean


def empg(
    advantages_N_T: Floats,
    entropy_N_T: Floats,
    mask_N_T: Bools,
    measured_N_T: Bools,
    k: float = 1.0,
    k_f: float = 1.0,
    zeta: float = 0.1,
    center: bool = True,
) -> Floats:
    """Modulated advantages; `measured_N_T` marks turns with an entropy (at least one token)."""
    entropy_K = entropy_N_T[measured_N_T]
    if entropy_K.size:
        low, high = entropy_K.min(), entropy_K.max()
        norm_N_T = np.where(measured_N_T, (entropy_N_T - low) / (high - low + 1e-8), 0.0)
    else:
        norm_N_T = np.zeros_like(entropy_N_T)
    scale_N_T = np.exp(-k * norm_N_T)
    scale_N_T = np.where(
        measured_N_T, scale_N_T / (batch_mean(scale_N_T[measured_N_T]) + 1e-8), 1.0
    )
    clarity_N_T = np.where(measured_N_T, np.exp(-k_f * norm_N_T), 0.0)
    bonus_N_T = np.zeros_like(clarity_N_T)
    bonus_N_T[:, :-1] = zeta * clarity_N_T[:, 1:]
    out_N_T = np.where(mask_N_T, scale_N_T * advantages_N_T + bonus_N_T, 0.0)
    if center:
        out_N_T = np.where(mask_N_T, out_N_T - batch_mean(out_N_T[mask_N_T]), 0.0)
    return out_N_T
