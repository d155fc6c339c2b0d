"""One micro-batch's share of a learner step's loss: the PPO-clip surrogate (+ k3 KL to the
reference) and the value MSE, weighted for the *whole* step (`turnrl.rl.losses`: the step-wide
counts `n_tokens` / `n_targets` and episodes `n_rows` come from the caller, summed over every
micro-batch and every data-parallel rank), so that the micro-batch losses add up to the step's
loss in any layout, padded or packed (`segments_B_T` count packed episodes apart)."""

from __future__ import annotations

import torch

from turnrl.rl.batch import TokenBatch
from turnrl.rl.learner_config import LearnerConfig, LossWeighting
from turnrl.rl.losses import Metrics, kl_penalty, ppo_clip_loss, sample_weights, value_loss


def policy_loss(
    logprobs_B_T: torch.Tensor,
    entropy_N: torch.Tensor,
    ref_logprobs_B_T: torch.Tensor | None,
    batch: TokenBatch,
    config: LearnerConfig,
    n_tokens: int,
    n_rows: int,
) -> tuple[torch.Tensor, Metrics]:
    """PPO-clip (+ `kl_coef` x k3 KL when `ref_logprobs_B_T` is given) of one micro-batch."""
    # "token" keeps the plain division by the step's token count (bit for bit the
    # unweighted path); other weightings pass explicit per-token weights.
    weights_B_T = None
    if config.loss_weighting != "token":
        weights_B_T = sample_weights(
            batch.loss_mask_B_T, config.loss_weighting, n_tokens, n_rows, batch.segments_B_T
        )
    denom = None if weights_B_T is not None else n_tokens
    loss, metrics = ppo_clip_loss(
        logprobs_B_T,
        batch.old_logprobs_B_T,
        batch.advantages_B_T,
        batch.loss_mask_B_T,
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        n_tokens=denom,
        weights_B_T=weights_B_T,
    )
    if ref_logprobs_B_T is not None:
        kl, kl_metrics = kl_penalty(
            logprobs_B_T,
            ref_logprobs_B_T,
            batch.loss_mask_B_T,
            "k3",
            n_tokens=denom,
            weights_B_T=weights_B_T,
        )
        loss = loss + config.kl_coef * kl
        metrics.update(kl_metrics)
    # entropy_N is in mask order; column 0 is never trained, so the mask's order is it.
    if weights_B_T is None:
        metrics["entropy"] = entropy_N.sum() / n_tokens
    else:
        metrics["entropy"] = (entropy_N * weights_B_T[batch.loss_mask_B_T]).sum()
    return loss, metrics


def state_value_loss(
    values_B_J: torch.Tensor,
    batch: TokenBatch,
    weighting: LossWeighting,
    n_targets: int,
    n_rows: int,
) -> tuple[torch.Tensor, Metrics]:
    """MSE of the values V(s_j) against the batch's targets."""
    if weighting == "token":
        return value_loss(
            values_B_J, batch.value_targets_B_J, batch.value_mask_B_J, n_targets=n_targets
        )
    weights_B_J = sample_weights(
        batch.value_mask_B_J, weighting, n_targets, n_rows, batch.value_segments_B_J
    )
    return value_loss(
        values_B_J, batch.value_targets_B_J, batch.value_mask_B_J, weights_B_J=weights_B_J
    )
