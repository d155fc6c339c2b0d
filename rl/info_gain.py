"""The policy's teacher-forced probability of the gold answer after each turn (IGPO signals).

Information gain (IGPO, Wang et al. 2025, arXiv 2510.14967) rewards turn t by how much it raised
the policy's probability of producing the gold answer a = (a_1..a_G):

    p_t = exp( (1/G) * sum_j log pi(a_j | context after turn t, answer prefix, a_<j) )

(the geometric mean of the gold tokens' probabilities), and p_{-1} is the same quantity given
only the initial prompt. This module measures the p's; `turnrl.rl.rewards` turns them into the
`info_gain` component, so replay needs no model (`with_gold_probs` stores them in
`Turn.signals`).

Tokens are the truth: the context after turn t is the episode's stored ids up to the end of
turn t's observation (`Episode.token_ids()` cut at that boundary), never re-tokenized text.
Only the gold answer and the answer prefix (say the ids of `<answer>`) are tokenized, by the
caller, which passes their ids. Each turn's `observation_ids` already end with the next
assistant header, and the initial prompt with the first one, so the prefix usually needs no
header of its own.

Computation (`method="cached"`, the default): per micro-batch of episodes, one forward pass over
the whole stored episodes fills a KV cache, then one more pass scores every boundary at once.
Boundary k of an episode becomes a block of queries `[ids[b_k - 1]] + prefix + gold[:-1]`
appended after the cache, with position ids continuing from `b_k - 1`, and an attention mask
that lets block k see the cached ids before `b_k - 1` and its own earlier tokens only. That is
exactly the context of a separate forward pass over `ids[:b_k] + prefix + gold`, at the cost of
one episode forward plus a few tokens per boundary (instead of one forward per boundary, which
is quadratic in the number of turns). The last context id is recomputed inside the block so the
first gold token is predicted from inside the block even when the prefix is empty.
`method="rows"` lays out one right-padded row per (episode, boundary) instead; it needs no
custom mask, so it serves attention kernels that ignore one (flash attention) and models with a
sliding-window cache; `"auto"` picks it for those.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from turnrl.agent.records import Episode
from turnrl.rl.batch import plan_micro_batches

Method = Literal["auto", "cached", "rows"]

_MASKABLE = ("sdpa", "eager")
"""Attention implementations that honour a custom 4D additive mask."""


@dataclass(frozen=True)
class _Row:
    """One episode's inputs: its stored ids, the boundaries to score, and its gold ids."""

    ids: list[int]
    boundaries: list[int]
    """Number of context ids before the answer prefix at each scored point: the initial
    prompt's length, then the end of each turn's observation."""
    gold: list[int]


def boundaries(episode: Episode) -> list[int]:
    """`[b_init, b_0, ..., b_{T-1}]`: the length of the episode's context after the initial
    prompt and after each turn's observation (an index into `Episode.token_ids()`)."""
    if not episode.turns:
        return []
    out = [len(episode.turns[0].prompt_ids)]
    end = 0
    for turn in episode.turns:
        end += len(turn.prompt_ids) + len(turn.completion_ids) + len(turn.observation_ids)
        out.append(end)
    return out


def gold_probabilities(
    model: PreTrainedModel,
    episodes: Sequence[Episode],
    gold_ids: Sequence[Sequence[int]],
    answer_prefix_ids: Sequence[int],
    micro_batch_tokens: int = 8192,
    *,
    temperature: float = 1.0,
    method: Method = "auto",
    pad_id: int = 0,
) -> list[list[float]]:
    """`out[n] = [p_init, p_0, ..., p_{T-1}]` for `episodes[n]` (see the module docstring);
    `[]` for an episode without turns.

    `gold_ids[n]` are the ids of episode n's gold answer (non-empty); `answer_prefix_ids` are
    teacher-forced between the context and the gold answer. `temperature` scales the logits
    as the sampler did (the learner's convention). `micro_batch_tokens` bounds each forward's
    padded size (rows x longest row, the scored blocks included). The model is run without
    gradients and in eval mode (its previous mode is restored).
    """
    if len(gold_ids) != len(episodes):
        raise ValueError(f"{len(gold_ids)} gold answers for {len(episodes)} episodes")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    prefix = list(answer_prefix_ids)
    rows: list[_Row] = []
    for episode, gold in zip(episodes, gold_ids, strict=True):
        if not gold:
            raise ValueError(f"episode {episode.episode_id}: empty gold answer ids")
        bounds = boundaries(episode)
        if bounds and bounds[0] < 1:
            raise ValueError(
                f"episode {episode.episode_id}: the first turn has no prompt ids; the gold "
                "answer needs at least one context id before it"
            )
        rows.append(_Row(episode.token_ids(), bounds, list(gold)))
    if method == "auto":
        method = "cached" if _supports_cached(model) else "rows"
    out: list[list[float]] = [[] for _ in rows]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if method == "cached":
                scored = [n for n, r in enumerate(rows) if r.boundaries]
                sizes = [
                    len(rows[n].ids) + len(rows[n].boundaries) * (len(prefix) + len(rows[n].gold))
                    for n in scored
                ]
                for group in plan_micro_batches(sizes, micro_batch_tokens):
                    batch = [rows[scored[i]] for i in group]
                    for i, probs in zip(
                        group, _cached(model, batch, prefix, temperature, pad_id), strict=True
                    ):
                        out[scored[i]] = probs
            else:
                pairs = [(n, k) for n, r in enumerate(rows) for k in range(len(r.boundaries))]
                sizes = [rows[n].boundaries[k] + len(prefix) + len(rows[n].gold) for n, k in pairs]
                flat: dict[tuple[int, int], float] = {}
                for group in plan_micro_batches(sizes, micro_batch_tokens):
                    chosen = [pairs[i] for i in group]
                    for key, p in zip(
                        chosen, _rows(model, rows, chosen, prefix, temperature, pad_id), strict=True
                    ):
                        flat[key] = p
                for n, r in enumerate(rows):
                    out[n] = [flat[(n, k)] for k in range(len(r.boundaries))]
    finally:
        model.train(was_training)
    return out


def with_gold_probs(episodes: Sequence[Episode], probs: Sequence[Sequence[float]]) -> list[Episode]:
    """Episodes with `Episode.gold_prob_initial` and each turn's `signals.gold_prob`, from
    `gold_probabilities`' output (other signals are kept)."""
    if len(probs) != len(episodes):
        raise ValueError(f"{len(probs)} probability rows for {len(episodes)} episodes")
    out = []
    for episode, p in zip(episodes, probs, strict=True):
        if len(p) != (len(episode.turns) + 1 if episode.turns else 0):
            raise ValueError(
                f"episode {episode.episode_id}: {len(p)} probabilities for "
                f"{len(episode.turns)} turns (one per turn plus the initial one)"
            )
        turns = [
            turn.model_copy(
                update={"signals": turn.signals.model_copy(update={"gold_prob": float(p[t + 1])})}
            )
            for t, turn in enumerate(episode.turns)
        ]
        update: dict[str, object] = {"turns": turns}
        if episode.turns:
            update["gold_prob_initial"] = float(p[0])
        out.append(episode.model_copy(update=update))
    return out


def _supports_cached(model: PreTrainedModel) -> bool:
    config = model.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return impl in _MASKABLE and getattr(config, "sliding_window", None) is None


def _device_dtype(model: PreTrainedModel) -> tuple[torch.device, torch.dtype]:
    weight = model.get_input_embeddings().weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"unexpected input embedding weight {type(weight).__name__}")
    return weight.device, weight.dtype


def _mean_gold_probs(
    model: PreTrainedModel,
    hidden_N_H: torch.Tensor,
    targets_N: torch.Tensor,
    segment_N: torch.Tensor,
    n_segments: int,
    temperature: float,
) -> list[float]:
    """exp(mean log p(target)) per segment, from the hidden states that predict each target."""
    logits_N_V = model.get_output_embeddings()(hidden_N_H).float()
    if temperature != 1.0:
        logits_N_V = logits_N_V / temperature
    logprobs_N = torch.log_softmax(logits_N_V, dim=-1).gather(-1, targets_N[:, None]).squeeze(-1)
    sums = torch.zeros(n_segments, dtype=torch.float64, device=logprobs_N.device)
    counts = torch.zeros(n_segments, dtype=torch.float64, device=logprobs_N.device)
    sums.index_add_(0, segment_N, logprobs_N.double())
    counts.index_add_(0, segment_N, torch.ones_like(logprobs_N, dtype=torch.float64))
    return torch.exp(sums / counts).tolist()


def _cached(
    model: PreTrainedModel,
    rows: Sequence[_Row],
    prefix: list[int],
    temperature: float,
    pad_id: int,
) -> list[list[float]]:
    device, dtype = _device_dtype(model)
    decoder = model.get_decoder()
    n_ctx = max(len(r.ids) for r in rows)
    n_blocks = max(len(r.boundaries) for r in rows)
    width = len(prefix) + max(len(r.gold) for r in rows)
    n_query = n_blocks * width

    ctx_B_L = torch.full((len(rows), n_ctx), pad_id, dtype=torch.long)
    query_B_Q = torch.full((len(rows), n_query), pad_id, dtype=torch.long)
    pos_B_Q = torch.zeros((len(rows), n_query), dtype=torch.long)
    # Cached ids visible to each query: those before `limit` (0 for padding blocks).
    limit_B_Q = torch.zeros((len(rows), n_query), dtype=torch.long)
    sel_b: list[int] = []
    sel_q: list[int] = []
    targets: list[int] = []
    segments: list[int] = []
    n_scored = 0
    for b, row in enumerate(rows):
        ctx_B_L[b, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
        n_prefix, n_gold = len(prefix), len(row.gold)
        for k, bound in enumerate(row.boundaries):
            start = k * width
            block = [row.ids[bound - 1], *prefix, *row.gold[:-1]]
            query_B_Q[b, start : start + len(block)] = torch.tensor(block, dtype=torch.long)
            pos_B_Q[b, start : start + width] = torch.arange(bound - 1, bound - 1 + width)
            limit_B_Q[b, start : start + width] = bound - 1
            # The query at block offset n_prefix + j predicts gold[j].
            sel_b += [b] * n_gold
            sel_q += range(start + n_prefix, start + n_prefix + n_gold)
            targets += row.gold
            segments += [n_scored] * n_gold
            n_scored += 1
    block_Q = torch.arange(n_query) // width
    offset_Q = torch.arange(n_query) % width
    # Additive mask over [cache | queries]: a query sees cached ids before its limit, and the
    # ids of its own block up to itself.
    see_cache_B_Q_L = torch.arange(n_ctx)[None, None, :] < limit_B_Q[:, :, None]
    same_block_Q_Q = (block_Q[:, None] == block_Q[None, :]) & (
        offset_Q[None, :] <= offset_Q[:, None]
    )
    allowed_B_Q_K = torch.cat(
        [see_cache_B_Q_L, same_block_Q_Q[None].expand(len(rows), -1, -1)], dim=-1
    )
    mask_B_1_Q_K = torch.zeros(allowed_B_Q_K.shape, dtype=dtype)
    mask_B_1_Q_K.masked_fill_(~allowed_B_Q_K, torch.finfo(dtype).min)
    mask_B_1_Q_K = mask_B_1_Q_K[:, None]

    cache_kw = (
        "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    )
    cache = DynamicCache(config=model.config)
    # Right padding needs no mask in the context pass: a causal model never lets a real id
    # attend to a later pad, and the query pass masks the pads out of the cache.
    decoder(input_ids=ctx_B_L.to(device), use_cache=True, **{cache_kw: cache})
    hidden_B_Q_H = decoder(
        input_ids=query_B_Q.to(device),
        attention_mask=mask_B_1_Q_K.to(device),
        position_ids=pos_B_Q.to(device),
        use_cache=True,
        **{cache_kw: cache},
    ).last_hidden_state
    flat = _mean_gold_probs(
        model,
        hidden_B_Q_H[torch.tensor(sel_b, device=device), torch.tensor(sel_q, device=device)],
        torch.tensor(targets, dtype=torch.long, device=device),
        torch.tensor(segments, dtype=torch.long, device=device),
        n_scored,
        temperature,
    )
    out = []
    at = 0
    for row in rows:
        out.append(flat[at : at + len(row.boundaries)])
        at += len(row.boundaries)
    return out


def _rows(
    model: PreTrainedModel,
    rows: Sequence[_Row],
    chosen: Sequence[tuple[int, int]],
    prefix: list[int],
    temperature: float,
    pad_id: int,
) -> list[float]:
    device, _ = _device_dtype(model)
    seqs = [rows[n].ids[: rows[n].boundaries[k]] + prefix + rows[n].gold for n, k in chosen]
    width = max(len(s) for s in seqs)
    ids_B_T = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    sel_b: list[int] = []
    sel_t: list[int] = []
    targets: list[int] = []
    segments: list[int] = []
    for i, ((n, k), seq) in enumerate(zip(chosen, seqs, strict=True)):
        ids_B_T[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        gold = rows[n].gold
        first = rows[n].boundaries[k] + len(prefix)
        # The logits at position t predict the id at t + 1.
        sel_b += [i] * len(gold)
        sel_t += range(first - 1, first - 1 + len(gold))
        targets += gold
        segments += [i] * len(gold)
    hidden_B_T_H = model.get_decoder()(input_ids=ids_B_T.to(device), use_cache=False)
    return _mean_gold_probs(
        model,
        hidden_B_T_H.last_hidden_state[
            torch.tensor(sel_b, device=device), torch.tensor(sel_t, device=device)
        ],
        torch.tensor(targets, dtype=torch.long, device=device),
        torch.tensor(segments, dtype=torch.long, device=device),
        len(seqs),
        temperature,
    )
