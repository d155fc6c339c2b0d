"""`Learner.sft_step`: the weighted NLL of exactly the trained tokens, with one optimizer step."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from fakes import with_advantages
from test_learner import make_episode, tiny_model, with_model_logprobs

from turnrl.agent.records import Episode
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import FullConfig, LearnerConfig, LoraConfig, LossWeighting


def _placeholder_logprobs(e: Episode) -> Episode:
    """Cloned episodes carry no usable logprobs: here none at all."""
    turns = [t.model_copy(update={"completion_logprobs": []}) for t in e.turns]
    return e.model_copy(update={"turns": turns})


@pytest.mark.parametrize(
    ("adaptation", "lr"),
    [(FullConfig(), 1e-2), (LoraConfig(r=4, alpha=8), 1e-2)],
    ids=["full", "lora"],
)
def test_sft_steps_lower_the_nll_of_the_cloned_turns(
    adaptation: LoraConfig | FullConfig, lr: float
) -> None:
    learner = Learner(tiny_model(), LearnerConfig(adaptation=adaptation, lr=lr))
    (episode,) = with_advantages(
        [_placeholder_logprobs(make_episode("e", [(6, 8, 3), (0, 6, 2)], seed=5))], [[1.0, 1.0]]
    )

    def completion_logprob() -> float:
        return sum(sum(t) for t in learner.logprobs([episode])[0])

    start = completion_logprob()
    results = [learner.sft_step([episode]) for _ in range(5)]
    nll = [r.scalars["nll"] for r in results]
    assert all(b < a for a, b in itertools.pairwise(nll))
    assert completion_logprob() > start
    # Each step's nll is the mean over its 14 trained tokens, measured before the update.
    assert nll[0] == pytest.approx(-start / 14, abs=1e-5)
    assert results[0].scalars["n_tokens"] == 14 and results[0].scalars["n_sequences"] == 1
    assert results[0].scalars["loss"] == pytest.approx(nll[0], abs=1e-6)  # every weight 1
    assert learner.version == 5 and all(r.policy_updated for r in results)
    assert not learner.model.training


def test_sft_gradient_is_the_hand_computed_masked_nll_gradient() -> None:
    """The accumulated gradient equals that of -sum a * log p / N written out by hand from
    full-vocabulary logits, over completion tokens only: a None turn, a replayed turn,
    prompts and observations contribute nothing, whatever the micro-batch split."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
    a = make_episode("a", [(5, 4, 3), (0, 3, 2)], seed=1)
    b = make_episode("b", [(4, 2, 2), (0, 5, 1), (0, 3, 2)], seed=2)
    b = b.model_copy(
        update={"turns": [b.turns[0].model_copy(update={"replayed": True}), *b.turns[1:]]}
    )
    weights: list[list[float | None]] = [[1.0, None], [7.0, 0.5, 2.0]]
    episodes = with_advantages([a, b], weights)

    learner = Learner(copy.deepcopy(model), LearnerConfig(micro_batch_tokens=16))
    result = learner.accumulate_sft_gradients(episodes)
    assert result.scalars["n_micro_batches"] == 2
    # Trained: a's first turn (4 tokens), b's turns 1 and 2 (5 + 3); b's replayed turn is not.
    assert result.scalars["n_tokens"] == 12

    by_hand = copy.deepcopy(model).train()
    loss = torch.zeros(())
    for e, w in zip(episodes, weights, strict=True):
        lp_T_V = torch.log_softmax(by_hand(torch.tensor([e.token_ids()])).logits[0], dim=-1)
        pos = 0
        for t, a_j in zip(e.turns, w, strict=True):
            pos += len(t.prompt_ids)
            if a_j is not None and not t.replayed:
                for k, c in enumerate(t.completion_ids):
                    loss = loss - a_j * lp_T_V[pos + k - 1, c] / 12
            pos += len(t.completion_ids) + len(t.observation_ids)
    loss.backward()
    assert result.scalars["loss"] == pytest.approx(loss.item(), rel=1e-5)
    want = dict(by_hand.named_parameters())
    for name, p in learner.model.named_parameters():
        assert p.grad is not None, name
        grad = want[name].grad
        assert grad is not None
        torch.testing.assert_close(p.grad, grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("weighting", ["token", "episode"])
def test_sft_weighting_follows_its_definition(weighting: LossWeighting) -> None:
    """The step's loss from the learner's own logprobs: "token" divides the weighted sum by
    the step's 20 trained tokens; "episode" averages each episode's own weighted token mean."""
    learner = Learner(tiny_model(), LearnerConfig(loss_weighting=weighting, lr=1e-3))
    episodes = with_advantages(
        with_model_logprobs(
            learner.model,
            [
                make_episode("pos", [(6, 4, 3), (0, 5, 2)], seed=1),
                make_episode("neg", [(5, 3, 4), (0, 2, 3), (0, 6, 1)], seed=2),
            ],
        ),
        [[1.0, 2.0], [0.5, 0.5, 1.0]],
    )
    lps = learner.logprobs(episodes)
    sums = [
        sum(
            t.advantage * lp
            for t, turn_lps in zip(e.turns, per, strict=True)
            for lp in turn_lps
            if t.advantage
        )
        for e, per in zip(episodes, lps, strict=True)
    ]
    counts = [sum(len(t) for t in per) for per in lps]  # 9 and 11
    nll = -sum(lp for per in lps for t in per for lp in t) / 20
    expected = -sum(sums) / 20 if weighting == "token" else -(sums[0] / 9 + sums[1] / 11) / 2
    assert counts == [9, 11]
    scalars = learner.sft_step(episodes).scalars
    assert scalars["loss"] == pytest.approx(expected, abs=1e-5)
    assert scalars["nll"] == pytest.approx(nll, abs=1e-5)
    assert scalars["grad_norm"] > 0


def test_sft_step_without_targets_is_skipped() -> None:
    learner = Learner(tiny_model(), LearnerConfig(lr=1e-2))
    episodes = with_advantages([make_episode("e", [(4, 3, 2)], seed=3)], [[None]])
    result = learner.sft_step(episodes)
    assert result.skipped and not result.policy_updated and learner.version == 0
    assert learner.sft_step(with_advantages(episodes, [[0.0]])).skipped
