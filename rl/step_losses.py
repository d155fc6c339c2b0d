"""One micro-batch's share of a learner step's loss: the PPO-clip surrogate (+ k3 KL to the
reference) and the value MSE, weighted for the *whole* step (`turnrl.rl.losses`: the step-wide
counts `n_tokens` / `n_targets`, episodes `n_rows` and turns `n_turns` come from the caller,
summed over every micro-batch and every data-parallel rank), so that the micro-batch losses add
up to the step's loss in any layout, padded or packed (`segments_B_T` count packed episodes
apart). `LearnerConfig.off_policy` and `ratio_level` pick the surrogate's anchor, importance
weight and ratio (`turnrl.rl.offpolicy`); the defaults are PPO's loss against the rollout
logprobs, computed exactly as before those settings existed."""

from __future__ import annotations

import torch

from turnrl.rl.batch import TokenBatch
from turnrl.rl.learner_config import (
    DecoupledPPO,
    LearnerConfig,
    LossWeighting,
    MaskedIS,
    OffPolicyCorrection,
    RolloutRatio,
)
from turnrl.rl.losses import Metrics, kl_penalty, sample_weights, value_loss
from turnrl.rl.offpolicy import (
    clipped_surrogate,
    importance_metrics,
    log_importance_weights,
    masked_weights,
    truncated_weights,
)


def policy_loss(
    logprobs_B_T: torch.Tensor,
    entropy_N: torch.Tensor,
    ref_logprobs_B_T: torch.Tensor | None,
    batch: TokenBatch,
    config: LearnerConfig,
    n_tokens: int,
    n_rows: int,
    n_turns: int,
) -> tuple[torch.Tensor, Metrics]:
    """PPO-clip (+ `kl_coef` x k3 KL when `ref_logprobs_B_T` is given) of one micro-batch.
    Under an off-policy correction the anchor is `batch.proximal_logprobs_B_T`, or, when the
    batch carries none, the micro-batch's own logprobs detached (the current weights are the
    proximal ones until the step's first optimizer step)."""
    # "token" keeps the plain division by the step's token count (bit for bit the
    # unweighted path); other weightings pass explicit per-token weights.
    weights_B_T = None
    if config.loss_weighting != "token":
        weights_B_T = sample_weights(
            batch.loss_mask_B_T, config.loss_weighting, n_tokens, n_rows, batch.segments_B_T
        )
    denom = None if weights_B_T is not None else n_tokens
    correction = config.off_policy
    sequence_B_T = None
    if config.ratio_level == "sequence" or not isinstance(correction, RolloutRatio):
        sequence_B_T = batch.turn_ids_B_T
    anchor_B_T = batch.old_logprobs_B_T
    is_weights_B_T = None
    is_metrics: Metrics = {}
    if not isinstance(correction, RolloutRatio):
        proximal_B_T = batch.proximal_logprobs_B_T
        anchor_B_T = logprobs_B_T.detach() if proximal_B_T is None else proximal_B_T
        assert sequence_B_T is not None
        is_weights_B_T, is_metrics = importance_weights(
            correction, anchor_B_T, batch, sequence_B_T, n_turns, denom, weights_B_T
        )
    loss, metrics = clipped_surrogate(
        logprobs_B_T,
        anchor_B_T,
        batch.advantages_B_T,
        batch.loss_mask_B_T,
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        is_weights_B_T=is_weights_B_T,
        sequence_B_T=sequence_B_T if config.ratio_level == "sequence" else None,
        n_tokens=denom,
        weights_B_T=weights_B_T,
    )
    metrics.update(is_metrics)
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


def importance_weights(
    correction: OffPolicyCorrection,
    proximal_B_T: torch.Tensor,
    batch: TokenBatch,
    sequence_B_T: torch.Tensor,
    n_turns: int,
    n_tokens: int | None,
    weights_B_T: torch.Tensor | None,
) -> tuple[torch.Tensor, Metrics]:
    """The weight `pi_prox / pi_behav` of each trained token as `correction` shapes it (plain,
    truncated or masked, at token or turn level), and what it did (`importance_metrics`)."""
    if isinstance(correction, RolloutRatio):
        raise ValueError("the rollout ratio takes no importance weight")
    mask = batch.loss_mask_B_T
    with torch.no_grad():
        token_log_w_B_T = log_importance_weights(proximal_B_T, batch.old_logprobs_B_T, mask)
        if isinstance(correction, DecoupledPPO):
            weights = torch.where(mask, torch.exp(token_log_w_B_T), 0.0)
            corrected = torch.zeros_like(mask)
        else:
            log_w_B_T = token_log_w_B_T
            if correction.level == "sequence":
                log_w_B_T = log_importance_weights(
                    proximal_B_T, batch.old_logprobs_B_T, mask, sequence_B_T
                )
            if isinstance(correction, MaskedIS):
                weights, corrected = masked_weights(
                    log_w_B_T, mask, correction.low, correction.high
                )
            else:
                weights, corrected = truncated_weights(log_w_B_T, mask, correction.cap)
        metrics = importance_metrics(
            token_log_w_B_T,
            weights,
            corrected,
            mask,
            sequence_B_T,
            n_turns,
            n_tokens=n_tokens,
            weights_B_T=weights_B_T,
        )
    return weights, metrics
