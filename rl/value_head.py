"""A value head for turn-level critics: V(s_j) of the state each turn starts from.

Design:
- The head is one linear layer `hidden -> 1` on the policy's final hidden state (after the
  decoder's last norm), the critic of PPO/A2C on a shared trunk (Schulman et al. 2017, arXiv
  1707.06347; Mnih et al. 2016, arXiv 1602.01783). It is read once per turn, at the last token
  before the turn's completion (`TokenBatch.state_positions_B_J`): a causal model's hidden state
  there has seen exactly the state `s_j`, which is what turn-level GAE needs (values of states
  between turns, not of every token).
- It lives beside the transformers model, not inside it: `save_pretrained`, LoRA adapters,
  merged exports and vLLM weight reloads never see it. The learner saves it next to the
  weights (`value_head.safetensors`) and trains it in its own optimizer parameter group.
- Values are computed from stored token ids, in batches and without gradients, and stored on
  the turns (`Turn.signals.value`, `with_values`) so that estimators and replay need no
  model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from turnrl.agent.records import Episode
from turnrl.rl.learner_config import ValueHeadConfig


class ValueHead(nn.Module):
    """`hidden_N_H -> values_N` in float32 (module docstring)."""

    def __init__(self, hidden_size: int, config: ValueHeadConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, dtype=torch.float32)
        with torch.no_grad():
            if config.init_std > 0:
                nn.init.normal_(self.proj.weight, std=config.init_std)
            else:
                nn.init.zeros_(self.proj.weight)
            self.proj.bias.fill_(config.init_bias)

    def forward(self, hidden_N_H: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(hidden_N_H.float()).squeeze(-1)
        return out


def state_values(
    head: ValueHead, hidden_B_T_H: torch.Tensor, state_positions_B_J: torch.Tensor
) -> torch.Tensor:
    """V(s_j) for every turn: the head applied to the hidden state at each turn's state
    position. Returns `values_B_J` (float32); 0 where the position is -1 (no such turn)."""
    valid_B_J = state_positions_B_J >= 0
    rows_B_J = torch.arange(hidden_B_T_H.shape[0], device=hidden_B_T_H.device)[:, None]
    hidden_B_J_H = hidden_B_T_H[rows_B_J, state_positions_B_J.clamp(min=0)]
    values_B_J: torch.Tensor = head(hidden_B_J_H)
    return torch.where(valid_B_J, values_B_J, 0.0)


def with_values(episodes: Sequence[Episode], values: Sequence[Sequence[float]]) -> list[Episode]:
    """The episodes with `values[i][j]` stored as `turns[j].signals.value` (other signals
    kept), as `Learner.values` returns them. A row with one value more than the episode has
    turns (`bootstrap=True`) stores the last as `Episode.value_after`."""
    if len(values) != len(episodes):
        raise ValueError(f"{len(values)} value rows for {len(episodes)} episodes")
    out = []
    for episode, episode_values in zip(episodes, values, strict=True):
        n = len(episode.turns)
        if len(episode_values) not in (n, n + 1) or (n == 0 and episode_values):
            raise ValueError(
                f"episode {episode.episode_id}: {len(episode_values)} values for {n} turns "
                "(one per turn, plus optionally the state after the last)"
            )
        turns = [
            turn.model_copy(update={"signals": turn.signals.model_copy(update={"value": float(v)})})
            for turn, v in zip(episode.turns, episode_values, strict=False)
        ]
        update: dict[str, object] = {"turns": turns}
        if len(episode_values) == n + 1:
            update["value_after"] = float(episode_values[n])
        out.append(episode.model_copy(update=update))
    return out
