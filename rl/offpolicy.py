"""Off-policy corrections of the PPO loss: pure functions over token-aligned tensors.

Three policies meet in a step (Hilton, Cobbe & Schulman 2021, "Batch size-invariance for policy
optimization", arXiv 2110.00641; verl's rollout-correction guide calls it the three-policy
framework): the *behaviour* policy sampled the tokens (its logprobs are the stored
`Turn.completion_logprobs`: weights up to `max_staleness` versions old in the asynchronous
loop, and another engine's numerics, vLLM's, even when they are current); the *proximal*
policy is the learner's weights at the start of `Learner.step`; the *current* policy is the
one being updated. `LearnerConfig.off_policy` picks the loss:

- `rollout`: PPO's ratio `pi / pi_behav`, clipped; no weight (the behaviour policy is the
  anchor).
- `decoupled` (Hilton et al.): ratio `pi / pi_prox`, clipped, times the importance weight
  `w = pi_prox / pi_behav` of each token: the clip bounds how far the update moves from the
  proximal policy, whatever produced the data; the weight corrects for who produced it.
- `tis`, truncated IS (Yao et al. 2025, "Your efficient RL framework secretly brings you
  off-policy RL training"; verl's `rollout_is`): as `decoupled` with `min(w, C)`.
- `mis`, masked IS (IcePop, Ling team 2025, for tokens; sequence-level MIS, Liu, Li et al.
  2025, "When speed kills stability"): as `decoupled` with `w` where `low <= w <= high`, 0
  elsewhere (IcePop's `M(k) = k` inside the band; verl's rejection sampling keeps weight 1
  instead).

`tis` and `mis` act at token level or at sequence level, where a sequence's weight is the
product of its tokens' weights, `exp(sum_t log w_t)`, truncated or masked as one and broadcast
to its tokens. Weights are constants (computed from logprobs without gradient) multiplying each
token's clipped surrogate term.

GSPO's sequence ratio (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv
2507.18071; `LearnerConfig.ratio_level`): `s = exp(mean_t log(pi_t / pi_anchor_t))` per
sequence, clipped per sequence, in place of the per-token ratio. `clipped_surrogate` gets it
by averaging both logprobs over each sequence before PPO's loss: the difference of the means
is the mean of the log-ratios, and each token of a sequence of `n` receives `1 / n` of the
sequence's gradient, GSPO's own. The sequence's term is broadcast to its tokens and summed
with the step's loss weights (`turnrl.rl.losses`), so under `"token"` weighting a sequence
weighs by its length (GSPO-token's aggregation, which equals GSPO's when the advantage is
constant along the sequence, as a turn's is).

A *sequence* here is one turn's sampled completion, not the whole episode, because:
- the advantage is per turn (`turnrl.rl.batch` broadcasts one per turn; step-level estimators
  give turns of one episode different ones), and GSPO's `min(s A, clip(s) A)` needs one
  advantage per sequence;
- a turn is what one policy version sampled: in the asynchronous loop an episode's turns may
  come from different versions (`Turn.policy_version`), and the tokens between turns are the
  environment's, never the policy's;
- a product over a whole episode (thousands of sampled tokens) degenerates: a mean per-token
  log-weight of 0.01 is a weight of e^20 over 2,000 tokens, so sequence-level truncation or
  masking would act on nearly every episode. A turn's product stays within its own length.
What a per-turn weight leaves uncorrected is the distribution of the turn's context (the
earlier turns), as token-level weights leave a token's prefix.

Shapes: `_B_T` tensors are token-aligned (`turnrl.rl.batch`); `sequence_B_T` holds an int64
id per token, equal within a sequence and distinct between sequences (any value off the mask:
`TokenBatch.turn_ids_B_T`). Metrics are detached 0-d tensors weighted like the loss, so they
sum over micro-batches and ranks.
"""

from __future__ import annotations

import math

import torch

from turnrl.rl.losses import Metrics, ppo_clip_loss, step_mean


def _sequence_index(mask: torch.Tensor, sequence_B_T: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each trained token's sequence renumbered 0..S-1 (0 off the mask), and S."""
    ids, index_N = torch.unique(sequence_B_T[mask], return_inverse=True)
    index_B_T = torch.zeros_like(sequence_B_T)
    index_B_T[mask] = index_N
    return index_B_T, int(ids.numel())


def sequence_sum(
    x_B_T: torch.Tensor, mask_B_T: torch.Tensor, sequence_B_T: torch.Tensor
) -> torch.Tensor:
    """Each trained token's sequence total of `x` over the sequence's trained tokens
    (broadcast back to them); 0 off the mask. Gradient flows to every summed `x`."""
    mask = mask_B_T.bool()
    index_B_T, n_sequences = _sequence_index(mask, sequence_B_T)
    if n_sequences == 0:
        return torch.where(mask, x_B_T, 0.0)
    sums_S = torch.zeros(n_sequences, dtype=x_B_T.dtype, device=x_B_T.device)
    sums_S = sums_S.index_add(0, index_B_T[mask], x_B_T[mask])
    return torch.where(mask, sums_S[index_B_T], 0.0)


def sequence_mean(
    x_B_T: torch.Tensor, mask_B_T: torch.Tensor, sequence_B_T: torch.Tensor
) -> torch.Tensor:
    """Each trained token's sequence mean of `x` (as `sequence_sum`, over the count)."""
    mask = mask_B_T.bool()
    counts_B_T = sequence_sum(mask.to(x_B_T.dtype), mask, sequence_B_T)
    return torch.where(mask, sequence_sum(x_B_T, mask, sequence_B_T) / counts_B_T.clamp(min=1), 0.0)


def log_importance_weights(
    proximal_B_T: torch.Tensor,
    behaviour_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    sequence_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """`log(pi_prox / pi_behav)` of each trained token; with `sequence_B_T`, the log of the
    product of its sequence's token weights (the sequence-level weight), on each of its
    tokens. 0 off the mask."""
    mask = mask_B_T.bool()
    log_w_B_T = torch.where(mask, proximal_B_T - behaviour_B_T, 0.0)
    return log_w_B_T if sequence_B_T is None else sequence_sum(log_w_B_T, mask, sequence_B_T)


def truncated_weights(
    log_w_B_T: torch.Tensor, mask_B_T: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIS: `min(w, cap)` with `w = exp(log_w)`, 0 off the mask; and which trained tokens were
    truncated (`w > cap`). Works in log space, so a sequence's product never overflows."""
    if cap <= 0:
        raise ValueError(f"cap must be positive, got {cap}")
    mask = mask_B_T.bool()
    log_cap = math.log(cap)
    truncated_B_T = (log_w_B_T > log_cap) & mask
    return torch.where(mask, torch.exp(log_w_B_T.clamp(max=log_cap)), 0.0), truncated_B_T


def masked_weights(
    log_w_B_T: torch.Tensor, mask_B_T: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MIS: `w = exp(log_w)` where `low <= w <= high`, else 0 (and 0 off the mask); and which
    trained tokens were masked out."""
    if not 0 <= low < high:
        raise ValueError(f"need 0 <= low < high, got low={low}, high={high}")
    mask = mask_B_T.bool()
    log_low = math.log(low) if low > 0 else -math.inf
    log_high = math.log(high)
    keep_B_T = (log_w_B_T >= log_low) & (log_w_B_T <= log_high) & mask
    weights_B_T = torch.where(keep_B_T, torch.exp(log_w_B_T.clamp(log_low, log_high)), 0.0)
    return weights_B_T, mask & ~keep_B_T


def clipped_surrogate(
    logprobs_B_T: torch.Tensor,
    anchor_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    is_weights_B_T: torch.Tensor | None = None,
    sequence_B_T: torch.Tensor | None = None,
    n_tokens: int | float | None = None,
    weights_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped surrogate against `anchor_logprobs_B_T` (the behaviour or the proximal
    policy), each token's term times its importance weight `is_weights_B_T` (None: 1), with
    GSPO's per-sequence ratio when `sequence_B_T` is given (module docstring). Weighted over
    the step like `turnrl.rl.losses.ppo_clip_loss`, whose metrics it returns (`clip_frac`
    counts a clipped sequence's tokens; `ratio_mean` and `approx_kl` are of the ratio used)."""
    if sequence_B_T is not None:
        logprobs_B_T = sequence_mean(logprobs_B_T, mask_B_T, sequence_B_T)
        anchor_logprobs_B_T = sequence_mean(anchor_logprobs_B_T, mask_B_T, sequence_B_T)
    return ppo_clip_loss(
        logprobs_B_T,
        anchor_logprobs_B_T,
        advantages_B_T,
        mask_B_T,
        clip_low=clip_low,
        clip_high=clip_high,
        n_tokens=n_tokens,
        weights_B_T=weights_B_T,
        is_weights_B_T=is_weights_B_T,
    )


def importance_metrics(
    log_w_B_T: torch.Tensor,
    is_weights_B_T: torch.Tensor,
    corrected_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    sequence_B_T: torch.Tensor,
    n_sequences: int,
    n_tokens: int | float | None = None,
    weights_B_T: torch.Tensor | None = None,
) -> Metrics:
    """What an importance correction did, weighted over the step like the loss: `log_w_B_T`
    the token log-weights `log(pi_prox / pi_behav)`, `is_weights_B_T` the weights applied,
    `corrected_B_T` the tokens truncated or masked; `n_sequences` the step's trained
    sequences (over every micro-batch and rank).

    `is_weight_mean`: mean weight applied; `is_token_frac`: share of trained tokens truncated
    or masked; `is_seq_frac`: share of sequences with at least one such token (this
    micro-batch's, over the step's count); `behaviour_kl`: k3 estimate of KL(pi_behav ||
    pi_prox), `w - 1 - log w` on the behaviour's samples (Schulman,
    http://joschu.net/blog/kl-approx.html), the mismatch the weights correct."""
    if n_sequences <= 0:
        raise ValueError(f"n_sequences must be positive, got {n_sequences}")
    mask = mask_B_T.bool()
    mean = step_mean(mask, n_tokens, weights_B_T)
    with torch.no_grad():
        log_w = torch.where(mask, log_w_B_T, 0.0)
        n_corrected = torch.unique(sequence_B_T[corrected_B_T & mask]).numel()
        return {
            "is_weight_mean": mean(is_weights_B_T),
            "is_token_frac": mean(corrected_B_T.to(torch.float32)),
            "is_seq_frac": torch.tensor(n_corrected / n_sequences, device=mask.device),
            "behaviour_kl": mean(torch.exp(log_w) - 1.0 - log_w),
        }
