"""The value head: where V(s_j) is read, how it trains, and that checkpoints keep it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from fakes import with_advantages
from transformers import PreTrainedModel

from turnrl.agent.records import Episode, StopReason, Turn, TurnSignals
from turnrl.rl.batch import build_token_batch, micro_batches
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import (
    FullConfig,
    LearnerConfig,
    LoraConfig,
    LossWeighting,
    ValueHeadConfig,
)
from turnrl.rl.value_head import with_values


def episode(name: str, shapes: list[tuple[int, int, int]], seed: int) -> Episode:
    """Turn j has (prompt, completion, observation) lengths `shapes[j]`; random ids."""
    g = torch.Generator().manual_seed(seed)
    turns = []
    for j, (n_p, n_c, n_o) in enumerate(shapes):
        ids = torch.randint(3, 4000, (n_p + n_c + n_o,), generator=g).tolist()
        turns.append(
            Turn(
                index=j,
                prompt_ids=ids[:n_p],
                completion_ids=ids[n_p : n_p + n_c],
                completion_logprobs=[-1.0] * n_c,
                observation_ids=ids[n_p + n_c :],
                text="",
                finish_reason="stop",
            )
        )
    return Episode(
        episode_id=name, task_id="t", group_id="g", turns=turns, stop_reason=StopReason.ANSWERED
    )


def with_own_logprobs(learner: Learner, episodes: list[Episode]) -> list[Episode]:
    """Stored logprobs = the learner's own, so that the PPO ratio starts at 1."""
    scored = learner.logprobs(episodes)
    return [
        e.model_copy(
            update={
                "turns": [
                    t.model_copy(update={"completion_logprobs": lps})
                    for t, lps in zip(e.turns, per_turn, strict=True)
                ]
            }
        )
        for e, per_turn in zip(episodes, scored, strict=True)
    ]


# "a" trains 2 + 2 = 4 tokens over 2 turns, "b" 3 + 1 + 2 = 6 tokens over 3 turns.
SHAPES = {"a": [(5, 2, 3), (0, 2, 2)], "b": [(4, 3, 1), (0, 1, 3), (0, 2, 0)]}
# One target per turn; None leaves a turn out of the value loss.
TARGETS: list[list[float | None]] = [[1.5, None], [0.5, 0.5, 0.5]]
ZERO_ADV = [[0.0, 0.0], [0.0, 0.0, 0.0]]


def two(seed: int = 0) -> list[Episode]:
    return [episode(name, shapes, seed + i) for i, (name, shapes) in enumerate(SHAPES.items())]


def two_zero_adv(seed: int = 0) -> list[Episode]:
    """`two()` with every turn's advantage 0: its tokens count as trained, but carry no
    policy signal."""
    return with_advantages(two(seed), ZERO_ADV)


HEAD = ValueHeadConfig()
FULL = FullConfig()


def learner_for(
    tiny_model: PreTrainedModel,
    head: ValueHeadConfig | None = HEAD,
    adaptation: LoraConfig | FullConfig = FULL,
    **kw: object,
) -> Learner:
    config = LearnerConfig.model_validate({"adaptation": adaptation, "value_head": head, **kw})
    return Learner(copy.deepcopy(tiny_model), config)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


ADAPTATIONS: list[LoraConfig | FullConfig] = [LoraConfig(r=4, alpha=8), FullConfig()]


# ---------------------------------------------------------------------------------- batches


def test_state_positions_are_the_last_token_before_each_completion() -> None:
    # Episode 0, turns (prompt, completion, observation) = (3, 2, 1), (0, 2, 2), (0, 1, 0):
    #   turn 0's completion starts at 3 -> state position 2 (the prompt's last token)
    #   turn 1's at 3 + 2 + 1 = 6      -> 5 (the observation's last token)
    #   turn 2's at 6 + 2 + 2 = 10     -> 9
    # Episode 1, one turn (2, 1, 1): position 1, then -1 padding for the missing turns.
    e0 = episode("e0", [(3, 2, 1), (0, 2, 2), (0, 1, 0)], seed=0)
    e1 = episode("e1", [(2, 1, 1)], seed=1)
    batch = build_token_batch(
        [e0, e1], [[0.0] * 3, [0.0]], value_targets=[[1.0, None, -0.5], [None]]
    )
    assert batch.state_positions_B_J.tolist() == [[2, 5, 9], [1, -1, -1]]
    assert batch.value_targets_B_J.tolist() == [[1.0, 0.0, -0.5], [0.0, 0.0, 0.0]]
    assert batch.value_mask_B_J.tolist() == [[True, False, True], [False, False, False]]
    assert batch.n_value_targets == 2
    # The position's token is the last one of the context before the completion.
    row = batch.input_ids_B_T[0].tolist()
    assert row[5] == e0.turns[0].observation_ids[-1]
    assert row[6] == e0.turns[1].completion_ids[0]
    # Targets follow their episodes into micro-batches.
    for b in micro_batches(
        [e0, e1], [[0.0] * 3, [0.0]], 12, value_targets=[[1.0, None, -0.5], [None]]
    ):
        for r, i in enumerate(b.episode_index_B.tolist()):
            assert b.n_value_targets == (2 if i == 0 else 0)
            assert int(b.state_positions_B_J[r, 0]) == (2 if i == 0 else 1)


def test_bad_value_targets_are_rejected() -> None:
    e = episode("e", [(2, 1, 1), (0, 1, 0)], seed=0)
    with pytest.raises(ValueError, match="one target, or None, per turn"):
        build_token_batch([e], [[0.0, 0.0]], value_targets=[[1.0]])
    with pytest.raises(ValueError, match="non-finite value target"):
        build_token_batch([e], [[0.0, 0.0]], value_targets=[[1.0, float("inf")]])
    with pytest.raises(ValueError, match="value-target rows"):
        build_token_batch([e], [[0.0, 0.0]], value_targets=[])
    # A turn with nothing before it has an empty state: it can have no value target.
    no_context = episode("n", [(0, 0, 2), (0, 1, 0)], seed=0)
    with pytest.raises(ValueError, match="no token before it"):
        build_token_batch([no_context], [[0.0, 0.0]], value_targets=[[1.0, None]])


# ---------------------------------------------------------------------------------- values


def test_values_read_the_hidden_state_before_each_turn(tiny_model: PreTrainedModel) -> None:
    """V(s_j) = w . h + b with h the final hidden state at the last token before turn j's
    completion, computed here on each episode alone (no padding, no batching)."""
    learner = learner_for(tiny_model, ValueHeadConfig(init_std=0.1, init_bias=0.2))
    episodes = two()
    values = learner.values(episodes)
    with_after = learner.values(episodes, bootstrap=True)
    assert learner.value_head is not None
    w = learner.value_head.proj.weight.detach()[0]
    b = float(learner.value_head.proj.bias.detach()[0])
    for e, got, got_after in zip(episodes, values, with_after, strict=True):
        ids = torch.tensor([e.token_ids()])
        with torch.no_grad():
            hidden_T_H = learner.model.get_decoder()(input_ids=ids).last_hidden_state[0]
        pos, expected = 0, []
        for t in e.turns:
            pos += len(t.prompt_ids)
            expected.append(float(hidden_T_H[pos - 1] @ w) + b)
            pos += len(t.completion_ids) + len(t.observation_ids)
        assert got == pytest.approx(expected, abs=1e-5)
        assert len(set(got)) == len(got)  # the head really reads the hidden state
        # The bootstrap value: the state after the last turn ends at the episode's last token.
        after = float(hidden_T_H[-1] @ w) + b
        assert got_after == pytest.approx([*expected, after], abs=1e-5)


def test_values_depend_only_on_the_state(tiny_model: PreTrainedModel) -> None:
    """V(s_j) sees the context up to turn j only: cutting the episode after turn j, or
    batching it with other episodes under any budget, changes no value."""
    learner = learner_for(tiny_model, ValueHeadConfig(init_std=0.1))
    episodes = two()
    full = learner.values(episodes)
    tiny_budget = learner_for(tiny_model, ValueHeadConfig(init_std=0.1), micro_batch_tokens=8)
    tiny_budget.value_head = learner.value_head
    assert _flat(tiny_budget.values(episodes)) == pytest.approx(_flat(full), abs=1e-5)
    for e, values in zip(episodes, full, strict=True):
        for j in range(len(e.turns)):
            cut = e.model_copy(update={"turns": e.turns[: j + 1]})
            assert learner.values([cut])[0] == pytest.approx(values[: j + 1], abs=1e-5)
            # The state after turn j is the state before turn j + 1 (its prompt is empty).
            if j + 1 < len(e.turns):
                after = learner.values([cut], bootstrap=True)[0][-1]
                assert after == pytest.approx(values[j + 1], abs=1e-5)


def test_zero_init_values_are_the_bias(tiny_model: PreTrainedModel) -> None:
    learner = learner_for(tiny_model, ValueHeadConfig(init_bias=0.3))
    assert _flat(learner.values(two())) == pytest.approx([0.3] * 5)


def test_with_values_stores_them_as_signals() -> None:
    episodes = two()
    signalled = [
        episodes[0].model_copy(
            update={
                "turns": [
                    t.model_copy(update={"signals": TurnSignals(gold_prob=0.1)})
                    for t in episodes[0].turns
                ]
            }
        ),
        episodes[1],
    ]
    out = with_values(signalled, [[1.0, 2.0], [3.0, 4.0, 5.0]])
    assert [t.signals for t in out[0].turns] == [
        TurnSignals(gold_prob=0.1, value=1.0),
        TurnSignals(gold_prob=0.1, value=2.0),
    ]
    assert [t.signals.value for t in out[1].turns] == [3.0, 4.0, 5.0]
    assert all(e.value_after is None for e in out)
    # One value more: the bootstrap value goes on the episode, the turns keep only theirs.
    out = with_values(episodes, [[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
    assert out[0].turns[-1].signals == TurnSignals(value=2.0)
    assert out[0].value_after == 9.0
    assert out[0].turns[0].signals == TurnSignals(value=1.0)
    with pytest.raises(ValueError, match="values for"):
        with_values(episodes, [[1.0], [3.0, 4.0, 5.0]])


def test_no_head_no_values(tiny_model: PreTrainedModel) -> None:
    learner = learner_for(tiny_model, None)
    with pytest.raises(ValueError, match="no value head"):
        learner.values(two())
    with pytest.raises(ValueError, match="need a value head"):
        learner.step(two_zero_adv(), TARGETS)


# ---------------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    ("weighting", "mse", "bias_grad"),
    [
        # V = bias = 0.5 everywhere (zero weights); errors V - G: [-1, -], [0, 0, 0].
        # token: 4 targeted turns weigh 1/4 each: MSE = 1/4; d/db = coef * 2 * (-1) / 4.
        ("token", 0.25, 0.5 * 2 * -1 / 4),
        # episode: "a" has 1 targeted turn (weight 1/2), "b" 3 (1/6 each): MSE = 1/2;
        # d/db = coef * 2 * (-1) / 2.
        ("episode", 0.5, 0.5 * 2 * -1 / 2),
    ],
)
def test_value_loss_hand_values(
    tiny_model: PreTrainedModel, weighting: LossWeighting, mse: float, bias_grad: float
) -> None:
    learner = learner_for(
        tiny_model, ValueHeadConfig(coef=0.5, init_bias=0.5), loss_weighting=weighting
    )
    result = learner.accumulate_gradients(two_zero_adv(), TARGETS)
    assert result.scalars["value_loss"] == pytest.approx(mse)
    assert result.scalars["loss"] == pytest.approx(0.5 * mse)
    assert result.scalars["n_value_targets"] == 4
    assert learner.value_head is not None
    bias = learner.value_head.proj.bias
    assert bias.grad is not None and float(bias.grad[0]) == pytest.approx(bias_grad)
    # No advantage, detached head: nothing reaches the policy.
    assert not result.policy_updated
    assert all(p.grad is None for p in learner.trainable_parameters)


@pytest.mark.parametrize("adaptation", ADAPTATIONS, ids=["lora", "full"])
def test_value_only_step_trains_the_head_alone(
    tiny_model: PreTrainedModel, adaptation: LoraConfig | FullConfig
) -> None:
    learner = learner_for(tiny_model, ValueHeadConfig(lr=1e-2), adaptation, lr=1e-2)
    episodes = two_zero_adv()
    before = _snapshot(learner.model)
    losses = []
    for _ in range(8):
        result = learner.step(episodes, TARGETS)
        assert not result.skipped and result.scalars["value_grad_norm"] > 0
        losses.append(result.scalars["value_loss"])
    assert losses[-1] < losses[0] / 2
    # The policy did not move, so its version did not either.
    assert learner.version == 0
    assert all(torch.equal(before[k], v) for k, v in _snapshot(learner.model).items())
    # Targets 1.5 on "a"'s first state and 0.5 on "b"'s: the values moved towards them.
    values = learner.values(episodes)
    assert values[0][0] > 0.3 and abs(values[1][0] - 0.5) < 0.3
    # Without targets (and without advantage) nothing trains.
    assert learner.step(episodes).skipped


@pytest.mark.parametrize("adaptation", ADAPTATIONS, ids=["lora", "full"])
def test_backprop_to_policy_moves_the_trained_weights(
    tiny_model: PreTrainedModel, adaptation: LoraConfig | FullConfig
) -> None:
    head = ValueHeadConfig(init_std=0.1, backprop_to_policy=True)
    learner = learner_for(tiny_model, head, adaptation, lr=1e-2)
    before = _snapshot(learner.model)
    result = learner.step(two_zero_adv(), TARGETS)
    assert result.policy_updated and result.scalars["grad_norm"] > 0
    assert learner.version == 1
    changed = {k for k, v in _snapshot(learner.model).items() if not torch.equal(before[k], v)}
    assert changed
    if adaptation.kind == "lora":
        assert all("lora_" in k for k in changed)


def test_detached_head_leaves_the_policy_gradient_alone(tiny_model: PreTrainedModel) -> None:
    """With value targets the policy's gradient is exactly the one without them, and the loss
    adds coef * MSE to the policy loss."""
    adv = [[1.0, 1.0], [-0.5, -0.5, -0.5]]
    runs = []
    for targets in (None, TARGETS):
        learner = learner_for(tiny_model, ValueHeadConfig(coef=0.5, init_bias=0.5), kl_coef=0.1)
        trained = with_own_logprobs(learner, with_advantages(two(), adv))
        metrics = learner.accumulate_gradients(trained, targets).scalars
        grads = {k: p.grad for k, p in learner.model.named_parameters() if p.grad is not None}
        runs.append((metrics, grads))
    (plain, plain_grads), (both, both_grads) = runs
    for k, g in plain_grads.items():
        torch.testing.assert_close(both_grads[k], g, rtol=0, atol=0)
    # At ratio 1 the policy loss is -(4 * 1 + 6 * -0.5) / 10 = -0.1; MSE = 1/4 (above).
    assert plain["loss"] == pytest.approx(-0.1, abs=1e-5)
    assert both["loss"] == pytest.approx(-0.1 + 0.5 * 0.25, abs=1e-5)
    assert "value_loss" not in plain and both["value_loss"] == pytest.approx(0.25)


@pytest.mark.parametrize("weighting", ["token", "episode"])
def test_micro_batches_do_not_change_the_value_gradient(
    tiny_model: PreTrainedModel, weighting: LossWeighting
) -> None:
    episodes = [*two(), episode("c", [(3, 4, 2), (0, 3, 0)], seed=7)]
    targets = [*TARGETS, [None, -1.0]]
    adv = [[1.0, 1.0], [-0.5, -0.5, -0.5], [0.5, -2.0]]
    head = ValueHeadConfig(init_std=0.1, backprop_to_policy=True)
    grads = []
    for budget in (8, 4096):
        learner = learner_for(tiny_model, head, micro_batch_tokens=budget, loss_weighting=weighting)
        assert learner.value_head is not None
        torch.manual_seed(0)
        torch.nn.init.normal_(learner.value_head.proj.weight, std=0.1)
        scored = with_own_logprobs(learner, with_advantages(episodes, adv))
        metrics = learner.accumulate_gradients(scored, targets).scalars
        named = [*learner.model.named_parameters(), *learner.value_head.named_parameters()]
        grads.append((metrics, {k: p.grad for k, p in named if p.grad is not None}))
    (m_small, small), (m_large, large) = grads
    assert m_small["n_micro_batches"] == 3 and m_large["n_micro_batches"] == 1
    for key in ("loss", "value_loss", "value_mean", "value_target_mean", "entropy"):
        assert m_small[key] == pytest.approx(m_large[key], rel=1e-5, abs=1e-7)
    assert small.keys() == large.keys() and "proj.weight" in large
    for k in large:
        # Float32 sums in another order: compare at the scale of each gradient.
        scale = float(large[k].abs().max())
        torch.testing.assert_close(small[k], large[k], rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("adaptation", ADAPTATIONS, ids=["lora", "full"])
def test_checkpoint_keeps_the_value_head(
    tiny_model: PreTrainedModel, adaptation: LoraConfig | FullConfig, tmp_path: Path
) -> None:
    head = ValueHeadConfig(lr=1e-2, backprop_to_policy=True)
    learner = learner_for(tiny_model, head, adaptation, lr=1e-2)
    episodes = two_zero_adv()
    learner.step(episodes, TARGETS)
    learner.save_checkpoint(tmp_path)
    saved_values = learner.values(episodes)
    learner.step(episodes, TARGETS)
    assert _flat(learner.values(episodes)) != pytest.approx(_flat(saved_values), abs=1e-6)

    # A fresh learner (another init) restores the head, the policy and the optimizer state.
    fresh = learner_for(tiny_model, head.model_copy(update={"init_bias": 3.0}), adaptation)
    fresh.load_checkpoint(tmp_path)
    assert fresh.version == 1
    assert _flat(fresh.values(episodes)) == pytest.approx(_flat(saved_values), abs=1e-6)
    learner.load_checkpoint(tmp_path)
    assert _flat(learner.values(episodes)) == pytest.approx(_flat(saved_values), abs=1e-6)
    # The head is not part of the exported model folders.
    folder = tmp_path / ("adapter" if adaptation.kind == "lora" else "model")
    assert not any("value" in p.name for p in folder.iterdir())

    with pytest.raises(ValueError, match="value head mismatch"):
        learner_for(tiny_model, None, adaptation).load_checkpoint(tmp_path)
    plain = learner_for(tiny_model, None, adaptation)
    plain.save_checkpoint(tmp_path / "plain")
    with pytest.raises(ValueError, match="value head mismatch"):
        learner_for(tiny_model, head, adaptation).load_checkpoint(tmp_path / "plain")


def _flat(values: list[list[float]]) -> list[float]:
    return [v for row in values for v in row]
