"""Policy-gradient losses: pure functions over token-aligned tensors, returning (loss, metrics).

- `ppo_clip_loss`: the clipped surrogate of PPO (Schulman et al. 2017, arXiv 1707.06347),
  `max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))` per token, where `r = exp(logprobs -
  old_logprobs)` is taken against the *rollout* logprobs stored with the episode. The two clip
  bounds may differ (DAPO's clip-higher, Yu et al. 2025, arXiv 2503.14476).
- `kl_penalty`: a per-token estimate of KL(pi_theta || pi_ref) from samples of the rollout
  policy, with Schulman's estimators (http://joschu.net/blog/kl-approx.html): with
  `d = ref_logprobs - logprobs`, k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased and
  always >= 0; the form GRPO puts in its loss, Shao et al. 2024, arXiv 2402.03300).

Aggregation is token-level (DAPO): the sum over every trained token of the step divided by the
number of trained tokens in the *whole step*, so long and short completions weigh per token,
not per sequence. `n_tokens` is that step-wide count: a micro-batch of a gradient-accumulation
step passes it, and the micro-batch losses then sum to the full-batch loss. Token-mean metrics
use the same denominator, so they sum across micro-batches too. Without `n_tokens` the
denominator is the batch's own masked count.

Shapes: `_B_T` tensors are token-aligned (see `turnrl.rl.batch`); any shape works as long as
all arguments share it. `mask` may be bool or 0/1 floats. Metrics are detached 0-d tensors
(no device sync until the caller reads them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

Metrics = dict[str, torch.Tensor]
KLEstimator = Literal["k1", "k2", "k3"]


def _denominator(mask: torch.Tensor, n_tokens: int | float | None) -> torch.Tensor | float:
    if n_tokens is not None:
        if n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive, got {n_tokens}")
        return float(n_tokens)
    # An all-masked batch gives loss 0 (not nan): it has nothing to train.
    return mask.sum().clamp(min=1).to(torch.float32)


def ppo_clip_loss(
    logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    n_tokens: int | float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate loss, token-level mean over the step.

    Returns `(loss, metrics)`; metrics: `clip_frac` (share of tokens whose clipped branch is
    the active one, i.e. which get no gradient), `approx_kl` (k3 estimate of
    KL(pi_old || pi_theta) on the rollout samples: `r - 1 - log r`), `ratio_mean`.
    """
    mask = mask_B_T.bool()
    # Masking the log-ratio before exp keeps padded positions (which may hold -inf or garbage)
    # out of both the forward value and the gradient.
    log_ratio_B_T = torch.where(mask, logprobs_B_T - old_logprobs_B_T, 0.0)
    ratio_B_T = torch.exp(log_ratio_B_T)
    unclipped_B_T = -advantages_B_T * ratio_B_T
    clipped_B_T = -advantages_B_T * torch.clamp(ratio_B_T, 1.0 - clip_low, 1.0 + clip_high)
    # The pessimistic max of the two losses; `where` (not `maximum`) so that the gradient goes
    # wholly through the active branch and `is_clipped` names exactly the zero-gradient tokens.
    is_clipped_B_T = (clipped_B_T > unclipped_B_T) & mask
    per_token_B_T = torch.where(is_clipped_B_T, clipped_B_T, unclipped_B_T)
    denom = _denominator(mask, n_tokens)
    loss = torch.where(mask, per_token_B_T, 0.0).sum() / denom
    with torch.no_grad():
        approx_kl_B_T = ratio_B_T - 1.0 - log_ratio_B_T
        metrics = {
            "clip_frac": is_clipped_B_T.sum().to(torch.float32) / denom,
            "approx_kl": torch.where(mask, approx_kl_B_T, 0.0).sum() / denom,
            "ratio_mean": torch.where(mask, ratio_B_T, 0.0).sum() / denom,
        }
    return loss, metrics


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log(pi / pi_ref): unbiased, high variance, can be negative."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(log(pi_ref / pi))^2 / 2: biased, low variance, >= 0."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """pi_ref/pi - 1 - log(pi_ref/pi): unbiased, low variance, >= 0."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


KL_ESTIMATORS: dict[KLEstimator, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(
    logprobs_B_T: torch.Tensor,
    ref_logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    kind: KLEstimator = "k3",
    n_tokens: int | float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Token-level mean of a KL(pi_theta || pi_ref) estimator; gradient flows to `logprobs`.

    Returns `(kl, {"kl_ref": kl detached})`; the caller scales it by its coefficient.
    """
    mask = mask_B_T.bool()
    zero = torch.zeros((), dtype=logprobs_B_T.dtype, device=logprobs_B_T.device)
    # Masked positions get equal inputs, whose estimate is 0 for every kind (and finite).
    lp_B_T = torch.where(mask, logprobs_B_T, zero)
    ref_B_T = torch.where(mask, ref_logprobs_B_T, zero)
    kl_B_T = KL_ESTIMATORS[kind](lp_B_T, ref_B_T)
    kl = torch.where(mask, kl_B_T, 0.0).sum() / _denominator(mask, n_tokens)
    return kl, {"kl_ref": kl.detach()}


def entropy_from_logprobs(logprobs_N_V: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's distribution, given its full log-softmax: `-sum p log p`."""
    return -(logprobs_N_V.exp() * logprobs_N_V).sum(dim=-1)
