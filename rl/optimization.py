"""The learner's optimizer step: AdamW's parameter groups, gradient clipping, and the learning
rate at each step (`LearnerConfig.lr_schedule`).

- Groups: the policy's trained parameters at `LearnerConfig.lr`, and the value head's, when
  there is one, at its own `ValueHeadConfig.lr`. Every optimizer step of the learner (each PPO
  minibatch update of `step`, each `sft_step`, value-only updates included) clips each group's
  gradient L2 norm to `max_grad_norm` separately (a large value error never shrinks the
  policy's step), reports the norms before clipping, then sets the scheduled rates and steps.
- Schedule: a pure function of the number of optimizer steps already taken (`step`, 0-based:
  the step about to be taken is number `step + 1`), so its whole state is that count,
  `Learner.optimizer_steps`, which the learner checkpoint saves and restores: a resumed run
  continues the schedule where it stopped. Each group's rate is its configured rate times
  `lr_factor`.
  - Warmup (both kinds): the first `warmup_steps` steps run at `(step + 1) / warmup_steps`, so
    the first step already moves (transformers' schedules start at 0, a wasted step).
  - `warmup_cosine`: after the warmup, `floor + (1 - floor) * (1 + cos(pi * p)) / 2` with
    `p = (step - warmup_steps) / (total_steps - warmup_steps)` clamped to [0, 1]: the first step
    after warmup runs at the full rate, step number `total_steps + 1` and every later one at
    the floor (SGDR's cosine, Loshchilov & Hutter 2017, arXiv 1608.03983, without restarts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from turnrl.rl.learner_config import ConstantLR, LearnerConfig, LRSchedule


def build_adamw(
    policy_parameters: Sequence[torch.Tensor],
    value_parameters: Sequence[torch.Tensor],
    config: LearnerConfig,
) -> torch.optim.AdamW:
    """AdamW over the policy's parameters and, when given, the value head's (a second group at
    `config.value_head.lr`)."""
    groups: list[dict[str, Any]] = [{"params": list(policy_parameters)}]
    if value_parameters:
        assert config.value_head is not None
        groups.append({"params": list(value_parameters), "lr": config.value_head.lr})
    # The fused kernel updates every tensor in one pass; on CPU the default per-tensor loop
    # costs ~7x more for a 135M-parameter model (benchmarks/bench_learner.py).
    fused = all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in [*policy_parameters, *value_parameters]
    )
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=config.betas,
        weight_decay=config.weight_decay,
        fused=fused or None,
    )


def lr_factor(schedule: LRSchedule, step: int) -> float:
    """The rate of optimizer step `step + 1` as a fraction of the configured rate."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if isinstance(schedule, ConstantLR):
        return 1.0
    span = schedule.total_steps - schedule.warmup_steps
    progress = min((step - schedule.warmup_steps) / span, 1.0)
    floor = schedule.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_rates(optimizer: torch.optim.Optimizer, config: LearnerConfig, step: int) -> float:
    """Set each group's rate for optimizer step `step + 1`, its configured rate times
    `lr_factor`; returns the policy's."""
    factor = lr_factor(config.lr_schedule, step)
    groups = optimizer.param_groups
    base = [config.lr] + ([config.value_head.lr] if config.value_head is not None else [])
    for group, rate in zip(groups, base[: len(groups)], strict=True):
        group["lr"] = rate * factor
    return float(groups[0]["lr"])


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    config: LearnerConfig,
    step: int,
    policy_parameters: Sequence[torch.Tensor],
    value_parameters: Sequence[torch.Tensor],
    *,
    value: bool,
) -> dict[str, float]:
    """Optimizer step number `step + 1` on the accumulated gradients: clip the policy's
    gradient norm and, with `value`, the value head's, each to `config.max_grad_norm` (None:
    measured, not clipped); set the scheduled rates; AdamW. Returns `grad_norm` (and
    `value_grad_norm`), before clipping, and the policy's rate `lr`."""
    max_norm = config.max_grad_norm or math.inf
    out = {"grad_norm": float(torch.nn.utils.clip_grad_norm_(policy_parameters, max_norm))}
    if value:
        out["value_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(value_parameters, max_norm))
    out["lr"] = set_rates(optimizer, config, step)
    # Parameters without a gradient (the policy's, in a value-only step with a detached
    # head) are left alone by AdamW, momentum and weight decay included.
    optimizer.step()
    return out
