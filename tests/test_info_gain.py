"""Gold-answer probabilities from stored ids equal a naive forward pass per boundary, and the
information-gain rewards built on them telescope to the final minus the initial probability."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from turnrl.agent.records import Episode, StopReason, Turn, TurnSignals
from turnrl.rl.info_gain import Method, boundaries, gold_probabilities, with_gold_probs
from turnrl.rl.rewards import RewardConfig, group_rewards, info_gain_rewards


def random_episode(
    name: str, shapes: list[tuple[int, int, int]], seed: int, answer_last: bool = True
) -> Episode:
    """Turn j has (prompt, completion, observation) lengths `shapes[j]`, random ids."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, 49000) for _ in range(n)]

    turns = [
        Turn(
            index=j,
            prompt_ids=ids(p),
            completion_ids=ids(c),
            completion_logprobs=[0.0] * c,
            observation_ids=ids(o),
            text="",
            finish_reason="stop",
            answer="x" if answer_last and j == len(shapes) - 1 else None,
        )
        for j, (p, c, o) in enumerate(shapes)
    ]
    return Episode(
        episode_id=name, task_id="t", group_id="g", turns=turns, stop_reason=StopReason.ANSWERED
    )


def naive(
    model: PreTrainedModel,
    episode: Episode,
    gold: list[int],
    prefix: list[int],
    temperature: float = 1.0,
) -> list[float]:
    """One unbatched forward pass over `ids[:b] + prefix + gold` for each boundary b."""
    ids = episode.token_ids()
    out = []
    for b in boundaries(episode):
        x = torch.tensor([ids[:b] + prefix + gold])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0].float() / temperature
        logprobs = torch.log_softmax(logits, dim=-1)
        first = b + len(prefix)
        # The logits at position i predict the id at i + 1.
        lp = [float(logprobs[first - 1 + j, g]) for j, g in enumerate(gold)]
        out.append(math.exp(sum(lp) / len(lp)))
    return out


EPISODES = [
    random_episode("a", [(7, 3, 4), (0, 5, 2)], 0),
    random_episode("b", [(3, 2, 1)], 1),
    random_episode("c", [(12, 4, 6), (0, 3, 3), (0, 1, 0)], 2, answer_last=False),
    Episode(episode_id="empty", task_id="t", group_id="g", stop_reason=StopReason.POLICY_ERROR),
    random_episode("d", [(5, 2, 2), (0, 2, 2), (0, 2, 2), (0, 2, 2), (0, 2, 1)], 3),
]
GOLDS = [[5, 6], [7], [8, 9, 10], [11], [12, 13, 14, 15]]


def test_boundaries_follow_the_stored_ids() -> None:
    # Initial prompt 7 ids; turn 0 ends at 7 + 3 + 4 = 14; turn 1 at 14 + 5 + 2 = 21.
    assert boundaries(EPISODES[0]) == [7, 14, 21]
    assert boundaries(EPISODES[3]) == []


PREFIXES = {"prefix": (100, 101, 102), "no_prefix": ()}


@pytest.fixture(scope="module")
def references(tiny_model: PreTrainedModel) -> dict[str, list[list[float]]]:
    """The naive probabilities of `EPISODES`, once per answer prefix."""
    return {
        name: [naive(tiny_model, e, g, list(prefix)) for e, g in zip(EPISODES, GOLDS, strict=True)]
        for name, prefix in PREFIXES.items()
    }


@pytest.mark.parametrize("method", ["cached", "rows"])
@pytest.mark.parametrize("budget", [1, 60, 100_000])
@pytest.mark.parametrize("prefix", sorted(PREFIXES))
def test_gold_probabilities_equal_a_naive_pass_per_boundary(
    tiny_model: PreTrainedModel,
    references: dict[str, list[list[float]]],
    method: Method,
    budget: int,
    prefix: str,
) -> None:
    got = gold_probabilities(tiny_model, EPISODES, GOLDS, PREFIXES[prefix], budget, method=method)
    assert [len(p) for p in got] == [3, 2, 4, 0, 6]
    for row, ref in zip(got, references[prefix], strict=True):
        assert row == pytest.approx(ref, rel=1e-4)


def test_temperature_scales_the_logits(tiny_model: PreTrainedModel) -> None:
    got = gold_probabilities(tiny_model, EPISODES[:2], GOLDS[:2], [100], temperature=0.7)
    for row, e, g in zip(got, EPISODES, GOLDS, strict=False):
        assert row == pytest.approx(naive(tiny_model, e, g, [100], temperature=0.7), rel=1e-4)


def test_real_tokens_and_info_gain_telescope(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The caller tokenizes only the answer prefix and the gold answer; the rewards built on the
    stored probabilities telescope to the final minus the initial probability."""
    prefix = tokenizer.encode("<answer>", add_special_tokens=False)
    gold = tokenizer.encode("Paris", add_special_tokens=False)
    eps = [EPISODES[0], EPISODES[2]]
    probs = gold_probabilities(tiny_model, eps, [gold, gold], prefix)
    stored = with_gold_probs(eps, probs)
    assert stored[0].gold_prob_initial == probs[0][0]
    assert stored[0].turns[0].signals == TurnSignals(gold_prob=probs[0][1])
    assert [t.signals.gold_prob for t in stored[1].turns] == probs[1][1:]
    assert all(0.0 < p <= 1.0 for row in probs for p in row)
    # Episode a answers on its last turn: the gains end at the turn before it.
    assert math.isclose(sum(info_gain_rewards(stored[0])), probs[0][1] - probs[0][0])
    # Episode c never answers: every turn has a gain.
    assert math.isclose(sum(info_gain_rewards(stored[1])), probs[1][-1] - probs[1][0])
    cfg = RewardConfig(weights={"outcome": 1.0, "info_gain": 1.0})
    graded = [e.model_copy(update={"outcome": {"f1": 0.0}}) for e in stored]
    rewarded = group_rewards(graded, cfg)
    assert [t.rewards["info_gain"] for t in rewarded[1].turns] == pytest.approx(
        [probs[1][k + 1] - probs[1][k] for k in range(3)]
    )


def test_mode_is_restored_and_inputs_are_checked(tiny_model: PreTrainedModel) -> None:
    tiny_model.train()
    try:
        gold_probabilities(tiny_model, EPISODES[:1], GOLDS[:1], [100])
        assert tiny_model.training
    finally:
        tiny_model.eval()
    with pytest.raises(ValueError, match="gold answers for"):
        gold_probabilities(tiny_model, EPISODES, GOLDS[:1], [100])
    with pytest.raises(ValueError, match="empty gold"):
        gold_probabilities(tiny_model, EPISODES[:1], [[]], [100])
    with pytest.raises(ValueError, match="probabilities for"):
        with_gold_probs(EPISODES[:1], [[0.1]])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12),
    st.booleans(),
)
def test_info_gain_telescopes(probs: list[float], answer_last: bool) -> None:
    """sum_t (p_t - p_{t-1}) = p_last - p_{-1}, p_last after the last turn that did not answer."""
    n_turns = len(probs) - 1
    ep = random_episode("h", [(1, 1, 1)] * n_turns, 0, answer_last=answer_last)
    stored = with_gold_probs([ep], [probs])[0]
    gains = info_gain_rewards(stored)
    last = n_turns - 1 if answer_last else n_turns
    assert math.isclose(sum(gains), probs[last] - probs[0], abs_tol=1e-9)
    if answer_last:
        assert gains[-1] == 0.0
