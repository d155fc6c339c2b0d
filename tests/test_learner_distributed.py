"""Data-parallel learner steps (`turnrl.rl.distributed`): two CPU processes on gloo, each given
the whole batch and training on its half of every minibatch, end with identical weights equal
to one process's step."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_learner import tiny_model
from test_learner_offpolicy import behind
from test_learner_packing import SHAPES, varied_episodes
from torch.multiprocessing.spawn import spawn

from turnrl.agent.records import Episode
from turnrl.rl.distributed import DataParallelGroup, _buckets
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import (
    FullConfig,
    LearnerConfig,
    LoraConfig,
    LossWeighting,
    MaskedIS,
    RolloutRatio,
    ValueHeadConfig,
)

WORLD = 2


def config(weighting: LossWeighting, variant: str) -> LearnerConfig:
    """`variant`: padded rows, packed rows, LoRA adapters (broadcast from rank 0), two PPO
    epochs of four minibatches (six episodes: parts of one episode leave a rank none), or
    those epochs with sequence-level masked IS and GSPO's ratio (each rank scores its own
    episodes' proximal logprobs; the masked-turn fraction is over every rank's turns)."""
    epochs = variant in ("minibatches", "offpolicy")
    off = variant == "offpolicy"
    return LearnerConfig(
        ppo_epochs=2 if epochs else 1,
        minibatches=4 if epochs else 1,
        off_policy=MaskedIS(level="sequence", low=0.5, high=1.5) if off else RolloutRatio(),
        ratio_level="sequence" if off else "token",
        lr=1e-3,
        loss_weighting=weighting,
        kl_coef=0.05,
        micro_batch_tokens=40,
        packing=variant == "packed",
        adaptation=LoraConfig(r=4, alpha=8) if variant == "lora" else FullConfig(),
        value_head=ValueHeadConfig(init_std=0.1, backprop_to_policy=True),
    )


def episodes_of(variant: str) -> list[Episode]:
    """`varied_episodes`; for "offpolicy", behind the model by -0.15, -0.05 or 0.05 nats a
    token, so that some turns' weights fall outside [0.5, 1.5] (none near its edges)."""
    episodes = varied_episodes(tiny_model())
    if variant != "offpolicy":
        return episodes
    return behind(episodes, [0.1 * (i % 3) - 0.15 for i in range(len(episodes))])


def targets_of(n: int) -> list[list[float | None]]:
    return [
        [0.3 * j - 0.1 * i if (i + j) % 2 else None for j in range(len(SHAPES[i]))]
        for i in range(n)
    ]


def run_step(
    learner: Learner, episodes: list[Episode], targets: list[list[float | None]]
) -> dict[str, Any]:
    """The whole batch's gradient (each rank's share, summed over ranks), then the step."""
    group = learner.data_parallel
    if group is None:
        learner.accumulate_gradients(episodes, targets)
    else:
        learner.accumulate_gradients(group.shard(episodes), group.shard(targets))
    params = learner.trainable_parameters + learner.value_parameters
    if learner.data_parallel is not None:
        learner.data_parallel.sum_gradients(params)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    learner.optimizer.zero_grad(set_to_none=True)
    result = learner.step(episodes, targets)
    return {
        "grads": grads,
        "params": [p.detach().clone() for p in params],
        "loss": result.scalars["loss"],
        "n_tokens": result.scalars["n_tokens"],
        "scalars": dict(result.scalars),
        "version": result.version,
    }


def _rank(rank: int, port: int, weighting: LossWeighting, variant: str, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # different value-head inits: rank 0's must win
        model = tiny_model()
        if rank == 1:
            with torch.no_grad():  # and different weights: rank 0's are broadcast
                next(model.parameters()).add_(1.0)
        group = DataParallelGroup(rank, WORLD)
        learner = Learner(model, config(weighting, variant), data_parallel=group)
        episodes = episodes_of(variant)
        targets = targets_of(len(episodes))
        torch.save(
            run_step(learner, episodes, targets),
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("weighting", "variant"),
    [
        ("token", "padded"),
        ("episode", "packed"),
        ("episode", "lora"),
        ("token", "minibatches"),
        ("token", "offpolicy"),
    ],
)
def test_two_ranks_step_like_one_process(
    tmp_path: Path, weighting: LossWeighting, variant: str
) -> None:
    spawn(
        _rank,
        args=(free_port(), weighting, variant, str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    ranks: list[dict[str, Any]] = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    torch.manual_seed(0)
    model = tiny_model()
    single = Learner(model, config(weighting, variant))
    assert single.value_head is not None
    # The value head as rank 0 initialised it (rank 0's seed; its weights were broadcast).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = Learner(tiny_model(), config(weighting, variant)).value_head
    assert head is not None
    single.value_head.load_state_dict(head.state_dict())
    episodes = episodes_of(variant)
    one = run_step(single, episodes, targets_of(len(episodes)))

    # Both ranks end identical: same summed gradient, same AdamW step.
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)
    assert ranks[0]["version"] == ranks[1]["version"] == one["version"] == 1
    # The ranks' losses are normalised by the global counts: their sum is the whole loss.
    assert ranks[0]["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    assert ranks[0]["n_tokens"] == ranks[1]["n_tokens"] == one["n_tokens"]
    if variant == "offpolicy":
        assert one["scalars"]["is_seq_frac"] > 0
        for key in ("is_seq_frac", "is_token_frac", "is_weight_mean", "clip_frac"):
            assert ranks[0]["scalars"][key] == pytest.approx(one["scalars"][key], abs=1e-6)
    for g_rank, g_one in zip(ranks[0]["grads"], one["grads"], strict=True):
        torch.testing.assert_close(g_rank, g_one, atol=1e-6, rtol=1e-4)
    # Adam's first step is ~lr * sign(grad): rounding near 0 moves a weight by <= 1% of lr.
    for p_rank, p_one in zip(ranks[0]["params"], one["params"], strict=True):
        torch.testing.assert_close(p_rank, p_one, atol=1e-5, rtol=1e-5)


def test_shards_are_contiguous_and_cover_everything() -> None:
    items = list(range(7))
    shards = [DataParallelGroup(r, 3).shard(items) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]


def test_gradient_buckets_respect_the_limit_and_the_dtype() -> None:
    ps = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64)]
    buckets = _buckets(ps, limit=80)
    assert [len(b) for b in buckets] == [2, 1, 1]
