"""The learned per-step router (`turnrl.rl.step_router`): turn features on hand-built views,
logged routes that agree with the bandit's probabilities, greedy evaluation, rewards of the
logged decisions worked out by hand, and a router trained on a constructed log that learns
where the cheap model is enough and where the expensive one pays for itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

from turnrl.agent.records import (
    GRADER_ERROR,
    Episode,
    Route,
    StopReason,
    ToolCall,
    ToolErrorKind,
    ToolResult,
    Turn,
)
from turnrl.agent.routing import RouteView
from turnrl.rl.bandit import BanditRouter
from turnrl.rl.bandit_config import (
    BanditRouterConfig,
    EpsilonGreedyConfig,
    LearnedRouterConfig,
    SoftmaxConfig,
)
from turnrl.rl.step_router import (
    FEATURES,
    LearnedStepRouter,
    episode_reward,
    step_decisions,
    trained_router,
    turn_features,
    usd_scale,
)

ARMS = ("cheap", "expensive")


def _turn(
    index: int,
    calls: int = 0,
    errors: int = 0,
    format_error: str | None = None,
    logprobs: tuple[float, ...] = (-0.5,),
    foreign: bool = False,
    tokens_left: int = 0,
    route: Route | None = None,
) -> Turn:
    """A turn with `calls` tool calls, the first `errors` of which failed."""
    tool_calls = [ToolCall(id=f"t{index}c{j}", name="search", raw="{}") for j in range(calls)]
    results = [
        ToolResult(call_id=c.id, text="x", error=ToolErrorKind.TOOL_ERROR if j < errors else None)
        for j, c in enumerate(tool_calls)
    ]
    return Turn(
        index=index,
        prompt_ids=[],
        completion_ids=[1] * len(logprobs),
        completion_logprobs=list(logprobs),
        observation_ids=[],
        text="",
        finish_reason="stop",
        tool_calls=tool_calls,
        tool_results=results,
        format_error=format_error,
        foreign=foreign,
        tokens_left=tokens_left,
        route=route,
    )


def _view(
    turns: list[Turn],
    cost: dict[str, float] | None = None,
    limits: dict[str, float] | None = None,
    context_tokens: int = 100,
    max_turns: int = 4,
) -> RouteView:
    return RouteView("task", len(turns), turns, cost or {}, limits or {}, context_tokens, max_turns)


def _features(view: RouteView) -> dict[str, float]:
    values = turn_features(view)
    assert len(values) == len(FEATURES) and all(math.isfinite(v) for v in values)
    return dict(zip(FEATURES, values, strict=True))


def test_features_of_a_mid_episode_view() -> None:
    turns = [
        _turn(0, calls=1, logprobs=(-0.2, -0.4), tokens_left=500),
        _turn(1, calls=2, errors=1, logprobs=(-0.5, -1.5), tokens_left=100),
    ]
    view = _view(
        turns,
        cost={"model_usd": 0.3, "turns:expensive": 1.0, "time_s": 5.0},
        limits={"model_usd": 1.0, "turns:expensive": 2.0},
        context_tokens=300,
    )
    assert _features(view) == pytest.approx(
        {
            "turn_fraction": 0.5,  # turn 2 of 4
            "usd_left": 0.7,  # (1.0 - 0.3) / 1.0
            "budget_left": 0.5,  # min(0.7, (2 - 1) / 2); time_s has no limit
            "last_called_tools": 1.0,
            "last_tool_error": 1.0,  # one of turn 1's two results
            "last_format_error": 0.0,
            "last_foreign": 0.0,
            "policy_logprob": -1.0,  # mean of turn 1's (-0.5, -1.5)
            "tool_calls": 0.75,  # (1 + 2) calls / 4 turns
            "context_used": 0.75,  # 300 / (300 + 100 left)
        }
    )


def test_features_after_a_foreign_malformed_turn_over_budget() -> None:
    turns = [
        _turn(0, calls=4, logprobs=(-7.0, -9.0), tokens_left=400),
        _turn(1, format_error="bad call", logprobs=(0.0,), foreign=True, tokens_left=100),
    ]
    view = _view(
        turns, cost={"model_usd": 1.2}, limits={"model_usd": 1.0}, context_tokens=900, max_turns=3
    )
    assert _features(view) == pytest.approx(
        {
            "turn_fraction": 2 / 3,
            "usd_left": 0.0,  # spent past the limit: clipped, not -0.2
            "budget_left": 0.0,
            "last_called_tools": 0.0,
            "last_tool_error": 0.0,
            "last_format_error": 1.0,
            "last_foreign": 1.0,
            # the foreign turn's logprob 0.0 is not the policy's; its own turn 0 had mean -8,
            # floored at -5
            "policy_logprob": -5.0,
            "tool_calls": 1.0,  # 4 calls / 3 turns, capped
            "context_used": 0.9,  # 900 / (900 + 100)
        }
    )


def test_features_at_the_first_turn_and_of_degenerate_logprobs() -> None:
    first = _features(_view([]))
    # Unbounded budget: fractions left are 1; nothing else is known yet.
    assert first == {name: 0.0 for name in FEATURES} | {"usd_left": 1.0, "budget_left": 1.0}
    nan = _features(_view([_turn(0, logprobs=(float("nan"), -0.1))]))
    assert nan["policy_logprob"] == -5.0
    # A zero limit leaves nothing; an unlimited model_usd with another bounded kind is 1.
    zero = _features(_view([], cost={"calls": 1}, limits={"calls": 0.0}))
    assert (zero["usd_left"], zero["budget_left"]) == (1.0, 0.0)


def _fitted_bandit(exploration: EpsilonGreedyConfig | SoftmaxConfig) -> BanditRouter:
    """Cheap is good after a clean turn, expensive after a tool error (rewards 1 and 0)."""
    cfg = BanditRouterConfig(arms=ARMS, exploration=exploration)
    ok = turn_features(_view([_turn(0, calls=1)]))
    err = turn_features(_view([_turn(0, calls=1, errors=1)]))
    x = np.array([ok, ok, err, err] * 5)
    arms = np.array([0, 1, 0, 1] * 5)
    rewards = np.array([1.0, 0.0, 0.0, 1.0] * 5)
    return BanditRouter.fit(cfg, x, arms, rewards)


@pytest.mark.parametrize(
    "exploration",
    [EpsilonGreedyConfig(epsilon=0.2), SoftmaxConfig(temperature=0.5, floor=0.05)],
)
def test_logged_routes_agree_with_the_bandit(
    exploration: EpsilonGreedyConfig | SoftmaxConfig,
) -> None:
    bandit = _fitted_bandit(exploration)
    router = LearnedStepRouter(bandit, np.random.default_rng(0))
    view = _view([_turn(0, calls=1, errors=1)])
    x = turn_features(view)
    expected = bandit.probabilities_N_A(np.array([x]))[0]
    counts = dict.fromkeys(ARMS, 0)
    n = 2000
    for _ in range(n):
        route = router.choose(view)
        assert route.router == "learned"
        assert route.features == list(x)
        assert list(route.probabilities) == list(ARMS)
        assert route.probabilities == pytest.approx(dict(zip(ARMS, expected, strict=True)))
        assert sum(route.probabilities.values()) == pytest.approx(1.0)
        assert min(route.probabilities.values()) > 0
        assert route.propensity == route.probabilities[route.model] > 0
        counts[route.model] += 1
    # The draws follow the logged probabilities (4.5 binomial standard errors at most).
    p0 = float(expected[0])
    assert abs(counts["cheap"] / n - p0) < 4.5 * math.sqrt(p0 * (1 - p0) / n)


def test_greedy_router_takes_greedy_arm_and_logs_it_as_certain() -> None:
    bandit = _fitted_bandit(EpsilonGreedyConfig(epsilon=0.5))
    router = LearnedStepRouter(bandit, np.random.default_rng(0), greedy=True)
    views = [
        _view([_turn(0, calls=1)]),
        _view([_turn(0, calls=1, errors=1)]),
        _view([_turn(0, calls=2, errors=1, logprobs=(-2.0,))], context_tokens=50),
        _view([]),
    ]
    greedy = bandit.greedy_N(np.array([turn_features(v) for v in views]))
    chosen = []
    for view, i in zip(views, greedy, strict=True):
        for _ in range(20):  # greedy: the same arm every time, not a draw
            route = router.choose(view)
            assert route.model == ARMS[i]
            assert route.propensity == 1.0
            assert route.probabilities == {a: float(a == ARMS[i]) for a in ARMS}
        chosen.append(route.model)
    assert chosen[:2] == ["cheap", "expensive"]  # the oracle was fitted to tell them apart


def test_refuses_a_bandit_of_another_feature_count() -> None:
    with pytest.raises(ValueError, match="turn features"):
        LearnedStepRouter(
            BanditRouter.new(BanditRouterConfig(arms=ARMS), 3), np.random.default_rng(0)
        )
    router = LearnedStepRouter.new(LearnedRouterConfig(), ARMS, np.random.default_rng(0))
    assert router.bandit.arms == ARMS


def _learned(model: str, features: list[float], propensity: float = 0.5) -> Route:
    return Route(
        model=model,
        router="learned",
        propensity=propensity,
        probabilities={"cheap": 0.5, "expensive": 0.5},
        features=features,
    )


def _episode(
    i: int,
    turns: list[Turn],
    outcome: dict[str, float],
    usd: float,
    stop: StopReason = StopReason.ANSWERED,
) -> Episode:
    return Episode(
        episode_id=f"e{i}",
        task_id=f"q{i}",
        group_id=f"g{i}",
        turns=turns,
        stop_reason=stop,
        outcome=outcome,
        cost={"model_usd": usd, "turns:cheap": 1.0},
    )


def test_step_decisions_reward_each_decision_with_its_episode() -> None:
    f = [0.1] * len(FEATURES)
    fixed = Route(model="cheap", router="fixed")
    episodes = [
        _episode(
            0,
            [
                _turn(0, route=_learned("cheap", f, 0.9)),
                _turn(1, route=fixed),
                _turn(2, route=_learned("expensive", f, 0.1)),
            ],
            {"correct": 1.0, "f1": 0.5},
            usd=0.3,
        ),
        _episode(1, [_turn(0)], {"correct": 1.0}, usd=0.0),  # not routed
        _episode(2, [_turn(0, route=_learned("expensive", f))], {"correct": 0.0}, usd=0.12),
        # a grader bug and a runner error say nothing about the choices: left out
        _episode(3, [_turn(0, route=_learned("cheap", f))], {"correct": 0.0, GRADER_ERROR: 1.0}, 0),
        _episode(4, [_turn(0, route=_learned("cheap", f))], {}, 0.0, StopReason.ERROR),
    ]
    log = step_decisions(episodes, ARMS, cost_weight=0.5, usd_scale=0.6)
    # episode 0: 1 - 0.5 * 0.3 / 0.6 = 0.75 for both its learned decisions (not the fixed
    # one); episode 2: 0 - 0.5 * 0.12 / 0.6 = -0.1
    assert log.rewards_N == pytest.approx([0.75, 0.75, -0.1])
    assert log.arms_N.tolist() == [0, 1, 1]
    assert log.propensities_N == pytest.approx([0.9, 0.1, 0.5])
    assert log.episodes_N.tolist() == [0, 0, 2]
    assert log.features_N_D.shape == (3, len(FEATURES))
    # another success metric: episode 0's f1 is 0.5, so 0.5 - 0.25 = 0.25
    f1 = step_decisions(episodes[:1], ARMS, 0.5, 0.6, success_metric="f1")
    assert f1.rewards_N == pytest.approx([0.25, 0.25])
    with pytest.raises(ValueError, match="no outcome metric 'success'"):
        step_decisions(episodes, ARMS, 0.5, 0.6, success_metric="success")
    empty = step_decisions(episodes[1:2], ARMS, 0.5, 0.6)
    assert empty.features_N_D.shape == (0, len(FEATURES))
    with pytest.raises(ValueError, match="not in"):
        step_decisions(episodes[:1], ("cheap", "big"), 0.5, 0.6)


def test_reward_scale_and_refusals() -> None:
    assert usd_scale({"model_usd": 0.25, "calls": 3}) == 0.25
    assert usd_scale({"calls": 3}) == 1.0
    e = _episode(0, [], {"correct": 1.0}, usd=0.5)
    assert episode_reward(e, "correct", 2.0, 4.0) == pytest.approx(1 - 2 * 0.5 / 4)
    with pytest.raises(ValueError, match="usd_scale"):
        episode_reward(e, "correct", 1.0, 0.0)


def test_trained_router_learns_where_each_model_pays() -> None:
    """After a tool error only the expensive model succeeds (80%, cheap 10%); after a clean
    turn both do (90%), and the cheap one costs less. Rewards (cost_weight 1, usd_scale 1):
    error: cheap 0.1 - 0.01, expensive 0.8 - 0.2; clean: cheap 0.9 - 0.01, expensive 0.9 - 0.2.
    A router with no data ties (picks cheap everywhere); trained on 400 uniformly routed
    episodes it picks expensive after an error and cheap after a clean turn."""
    rng = np.random.default_rng(1)
    rates = {(True, "cheap"): 0.1, (True, "expensive"): 0.8}
    rates |= {(False, "cheap"): 0.9, (False, "expensive"): 0.9}
    usd = {"cheap": 0.01, "expensive": 0.2}
    views = {err: _view([_turn(0, calls=1, errors=int(err))], max_turns=3) for err in (True, False)}
    episodes = []
    for i in range(400):
        err = bool(rng.uniform() < 0.5)
        model = ARMS[int(rng.integers(2))]
        first = _turn(0, calls=1, errors=int(err), route=Route(model="cheap", router="fixed"))
        second = _turn(1, route=_learned(model, list(turn_features(views[err]))))
        success = float(rng.uniform() < rates[(err, model)])
        episodes.append(_episode(i, [first, second], {"correct": success}, usd[model]))
    log = step_decisions(episodes, ARMS, cost_weight=1.0, usd_scale=1.0)
    assert log.arms_N.shape == (400,)
    config = LearnedRouterConfig(ridge=1.0)
    untrained = LearnedStepRouter.new(config, ARMS, np.random.default_rng(0), greedy=True)
    assert {untrained.choose(v).model for v in views.values()} == {"cheap"}
    trained = LearnedStepRouter(
        trained_router(untrained.bandit, log), np.random.default_rng(0), greedy=True
    )
    assert trained.choose(views[True]).model == "expensive"
    assert trained.choose(views[False]).model == "cheap"
