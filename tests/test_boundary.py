"""Boundary-guided training (BoPO, arXiv 2602.21227): the difficulty taxonomy, warm-start
selection, boundary-relative rewards and the reference-guided advantage, against examples
worked out by hand (the arithmetic is in the comments), their edge cases, and the configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from turnrl.rl.boundary import (
    Candidate,
    Difficulty,
    boundary_reference_rewards,
    boundary_relative_rewards,
    boundary_success_rates,
    classify_difficulty,
    normalized_cost,
    reference_guided_advantages,
    select_warm_start,
    stratified_large_probs,
)
from turnrl.rl.boundary_config import (
    BestBoundaryReference,
    BopoConfig,
    BoundaryConfig,
    NoReference,
    ReferenceConfig,
)
from turnrl.rl.group_advantages import grpo

# ---- difficulty taxonomy ----------------------------------------------------------------------


def test_success_rates_per_task_with_a_task_that_has_no_runs() -> None:
    # task 0: 1, 0, 1 -> 2/3; task 1: 1, 0 -> 1/2; task 2: no runs -> NaN; task 3: 0 -> 0.
    rates = boundary_success_rates([1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 3], 4)
    assert rates[0] == pytest.approx(2 / 3)
    assert rates[1] == 0.5
    assert math.isnan(rates[2])
    assert rates[3] == 0.0


def test_classify_difficulty_hand_example() -> None:
    # threshold 0.5: cheap solves when rate >= 0.5, expensive likewise.
    # 1.0/1.0 both -> easy; 0.2/0.8 expensive only -> hard; 0/0 neither -> intractable;
    # 0.6/0.2 cheap only -> inverted; 0.4/0.5 expensive exactly at the threshold -> hard.
    got = classify_difficulty([1.0, 0.2, 0.0, 0.6, 0.4], [1.0, 0.8, 0.0, 0.2, 0.5], 0.5)
    assert got == (
        Difficulty.EASY,
        Difficulty.HARD,
        Difficulty.INTRACTABLE,
        Difficulty.INVERTED,
        Difficulty.HARD,
    )


def test_classify_difficulty_threshold_tie_counts_as_solved() -> None:
    # 3 of 5 = 0.6 against threshold 0.6: solved; against 0.8: not solved.
    assert classify_difficulty([0.6], [0.6], 0.6) == (Difficulty.EASY,)
    assert classify_difficulty([0.6], [0.6], 0.8) == (Difficulty.INTRACTABLE,)


def test_classify_difficulty_refuses_missing_boundaries_and_bad_thresholds() -> None:
    with pytest.raises(ValueError, match="NaN"):
        classify_difficulty([0.5, math.nan], [1.0, 1.0])
    with pytest.raises(ValueError, match="solve_threshold"):
        classify_difficulty([0.5], [1.0], 0.0)
    with pytest.raises(ValueError, match="same length"):
        classify_difficulty([0.5, 0.5], [1.0])


def test_difficulty_members_and_values() -> None:
    assert [d.value for d in Difficulty] == ["easy", "hard", "intractable", "inverted"]
    assert Difficulty("hard") is Difficulty.HARD


# ---- warm-start data ------------------------------------------------------------------------


def _cand(task: str, index: int, success: bool, cost: float, large: float) -> Candidate:
    return Candidate(task_id=task, index=index, success=success, cost=cost, large_prob=large)


def test_stratified_large_probs() -> None:
    # N = 4: k / N for k = 1..4.
    assert stratified_large_probs(4).tolist() == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        stratified_large_probs(0)


def test_select_warm_start_hand_example() -> None:
    difficulty = {
        "e": Difficulty.EASY,
        "h": Difficulty.HARD,
        "x": Difficulty.INTRACTABLE,
        "i": Difficulty.INVERTED,
        "h2": Difficulty.HARD,
        "m": Difficulty.EASY,
    }
    candidates = [
        # Easy: cheapest successful always-cheap run is 1 (cost 2); 2 is cheaper but failed,
        # 3 is cheaper but not always-cheap.
        _cand("e", 0, True, 3.0, 0.0),
        _cand("e", 1, True, 2.0, 0.0),
        _cand("e", 2, False, 1.0, 0.0),
        _cand("e", 3, True, 1.5, 1.0),
        # Hard: cheapest successful of any mix; 11 and 12 tie at cost 4, 12 has the lower
        # P(expensive) (0.25 < 0.5), so 12.
        _cand("h", 10, False, 1.0, 0.0),
        _cand("h", 11, True, 4.0, 0.5),
        _cand("h", 12, True, 4.0, 0.25),
        _cand("h", 13, True, 9.0, 1.0),
        # Intractable: cheapest always-cheap run, failed: 21 (cost 3); 22 is cheaper but is an
        # always-expensive run.
        _cand("x", 20, False, 5.0, 0.0),
        _cand("x", 21, False, 3.0, 0.0),
        _cand("x", 22, False, 1.0, 1.0),
        # Inverted: as Easy, 30.
        _cand("i", 30, True, 2.0, 0.0),
        _cand("i", 31, False, 1.0, 1.0),
        # Hard with no success at all: dropped.
        _cand("h2", 40, False, 2.0, 0.5),
        _cand("h2", 41, False, 3.0, 1.0),
        # "m" has no candidates: dropped.
    ]
    got = select_warm_start(candidates, difficulty)
    assert got.indices == (1, 12, 21, 30)
    assert got.task_ids == ("e", "h", "x", "i")
    assert got.dropped_task_ids == ("h2", "m")
    assert got.unsampled_task_ids == ()


def test_select_warm_start_full_tie_goes_to_the_lower_index() -> None:
    candidates = [_cand("e", 7, True, 2.0, 0.0), _cand("e", 5, True, 2.0, 0.0)]
    assert select_warm_start(candidates, {"e": Difficulty.EASY}).indices == (5,)


def test_select_warm_start_easy_without_a_cheap_success_is_dropped() -> None:
    # Only an always-expensive success: an Easy task's label must be an always-cheap run.
    candidates = [_cand("e", 0, True, 1.0, 1.0), _cand("e", 1, False, 1.0, 0.0)]
    got = select_warm_start(candidates, {"e": Difficulty.EASY})
    assert got.indices == ()
    assert got.dropped_task_ids == ("e",)


def test_select_warm_start_cap_is_deterministic_per_generator() -> None:
    tasks = [f"t{k}" for k in range(6)]
    difficulty = {t: Difficulty.EASY for t in tasks} | {"h": Difficulty.HARD}
    candidates = [_cand(t, k, True, 1.0, 0.0) for k, t in enumerate(tasks)]
    candidates.append(_cand("h", 99, True, 5.0, 0.5))
    caps = {Difficulty.EASY: 2}

    def draw(seed: int) -> tuple[str, ...]:
        got = select_warm_start(
            candidates, difficulty, tasks_per_difficulty=caps, rng=np.random.default_rng(seed)
        )
        easy = tuple(t for t in got.task_ids if t != "h")
        assert len(easy) == 2
        assert "h" in got.task_ids  # an uncapped class keeps every task
        assert sorted(easy + got.unsampled_task_ids) == tasks
        return easy

    assert draw(3) == draw(3)
    assert len({draw(seed) for seed in range(12)}) > 1  # the draw does depend on the generator


def test_select_warm_start_cap_without_generator() -> None:
    candidates = [_cand("a", 0, True, 1.0, 0.0), _cand("b", 1, True, 1.0, 0.0)]
    difficulty = {"a": Difficulty.EASY, "b": Difficulty.EASY}
    with pytest.raises(ValueError, match="rng"):
        select_warm_start(candidates, difficulty, tasks_per_difficulty={Difficulty.EASY: 1})
    # A cap that does not bind needs no generator.
    got = select_warm_start(candidates, difficulty, tasks_per_difficulty={Difficulty.EASY: 2})
    assert got.indices == (0, 1)


def test_select_warm_start_refuses_bad_candidates() -> None:
    with pytest.raises(ValueError, match="without a difficulty"):
        select_warm_start([_cand("z", 0, True, 1.0, 0.0)], {"e": Difficulty.EASY})
    with pytest.raises(ValueError, match="unique"):
        select_warm_start(
            [_cand("e", 0, True, 1.0, 0.0), _cand("e", 0, True, 2.0, 0.0)],
            {"e": Difficulty.EASY},
        )
    with pytest.raises(ValueError, match="large_prob"):
        select_warm_start([_cand("e", 0, True, 1.0, 1.5)], {"e": Difficulty.EASY})
    with pytest.raises(ValueError, match="cost"):
        select_warm_start([_cand("e", 0, True, -1.0, 0.0)], {"e": Difficulty.EASY})


# ---- boundary-relative reward ---------------------------------------------------------------


def test_boundary_relative_rewards_hand_example() -> None:
    # lambda = 0.5, beta = 0.5.
    # task 0 Hard, boundaries 2 and 10 (span 8); task 1 Easy, 1 and 5 (span 4);
    # task 2 Intractable, 3 and 3 (no span: scale by 3).
    # n0: t0 success, cost 6: C_norm (6-2)/8 = 0.5; R = 1 + 0.5 - 0.25 = 1.25
    # n1: t0 fail, cost 2: C_norm 0; R = 0
    # n2: t0 success, cost 12: (12-2)/8 = 1.25 -> clip 1; R = 1 + 0.5 - 0.5 = 1.0
    # n3: t1 success, cost 0.5: (0.5-1)/4 < 0 -> clip 0; R = 1
    # n4: t1 success, cost 3: (3-1)/4 = 0.5; R = 1 - 0.25 = 0.75
    # n5: t2 fail, cost 4.5: (4.5-3)/3 = 0.5; R = -0.25 (unsolvable: cost term only)
    # n6: t2 fail, cost 3: 0; R = 0
    got = boundary_relative_rewards(
        success_N=[1, 0, 1, 1, 1, 0, 0],
        cost_N=[6, 2, 12, 0.5, 3, 4.5, 3],
        group_N=[0, 0, 0, 1, 1, 2, 2],
        cheap_cost_G=[2, 1, 3],
        expensive_cost_G=[10, 5, 3],
        hard_G=np.array([True, False, False]),
        cost_weight=0.5,
        hard_bonus=0.5,
    )
    assert got.cost_norm_N.tolist() == [0.5, 0.0, 1.0, 0.0, 0.5, 0.5, 0.0]
    assert got.hard_bonus_N.tolist() == [0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert got.success_N.tolist() == [1, 0, 1, 1, 1, 0, 0]
    assert got.total_N.tolist() == [1.25, 0.0, 1.0, 1.0, 0.75, -0.25, 0.0]


def test_normalized_cost_zero_cost_boundaries_and_swapped_boundaries() -> None:
    # Both boundaries free: no cost scale, C_norm 0 whatever the run spent.
    assert normalized_cost([0.0, 7.0], [0.0, 0.0], [0.0, 0.0]).tolist() == [0.0, 0.0]
    # Expensive boundary cheaper (2) than the cheap one (10): they swap, span 8.
    # 6 -> (6-2)/8 = 0.5; 2 -> 0; 10 -> 1.
    assert normalized_cost([6.0, 2.0, 10.0], [10.0] * 3, [2.0] * 3).tolist() == [0.5, 0.0, 1.0]
    # Equal non-zero boundaries (4, 4): 6 -> (6-4)/4 = 0.5; 3 -> clip 0; 20 -> clip 1.
    assert normalized_cost([6.0, 3.0, 20.0], [4.0] * 3, [4.0] * 3).tolist() == [0.5, 0.0, 1.0]


def test_boundary_relative_rewards_refuse_missing_or_bad_inputs() -> None:
    args = {
        "success_N": [1.0],
        "cost_N": [1.0],
        "group_N": [0],
        "cheap_cost_G": [1.0],
        "expensive_cost_G": [2.0],
        "hard_G": np.array([True]),
        "cost_weight": 0.5,
        "hard_bonus": 0.5,
    }
    boundary_relative_rewards(**args)  # type: ignore[arg-type]
    for key, bad, match in [
        ("expensive_cost_G", [math.nan], "NaN"),
        ("cost_N", [-1.0], ">= 0"),
        ("success_N", [1.5], r"\[0, 1\]"),
        ("hard_G", ["hard"], "bool"),
        ("group_N", [1], "group_N"),
    ]:
        with pytest.raises(ValueError, match=match):
            boundary_relative_rewards(**(args | {key: bad}))  # type: ignore[arg-type]


# ---- reference-guided advantage -------------------------------------------------------------


def test_boundary_reference_rewards_hand_example() -> None:
    # lambda = 0.5, beta = 0.5. The cheap boundary's own cost has C_norm 0, the expensive
    # one's C_norm 1.
    # task 0 Hard (p_s 0.2, p_l 1): cheap 0.2 * 1.5 = 0.3, expensive 1 * 1.5 - 0.5 = 1.0 -> 1.0
    # task 1 Easy (p_s 0.8, p_l 1): cheap 0.8, expensive 1 - 0.5 = 0.5 -> 0.8
    # task 2 Intractable (0, 0): cheap 0, expensive -0.5 -> 0
    got = boundary_reference_rewards(
        cheap_success_G=[0.2, 0.8, 0.0],
        expensive_success_G=[1.0, 1.0, 0.0],
        cheap_cost_G=[2.0, 1.0, 3.0],
        expensive_cost_G=[10.0, 5.0, 6.0],
        hard_G=np.array([True, False, False]),
        cost_weight=0.5,
        hard_bonus=0.5,
    )
    assert got.tolist() == pytest.approx([1.0, 0.8, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        boundary_reference_rewards(
            [math.nan], [1.0], [1.0], [2.0], np.array([True]), cost_weight=0.5, hard_bonus=0.5
        )


def test_reference_guided_advantage_rules_out_cheap_failure() -> None:
    """On a Hard task, rollouts that stay cheap and fail: plain GRPO over the group gives the
    always-cheap failure zero advantage (all alike) or a positive one (it is the cheapest
    failure); with the always-expensive boundary's reward in the baseline it is negative."""
    lam, beta = 0.5, 0.5
    # Boundary runs, K = 5 each: always-cheap 1 of 5 (rate 0.2), always-expensive 5 of 5.
    cheap_rate = boundary_success_rates([1, 0, 0, 0, 0], [0] * 5, 1)
    expensive_rate = boundary_success_rates([1] * 5, [0] * 5, 1)
    (difficulty,) = classify_difficulty(cheap_rate, expensive_rate, 0.5)
    assert difficulty is Difficulty.HARD
    hard_G = np.array([difficulty is Difficulty.HARD])
    cheap_cost_G, expensive_cost_G = np.array([2.0]), np.array([10.0])
    # Reference: max(cheap 0.2 * 1.5 = 0.3, expensive 1.5 - 0.5 = 1.0) = 1.0.
    reference_G = boundary_reference_rewards(
        cheap_rate, expensive_rate, cheap_cost_G, expensive_cost_G, hard_G,
        cost_weight=lam, hard_bonus=beta,
    )  # fmt: skip
    assert reference_G.tolist() == [1.0]

    # Group A: four always-cheap failures (cost 2, C_norm 0): rewards 0, 0, 0, 0.
    # Group B: failures at cost 2, 4, 6, 2: C_norm 0, 0.25, 0.5, 0: rewards 0, -0.125, -0.25, 0.
    rewards = boundary_relative_rewards(
        success_N=[0] * 8,
        cost_N=[2, 2, 2, 2, 2, 4, 6, 2],
        group_N=[0] * 8,
        cheap_cost_G=cheap_cost_G,
        expensive_cost_G=expensive_cost_G,
        hard_G=hard_G,
        cost_weight=lam,
        hard_bonus=beta,
    ).total_N
    group_a, group_b = rewards[:4], rewards[4:]
    assert group_b.tolist() == [0.0, -0.125, -0.25, 0.0]
    one_group = np.zeros(4, np.int64)

    # Plain GRPO: A is constant -> 0; in B the mean is -0.09375, so the cheapest failure (0)
    # sits above it -> positive.
    assert grpo(group_a, one_group).tolist() == [0.0] * 4
    assert grpo(group_b, one_group)[0] > 0

    # Reference-guided, eps 0. A: values 0, 0, 0, 0, 1 -> mean 0.2, var (4 * 0.04 + 0.64) / 5
    # = 0.16, std 0.4 -> (0 - 0.2) / 0.4 = -0.5 each.
    a = reference_guided_advantages(group_a, one_group, reference_G, eps=0.0)
    assert a.tolist() == pytest.approx([-0.5] * 4)
    # B: values 0, -0.125, -0.25, 0, 1 -> mean 0.625 / 5 = 0.125; deviations -0.125, -0.25,
    # -0.375, -0.125, 0.875; squares sum 0.015625 + 0.0625 + 0.140625 + 0.015625 + 0.765625
    # = 1.0 -> var 0.2, std sqrt(0.2). Every failure is negative, the cheap one included.
    b = reference_guided_advantages(group_b, one_group, reference_G, eps=0.0)
    expected = np.array([-0.125, -0.25, -0.375, -0.125]) / math.sqrt(0.2)
    assert b.tolist() == pytest.approx(expected.tolist())
    assert b[0] < 0


def test_reference_weight_counts_the_reference_as_several_members() -> None:
    # Rewards 0, 1, reference 1 with weight 3: values 0, 1, 1, 1, 1 -> mean 0.8,
    # var (0.64 + 4 * 0.04) / 5 = 0.16, std 0.4 -> (0 - 0.8) / 0.4 = -2, (1 - 0.8) / 0.4 = 0.5.
    got = reference_guided_advantages([0.0, 1.0], [0, 0], [1.0], reference_weight=3.0, eps=0.0)
    assert got.tolist() == pytest.approx([-2.0, 0.5])


def test_reference_guided_single_member_and_missing_reference() -> None:
    # Group 0, one member 0.5, reference 1.5: values 0.5, 1.5 -> mean 1, std 0.5 -> -1.
    # Group 1, one member, reference NaN: plain GRPO of one -> 0.
    # Group 2, rewards 1, 0, reference NaN: plain GRPO -> +1, -1 (std 0.5, eps 0).
    got = reference_guided_advantages(
        [0.5, 0.7, 1.0, 0.0], [0, 1, 2, 2], [1.5, math.nan, math.nan], eps=0.0
    )
    assert got.tolist() == pytest.approx([-1.0, 0.0, 1.0, -1.0])
    assert grpo(np.array([0.5]), np.array([0]), eps=0.0).tolist() == [0.0]


def test_reference_guided_constant_group_is_zero_and_ties_share_an_advantage() -> None:
    # All equal, reference included: zero, even with eps 0, although the mean (0.7 + 0.7 +
    # 0.7) / 3 is 0.7 off by ~1e-16 in float64, and a "std > 0" test would divide that
    # rounding error by a std of the same size (-> +-1).
    got = reference_guided_advantages([0.7, 0.7], [0, 0], [0.7], eps=0.0)
    assert got.tolist() == [0.0, 0.0]
    # Tied rewards get the same advantage: 1, 1, 0 with reference 0 -> mean 0.5, std 0.5.
    tied = reference_guided_advantages([1.0, 1.0, 0.0], [0, 0, 0], [0.0], eps=0.0)
    assert tied.tolist() == pytest.approx([1.0, 1.0, -1.0])


def test_reference_weight_zero_is_plain_grpo() -> None:
    rewards = np.array([0.3, -0.2, 1.0, 0.5, 0.5])
    group = np.array([0, 0, 0, 1, 1])
    got = reference_guided_advantages(rewards, group, [2.0, -1.0], reference_weight=0.0)
    assert got.tolist() == pytest.approx(grpo(rewards, group).tolist())


def test_reference_guided_refuses_bad_groups() -> None:
    with pytest.raises(ValueError, match="group_N"):
        reference_guided_advantages([1.0], [1], [0.0])
    with pytest.raises(ValueError, match="reference_weight"):
        reference_guided_advantages([1.0], [0], [0.0], reference_weight=-1.0)


# ---- configs --------------------------------------------------------------------------------


def test_configs_round_trip_and_reference_union() -> None:
    bopo = BopoConfig.model_validate({"cost_weight": 0.3, "reference": {"kind": "none"}})
    assert isinstance(bopo.reference, NoReference)
    assert BopoConfig.model_validate(bopo.model_dump(mode="json")) == bopo
    assert isinstance(BopoConfig().reference, BestBoundaryReference)
    adapter: TypeAdapter[ReferenceConfig] = TypeAdapter(ReferenceConfig)
    assert adapter.validate_python({"kind": "best_boundary", "weight": 2}).weight == 2.0  # type: ignore[union-attr]

    boundary = BoundaryConfig.model_validate({"tasks_per_difficulty": {"hard": 3}})
    assert boundary.tasks_per_difficulty == {Difficulty.HARD: 3}
    assert BoundaryConfig.model_validate(boundary.model_dump(mode="json")) == boundary


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (BoundaryConfig, {"solve_threshold": 0.0}),
        (BoundaryConfig, {"tasks_per_difficulty": {"medium": 1}}),
        (BoundaryConfig, {"tasks_per_difficulty": {"hard": -1}}),
        (BopoConfig, {"cost_weight": -1}),
        (BopoConfig, {"reference": {"kind": "none", "weight": 1.0}}),
        (BopoConfig, {"lambda": 0.5}),
    ],
)
def test_configs_reject_bad_values(model: type[BoundaryConfig | BopoConfig], data: object) -> None:
    with pytest.raises(ValidationError):
        model.model_validate(data)
