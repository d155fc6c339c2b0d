"""Scoring stored tokens with a model: the decoder's final hidden states and the logprob of
every trained token (the learner's and the reference model's view of a `TokenBatch`).

Logprob convention (the sampler's): log_softmax(logits / temperature) at the position before
each token, in float32, before any top-p truncation.

Shared prefix: the episodes of a batch usually start with the same prompt (system prompt,
tool schemas, task: ~560 tokens in the demo), and a group's rollouts share it whole. With
`share_prefix`, the longest prefix that *every* row of the micro-batch shares (found from the
ids, never assumed) goes through the decoder once, at batch size 1, with a KV cache; its keys
and values are broadcast over the rows with `expand` (a view: no copy), and the rows' suffixes
run on top of them. Each row sees exactly the context of a plain forward pass (same ids, same
positions, causal), so hidden states, logprobs and gradients are the plain ones up to float
rounding; backward through `expand` sums the rows' gradients into the one prefix computation,
which stays in the graph when gradients are on. The prefix's hidden states are broadcast the
same way, so callers still get `hidden_B_T_H` for every position (a trained token or a value
read inside the prefix is served too). It needs a decoder whose attention takes a dynamic KV
cache with causal masking over it (sdpa or eager attention, no sliding window); other models,
single rows and prefixes under `MIN_SHARED_PREFIX` take the plain pass.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from turnrl.rl.batch import TokenBatch
from turnrl.rl.losses import entropy_from_logprobs
from turnrl.rl.packing import packed_hidden

MIN_SHARED_PREFIX = 16
"""Shortest common prefix worth a separate pass (below it the saving is a few token-rows)."""

HEAD_CHUNK_ROWS = 1024
"""Trained positions projected to the vocabulary at a time (a 49152-word vocabulary in float32:
~200 MB of logits per chunk)."""

_SHAREABLE_ATTENTION = ("sdpa", "eager")


def shared_prefix_length(input_ids_B_T: torch.Tensor, lengths_B: torch.Tensor) -> int:
    """Length of the longest prefix of real tokens that every row shares, capped so that each
    row keeps at least one token after it; 0 for fewer than two rows."""
    if input_ids_B_T.shape[0] < 2:
        return 0
    limit = int(lengths_B.min()) - 1
    if limit <= 0:
        return 0
    same_T = (input_ids_B_T[:, :limit] == input_ids_B_T[:1, :limit]).all(dim=0)
    differ = (~same_T).nonzero()
    return int(differ[0, 0]) if differ.numel() else limit


def supports_prefix_sharing(model: PreTrainedModel) -> bool:
    """Whether `model`'s decoder can run suffixes on a broadcast prefix KV (module docstring)."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return impl in _SHAREABLE_ATTENTION and getattr(config, "sliding_window", None) is None


def decoder_hidden(
    model: PreTrainedModel, batch: TokenBatch, *, share_prefix: bool = False
) -> torch.Tensor:
    """The decoder's final hidden states (after its last norm) for every position of
    `batch`: `hidden_B_T_H`, what the LM head and the value head read. `share_prefix` runs
    the rows' common prefix once (module docstring); the result is the same. A packed batch
    (`turnrl.rl.packing`) runs with its block-diagonal attention, never a shared prefix."""
    if batch.packed:
        return packed_hidden(model, batch)
    return context_hidden(model, batch.input_ids_B_T, batch.lengths_B, share_prefix=share_prefix)


def context_hidden(
    model: PreTrainedModel,
    input_ids_B_T: torch.Tensor,
    lengths_B: torch.Tensor,
    *,
    share_prefix: bool = True,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """`hidden_B_T_H` of right-padded rows (`lengths_B` real tokens each), their common
    prefix run once with `share_prefix`. With `cache` (an empty `DynamicCache` built from the
    model's config), the pass also leaves every row's keys and values in it, for a later
    pass that attends to the rows (as `turnrl.rl.info_gain`'s cached gold probabilities do)."""
    decoder = model.get_decoder()
    cache_kw = (
        "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    )
    n_prefix = shared_prefix_length(input_ids_B_T, lengths_B) if share_prefix else 0
    if n_prefix >= MIN_SHARED_PREFIX and supports_prefix_sharing(model):
        kv = DynamicCache(config=model.config) if cache is None else cache
        if all(isinstance(layer, DynamicLayer) for layer in kv.layers) and kv.layers:
            return _on_shared_prefix(decoder, cache_kw, input_ids_B_T, n_prefix, kv)
    # No attention mask: rows are right-padded, so causal attention never lets a real token
    # see a pad, and the mask-free call keeps the fused causal attention kernel.
    kw: dict[str, object] = {"use_cache": False} if cache is None else {"use_cache": True}
    if cache is not None:
        kw[cache_kw] = cache
    hidden: torch.Tensor = decoder(input_ids=input_ids_B_T, **kw).last_hidden_state
    return hidden


def _on_shared_prefix(
    decoder: torch.nn.Module,
    cache_kw: str,
    input_ids_B_T: torch.Tensor,
    n_prefix: int,
    cache: DynamicCache,
) -> torch.Tensor:
    """One pass over `input_ids_B_T[0, :n_prefix]` into `cache`, its keys and values
    broadcast over the rows, then one pass over the rows' suffixes on top of them."""
    n_rows = input_ids_B_T.shape[0]
    prefix_1_P_H: torch.Tensor = decoder(
        input_ids=input_ids_B_T[:1, :n_prefix], use_cache=True, **{cache_kw: cache}
    ).last_hidden_state
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer)
        assert layer.keys is not None and layer.values is not None
        # Views with stride 0 over the rows: the suffix pass concatenates its own keys and
        # values after them, and backward sums the rows' gradients into the prefix's.
        layer.keys = layer.keys.expand(n_rows, -1, -1, -1)
        layer.values = layer.values.expand(n_rows, -1, -1, -1)
    # Positions continue from the cache's length; the causal mask covers prefix + suffix.
    suffix_B_S_H: torch.Tensor = decoder(
        input_ids=input_ids_B_T[:, n_prefix:], use_cache=True, **{cache_kw: cache}
    ).last_hidden_state
    return torch.cat([prefix_1_P_H.expand(n_rows, -1, -1), suffix_B_S_H], dim=1)


def token_logprobs(
    model: PreTrainedModel,
    batch: TokenBatch,
    temperature: float = 1.0,
    *,
    select_before_head: bool = True,
    with_entropy: bool = False,
    hidden_B_T_H: torch.Tensor | None = None,
    share_prefix: bool = False,
    chunk_rows: int = HEAD_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of every trained token under `model`, token-aligned like `batch`.

    Returns `(logprobs_B_T, entropy_N)`: `logprobs_B_T[b, t]` = log p(input_ids[b, t] |
    input_ids[b, :t]) in float32 where `loss_mask_B_T` is True, else 0; `entropy_N` (detached,
    or None) is the entropy of the predicted distribution at each trained token, in mask order.
    `hidden_B_T_H` reuses `decoder_hidden(model, batch)` already computed (the value head
    reads the same pass); it needs `select_before_head`. `share_prefix` computes the hidden
    states with `decoder_hidden`'s shared prefix. The trained positions go through the head
    and the softmax `chunk_rows` at a time (the result does not depend on it).
    """
    input_ids_B_T = batch.input_ids_B_T
    # The logits at t - 1 predict token t: pair positions [:, :-1] with targets [:, 1:].
    target_mask_B_T1 = batch.loss_mask_B_T[:, 1:]
    targets_N = input_ids_B_T[:, 1:][target_mask_B_T1]
    if hidden_B_T_H is not None and not select_before_head:
        raise ValueError("hidden_B_T_H is only used with select_before_head=True")
    if select_before_head:
        if hidden_B_T_H is None:
            hidden_B_T_H = decoder_hidden(model, batch, share_prefix=share_prefix)
        head = model.get_output_embeddings()
        rows_N_X = hidden_B_T_H[:, :-1][target_mask_B_T1]
    else:
        head = None
        rows_N_X = model(input_ids=input_ids_B_T, use_cache=False).logits[:, :-1][target_mask_B_T1]
    # Row chunks bound the vocab-sized temporaries (logits, softmax, entropy terms) to one
    # chunk's; log_softmax keeps its output for backward either way.
    logprob_parts: list[torch.Tensor] = []
    entropy_parts: list[torch.Tensor] = []
    for start in range(0, rows_N_X.shape[0], chunk_rows):
        rows_C_X = rows_N_X[start : start + chunk_rows]
        logits_C_V = (rows_C_X if head is None else head(rows_C_X)).float()
        if temperature != 1.0:
            logits_C_V = logits_C_V / temperature
        logprobs_C_V = torch.log_softmax(logits_C_V, dim=-1)
        del logits_C_V
        targets_C = targets_N[start : start + chunk_rows, None]
        logprob_parts.append(logprobs_C_V.gather(-1, targets_C).squeeze(-1))
        if with_entropy:
            with torch.no_grad():
                entropy_parts.append(entropy_from_logprobs(logprobs_C_V))
    zeros_B_T1 = torch.zeros(target_mask_B_T1.shape, device=input_ids_B_T.device)
    if not logprob_parts:
        empty = zeros_B_T1.new_zeros(0)
        return torch.nn.functional.pad(zeros_B_T1, (1, 0)), empty if with_entropy else None
    logprobs_N = torch.cat(logprob_parts)
    entropy_N = torch.cat(entropy_parts) if with_entropy else None
    logprobs_B_T1 = zeros_B_T1.masked_scatter(target_mask_B_T1, logprobs_N)
    return torch.nn.functional.pad(logprobs_B_T1, (1, 0)), entropy_N
