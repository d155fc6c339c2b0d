"""PPO epochs and minibatches: the clip engages after the first update, every minibatch is a
disjoint set of whole episodes, the KL stop cuts a step short, one weight sync per step."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from fakes import with_advantages
from hypothesis import given, settings
from hypothesis import strategies as st
from test_learner import make_episode, tiny_model, with_model_logprobs
from transformers import PreTrainedModel

from turnrl.agent.records import Episode
from turnrl.rl.batch import ProximalLogprobs
from turnrl.rl.learner import Learner, StepResult
from turnrl.rl.learner_config import LearnerConfig, ValueHeadConfig
from turnrl.rl.ppo_epochs import split_episodes


class Recording(Learner):
    """Records the episodes (and value targets) of every accumulation: one per minibatch."""

    def __init__(self, model: PreTrainedModel, config: LearnerConfig) -> None:
        super().__init__(model, config)
        self.seen: list[tuple[list[str], list[list[float | None]] | None]] = []

    def accumulate_gradients(
        self,
        episodes: Sequence[Episode],
        value_targets: Sequence[Sequence[float | None]] | None = None,
        proximal: ProximalLogprobs | None = None,
    ) -> StepResult:
        targets = None if value_targets is None else [list(t) for t in value_targets]
        self.seen.append(([e.episode_id for e in episodes], targets))
        return super().accumulate_gradients(episodes, value_targets, proximal)


def batch(n: int = 6) -> list[Episode]:
    """`n` episodes whose stored logprobs are the tiny model's own (ratio 1 at the start),
    half pushed up and half down."""
    episodes = with_model_logprobs(
        tiny_model(),
        [make_episode(f"e{i}", [(4, 3 + i % 3, 2), (0, 4, 1)], seed=i) for i in range(n)],
    )
    return with_advantages(episodes, [[1.0 if i % 2 else -1.0] * 2 for i in range(n)])


def test_defaults_take_one_optimizer_step() -> None:
    learner = Learner(tiny_model(), LearnerConfig(lr=1e-2))
    result = learner.step(batch())
    assert result.scalars["n_optimizer_steps"] == 1
    assert result.scalars["clip_frac"] == 0.0 and learner.version == 1
    assert "clip_frac_last_epoch" not in result.scalars and "early_stopped" not in result.scalars


@pytest.mark.parametrize("minibatches", [1, 2])
def test_epochs_move_the_ratio_so_the_clip_engages(minibatches: int) -> None:
    config = LearnerConfig(lr=1e-2, ppo_epochs=4, minibatches=minibatches)
    learner = Recording(tiny_model(), config)
    result = learner.step(batch())
    scalars = result.scalars
    assert scalars["n_optimizer_steps"] == 4 * minibatches == len(learner.seen)
    # The first update sees ratio 1; the later ones see the moved policy against the
    # stored rollout logprobs, and some of their tokens fall outside [0.8, 1.2].
    assert scalars["clip_frac_last_epoch"] > 0
    assert scalars["approx_kl_last_epoch"] > 0
    assert 0 < scalars["clip_frac"] < scalars["clip_frac_last_epoch"]
    # Whole-batch counts, whatever the split: 6 episodes of 3 + i % 3 and 4 trained tokens.
    assert scalars["n_tokens"] == (3 + 4 + 5) * 2 + 6 * 4 and scalars["n_sequences"] == 6
    # One weight sync per step, however many optimizer steps it took.
    assert result.policy_updated and result.version == learner.version == 1


def test_minibatches_are_disjoint_and_cover_the_batch_each_epoch() -> None:
    learner = Recording(tiny_model(), LearnerConfig(lr=1e-3, ppo_epochs=3, minibatches=4))
    episodes = batch(6)
    learner.step(episodes)
    names = [e.episode_id for e in episodes]
    assert len(learner.seen) == 12
    epochs = [learner.seen[k : k + 4] for k in range(0, 12, 4)]
    for epoch in epochs:
        parts = [ids for ids, _ in epoch]
        assert sorted(i for ids in parts for i in ids) == sorted(names)
        assert sorted(len(ids) for ids in parts) == [1, 1, 2, 2]
        # Within a minibatch, episodes keep the batch's order.
        assert all(ids == sorted(ids, key=names.index) for ids in parts)
    # Shuffled per epoch (seeded: the same step replays the same split).
    assert len({tuple(tuple(ids) for ids, _ in epoch) for epoch in epochs}) > 1


def test_value_targets_follow_their_episodes_into_minibatches() -> None:
    config = LearnerConfig(lr=1e-3, minibatches=3, value_head=ValueHeadConfig())
    learner = Recording(tiny_model(), config)
    episodes = batch(6)
    targets: list[list[float | None]] = [[float(i), None] for i in range(6)]
    result = learner.step(episodes, targets)
    assert result.scalars["n_value_targets"] == 6 and result.scalars["n_optimizer_steps"] == 3
    for ids, got in learner.seen:
        assert got == [[float(ids_i[1:]), None] for ids_i in ids]


def test_tiny_target_kl_stops_after_the_first_update() -> None:
    config = LearnerConfig(lr=1e-2, ppo_epochs=4, minibatches=2, target_kl=1e-9)
    learner = Recording(tiny_model(), config)
    scalars = learner.step(batch()).scalars
    assert scalars["n_optimizer_steps"] == 1 == len(learner.seen)
    assert scalars["early_stopped"] == 1.0 and scalars["kl_after_update"] > 1e-9
    assert learner.version == 1
    # A loose target lets every update run.
    loose = Recording(tiny_model(), config.model_copy(update={"target_kl": 10.0}))
    scalars = loose.step(batch()).scalars
    assert scalars["n_optimizer_steps"] == 8 and scalars["early_stopped"] == 0.0


def test_minibatch_losses_use_their_own_counts() -> None:
    """At ratio 1 (the first update), a minibatch's loss is minus its own mean advantage:
    "token" weighting divides by the minibatch's trained tokens, not the batch's."""
    learner = Recording(tiny_model(), LearnerConfig(lr=1e-9, minibatches=2))
    episodes = batch(6)
    by_id = {e.episode_id: e for e in episodes}
    result = learner.step(episodes)
    losses = []
    for ids, _ in learner.seen:
        tokens = [(t.advantage, len(t.completion_ids)) for i in ids for t in by_id[i].turns]
        n = sum(k for _, k in tokens)
        losses.append(-sum(a * k for a, k in tokens if a is not None) / n)
    assert result.scalars["loss"] == pytest.approx(sum(losses) / 2, abs=1e-5)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 40), st.integers(1, 9), st.integers(0, 10_000))
def test_split_episodes_partitions(n: int, parts: int, seed: int) -> None:
    split = split_episodes(n, parts, seed)
    assert sorted(i for part in split for i in part) == list(range(n))
    assert len(split) == max(1, min(parts, n))
    sizes = [len(p) for p in split]
    assert max(sizes) - min(sizes) <= 1
    assert all(p == sorted(p) for p in split)
    assert split == split_episodes(n, parts, seed)
