"""Policy-gradient losses: pure functions over token-aligned tensors, returning (loss, metrics).

- `ppo_clip_loss`: the clipped surrogate of PPO (Schulman et al. 2017, arXiv 1707.06347),
  `max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))` per token, where `r = exp(logprobs -
  old_logprobs)` is taken against the *rollout* logprobs stored with the episode. The two clip
  bounds may differ (DAPO's clip-higher, Yu et al. 2025, arXiv 2503.14476).
- `kl_penalty`: a per-token estimate of KL(pi_theta || pi_ref) from samples of the rollout
  policy, with Schulman's estimators (http://joschu.net/blog/kl-approx.html): with
  `d = ref_logprobs - logprobs`, k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased and
  always >= 0; the form GRPO puts in its loss, Shao et al. 2024, arXiv 2402.03300).
- `sft_loss`: the negative log-likelihood of the trained tokens, each scaled by its turn's
  weight (supervised fine-tuning / behaviour cloning on stored episodes; the turn's advantage
  slot carries the weight, so the weighting conventions below apply unchanged).
- `value_loss`: squared error of a value head's estimates against their targets (returns-to-go
  or lambda-returns), the critic term of PPO/A2C (arXiv 1707.06347, 1602.01783).

Aggregation, the convention that decides how much each episode weighs (`LossWeighting`):

- `"token"` (default; DAPO's token-level mean, arXiv 2503.14476): every trained token of the
  step weighs the same, `1 / N` with `N` the number of trained tokens in the *whole step*. An
  episode's share of the loss is proportional to its trained-token count, so long episodes
  (many turns, long completions) dominate the step. `n_tokens` is that step-wide `N`: a
  micro-batch of a gradient-accumulation step passes it, and the micro-batch losses then sum
  to the full-batch loss. Without `n_tokens` the denominator is the batch's own masked count.
- `"episode"`: every episode that has trained tokens weighs the same. A token of episode `i`
  weighs `1 / (n_i * E)`, with `n_i` the trained-token count of episode `i` and `E` the number
  of episodes in the step that have at least one trained token; episodes without trained
  tokens take no share. Each episode's tokens sum to `1 / E`, so a 10-turn episode moves the
  policy as much as a 1-turn one (each of its tokens weighs less in proportion). The loss
  takes these weights as `weights_B_T` (built by `sample_weights`); an episode is one row and
  never split across micro-batches, so `n_i` is known in its micro-batch, and with the
  step-wide `E` the micro-batch losses again sum to the full-batch loss.

Both weightings sum to 1 over the step's trained tokens. The value loss follows the same
convention with turns as samples: one value per turn that has a target. Metrics (token means
such as `clip_frac`) use the loss's weights, so they also sum across micro-batches.

Shapes: `_B_T` tensors are token-aligned (see `turnrl.rl.batch`); any shape works as long as
all arguments share it. `mask` may be bool or 0/1 floats. Metrics are detached 0-d tensors
(no device sync until the caller reads them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from turnrl.rl.learner_config import LossWeighting

Metrics = dict[str, torch.Tensor]
KLEstimator = Literal["k1", "k2", "k3"]


def _denominator(mask: torch.Tensor, n_tokens: int | float | None) -> torch.Tensor | float:
    if n_tokens is not None:
        if n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive, got {n_tokens}")
        return float(n_tokens)
    # An all-masked batch gives loss 0 (not nan): it has nothing to train.
    return mask.sum().clamp(min=1).to(torch.float32)


def step_mean(
    mask: torch.Tensor, n_tokens: int | float | None, weights: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The step-mean of a per-sample tensor: weighted sum when `weights` are given, else the
    sum over the mask divided by `n_tokens` (or the mask's own count). Every loss and metric
    here is reduced with it, so micro-batch values add up to the step's."""
    if weights is None:
        denom = _denominator(mask, n_tokens)
        return lambda x_B_T: torch.where(mask, x_B_T, 0.0).sum() / denom
    if n_tokens is not None:
        raise ValueError("pass either n_tokens or weights, not both (weights are normalised)")
    return lambda x_B_T: torch.where(mask, x_B_T * weights, 0.0).sum()


def sample_weights(
    mask_B_X: torch.Tensor,
    weighting: LossWeighting,
    n_samples: int,
    n_rows: int,
    segments_B_X: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight of each sample in the step's loss; each row is one episode (module docstring),
    or, with `segments_B_X` (packed rows, `turnrl.rl.packing`), each sample belongs to the
    episode numbered there (-1 off the samples).

    `mask_B_X` marks the samples (trained tokens, or turns with a value target) of one
    (micro-)batch; `n_samples` is the number of samples in the whole step and `n_rows` the
    number of episodes of the step with at least one sample. `"token"`: `1 / n_samples` on
    every sample; `"episode"`: `1 / (samples in the episode * n_rows)`. 0 off the mask;
    float32.
    """
    if n_samples <= 0 or n_rows <= 0:
        raise ValueError(f"need a positive step size, got {n_samples} samples in {n_rows} rows")
    mask = mask_B_X.bool()
    if weighting == "token":
        per_B_X = torch.full(mask.shape, float(n_samples), device=mask.device)
    elif weighting == "episode" and segments_B_X is None:
        per_B_X = mask.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32) * n_rows
    elif weighting == "episode":
        assert segments_B_X is not None
        # Samples per episode, gathered back to each sample: the row count of the padded
        # layout, for rows that hold several episodes.
        segments = torch.where(mask, segments_B_X, 0)
        counts_S = torch.zeros(int(segments.max()) + 1, device=mask.device)
        counts_S.index_add_(0, segments[mask], torch.ones(int(mask.sum()), device=mask.device))
        per_B_X = counts_S[segments].clamp(min=1) * n_rows
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}")
    return torch.where(mask, 1.0 / per_B_X, 0.0)


def ppo_clip_loss(
    logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    n_tokens: int | float | None = None,
    weights_B_T: torch.Tensor | None = None,
    is_weights_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate loss, a weighted mean over the step's trained tokens: the token
    mean over `n_tokens`, or the sum weighted by `weights_B_T` (`sample_weights`).
    `is_weights_B_T` (no gradient) multiplies each token's term: an off-policy correction's
    importance weight (`turnrl.rl.offpolicy`); None leaves the loss exactly as without it.

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
    if is_weights_B_T is not None:
        per_token_B_T = per_token_B_T * is_weights_B_T.detach()
    mean = step_mean(mask, n_tokens, weights_B_T)
    loss = mean(per_token_B_T)
    with torch.no_grad():
        approx_kl_B_T = ratio_B_T - 1.0 - log_ratio_B_T
        metrics = {
            "clip_frac": mean(is_clipped_B_T.to(torch.float32)),
            "approx_kl": mean(approx_kl_B_T),
            "ratio_mean": mean(ratio_B_T),
        }
    return loss, metrics


def sft_loss(
    logprobs_B_T: torch.Tensor,
    weights_per_turn_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    n_tokens: int | float | None = None,
    weights_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Weighted negative log-likelihood: `-sum_t w_t * a_t * logprobs_t` over the trained
    tokens, with `a_t` the token's turn weight (`weights_per_turn_B_T`, the batch's advantage
    slot: 1.0 clones a turn) and `w_t` the step's share, `1 / n_tokens` or `weights_B_T`
    (`sample_weights`), as in `ppo_clip_loss`. Gradient flows to `logprobs`.

    Returns `(loss, metrics)`; metrics: `nll`, the plain token mean of `-logprobs` (turn
    weights and sample weights left out, so it reads the same under every convention); its
    denominator is `n_tokens` when given (the step's count, so micro-batches sum), else the
    mask's own count.
    """
    mask = mask_B_T.bool()
    nll_mean = step_mean(mask, n_tokens, None)
    loss_mean = nll_mean if weights_B_T is None else step_mean(mask, None, weights_B_T)
    loss = loss_mean(-weights_per_turn_B_T * logprobs_B_T)
    with torch.no_grad():
        metrics = {"nll": nll_mean(-logprobs_B_T.detach())}
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
    weights_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Step mean of a KL(pi_theta || pi_ref) estimator (weighted like `ppo_clip_loss`);
    gradient flows to `logprobs`.

    Returns `(kl, {"kl_ref": kl detached})`; the caller scales it by its coefficient.
    """
    mask = mask_B_T.bool()
    zero = torch.zeros((), dtype=logprobs_B_T.dtype, device=logprobs_B_T.device)
    # Masked positions get equal inputs, whose estimate is 0 for every kind (and finite).
    lp_B_T = torch.where(mask, logprobs_B_T, zero)
    ref_B_T = torch.where(mask, ref_logprobs_B_T, zero)
    kl_B_T = KL_ESTIMATORS[kind](lp_B_T, ref_B_T)
    kl = step_mean(mask, n_tokens, weights_B_T)(kl_B_T)
    return kl, {"kl_ref": kl.detach()}


def value_loss(
    values_B_J: torch.Tensor,
    targets_B_J: torch.Tensor,
    mask_B_J: torch.Tensor,
    n_targets: int | float | None = None,
    weights_B_J: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Mean squared error `(V - target)^2` over the turns that have a target (`mask_B_J`),
    averaged like the policy loss: over `n_targets` or weighted by `weights_B_J`. Gradient
    flows to `values`; the caller scales it by its coefficient.

    Returns `(loss, metrics)`; metrics: `value_loss` (the loss, detached), `value_mean` and
    `value_target_mean` (the same mean of the values and of the targets).
    """
    mask = mask_B_J.bool()
    mean = step_mean(mask, n_targets, weights_B_J)
    # Masked positions may hold anything; `where` keeps them out of the value and the gradient.
    error_B_J = torch.where(mask, values_B_J.float() - targets_B_J.float(), 0.0)
    loss = mean(error_B_J.square())
    with torch.no_grad():
        metrics = {
            "value_loss": loss.detach(),
            "value_mean": mean(values_B_J.detach().float()),
            "value_target_mean": mean(targets_B_J.float()),
        }
    return loss, metrics


def entropy_from_logprobs(logprobs_N_V: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's distribution, given its full log-softmax: `-sum p log p`."""
    return -(logprobs_N_V.exp() * logprobs_N_V).sum(dim=-1)
