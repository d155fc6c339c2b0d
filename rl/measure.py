"""No-gradient passes over stored episodes under the current weights: each completion token's
logprob (teacher forcing), the value head's V(s_j), the approximate KL to the rollout
policy that `LearnerConfig.target_kl` stops on, and a micro-batch's logprobs under the KL
reference. They read the stored ids in the learner's micro-batches (`turnrl.rl.batch`), never
re-tokenized; `share_prefix` runs each micro-batch's common prefix once
(`turnrl.rl.logprobs`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import peft
import torch
from transformers import PreTrainedModel

from turnrl.agent.records import Episode
from turnrl.rl.batch import TokenBatch, micro_batches
from turnrl.rl.learner_config import LossWeighting
from turnrl.rl.logprobs import decoder_hidden, token_logprobs
from turnrl.rl.losses import ppo_clip_loss, sample_weights
from turnrl.rl.value_head import ValueHead, state_values


def without_logprobs(episode: Episode, *, keep_replayed: bool) -> Episode:
    """`episode` with zeros for its completion logprobs (which scoring and cloning ignore), and
    without `replayed` marks unless `keep_replayed`."""
    turns = []
    for t in episode.turns:
        update: dict[str, object] = {"completion_logprobs": [0.0] * len(t.completion_ids)}
        if not keep_replayed:
            update["replayed"] = False
        turns.append(t.model_copy(update=update))
    return episode.model_copy(update={"turns": turns})


def scoring_batches(
    episodes: Sequence[Episode], micro_batch_tokens: int, pad_id: int
) -> list[TokenBatch]:
    """Micro-batches of `episodes` for scoring: their own logprobs and advantages are
    ignored (placeholders), only the ids and turn boundaries matter; replayed turns are
    scored like the others."""
    placeholders = [without_logprobs(e, keep_replayed=False) for e in episodes]
    zero_adv = [[0.0] * len(e.turns) for e in episodes]
    return micro_batches(placeholders, zero_adv, micro_batch_tokens, pad_id=pad_id)


def _device(model: PreTrainedModel) -> torch.device:
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight.device


def completion_logprobs(
    model: PreTrainedModel,
    episodes: Sequence[Episode],
    *,
    temperature: float,
    micro_batch_tokens: int,
    pad_id: int,
    share_prefix: bool = False,
) -> list[list[list[float]]]:
    """Each turn's stored completion ids scored under `model`: `[episode][turn][token]`."""
    device = _device(model)
    out: list[list[list[float]]] = [[] for _ in episodes]
    with torch.no_grad():
        for cpu_batch in scoring_batches(episodes, micro_batch_tokens, pad_id):
            logprobs_B_T, _ = token_logprobs(
                model, cpu_batch.to(device), temperature, share_prefix=share_prefix
            )
            rows = logprobs_B_T.cpu()
            for b, i in enumerate(cpu_batch.episode_index_B.tolist()):
                flat = rows[b][cpu_batch.loss_mask_B_T[b]].tolist()
                per_turn: list[list[float]] = []
                for t in episodes[i].turns:
                    per_turn.append(flat[: len(t.completion_ids)])
                    flat = flat[len(t.completion_ids) :]
                out[i] = per_turn
    return out


def episode_values(
    model: PreTrainedModel,
    head: ValueHead,
    episodes: Sequence[Episode],
    *,
    bootstrap: bool,
    micro_batch_tokens: int,
    pad_id: int,
    share_prefix: bool = False,
) -> list[list[float]]:
    """V(s_j) of every turn, `[episode][turn]`, plus V(s_T) after the last turn with
    `bootstrap` (`Learner.values`)."""
    device = _device(model)
    out: list[list[float]] = [[] for _ in episodes]
    with torch.no_grad():
        for cpu_batch in scoring_batches(episodes, micro_batch_tokens, pad_id):
            batch = cpu_batch.to(device)
            hidden_B_T_H = decoder_hidden(model, batch, share_prefix=share_prefix)
            positions_B_J = batch.state_positions_B_J
            if bootstrap:
                last_B_1 = (batch.lengths_B - 1)[:, None]
                positions_B_J = torch.cat([positions_B_J, last_B_1], dim=1)
            values_B_J = state_values(head, hidden_B_T_H, positions_B_J)
            rows = values_B_J.cpu().tolist()
            positions = positions_B_J.cpu().tolist()
            for b, i in enumerate(cpu_batch.episode_index_B.tolist()):
                n = len(episodes[i].turns)
                cols = [*range(n), len(positions[b]) - 1] if bootstrap else list(range(n))
                if any(positions[b][c] < 0 for c in cols):
                    raise ValueError(
                        f"episode {episodes[i].episode_id}: a state with no token in it "
                        "has no value"
                    )
                out[i] = [rows[b][c] for c in cols]
    return out


def rollout_kl(
    model: PreTrainedModel,
    episodes: Sequence[Episode],
    *,
    temperature: float,
    weighting: LossWeighting,
    micro_batch_tokens: int,
    pad_id: int,
    share_prefix: bool = False,
) -> float:
    """Approximate KL(pi_rollout || pi_theta) on `episodes`' trained tokens under `model`: k3
    from the stored rollout logprobs, weighted like the loss (the `approx_kl` of
    `ppo_clip_loss`, see `turnrl.rl.ppo_epochs`). Run it in eval mode."""
    device = _device(model)
    advantages = [[t.advantage for t in e.turns] for e in episodes]
    batches = micro_batches(episodes, advantages, micro_batch_tokens, pad_id=pad_id)
    n_tokens = sum(b.n_tokens for b in batches)
    if n_tokens == 0:
        return 0.0
    n_rows = sum(int(b.loss_mask_B_T.any(dim=1).sum()) for b in batches)
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for cpu_batch in batches:
            if cpu_batch.n_tokens == 0:
                continue
            batch = cpu_batch.to(device)
            logprobs_B_T, _ = token_logprobs(model, batch, temperature, share_prefix=share_prefix)
            weights_B_T = None
            if weighting != "token":
                weights_B_T = sample_weights(batch.loss_mask_B_T, weighting, n_tokens, n_rows)
            _, metrics = ppo_clip_loss(
                logprobs_B_T,
                batch.old_logprobs_B_T,
                batch.advantages_B_T,
                batch.loss_mask_B_T,
                n_tokens=None if weights_B_T is not None else n_tokens,
                weights_B_T=weights_B_T,
            )
            total = total + metrics["approx_kl"]
    return float(total)


def reference_logprobs(
    model: PreTrainedModel,
    batch: TokenBatch,
    *,
    temperature: float,
    share_prefix: bool,
    adapters: peft.PeftModel | None = None,
) -> torch.Tensor:
    """`logprobs_B_T` of `batch` under the KL reference, without gradient: `model` (a frozen
    copy of the policy), or, with `adapters`, `model` with that peft wrapper's adapters
    disabled (the base the adapters were put on)."""
    off = contextlib.nullcontext() if adapters is None else adapters.disable_adapter()
    with torch.no_grad(), off:
        lp, _ = token_logprobs(model, batch, temperature, share_prefix=share_prefix)
    return lp
