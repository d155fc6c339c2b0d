"""Sequence packing: several episodes end to end in one row, so that short episodes fill the
room the padded layout (`turnrl.rl.batch`, one episode per row) spends on padding.

Layout (`LearnerConfig.packing`): the row width is the step's longest episode (so any episode
fits a row and a row's attention costs no more than that episode's own); episodes are placed
first-fit decreasing into rows (a bin-packing heuristic within 11/9 of the optimum row count,
Johnson 1973), and a micro-batch holds `micro_batch_tokens // width` rows (at least one). Every
token-aligned tensor of `TokenBatch` keeps its meaning along the row: the loss mask, the
rollout logprobs and the advantages are the episodes' own, concatenated. The shift that pairs
the hidden state at `t - 1` with token `t` crosses an episode boundary only onto an episode's
first token, which is never trained (`build_token_batch` refuses a sampled first token), so no
loss term reads across episodes. Value-head columns are the row's episodes' turns in order,
their state positions shifted by the episode's offset in the row.

Attention stays inside each episode: positions restart at 0 for each episode
(`position_ids_B_T`, so rotary embeddings see the padded layout's positions) and the mask is
block-diagonal causal: token `i` attends to `j` iff both belong to the same episode and
`j <= i`. Under sdpa and eager attention the mask is passed as a 4-D tensor (boolean for sdpa,
additive for eager), which transformers hands to the kernel unchanged; under
flash_attention_2 the rows are flattened into one and only the position ids are passed, from
which transformers derives `cu_seqlens` for flash-attention's varlen kernel (Dao 2023, arXiv
2307.08691), with no mask at all. The padding tail of a row is one more segment of its own
(positions from 0, attending only to itself), so no query row of the mask is empty.

Per-episode loss weights are preserved: `"token"` weighting needs no change (one weight per
trained token of the step); `"episode"` weighting counts an episode's samples through
`segments_B_T` / `value_segments_B_J` (`turnrl.rl.losses.sample_weights`), not per row.
The result equals the padded computation to float rounding (tests/test_learner_packing.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from turnrl.agent.records import Episode
from turnrl.rl.batch import (
    ProximalLogprobs,
    TokenBatch,
    build_token_batch,
    check_rows,
    micro_batches,
    sequence_length,
)


def plan_packs(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Group sequence indices into rows whose total length is <= `width` (first-fit
    decreasing; a sequence longer than `width` gets a row of its own). Deterministic; every
    index appears once; each row lists its indices in placement order."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def pack_micro_batches(
    episodes: Sequence[Episode],
    advantages: Sequence[Sequence[float | None]],
    token_budget: int,
    *,
    pad_id: int = 0,
    value_targets: Sequence[Sequence[float | None]] | None = None,
    proximal: ProximalLogprobs | None = None,
) -> list[TokenBatch]:
    """`turnrl.rl.batch.micro_batches` with several episodes per row (module docstring):
    rows as wide as the longest episode, `token_budget // width` rows per micro-batch."""
    check_rows(episodes, advantages, value_targets, proximal)
    lengths = [sequence_length(e) for e in episodes]
    width = max([*lengths, 1])
    rows = plan_packs(lengths, width)
    per_batch = max(1, token_budget // width)
    out = []
    for start in range(0, len(rows), per_batch):
        group = rows[start : start + per_batch]
        padded = [
            build_token_batch(
                [episodes[i] for i in row],
                [advantages[i] for i in row],
                pad_id=pad_id,
                episode_indices=row,
                value_targets=None if value_targets is None else [value_targets[i] for i in row],
                proximal=None if proximal is None else [proximal[i] for i in row],
            )
            for row in group
        ]
        packed = [
            _pack_row(b, [len(episodes[i].turns) for i in row])
            for b, row in zip(padded, group, strict=True)
        ]
        out.append(_stack(packed, pad_id))
    return out


_Row = dict[str, torch.Tensor]


def _pack_row(batch: TokenBatch, n_turns: list[int]) -> _Row:
    """One packed row (1-D tensors) from the padded batch of its episodes."""
    lengths = batch.lengths_B.tolist()
    offsets = [sum(lengths[:b]) for b in range(len(lengths))]

    def cat(t_B_X: torch.Tensor, widths: list[int]) -> torch.Tensor:
        return torch.cat([t_B_X[b, :w] for b, w in enumerate(widths)])

    states = [
        torch.where(batch.state_positions_B_J[b, :n] >= 0, batch.state_positions_B_J[b, :n] + o, -1)
        for b, (n, o) in enumerate(zip(n_turns, offsets, strict=True))
    ]
    index = batch.episode_index_B.tolist()
    proximal: _Row = {}
    if batch.proximal_logprobs_B_T is not None:
        proximal["proximal"] = cat(batch.proximal_logprobs_B_T, lengths)
    return {
        **proximal,
        "input_ids": cat(batch.input_ids_B_T, lengths),
        "loss_mask": cat(batch.loss_mask_B_T, lengths),
        "old_logprobs": cat(batch.old_logprobs_B_T, lengths),
        "advantages": cat(batch.advantages_B_T, lengths),
        "turn_index": cat(batch.turn_index_B_T, lengths),
        "positions": torch.cat([torch.arange(n) for n in lengths]),
        "segments": torch.cat([torch.full((n,), i) for n, i in zip(lengths, index, strict=True)]),
        "states": torch.cat(states),
        "targets": cat(batch.value_targets_B_J, n_turns),
        "target_mask": cat(batch.value_mask_B_J, n_turns),
        "value_segments": torch.cat(
            [torch.full((n,), i) for n, i in zip(n_turns, index, strict=True)]
        ),
        "first": torch.tensor(index[0]),
    }


def _stack(rows: list[_Row], pad_id: int) -> TokenBatch:
    width = max(len(r["input_ids"]) for r in rows)
    n_turns = max(max(len(r["states"]) for r in rows), 1)

    def pad(key: str, value: float | bool, to: int) -> torch.Tensor:
        return torch.stack(
            [torch.nn.functional.pad(r[key], (0, to - len(r[key])), value=value) for r in rows]
        )

    # The padding tail is a segment of its own, positions from 0 (module docstring).
    positions = torch.stack(
        [torch.cat([r["positions"], torch.arange(width - len(r["positions"]))]) for r in rows]
    )
    return TokenBatch(
        input_ids_B_T=pad("input_ids", pad_id, width),
        loss_mask_B_T=pad("loss_mask", False, width),
        old_logprobs_B_T=pad("old_logprobs", 0.0, width),
        advantages_B_T=pad("advantages", 0.0, width),
        turn_index_B_T=pad("turn_index", -1, width),
        lengths_B=torch.tensor([len(r["input_ids"]) for r in rows]),
        episode_index_B=torch.stack([r["first"] for r in rows]),
        state_positions_B_J=pad("states", -1, n_turns),
        value_targets_B_J=pad("targets", 0.0, n_turns),
        value_mask_B_J=pad("target_mask", False, n_turns),
        position_ids_B_T=positions,
        segments_B_T=pad("segments", -1, width),
        value_segments_B_J=pad("value_segments", -1, n_turns),
        proximal_logprobs_B_T=pad("proximal", 0.0, width) if "proximal" in rows[0] else None,
    )


def block_causal_mask(segments_B_T: torch.Tensor) -> torch.Tensor:
    """`mask_B_1_T_T` (bool, True = may attend): same segment and not in the future. The
    padding tail (segment -1) attends to itself only, so no query row is empty."""
    n = segments_B_T.shape[1]
    causal_T_T = torch.ones(n, n, dtype=torch.bool, device=segments_B_T.device).tril()
    same_B_T_T = segments_B_T[:, :, None] == segments_B_T[:, None, :]
    return (same_B_T_T & causal_T_T)[:, None]


def packed_hidden(model: PreTrainedModel, batch: TokenBatch) -> torch.Tensor:
    """The decoder's final hidden states of a packed batch, `hidden_B_T_H`, each episode
    attending to itself only (module docstring)."""
    assert batch.position_ids_B_T is not None and batch.segments_B_T is not None
    decoder = model.get_decoder()
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    ids_B_T, positions_B_T = batch.input_ids_B_T, batch.position_ids_B_T
    if impl.startswith("flash_attention"):
        # transformers derives cu_seqlens from restarting position ids at batch size 1.
        n_rows, width = ids_B_T.shape
        flat: torch.Tensor = decoder(
            input_ids=ids_B_T.reshape(1, -1),
            position_ids=positions_B_T.reshape(1, -1),
            use_cache=False,
        ).last_hidden_state
        return flat.reshape(n_rows, width, -1)
    mask = block_causal_mask(batch.segments_B_T)
    if impl != "sdpa":
        # eager adds the mask to the scores; the most negative float32 acts as -inf without
        # producing nan in softmax.
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min
        )
    hidden: torch.Tensor = decoder(
        input_ids=ids_B_T, position_ids=positions_B_T, attention_mask=mask, use_cache=False
    ).last_hidden_state
    return hidden


def training_batches(
    episodes: Sequence[Episode],
    advantages: Sequence[Sequence[float | None]],
    token_budget: int,
    *,
    packing: bool,
    pad_id: int = 0,
    value_targets: Sequence[Sequence[float | None]] | None = None,
    proximal: ProximalLogprobs | None = None,
) -> list[TokenBatch]:
    """The learner's micro-batches: packed rows with `packing`, else padded rows."""
    make = pack_micro_batches if packing else micro_batches
    return make(
        episodes,
        advantages,
        token_budget,
        pad_id=pad_id,
        value_targets=value_targets,
        proximal=proximal,
    )
