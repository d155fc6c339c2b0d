"""The learner's optimizer step (`turnrl.rl.optimization`): the learning-rate schedule by hand,
its position saved and restored with checkpoints, gradient clipping on every kind of step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fakes import with_advantages
from test_learner import ADV, tiny_model, two_episodes

from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import ConstantLR, LearnerConfig, ValueHeadConfig, WarmupCosineLR
from turnrl.rl.optimization import lr_factor

COSINE = WarmupCosineLR(warmup_steps=2, total_steps=6, min_lr_ratio=0.1)


def test_lr_factor_by_hand() -> None:
    """Warmup 2, total 6, floor 0.1. Steps taken 0, 1 warm up: 1/2, 2/2. Then
    p = (step - 2) / (6 - 2) and 0.1 + 0.9 (1 + cos(pi p)) / 2:
      step 2: p 0    -> 1
      step 3: p 1/4  -> 0.1 + 0.45 (1 + 0.707107) = 0.868198
      step 4: p 1/2  -> 0.1 + 0.45 = 0.55
      step 5: p 3/4  -> 0.1 + 0.45 (1 - 0.707107) = 0.231802
      step 6 and on: p 1 -> 0.1."""
    got = [lr_factor(COSINE, s) for s in range(9)]
    want = [0.5, 1.0, 1.0, 0.868198, 0.55, 0.231802, 0.1, 0.1, 0.1]
    assert got == pytest.approx(want, abs=1e-6)
    # Constant with a warmup of 4: 1/4, 2/4, 3/4, then 1.
    assert [lr_factor(ConstantLR(warmup_steps=4), s) for s in range(6)] == [
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
        1.0,
    ]
    assert [lr_factor(ConstantLR(), s) for s in range(3)] == [1.0, 1.0, 1.0]


def test_schedule_needs_room_to_decay() -> None:
    with pytest.raises(ValueError, match="total_steps > warmup_steps"):
        WarmupCosineLR(warmup_steps=5, total_steps=5)


def test_each_step_logs_its_rate_and_the_value_head_follows() -> None:
    config = LearnerConfig(lr=1e-2, lr_schedule=COSINE, value_head=ValueHeadConfig(lr=1e-3))
    learner = Learner(tiny_model(), config)
    episodes = with_advantages(two_episodes(learner.model), ADV)
    targets: list[list[float | None]] = [[0.5, None], [None, -0.5, 0.2]]
    rates = [learner.step(episodes, targets).scalars["lr"] for _ in range(4)]
    assert rates == pytest.approx([5e-3, 1e-2, 1e-2, 8.68198e-3], rel=1e-5)
    assert learner.optimizer_steps == 4
    # The value head's group is scaled alike: its configured 1e-3 times the same factor.
    assert learner.optimizer.param_groups[1]["lr"] == pytest.approx(8.68198e-4, rel=1e-5)
    # Two minibatches: two optimizer steps per call, the logged rate their mean.
    two = Learner(tiny_model(), config.model_copy(update={"minibatches": 2}))
    scalars = two.step(with_advantages(two_episodes(two.model), ADV), targets).scalars
    assert scalars["n_optimizer_steps"] == 2 and two.optimizer_steps == 2
    assert scalars["lr"] == pytest.approx((5e-3 + 1e-2) / 2, rel=1e-6)


def test_default_rate_is_constant() -> None:
    learner = Learner(tiny_model(), LearnerConfig(lr=3e-4))
    episodes = with_advantages(two_episodes(learner.model), ADV)
    assert [learner.step(episodes).scalars["lr"] for _ in range(3)] == [3e-4] * 3


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_resumed_learner_continues_the_schedule_bit_for_bit(tmp_path: Path) -> None:
    """Two steps, a checkpoint, two more: a learner restored from the checkpoint takes the
    same two steps at the same rates and ends with the same weights, bit for bit."""
    config = LearnerConfig(lr=1e-2, lr_schedule=COSINE)
    first = Learner(tiny_model(), config)
    episodes = with_advantages(two_episodes(first.model), ADV)
    for _ in range(2):
        first.step(episodes)
    first.save_checkpoint(tmp_path)
    after = [first.step(episodes).scalars["lr"] for _ in range(2)]
    resumed = Learner(tiny_model(seed=1), config)  # other weights: the checkpoint's win
    resumed.load_checkpoint(tmp_path)
    assert resumed.optimizer_steps == 2 and resumed.version == 2
    again = [resumed.step(episodes).scalars["lr"] for _ in range(2)]
    assert again == after == pytest.approx([1e-2, 8.68198e-3], rel=1e-5)
    assert resumed.optimizer_steps == first.optimizer_steps == 4
    one, two = _snapshot(first.model), _snapshot(resumed.model)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_every_kind_of_step_is_clipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """At `optimizer.step()` each group's gradient norm is at most `max_grad_norm`, in PPO
    minibatch updates, a value-only update and `sft_step`; `grad_norm` logs the norm before
    clipping."""
    max_norm = 1e-4
    config = LearnerConfig(
        lr=1e-3, max_grad_norm=max_norm, minibatches=2, value_head=ValueHeadConfig()
    )
    learner = Learner(tiny_model(), config)
    norms: list[tuple[float, float]] = []
    adamw_step = learner.optimizer.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        norms.append((_norm(learner.trainable_parameters), _norm(learner.value_parameters)))
        return adamw_step(*args, **kwargs)

    monkeypatch.setattr(learner.optimizer, "step", recording_step)
    episodes = with_advantages(two_episodes(learner.model), ADV)
    targets: list[list[float | None]] = [[3.0, None], [None, -2.0, 1.0]]
    ppo = learner.step(episodes, targets).scalars
    zero = with_advantages(episodes, [[0.0, 0.0], [0.0, 0.0, 0.0]])
    value_only = learner.step(zero, targets).scalars
    sft = learner.sft_step(episodes).scalars
    assert len(norms) == 2 + 2 + 1
    assert all(p <= max_norm * (1 + 1e-4) and v <= max_norm * (1 + 1e-4) for p, v in norms)
    assert ppo["grad_norm"] > max_norm and ppo["value_grad_norm"] > max_norm
    # A value-only update leaves the policy without a gradient (the head is detached).
    assert value_only["value_grad_norm"] > max_norm and value_only["grad_norm"] == 0.0
    assert sft["grad_norm"] > max_norm


def _norm(parameters: list[torch.Tensor]) -> float:
    grads = [p.grad for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
