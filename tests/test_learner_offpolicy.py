"""Off-policy corrections inside `Learner.step`: the proximal anchor, the importance weights'
figures against hand arithmetic, the proximal pass of multi-update steps, packed = padded at
sequence level, the KL stop's anchor, and the version lag."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import pytest
import torch
from fakes import with_advantages
from test_learner import ADV, make_episode, tiny_model, two_episodes, with_model_logprobs
from test_learner_packing import varied_episodes
from transformers import PreTrainedModel

from turnrl.agent.records import Episode
from turnrl.rl.batch import ProximalLogprobs
from turnrl.rl.learner import Learner, StepResult
from turnrl.rl.learner_config import (
    DecoupledPPO,
    LearnerConfig,
    MaskedIS,
    OffPolicyCorrection,
    RolloutRatio,
    TruncatedIS,
)


def behind(episodes: Sequence[Episode], shift: Sequence[float]) -> list[Episode]:
    """Copies whose stored (behaviour) logprobs are the learner's minus `shift[i]` on every
    token of episode `i`: each token's weight pi_prox / pi_behav is exp(shift[i])."""
    return [
        e.model_copy(
            update={
                "turns": [
                    t.model_copy(
                        update={"completion_logprobs": [x - d for x in t.completion_logprobs]}
                    )
                    for t in e.turns
                ]
            }
        )
        for e, d in zip(episodes, shift, strict=True)
    ]


def off_policy_batch(model: torch.nn.Module, shift: Sequence[float]) -> list[Episode]:
    """`two_episodes`: "pos" trains 4 + 5 = 9 tokens at A = +1, "neg" 3 + 2 + 6 = 11 at
    A = -1, behind the model by `shift`."""
    return with_advantages(behind(two_episodes(model), shift), ADV)


def first_step(correction: OffPolicyCorrection, shift: Sequence[float]) -> dict[str, float]:
    """The scalars of one single-update step (proximal = the current weights, detached)."""
    learner = Learner(tiny_model(), LearnerConfig(lr=1e-9, off_policy=correction))
    return dict(learner.step(off_policy_batch(learner.model, shift)).scalars)


def test_decoupled_weights_the_first_update_by_hand() -> None:
    """pos is behind by 0.1 (w = e^0.1 = 1.105171), neg by -0.2 (w = e^-0.2 = 0.818731).
    Proximal = current weights, so the ratio is 1 and each token's loss is -A w:
      loss = -(9 e^0.1 - 11 e^-0.2) / 20;   is_weight_mean = (9 e^0.1 + 11 e^-0.2) / 20;
      behaviour_kl = (9 (e^0.1 - 1 - 0.1) + 11 (e^-0.2 - 1 + 0.2)) / 20.
    Plain PPO against the behaviour policy gives the same loss here (r = w, both inside
    [0.8, 1.2], nothing clipped), its ratio being that weight."""
    up, down = math.exp(0.1), math.exp(-0.2)
    scalars = first_step(DecoupledPPO(), [0.1, -0.2])
    assert scalars["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert scalars["clip_frac"] == 0.0
    assert scalars["loss"] == pytest.approx(-(9 * up - 11 * down) / 20, abs=1e-5)
    assert scalars["is_weight_mean"] == pytest.approx((9 * up + 11 * down) / 20, abs=1e-5)
    kl = (9 * (up - 1.1) + 11 * (down - 0.8)) / 20
    assert scalars["behaviour_kl"] == pytest.approx(kl, abs=1e-5)
    assert scalars["is_token_frac"] == 0.0 and scalars["is_seq_frac"] == 0.0
    plain = first_step(RolloutRatio(), [0.1, -0.2])
    assert plain["loss"] == pytest.approx(scalars["loss"], abs=1e-5)
    assert plain["ratio_mean"] == pytest.approx(scalars["is_weight_mean"], abs=1e-5)
    assert "is_weight_mean" not in plain and "behaviour_kl" not in plain


def test_decoupled_keeps_the_gradient_plain_ppo_clips_away() -> None:
    """pos behind by 0.5: against the behaviour policy its ratio is e^0.5 = 1.65 > 1.2 with
    A = +1, so plain PPO clips all 9 of its tokens (no gradient from them); decoupled PPO
    measures the ratio against the proximal policy (1: no clip) and weights by e^0.5."""
    plain = first_step(RolloutRatio(), [0.5, 0.0])
    decoupled = first_step(DecoupledPPO(), [0.5, 0.0])
    assert plain["clip_frac"] == pytest.approx(9 / 20)
    assert decoupled["clip_frac"] == 0.0
    # Plain: pos's clipped terms are -1.2 each, neg's -(-1) * 1: (-9 * 1.2 + 11) / 20.
    assert plain["loss"] == pytest.approx((-9 * 1.2 + 11) / 20, abs=1e-5)
    assert decoupled["loss"] == pytest.approx((-9 * math.exp(0.5) + 11) / 20, abs=1e-5)


def test_truncated_is_at_token_and_sequence_level_by_hand() -> None:
    """pos behind by 0.5 per token, neg by -0.2; cap 1.1.
    Token level: pos's tokens weigh e^0.5 = 1.6487 > 1.1 -> 1.1 (9 of 20 tokens truncated,
    in 2 of the 5 turns); neg's e^-0.2 stay.
      is_weight_mean = (9 * 1.1 + 11 e^-0.2) / 20; loss = -(9 * 1.1 - 11 e^-0.2) / 20.
    Sequence level (a turn's product): pos's turns e^(4 * 0.5), e^(5 * 0.5) -> 1.1 each;
    neg's turns of 3, 2, 6 tokens e^-0.6, e^-0.4, e^-1.2 kept.
      is_weight_mean = (9 * 1.1 + 3 e^-0.6 + 2 e^-0.4 + 6 e^-1.2) / 20."""
    down = math.exp(-0.2)
    token = first_step(TruncatedIS(level="token", cap=1.1), [0.5, -0.2])
    assert token["is_token_frac"] == pytest.approx(9 / 20)
    assert token["is_seq_frac"] == pytest.approx(2 / 5)
    assert token["is_weight_mean"] == pytest.approx((9 * 1.1 + 11 * down) / 20, abs=1e-5)
    assert token["loss"] == pytest.approx(-(9 * 1.1 - 11 * down) / 20, abs=1e-5)
    seq = first_step(TruncatedIS(level="sequence", cap=1.1), [0.5, -0.2])
    neg = 3 * math.exp(-0.6) + 2 * math.exp(-0.4) + 6 * math.exp(-1.2)
    assert seq["is_token_frac"] == pytest.approx(9 / 20)
    assert seq["is_seq_frac"] == pytest.approx(2 / 5)
    assert seq["is_weight_mean"] == pytest.approx((9 * 1.1 + neg) / 20, abs=1e-5)
    assert seq["loss"] == pytest.approx(-(9 * 1.1 - neg) / 20, abs=1e-5)


def test_masked_is_drops_whole_turns_at_sequence_level() -> None:
    """Band [0.5, 2]: pos (0.1 per token) turns e^0.4 = 1.49 and e^0.5 = 1.65 kept; neg
    (-0.2 per token) turns e^-0.6 = 0.55 kept, e^-0.4 = 0.67 kept, e^-1.2 = 0.30 dropped:
    its 6 tokens leave the loss. loss = -(4 e^0.4 + 5 e^0.5 - 3 e^-0.6 - 2 e^-0.4) / 20."""
    scalars = first_step(MaskedIS(level="sequence", low=0.5, high=2.0), [0.1, -0.2])
    assert scalars["is_token_frac"] == pytest.approx(6 / 20)
    assert scalars["is_seq_frac"] == pytest.approx(1 / 5)
    kept = 4 * math.exp(0.4) + 5 * math.exp(0.5) - 3 * math.exp(-0.6) - 2 * math.exp(-0.4)
    assert scalars["loss"] == pytest.approx(-kept / 20, abs=1e-5)


class Recording(Learner):
    """Records the proximal logprobs and the scalars of every minibatch's accumulation."""

    def __init__(self, model: PreTrainedModel, config: LearnerConfig) -> None:
        super().__init__(model, config)
        self.seen: list[tuple[ProximalLogprobs | None, dict[str, float]]] = []

    def accumulate_gradients(
        self,
        episodes: Sequence[Episode],
        value_targets: Sequence[Sequence[float | None]] | None = None,
        proximal: ProximalLogprobs | None = None,
    ) -> StepResult:
        result = super().accumulate_gradients(episodes, value_targets, proximal)
        self.seen.append((proximal, dict(result.scalars)))
        return result


def test_several_updates_anchor_at_the_weights_of_the_step_start() -> None:
    config = LearnerConfig(lr=1e-2, ppo_epochs=3, off_policy=TruncatedIS(cap=5.0))
    learner = Recording(tiny_model(), config)
    episodes = off_policy_batch(learner.model, [0.3, -0.3])
    before = learner.logprobs(episodes)
    learner.step(episodes)
    assert len(learner.seen) == 3
    for proximal, _ in learner.seen:  # one pass before the first update, reused by all
        assert proximal is not None
        flat = [x for e in proximal for t in e for x in t]
        assert flat == pytest.approx([x for e in before for t in e for x in t], abs=1e-5)
    ratios = [scalars["ratio_mean"] for _, scalars in learner.seen]
    assert ratios[0] == pytest.approx(1.0, abs=1e-5)
    assert abs(ratios[2] - 1.0) > 1e-3  # the weights moved; the anchor did not
    # The weights never change within the step: the proximal and behaviour policies are
    # fixed, so every update sees the same is_weight_mean.
    weights = [scalars["is_weight_mean"] for _, scalars in learner.seen]
    assert weights == pytest.approx([weights[0]] * 3, abs=1e-6)
    # A single-update step needs no proximal pass.
    single = Recording(tiny_model(), config.model_copy(update={"ppo_epochs": 1}))
    single.step(off_policy_batch(single.model, [0.3, -0.3]))
    assert [p for p, _ in single.seen] == [None]


@pytest.mark.parametrize(
    "correction",
    [MaskedIS(level="sequence", low=0.5, high=1.5), TruncatedIS(level="token", cap=1.02)],
    ids=["mis-seq", "tis-token"],
)
def test_packed_rows_give_the_padded_figures_at_sequence_level(
    correction: OffPolicyCorrection,
) -> None:
    """Turns are told apart inside packed rows (several episodes per row): the same loss,
    figures and gradient as the padded layout, with GSPO's sequence ratio."""
    model = tiny_model()
    with torch.no_grad():  # current != proximal != behaviour
        for p in model.parameters():
            p.add_(0.02 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
    shift = [0.1 * (i % 3) - 0.15 for i in range(6)]
    episodes = behind(varied_episodes(tiny_model()), shift)
    proximal = Learner(copy.deepcopy(tiny_model()), LearnerConfig()).logprobs(episodes)
    out = []
    for packing in (False, True):
        config = LearnerConfig(
            micro_batch_tokens=40,
            packing=packing,
            off_policy=correction,
            ratio_level="sequence",
            loss_weighting="episode",
        )
        learner = Learner(copy.deepcopy(model), config)
        scalars = learner.accumulate_gradients(episodes, proximal=proximal).scalars
        grads = [p.grad.clone() for p in learner.model.parameters() if p.grad is not None]
        out.append((scalars, grads))
    (padded, g_padded), (packed, g_packed) = out
    assert padded["is_seq_frac"] > 0
    for key in ("loss", "clip_frac", "is_weight_mean", "is_token_frac", "is_seq_frac"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(g_padded, g_packed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_kl_stop_measures_against_the_ratio_anchor() -> None:
    """The behaviour policy is 0.5 nats behind on every token: k3 KL to it is e^0.5 - 1 -
    0.5 = 0.1487 per token, far above target_kl = 0.01, so plain PPO stops after its first
    update; decoupled PPO measures against the proximal policy, which a tiny step barely
    moves, and runs all three."""
    for correction, updates in ((RolloutRatio(), 1), (DecoupledPPO(), 3)):
        config = LearnerConfig(lr=1e-8, ppo_epochs=3, target_kl=0.01, off_policy=correction)
        learner = Learner(tiny_model(), config)
        scalars = learner.step(off_policy_batch(learner.model, [0.5, 0.5])).scalars
        assert scalars["n_optimizer_steps"] == updates
        assert scalars["early_stopped"] == float(updates == 1)


def test_version_lag_by_hand() -> None:
    """The learner is at version 5. Trained turns sampled at versions 5, 4 (pos) and 3, 3, 5
    (neg): lags 0, 1, 2, 2, 0 -> mean 1, max 2. A turn without an advantage and a replayed
    turn are not trained and not counted (their version 0 would be a lag of 5)."""
    model = tiny_model()
    pos, neg = two_episodes(model)
    extra = with_model_logprobs(model, [make_episode("x", [(3, 2, 1), (0, 2, 1)], seed=7)])[0]
    versions = [[5, 4], [3, 3, 5], [0, 0]]
    episodes = [
        e.model_copy(
            update={
                "turns": [
                    t.model_copy(update={"policy_version": v, "replayed": i == 2 and j == 1})
                    for j, (t, v) in enumerate(zip(e.turns, vs, strict=True))
                ]
            }
        )
        for i, (e, vs) in enumerate(zip([pos, neg, extra], versions, strict=True))
    ]
    learner = Learner(model, LearnerConfig(lr=1e-9))
    learner.version = 5
    scalars = learner.step(with_advantages(episodes, [*ADV, [None, 1.0]])).scalars
    assert scalars["version_lag_mean"] == pytest.approx(1.0)
    assert scalars["version_lag_max"] == 2.0
