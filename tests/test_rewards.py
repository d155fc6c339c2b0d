"""Turn-level reward components against hand-worked examples, and their properties: costs are
never rewarded, the EAPO discount reproduces the paper's per-round reward, GDPO normalises each
component within its group."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.agent.records import Episode, StopReason, ToolCall, ToolResult, Turn, TurnSignals
from turnrl.rl.rewards import (
    COMPONENTS,
    RewardConfig,
    coverage_rewards,
    decoupled_returns,
    decoupled_turn_rewards,
    eapo_rewards,
    episode_return,
    group_rewards,
    info_gain_rewards,
    mark_gold_seen,
    otc_rewards,
    otc_target,
    otc_tool_reward,
    saturation_rewards,
    turn_rewards,
)
from turnrl.tasks.grading import normalize_answer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def turn(
    index: int,
    calls: int = 0,
    *,
    costs: list[dict[str, float]] | None = None,
    items: list[list[str]] | None = None,
    texts: list[str] | None = None,
    answer: str | None = None,
    format_error: str | None = None,
    signals: dict[str, float] | None = None,
) -> Turn:
    """A turn with `calls` tool calls; call i's result has `costs[i]`, `items[i]`, `texts[i]`."""
    return Turn(
        index=index,
        prompt_ids=[1] if index == 0 else [],
        completion_ids=[2, 3],
        completion_logprobs=[-0.1, -0.2],
        observation_ids=[4],
        text="",
        finish_reason="stop",
        tool_calls=[
            ToolCall(id=f"t{index}c{i}", name="search", raw="{}", arguments={})
            for i in range(calls)
        ],
        tool_results=[
            ToolResult(
                call_id=f"t{index}c{i}",
                text=texts[i] if texts else "",
                cost=costs[i] if costs else {"calls": 1.0},
                items=items[i] if items else [],
            )
            for i in range(calls)
        ],
        answer=answer,
        format_error=format_error,
        # gold_seen given as 1.0/0.0 reads as the flag it is.
        signals=TurnSignals(
            **{k: v >= 0.5 if k == "gold_seen" else v for k, v in (signals or {}).items()}
        ),
    )


def episode(
    turns: list[Turn],
    outcome: dict[str, float] | None = None,
    group: str = "g",
    name: str = "e",
    gold_prob_initial: float | None = None,
) -> Episode:
    return Episode(
        episode_id=name,
        task_id="t",
        group_id=group,
        stop_reason=StopReason.ANSWERED,
        # Graded (a wrong answer) unless a test says otherwise: rewards never read a missing
        # metric as 0.
        outcome=outcome if outcome is not None else {"f1": 0.0, "correct": 0.0},
        turns=turns,
        gold_prob_initial=gold_prob_initial,
    )


def calls_episode(
    n_calls: int, outcome: dict[str, float], group: str = "g", name: str = "e"
) -> Episode:
    """One call per turn, then an answer turn."""
    turns = [turn(i, 1) for i in range(n_calls)] + [turn(n_calls, answer="x")]
    return episode(turns, outcome, group, name)


# --- config ----------------------------------------------------------------------------


def test_existing_configs_load_and_give_the_same_numbers() -> None:
    """Regression lock: the demo's `rewards` section keeps loading, and outcome/format/
    tool_cost keep their values (do not change without a decision)."""
    demo = yaml.safe_load((EXAMPLES / "demo.yaml").read_text())["rewards"]
    cfg = RewardConfig.model_validate(demo)
    assert cfg.weights == {"outcome": 1.0, "format": 0.2, "tool_cost": 0.02}
    ep = episode([turn(0, 1, format_error="void"), turn(1, 2), turn(2, answer="x")], {"f1": 0.8})
    rewarded = group_rewards([ep], cfg)[0]
    assert [t.rewards for t in rewarded.turns] == [
        {"outcome": 0.0, "format": -1.0, "tool_cost": -1.0},
        {"outcome": 0.0, "format": 0.0, "tool_cost": -2.0},
        {"outcome": 0.8, "format": 0.0, "tool_cost": 0.0},
    ]
    # 0.8 - 0.2 * 1 - 0.02 * (1 + 2) = 0.54
    assert math.isclose(episode_return(rewarded, cfg.weights), 0.54, abs_tol=1e-12)
    assert turn_rewards(ep, cfg) == rewarded


def test_config_rejects_unknown_components_and_negative_prices() -> None:
    with pytest.raises(ValueError, match="unknown reward components"):
        RewardConfig(weights={"outcome": 1.0, "bonus": 1.0})
    with pytest.raises(ValueError, match="cost weights must be >= 0"):
        RewardConfig(cost_weights={"calls": -1.0})
    cfg = RewardConfig(weights={"outcome": 1.0, "coverage": 0.0})
    # Base components are always filled; others when named (even at weight 0).
    assert cfg.computed() == ["outcome", "format", "tool_cost", "coverage"]
    assert RewardConfig.model_validate(cfg.model_dump()) == cfg
    assert not RewardConfig().decoupled
    assert RewardConfig.model_validate({"decoupled": True}).decoupled


# --- per-episode components --------------------------------------------------------------


def test_tool_cost_weighs_heterogeneous_cost_vectors() -> None:
    prices = {"calls": 0.1, "time_s": 0.5, "money_usd": 10.0}
    ep = episode(
        [
            turn(0, 2, costs=[{"calls": 1, "time_s": 2.0}, {"calls": 1, "money_usd": 0.03}]),
            turn(1, 1, costs=[{"calls": 1, "human_attention": 5.0}]),
        ]
    )
    # turn 0: (0.1 * 1 + 0.5 * 2) + (0.1 * 1 + 10 * 0.03) = 1.1 + 0.4 = 1.5
    # turn 1: 0.1 * 1, and `human_attention` has no price: 0.1
    cost = group_rewards([ep], RewardConfig(cost_weights=prices))[0]
    assert [t.rewards["tool_cost"] for t in cost.turns] == pytest.approx([-1.5, -0.1])


def test_info_gain_hand_example() -> None:
    ep = episode(
        [
            turn(0, 1, signals={"gold_prob": 0.3}),
            turn(1, 1, signals={"gold_prob": 0.25}),
            turn(2, answer="x", signals={"gold_prob": 0.9}),
        ],
        gold_prob_initial=0.1,
    )
    # 0.3 - 0.1 = 0.2; 0.25 - 0.3 = -0.05; the answer turn's credit is the outcome: 0.
    gains = info_gain_rewards(ep)
    assert gains == pytest.approx([0.2, -0.05, 0.0])
    # Telescopes: 0.2 - 0.05 = 0.15 = 0.25 - 0.1.
    assert math.isclose(sum(gains), 0.25 - 0.1)
    # The answer turn needs no probability.
    no_last = ep.turns[2].model_copy(update={"signals": TurnSignals()})
    assert info_gain_rewards(ep.model_copy(update={"turns": [*ep.turns[:2], no_last]})) == gains


def test_a_metric_the_grader_did_not_emit_is_an_error_naming_the_episode() -> None:
    """Regression lock (issue 11): humaneval runs once trained on `f1`, which its grader never
    emits, and every episode silently scored 0. Do not relax without a decision."""
    graded = episode([turn(0, answer="x")], {"correct": 1.0}, name="he/0")
    with pytest.raises(ValueError, match=r"episode he/0: no outcome metric 'f1'.*\['correct'\]"):
        group_rewards([graded], RewardConfig(weights={"outcome": 1.0}, outcome_metric="f1"))
    ungraded = episode([turn(0, answer="x")], {}, name="raw")
    with pytest.raises(ValueError, match=r"episode raw: no outcome metric 'correct'.*not graded"):
        group_rewards([ungraded], RewardConfig())
    assert group_rewards([graded], RewardConfig())[0].turns[0].rewards["outcome"] == 1.0


def test_info_gain_without_signals_says_what_to_compute() -> None:
    ep = episode([turn(0, 1), turn(1, answer="x")])
    cfg = RewardConfig(weights={"outcome": 1.0, "info_gain": 1.0})
    with pytest.raises(ValueError, match=r"gold_prob_initial.*gold_probabilities"):
        group_rewards([ep], cfg)
    half = episode([turn(0, 1), turn(1, answer="x")], gold_prob_initial=0.1)
    with pytest.raises(ValueError, match=r"turn 0.*gold_prob"):
        group_rewards([half], cfg)


def test_otc_tool_reward_matches_the_paper() -> None:
    assert otc_tool_reward(0, 0) == 1.0
    # n = 0: cos(m pi / (2m + c)); m = 1, c = 1: cos(pi / 3) = 0.5
    assert otc_tool_reward(1, 0, c=1.0) == pytest.approx(0.5)
    # m = n: f = 2n^2 / 2n = n, sin(pi / 2) = 1
    assert otc_tool_reward(3, 3) == pytest.approx(1.0)
    # m = 4, n = 2: f = 16 / 6 = 8/3, sin(8/3 * pi / 4) = sin(2 pi / 3) = sqrt(3) / 2
    assert otc_tool_reward(4, 2) == pytest.approx(math.sqrt(3) / 2)
    # m = 0, n = 2: f = 0, sin(0) = 0 (too few calls)
    assert otc_tool_reward(0, 2) == 0.0


def test_otc_hand_example() -> None:
    group = [
        calls_episode(2, {"f1": 1.0, "correct": 1.0}, name="a"),
        calls_episode(4, {"f1": 1.0, "correct": 1.0}, name="b"),
        calls_episode(1, {"f1": 0.0, "correct": 0.0}, name="c"),
        calls_episode(1, {"f1": 0.5, "correct": 0.0}, name="d"),
    ]
    # Target n = fewest calls among the correct a, b: 2.
    assert otc_target(group, "correct") == 2
    cfg = RewardConfig(weights={"outcome": 1.0, "otc": 1.0})
    out = group_rewards(group, cfg)
    last = [e.turns[-1].rewards["otc"] for e in out]
    # a: m = n -> r_tool = 1 -> 1 * (1 - 1) = 0
    # b: r_tool(4, 2) = sqrt(3)/2 -> 1 * (0.866 - 1) = -0.134
    # c: wrong, r_phi = 0 -> 0: calling more or less is not shaped for a wrong answer
    # d: r_tool(1, 2): f = 4/3, sin(pi/3) = sqrt(3)/2 -> 0.5 * (sqrt(3)/2 - 1) = -0.067
    r = math.sqrt(3) / 2
    assert last == pytest.approx([0.0, r - 1, 0.0, 0.5 * (r - 1)])
    assert all(t.rewards["otc"] == 0.0 for e in out for t in e.turns[:-1])
    # With equal weights outcome + otc is the paper's multiplicative reward r_phi * r_tool.
    assert episode_return(out[1], cfg.weights) == pytest.approx(1.0 * r)


def test_otc_target_is_per_group_and_absent_without_a_correct_episode() -> None:
    eps = [
        calls_episode(3, {"f1": 1.0, "correct": 1.0}, group="x", name="x1"),
        calls_episode(1, {"f1": 1.0, "correct": 1.0}, group="y", name="y1"),
        calls_episode(3, {"f1": 1.0, "correct": 1.0}, group="y", name="y2"),
        calls_episode(2, {"f1": 0.4, "correct": 0.0}, group="z", name="z1"),
    ]
    out = group_rewards(eps, RewardConfig(weights={"otc": 1.0}))
    otc = [e.turns[-1].rewards["otc"] for e in out]
    # x: alone and correct -> its own target; y: target 1, y2 uses 3 calls: f = 6/4 = 1.5,
    # sin(1.5 pi / 2) = sqrt(2)/2; z: nobody correct -> no target -> 0.
    assert otc == pytest.approx([0.0, 0.0, math.sqrt(2) / 2 - 1, 0.0])
    assert otc_rewards(eps[3], None, "f1", 1.0) == [0.0, 0.0, 0.0]


def test_saturation_hand_example() -> None:
    ep = episode(
        [
            turn(0, 1, signals={"gold_prob": 0.6, "gold_seen": 0.0}),
            turn(1, 2, signals={"gold_prob": 0.3, "gold_seen": 1.0}),
            turn(2, 1, signals={"gold_prob": 0.2, "gold_seen": 0.0}),
            turn(3, answer="x", signals={"gold_seen": 0.0}),
        ],
        gold_prob_initial=0.1,
    )
    # threshold 0.5: turn 0 starts at p = 0.1 -> 0; turn 1 starts at p = 0.6 -> 2 calls -> -2;
    # turn 2 starts at p = 0.3, but turn 1 showed the gold answer -> -1; turn 3 makes no call.
    assert saturation_rewards(ep, 0.5) == [0.0, -2.0, -1.0, 0.0]
    # Without the probability criterion only `gold_seen` counts: turn 1 is not penalised.
    assert saturation_rewards(ep, None) == [0.0, 0.0, -1.0, 0.0]
    bare = episode([turn(0, 1), turn(1, answer="x")])
    with pytest.raises(ValueError, match=r"gold_seen.*mark_gold_seen"):
        saturation_rewards(bare, 0.5)


def test_mark_gold_seen_matches_whole_normalised_words() -> None:
    ep = episode(
        [
            turn(0, 1, texts=["Its capital is PARIS."]),
            turn(1, 1, texts=["The Parisian metro"]),
            turn(2, answer="Paris"),
        ]
    )
    marked = mark_gold_seen(ep, ["Paris", ""], normalize_answer)
    assert [t.signals.gold_seen for t in marked.turns] == [True, False, False]


def test_eapo_hand_example() -> None:
    ep = episode([turn(0, 1), turn(1, 1), turn(2, answer="x")], {"f1": 0.8})
    # gamma = 0.5, T = 3, R = 0.8:
    # t=0: -(1 - 0.5) * 0.5^(3-2-0) * 0.8 = -0.5 * 0.5 * 0.8 = -0.2
    # t=1: -(1 - 0.5) * 0.5^0 * 0.8 = -0.4;  t=2 (last): 0
    assert eapo_rewards(ep, "f1", 0.5) == pytest.approx([-0.2, -0.4, 0.0])
    # outcome + eapo: episode return 0.8 - 0.6 = 0.2 = 0.5^2 * 0.8, IterResearch's reward for
    # the first of three rounds.
    out = group_rewards([ep], RewardConfig(weights={"outcome": 1.0, "eapo": 1.0}, eapo_gamma=0.5))
    assert episode_return(out[0], {"outcome": 1.0, "eapo": 1.0}) == pytest.approx(0.2)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 12),
    st.floats(0.01, 1.0),
    st.floats(0.0, 1.0),
)
def test_eapo_returns_to_go_are_the_discounted_terminal_reward(
    n_turns: int, gamma: float, score: float
) -> None:
    ep = episode([turn(i, 1) for i in range(n_turns)], {"f1": score})
    eapo = eapo_rewards(ep, "f1", gamma)
    for t in range(n_turns):
        to_go = score + sum(eapo[t:])
        assert math.isclose(to_go, gamma ** (n_turns - 1 - t) * score, abs_tol=1e-9)
        assert eapo[t] <= 0.0


def test_coverage_hand_example() -> None:
    ep = episode(
        [
            turn(0, 1, items=[["a", "b"]]),
            turn(1, 2, items=[["b", "c"], ["c"]]),
            turn(2, 1, items=[["a"]]),
            turn(3, answer="x"),
        ]
    )
    # decay 0.5: a is the 1st distinct passage (1), b the 2nd (0.5) -> 1.5; b again 0, c the
    # 3rd (0.25), c again 0 -> 0.25; a again -> 0; no call -> 0.
    assert coverage_rewards(ep, 0.5) == [1.5, 0.25, 0.0, 0.0]
    # decay 1: one per new passage.
    assert coverage_rewards(ep, 1.0) == [2.0, 1.0, 0.0, 0.0]


# --- costs are never rewarded --------------------------------------------------------------

_COST = st.dictionaries(
    st.sampled_from(["calls", "time_s", "money_usd", "tokens", "human_attention"]),
    st.floats(-100, 100, allow_nan=False),
    max_size=4,
)


@st.composite
def _episodes(draw: Any) -> list[Episode]:
    out = []
    for n in range(draw(st.integers(1, 5))):
        n_turns = draw(st.integers(1, 5))
        probs = draw(st.lists(st.floats(0, 1), min_size=n_turns + 1, max_size=n_turns + 1))
        turns = []
        for i in range(n_turns):
            k = draw(st.integers(0, 3))
            signals = {"gold_prob": probs[i + 1], "gold_seen": float(draw(st.booleans()))}
            turns.append(
                turn(
                    i,
                    k,
                    costs=[draw(_COST) for _ in range(k)],
                    answer="x" if i == n_turns - 1 and draw(st.booleans()) else None,
                    signals=signals,
                )
            )
        correct = draw(st.booleans())
        score = 1.0 if correct else draw(st.sampled_from([0.0, 0.3]))
        out.append(
            episode(
                turns,
                {"f1": score, "correct": float(correct)},
                group=draw(st.sampled_from(["g1", "g2"])),
                name=f"e{n}",
                gold_prob_initial=probs[0],
            )
        )
    return out


@settings(max_examples=200, deadline=None)
@given(
    _episodes(),
    st.dictionaries(
        st.sampled_from(["calls", "time_s", "money_usd", "tokens"]), st.floats(0, 10), max_size=4
    ),
)
def test_costs_are_never_rewarded(eps: list[Episode], prices: dict[str, float]) -> None:
    cfg = RewardConfig(weights=dict.fromkeys(COMPONENTS, 1.0), cost_weights=prices)
    out = group_rewards(eps, cfg)
    assert [e.episode_id for e in out] == [e.episode_id for e in eps]
    for e in out:
        for t in e.turns:
            assert set(t.rewards) == set(COMPONENTS)
            assert t.rewards["tool_cost"] <= 0.0
            assert t.rewards["otc"] <= 0.0
            assert t.rewards["saturation"] <= 0.0
            assert t.rewards["eapo"] <= 0.0
            assert t.rewards["coverage"] >= 0.0
            if t.n_tool_calls == 0:
                assert t.rewards["tool_cost"] == 0.0 and t.rewards["saturation"] == 0.0
        if e.outcome["f1"] == 0.0:
            # A wrong episode gains nothing from OTC, whatever its number of calls.
            assert all(t.rewards["otc"] == 0.0 for t in e.turns)


# --- GDPO -------------------------------------------------------------------------------


def test_decoupled_returns_hand_example() -> None:
    def ep(group: str, name: str, outcome: float, void: bool) -> Episode:
        return episode(
            [turn(0, 1, format_error="void" if void else None), turn(1, answer="x")],
            {"f1": outcome},
            group,
            name,
        )

    eps = [ep("g1", "a", 1.0, False), ep("g1", "b", 0.0, True)]
    eps += [ep("g2", "c", 1.0, True), ep("g2", "d", 1.0, False)]
    cfg = RewardConfig(weights={"outcome": 1.0, "format": 1.0}, cost_weights={})
    rewarded = group_rewards(eps, cfg)
    # g1: outcome 1, 0 -> mean .5, std .5 -> +1, -1; format 0, -1 -> mean -.5, std .5 -> +1, -1.
    #     sums: 2, -2.
    # g2: outcome 1, 1 is constant -> 0, 0; format -1, 0 -> -1, +1. sums: -1, +1.
    # batch: [2, -2, -1, 1], mean 0, std sqrt((4 + 4 + 1 + 1) / 4) = sqrt(2.5).
    expected = [s / math.sqrt(2.5) for s in (2.0, -2.0, -1.0, 1.0)]
    assert decoupled_returns(rewarded, cfg) == pytest.approx(expected, abs=1e-5)
    # GRPO on the summed reward would instead see g1: 1, -1 -> +1, -1 (the two components
    # collapse into one difference); GDPO keeps a's two advantages apart.
    per_turn = decoupled_turn_rewards(rewarded, cfg)
    assert [sum(r) for r in per_turn] == pytest.approx(expected, abs=1e-5)
    # Where rewards land is kept. b: turn 0 holds its void turn, format -1 -> -1 / .5 = -2;
    # turn 1 (last) holds the centred totals: outcome (0 - .5) / .5 = -1, format
    # (0 - (-.5)) / .5 = +1 -> 0. Then / sqrt(2.5) (batch mean 0).
    assert per_turn[1] == pytest.approx([-2 / math.sqrt(2.5), 0.0], abs=1e-5)
    with pytest.raises(ValueError, match="group_rewards"):
        decoupled_returns(eps, cfg)


@settings(max_examples=100, deadline=None)
@given(_episodes())
def test_decoupled_returns_have_zero_mean_per_group(eps: list[Episode]) -> None:
    cfg = RewardConfig(weights={"outcome": 1.0, "tool_cost": 0.5, "info_gain": 1.0})
    rewarded = group_rewards(eps, cfg)
    adv = decoupled_returns(rewarded, cfg)
    per_turn = decoupled_turn_rewards(rewarded, cfg)
    for g in {e.group_id for e in eps}:
        members = [a for a, e in zip(adv, eps, strict=True) if e.group_id == g]
        assert abs(sum(members)) < 1e-6 * max(1.0, max(abs(a) for a in members))
    for a, row in zip(adv, per_turn, strict=True):
        assert math.isclose(sum(row), a, rel_tol=1e-9, abs_tol=1e-9)
