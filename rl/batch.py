"""Training tensors built from stored episodes, without re-tokenizing anything.

An episode's row is the concatenation over its turns of `prompt_ids + completion_ids +
observation_ids` — exactly `Episode.token_ids()`, the context the policy saw. Every per-token
tensor is aligned to `input_ids_B_T` (*token-aligned*, not target-aligned): position `t` holds
facts about the token `input_ids_B_T[b, t]`:

- `loss_mask_B_T` is True exactly on the positions of sampled (`completion_ids`) tokens; prompt,
  observation and padding positions are False and are never trained (STYLE §3). So are the
  completions of turns without an advantage (None: not assigned) and of `replayed` turns
  (the prefix a branched rollout restored from a stored episode): they stay in the context,
  but this episode's policy did not sample them.
- `old_logprobs_B_T` holds each sampled token's rollout logprob (`Turn.completion_logprobs`).
  `proximal_logprobs_B_T`, when given, the proximal policy's (`turnrl.rl.offpolicy`).
- `advantages_B_T` holds the advantage of the turn the token belongs to: one float per turn is
  broadcast to that turn's sampled tokens (GRPO gives every turn the episode's value; step-level
  estimators give each turn its own). Masked-out positions hold 0.

The shift: a causal LM's logits at position `t` predict token `t + 1`, so the logprob of token
`t` is read from the logits at `t - 1`. A consumer therefore pairs hidden states `[:, :-1]` with
`loss_mask_B_T[:, 1:]` and targets `input_ids_B_T[:, 1:]`. Position 0 has no context and can
never be trained; an episode whose first token is a sampled one is rejected.

Turn-aligned tensors (`_B_J`, `J` = the most turns of any row) serve the value head:
`state_positions_B_J[b, j]` is the position of the last token before turn `j`'s completion,
the end of the state `s_j` the turn starts from (the prompt or the previous observation). A
causal model's hidden state there has seen exactly `s_j`, and it is the one whose logits
predict the turn's first sampled token; V(s_j) is read from it. `value_targets_B_J` and
`value_mask_B_J` carry the optional regression targets, one per turn.

Rows are right-padded with `pad_id`. With causal attention no real token attends to a later
pad, so the learner needs no attention mask: padded logits are garbage that the mask drops.

Micro-batches for gradient accumulation are planned by a token budget on the *padded* size
(rows x longest row): rows are sorted by length so a micro-batch holds similar lengths and
wastes little on padding. `turnrl.rl.packing` lays the same tensors out with several episodes
per row instead (the optional `position_ids_B_T`, `segments_B_T`, `value_segments_B_J`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

import torch

from turnrl.agent.records import Episode

_T = TypeVar("_T")


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded training tensors for a group of episodes (see the module docstring)."""

    input_ids_B_T: torch.Tensor
    """int64: each row is one episode's `token_ids()`, then `pad_id` up to the longest row."""
    loss_mask_B_T: torch.Tensor
    """bool: True exactly where `input_ids_B_T` holds an id the policy sampled (outside
    replayed turns)."""
    old_logprobs_B_T: torch.Tensor
    """float32: rollout logprob of each sampled id; 0 where the mask is False."""
    advantages_B_T: torch.Tensor
    """float32: the advantage of the sampled id's turn; 0 where the mask is False."""
    turn_index_B_T: torch.Tensor
    """int64: which turn of the episode the position belongs to; -1 on padding."""
    lengths_B: torch.Tensor
    """int64: number of real (unpadded) tokens in each row."""
    episode_index_B: torch.Tensor
    """int64: index of each row's episode in the sequence the batch was built from, so that
    every trained id can be traced back to the turn that sampled it."""
    state_positions_B_J: torch.Tensor
    """int64: position of the last token before turn `j`'s completion (where V(s_j) is read);
    -1 past the row's last turn, and for a turn with no token before it."""
    value_targets_B_J: torch.Tensor
    """float32: value-head regression target of turn `j`; 0 where `value_mask_B_J` is False."""
    value_mask_B_J: torch.Tensor
    """bool: True where turn `j` has a value target."""
    position_ids_B_T: torch.Tensor | None = None
    """Packed batches only (`turnrl.rl.packing`, several episodes per row): int64 position of
    each token inside its own episode, restarting at 0 for each episode and for the padding
    tail. None: one episode per row at positions 0..T-1 (the layout above)."""
    segments_B_T: torch.Tensor | None = None
    """Packed batches only: int64 index (in the caller's episode list, like
    `episode_index_B`) of the episode each position belongs to; -1 on padding."""
    value_segments_B_J: torch.Tensor | None = None
    """Packed batches only: the episode index of each turn column (a packed row's turns are
    its episodes' turns in order); -1 past the last."""
    proximal_logprobs_B_T: torch.Tensor | None = None
    """float32: the proximal policy's logprob of each sampled id (the learner's weights at the
    start of its step, `turnrl.rl.offpolicy`); 0 where the mask is False. None: not
    measured (no off-policy correction, or the loss takes the current weights' own)."""

    @property
    def packed(self) -> bool:
        """Several episodes per row (`turnrl.rl.packing`)."""
        return self.position_ids_B_T is not None

    @property
    def n_trained_episodes(self) -> int:
        """Episodes of the batch with at least one trained token."""
        return _episodes_with(self.loss_mask_B_T, self.segments_B_T)

    @property
    def n_value_episodes(self) -> int:
        """Episodes of the batch with at least one value target."""
        return _episodes_with(self.value_mask_B_J, self.value_segments_B_J)

    @property
    def n_tokens(self) -> int:
        """Number of trained (masked-in) tokens."""
        return int(self.loss_mask_B_T.sum())

    @property
    def turn_ids_B_T(self) -> torch.Tensor:
        """int64: an id of each position's turn, the same along one turn of one episode and
        different for every other turn of the batch (packed rows included); -1 on padding."""
        episode_B_T = self.segments_B_T
        if episode_B_T is None:
            episode_B_T = self.episode_index_B[:, None].expand_as(self.turn_index_B_T)
        n_turns = int(self.turn_index_B_T.max()) + 1
        real_B_T = self.turn_index_B_T >= 0
        return torch.where(real_B_T, episode_B_T * n_turns + self.turn_index_B_T, -1)

    @property
    def n_trained_turns(self) -> int:
        """Number of turns with at least one trained token."""
        return int(torch.unique(self.turn_ids_B_T[self.loss_mask_B_T]).numel())

    @property
    def n_value_targets(self) -> int:
        """Number of turns with a value target."""
        return int(self.value_mask_B_J.sum())

    @property
    def n_padded(self) -> int:
        """Rows x columns: what a forward pass over the batch computes."""
        return int(self.input_ids_B_T.numel())

    def to(self, device: torch.device | str) -> TokenBatch:
        """The same batch with every tensor on `device`."""
        moved: dict[str, torch.Tensor | None] = {
            f.name: getattr(self, f.name) for f in fields(self)
        }
        return TokenBatch(**{k: None if v is None else v.to(device) for k, v in moved.items()})  # type: ignore[arg-type]


def counts_of(batches: Sequence[TokenBatch], n_episodes: int) -> dict[str, float]:
    """A step's counts for its scalars: trained tokens, episodes, padded tokens computed."""
    return {
        "n_tokens": float(sum(b.n_tokens for b in batches)),
        "n_sequences": float(n_episodes),
        "n_padded_tokens": float(sum(b.n_padded for b in batches)),
    }


def _episodes_with(mask_B_X: torch.Tensor, segments_B_X: torch.Tensor | None) -> int:
    if segments_B_X is None:
        return int(mask_B_X.any(dim=1).sum())
    return int(torch.unique(segments_B_X[mask_B_X]).numel())


def _check(
    episode: Episode,
    advantages: Sequence[float | None],
    targets: Sequence[float | None] | None,
    proximal: Sequence[Sequence[float]] | None = None,
) -> None:
    if targets is not None and len(targets) != len(episode.turns):
        raise ValueError(
            f"episode {episode.episode_id}: {len(targets)} value targets for "
            f"{len(episode.turns)} turns (one target, or None, per turn is required)"
        )
    if targets is not None and not all(v is None or math.isfinite(v) for v in targets):
        raise ValueError(f"episode {episode.episode_id}: non-finite value target in {targets}")
    if len(advantages) != len(episode.turns):
        raise ValueError(
            f"episode {episode.episode_id}: {len(advantages)} advantages for "
            f"{len(episode.turns)} turns (one advantage, or None, per turn is required)"
        )
    if not all(a is None or math.isfinite(a) for a in advantages):
        raise ValueError(f"episode {episode.episode_id}: non-finite advantage in {advantages}")
    for turn in episode.turns:
        if not turn.context_only and len(turn.completion_logprobs) != len(turn.completion_ids):
            raise ValueError(
                f"episode {episode.episode_id} turn {turn.index}: "
                f"{len(turn.completion_logprobs)} logprobs for "
                f"{len(turn.completion_ids)} completion ids"
            )
    if proximal is not None and [len(p) for p in proximal] != [
        len(t.completion_ids) for t in episode.turns
    ]:
        raise ValueError(
            f"episode {episode.episode_id}: proximal logprobs shaped "
            f"{[len(p) for p in proximal]}, completions "
            f"{[len(t.completion_ids) for t in episode.turns]}"
        )


def _pad(rows: list[list[_T]], value: _T, width: int) -> list[list[_T]]:
    return [r + [value] * (width - len(r)) for r in rows]


def check_rows(
    episodes: Sequence[Episode],
    advantages: Sequence[Sequence[float | None]],
    value_targets: Sequence[Sequence[float | None]] | None,
    proximal: Sequence[object] | None = None,
) -> None:
    """One advantage row (and value-target row, proximal row, when given) per episode."""
    if len(advantages) != len(episodes):
        raise ValueError(f"{len(advantages)} advantage rows for {len(episodes)} episodes")
    if value_targets is not None and len(value_targets) != len(episodes):
        raise ValueError(f"{len(value_targets)} value-target rows for {len(episodes)} episodes")
    if proximal is not None and len(proximal) != len(episodes):
        raise ValueError(f"{len(proximal)} proximal rows for {len(episodes)} episodes")


ProximalLogprobs = Sequence[Sequence[Sequence[float]]]
"""The proximal policy's logprobs of each episode's completions, `[episode][turn][token]`
(shaped like `Turn.completion_logprobs`; `Learner.logprobs` gives them)."""


def build_token_batch(
    episodes: Sequence[Episode],
    advantages: Sequence[Sequence[float | None]],
    *,
    pad_id: int = 0,
    episode_indices: Sequence[int] | None = None,
    value_targets: Sequence[Sequence[float | None]] | None = None,
    proximal: ProximalLogprobs | None = None,
) -> TokenBatch:
    """Lay `episodes` out as right-padded rows, one per episode, in the order given.

    `advantages[i][j]` is the advantage of turn `j` of `episodes[i]` (None: the turn is not
    trained, like a replayed one); `value_targets[i][j]`
    (optional) its value-head target, None for a turn without one. `episode_indices` labels
    the rows (default `0..len(episodes)-1`); `micro_batches` passes the positions in the
    caller's full list. `proximal` (optional) fills `proximal_logprobs_B_T`.
    """
    check_rows(episodes, advantages, value_targets, proximal)
    if not episodes:
        raise ValueError("cannot build a batch from no episodes")
    if episode_indices is None:
        episode_indices = range(len(episodes))
    ids_rows: list[list[int]] = []
    mask_rows: list[list[bool]] = []
    old_rows: list[list[float]] = []
    adv_rows: list[list[float]] = []
    turn_rows: list[list[int]] = []
    state_rows: list[list[int]] = []
    target_rows: list[list[float]] = []
    target_mask_rows: list[list[bool]] = []
    prox_rows: list[list[float]] = []
    for i, (episode, episode_adv) in enumerate(zip(episodes, advantages, strict=True)):
        episode_targets = None if value_targets is None else value_targets[i]
        episode_prox = None if proximal is None else proximal[i]
        _check(episode, episode_adv, episode_targets, episode_prox)
        ids: list[int] = []
        states: list[int] = []
        mask: list[bool] = []
        old: list[float] = []
        prox: list[float] = []
        adv: list[float] = []
        turn_of: list[int] = []
        for j, (turn, a) in enumerate(zip(episode.turns, episode_adv, strict=True)):
            n_p, n_c, n_o = (
                len(turn.prompt_ids),
                len(turn.completion_ids),
                len(turn.observation_ids),
            )
            ids += turn.prompt_ids
            states.append(len(ids) - 1)
            ids += turn.completion_ids
            ids += turn.observation_ids
            if turn.context_only or a is None:
                mask += [False] * (n_p + n_c + n_o)
                old += [0.0] * (n_p + n_c + n_o)
                prox += [0.0] * (n_p + n_c + n_o)
                adv += [0.0] * (n_p + n_c + n_o)
            else:
                mask += [False] * n_p + [True] * n_c + [False] * n_o
                old += [0.0] * n_p + list(turn.completion_logprobs) + [0.0] * n_o
                if episode_prox is not None:
                    prox += [0.0] * n_p + list(episode_prox[j]) + [0.0] * n_o
                adv += [0.0] * n_p + [float(a)] * n_c + [0.0] * n_o
            turn_of += [j] * (n_p + n_c + n_o)
        if mask and mask[0]:
            raise ValueError(
                f"episode {episode.episode_id}: the first token is a sampled one; a sampled "
                "token needs at least one context token before it to be scored"
            )
        ids_rows.append(ids)
        mask_rows.append(mask)
        old_rows.append(old)
        prox_rows.append(prox)
        adv_rows.append(adv)
        turn_rows.append(turn_of)
        state_rows.append(states)
        targets = list(episode_targets) if episode_targets is not None else []
        for j, target in enumerate(targets):
            if target is not None and states[j] < 0:
                raise ValueError(
                    f"episode {episode.episode_id} turn {j}: a value target for a turn with "
                    "no token before it (its state is empty)"
                )
        target_rows.append([0.0 if v is None else float(v) for v in targets])
        target_mask_rows.append([v is not None for v in targets])

    lengths = [len(r) for r in ids_rows]
    width = max(max(lengths), 1)
    n_turns = max(max(len(e.turns) for e in episodes), 1)
    return TokenBatch(
        input_ids_B_T=torch.tensor(_pad(ids_rows, pad_id, width), dtype=torch.long),
        loss_mask_B_T=torch.tensor(_pad(mask_rows, False, width), dtype=torch.bool),
        old_logprobs_B_T=torch.tensor(_pad(old_rows, 0.0, width), dtype=torch.float32),
        advantages_B_T=torch.tensor(_pad(adv_rows, 0.0, width), dtype=torch.float32),
        turn_index_B_T=torch.tensor(_pad(turn_rows, -1, width), dtype=torch.long),
        lengths_B=torch.tensor(lengths, dtype=torch.long),
        episode_index_B=torch.tensor(list(episode_indices), dtype=torch.long),
        state_positions_B_J=torch.tensor(_pad(state_rows, -1, n_turns), dtype=torch.long),
        value_targets_B_J=torch.tensor(_pad(target_rows, 0.0, n_turns), dtype=torch.float32),
        value_mask_B_J=torch.tensor(_pad(target_mask_rows, False, n_turns), dtype=torch.bool),
        proximal_logprobs_B_T=None
        if proximal is None
        else torch.tensor(_pad(prox_rows, 0.0, width), dtype=torch.float32),
    )


def sequence_length(episode: Episode) -> int:
    """Length of `episode.token_ids()` without building it."""
    return sum(
        len(t.prompt_ids) + len(t.completion_ids) + len(t.observation_ids) for t in episode.turns
    )


def plan_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices so each group's padded size (rows x longest) is <= `token_budget`.

    A sequence longer than the budget goes alone (it cannot be split without cutting its
    context). Indices are visited longest first, so each group holds similar lengths; the
    grouping is deterministic. Every index appears in exactly one group.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        # Visiting longest first, a group's first member is its longest row.
        if groups and (len(groups[-1]) + 1) * max(lengths[groups[-1][0]], 1) <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def micro_batches(
    episodes: Sequence[Episode],
    advantages: Sequence[Sequence[float | None]],
    token_budget: int,
    *,
    pad_id: int = 0,
    value_targets: Sequence[Sequence[float | None]] | None = None,
    proximal: ProximalLogprobs | None = None,
) -> list[TokenBatch]:
    """Split `episodes` into `TokenBatch`es whose padded size respects `token_budget`.

    `TokenBatch.episode_index_B` gives each row's position in `episodes`.
    """
    check_rows(episodes, advantages, value_targets, proximal)
    lengths = [sequence_length(e) for e in episodes]
    return [
        build_token_batch(
            [episodes[i] for i in group],
            [advantages[i] for i in group],
            pad_id=pad_id,
            episode_indices=group,
            value_targets=None if value_targets is None else [value_targets[i] for i in group],
            proximal=None if proximal is None else [proximal[i] for i in group],
        )
        for group in plan_micro_batches(lengths, token_budget)
    ]
