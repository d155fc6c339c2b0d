"""Scoring stored tokens with a model: the decoder's final hidden states and the logprob of
every trained token (the learner's and the reference model's view of a `TokenBatch`).

Logprob convention (the sampler's): log_softmax(logits / temperature) at the position before
each token, in float32, before any top-p truncation.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from turnrl.rl.batch import TokenBatch
from turnrl.rl.losses import entropy_from_logprobs


def decoder_hidden(model: PreTrainedModel, batch: TokenBatch) -> torch.Tensor:
    """The decoder's final hidden states (after its last norm) for every position of
    `batch`: `hidden_B_T_H`, what the LM head and the value head read."""
    # No attention mask: rows are right-padded, so causal attention never lets a real token
    # see a pad, and the mask-free call keeps the fused causal attention kernel.
    decoder = model.get_decoder()
    hidden: torch.Tensor = decoder(input_ids=batch.input_ids_B_T, use_cache=False).last_hidden_state
    return hidden


def token_logprobs(
    model: PreTrainedModel,
    batch: TokenBatch,
    temperature: float = 1.0,
    *,
    select_before_head: bool = True,
    with_entropy: bool = False,
    hidden_B_T_H: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of every trained token under `model`, token-aligned like `batch`.

    Returns `(logprobs_B_T, entropy_N)`: `logprobs_B_T[b, t]` = log p(input_ids[b, t] |
    input_ids[b, :t]) in float32 where `loss_mask_B_T` is True, else 0; `entropy_N` (detached,
    or None) is the entropy of the predicted distribution at each trained token, in mask order.
    `hidden_B_T_H` reuses `decoder_hidden(model, batch)` already computed (the value head
    reads the same pass); it needs `select_before_head`.
    """
    input_ids_B_T = batch.input_ids_B_T
    # The logits at t - 1 predict token t: pair positions [:, :-1] with targets [:, 1:].
    target_mask_B_T1 = batch.loss_mask_B_T[:, 1:]
    targets_N = input_ids_B_T[:, 1:][target_mask_B_T1]
    if hidden_B_T_H is not None and not select_before_head:
        raise ValueError("hidden_B_T_H is only used with select_before_head=True")
    if select_before_head:
        if hidden_B_T_H is None:
            hidden_B_T_H = decoder_hidden(model, batch)
        head = model.get_output_embeddings()
        logits_N_V = head(hidden_B_T_H[:, :-1][target_mask_B_T1])
    else:
        logits_B_T_V = model(input_ids=input_ids_B_T, use_cache=False).logits
        logits_N_V = logits_B_T_V[:, :-1][target_mask_B_T1]
    logits_N_V = logits_N_V.float()
    if temperature != 1.0:
        logits_N_V = logits_N_V / temperature
    logprobs_N_V = torch.log_softmax(logits_N_V, dim=-1)
    logprobs_N = logprobs_N_V.gather(-1, targets_N[:, None]).squeeze(-1)
    entropy_N = None
    if with_entropy:
        with torch.no_grad():
            entropy_N = entropy_from_logprobs(logprobs_N_V)
    zeros_B_T1 = logprobs_N.new_zeros(target_mask_B_T1.shape)
    logprobs_B_T1 = zeros_B_T1.masked_scatter(target_mask_B_T1, logprobs_N)
    return torch.nn.functional.pad(logprobs_B_T1, (1, 0)), entropy_N
