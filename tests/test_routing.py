"""Per-step routing among priced models: exact ids across models, what is trained, the hard
budget at its boundary, the budget the agent sees, and the run config's checks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest
import torch
from fakes import CharTokenizer, EchoTool
from pydantic import ValidationError

from turnrl.agent.budget import Budget
from turnrl.agent.chat import ChatML
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode, Route, StopReason
from turnrl.agent.routing import (
    DelegateRouter,
    DelegateTool,
    FixedRouter,
    RoutedModel,
    RouteView,
    Routing,
    StepRouter,
)
from turnrl.agent.routing_config import Price
from turnrl.agent.runner import EpisodeRunner, EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.config import RunConfig
from turnrl.rl.advantages import turn_batch
from turnrl.rl.batch import build_token_batch
from turnrl.rl.step_router import step_decisions

TOK = CharTokenizer()
SEARCH = '<tool_call>{"name": "echo", "arguments": {"text": "hi"}}</tool_call><|im_end|>'
DELEGATE = '<tool_call>{"name": "delegate", "arguments": {}}</tool_call><|im_end|>'
ANSWER = "<answer>42</answer><|im_end|>"
SPEC = EpisodeSpec(
    episode_id="e", group_id="g", task_id="t", instructions="Be brief.", question="Q?"
)


def scripted(replies: Sequence[str], logprob: float) -> ScriptedPolicy:
    it = iter(replies)
    return ScriptedPolicy(lambda ctx: next(it, ANSWER), TOK, logprob=logprob)


def run(
    small: ScriptedPolicy,
    big: ScriptedPolicy,
    router: StepRouter,
    budget: Budget,
    big_price: Price,
    small_price: Price | None = None,
    clock: Callable[[], float] | None = None,
) -> Episode:
    models = {
        "small": RoutedModel("small", small_price or Price(), None),
        "big": RoutedModel("big", big_price, big),
    }
    kwargs = {} if clock is None else {"clock": clock}
    runner = EpisodeRunner(
        small,
        ChatML(TOK),
        [EchoTool(), DelegateTool("delegate", "big", big_price)],
        budget,
        SamplingParams(max_tokens=64),
        routing=Routing(models, router),
        **kwargs,  # type: ignore[arg-type]
    )
    return asyncio.run(runner.run_episode(SPEC))


BUDGET = Budget(max_context_tokens=100_000, max_new_tokens=64, max_turns=6)


def test_turns_of_two_models_keep_exact_ids_and_only_the_trained_ones_train() -> None:
    small = scripted([SEARCH, DELEGATE], logprob=-0.5)
    big = scripted([ANSWER], logprob=-9.0)
    ep = run(small, big, DelegateRouter("small", "big"), BUDGET, Price(per_call=0.25))
    assert ep.stop_reason == StopReason.ANSWERED and ep.answer == "42"
    assert [t.route.model if t.route else None for t in ep.turns] == ["small", "small", "big"]
    assert [t.foreign for t in ep.turns] == [False, False, True]
    # Each model saw exactly the stored context before its turn, whichever model wrote it.
    ids = ep.token_ids()
    starts = []
    offset = 0
    for turn in ep.turns:
        offset += len(turn.prompt_ids)
        starts.append(offset)
        offset += len(turn.completion_ids) + len(turn.observation_ids)
    assert small.prompts == [ids[: starts[0]], ids[: starts[1]]]
    assert big.prompts == [ids[: starts[2]]]
    assert ep.turns[2].completion_ids == TOK.encode(ANSWER, parse_special=True)
    assert set(ep.turns[2].completion_logprobs) == {-9.0}
    # Costs: the big model's one turn; turns counted per model.
    assert ep.cost["model_usd"] == pytest.approx(0.25)
    assert ep.cost["turns:small"] == 2 and ep.cost["turns:big"] == 1
    # Training: the foreign turn is masked, the trained policy's turns (with its delegate
    # decision) are trained with their own logprobs.
    assert turn_batch([ep], [[0.0, 0.0, 1.0]]).train_N_T.tolist() == [[True, True, False]]
    batch = build_token_batch([ep], [[1.0, 1.0, 1.0]])
    trained = batch.input_ids_B_T[0][batch.loss_mask_B_T[0]].tolist()
    assert trained == ep.turns[0].completion_ids + ep.turns[1].completion_ids
    old = batch.old_logprobs_B_T[0][batch.loss_mask_B_T[0]]
    assert torch.all(old == -0.5)


def test_a_turn_that_lands_exactly_on_the_budget_runs() -> None:
    budget = BUDGET.model_copy(update={"max_cost": {"model_usd": 0.5}})
    big = scripted([SEARCH, ANSWER], logprob=-1.0)
    ep = run(scripted([], -1.0), big, FixedRouter("big"), budget, Price(per_call=0.25))
    assert ep.stop_reason == StopReason.ANSWERED and ep.answer == "42"
    assert ep.cost["model_usd"] == pytest.approx(0.5)


def test_a_turn_that_would_go_just_over_is_refused() -> None:
    budget = BUDGET.model_copy(update={"max_cost": {"model_usd": 0.4999}})
    big = scripted([SEARCH, ANSWER], logprob=-1.0)
    ep = run(scripted([], -1.0), big, FixedRouter("big"), budget, Price(per_call=0.25))
    assert ep.stop_reason == StopReason.BUDGET_EXHAUSTED and ep.answer is None
    assert len(ep.turns) == 1 and len(big.prompts) == 1  # turn 1 never reached the model
    assert ep.error is not None and "turn 1: turn refused" in ep.error
    assert ep.cost["model_usd"] == pytest.approx(0.25)
    # The refused choice is logged: a learned router learns what it cost.
    assert ep.refused_route is not None and ep.refused_route.model == "big"
    learned = Route(model="big", router="learned", propensity=0.5, features=[0.0] * 10)
    logged = ep.model_copy(
        update={
            "refused_route": learned,
            "turns": [t.model_copy(update={"route": learned}) for t in ep.turns],
            "outcome": {"correct": 0.0},
        }
    )
    log = step_decisions([logged], ["small", "big"], cost_weight=1.0, usd_scale=1.0)
    # Two decisions (the turn's, the refused one), each rewarded 0 - 1.0 * 0.25 / 1.0.
    assert log.arms_N.tolist() == [1, 1] and log.rewards_N.tolist() == [-0.25, -0.25]


def test_the_bound_counts_the_turns_token_limit() -> None:
    # $1 per output token, 64 tokens per turn: a turn may cost $64 before it runs, so a $63
    # budget refuses even the first turn, however short the reply would have been.
    price = Price(output_per_mtok=1e6)
    tight = BUDGET.model_copy(update={"max_cost": {"model_usd": 63.0}})
    ep = run(scripted([], -1.0), scripted([ANSWER], -1.0), FixedRouter("big"), tight, price)
    assert ep.stop_reason == StopReason.BUDGET_EXHAUSTED and ep.turns == []
    enough = BUDGET.model_copy(update={"max_cost": {"model_usd": 64.0}})
    ep = run(scripted([], -1.0), scripted([ANSWER], -1.0), FixedRouter("big"), enough, price)
    assert ep.stop_reason == StopReason.ANSWERED
    assert ep.cost["model_usd"] == pytest.approx(len(TOK.encode(ANSWER, parse_special=True)))


def test_a_per_second_price_that_crosses_the_budget_voids_the_answer() -> None:
    ticks = iter(range(1000))
    budget = BUDGET.model_copy(update={"max_cost": {"model_usd": 0.5}})
    # Each turn takes 1 s on this clock (one tick before, one after the model call).
    ep = run(
        scripted([], -1.0),
        scripted([ANSWER], -1.0),
        FixedRouter("big"),
        budget,
        Price(per_second=0.75),
        clock=lambda: float(next(ticks)),
    )
    assert ep.stop_reason == StopReason.BUDGET_EXHAUSTED
    assert ep.answer is None and ep.error is not None and "crossed the budget" in ep.error
    assert ep.turns[0].observation_ids == []


def test_a_bound_on_expensive_turns_refuses_the_second_delegation() -> None:
    budget = BUDGET.model_copy(update={"max_cost": {"turns:big": 1.0}})
    small = scripted([DELEGATE, DELEGATE], logprob=-1.0)
    big = scripted([SEARCH], logprob=-1.0)
    ep = run(small, big, DelegateRouter("small", "big"), budget, Price(per_call=0.1))
    assert [t.route.model if t.route else None for t in ep.turns] == ["small", "big", "small"]
    assert ep.stop_reason == StopReason.BUDGET_EXHAUSTED
    assert ep.error is not None and "turn 3: turn refused" in ep.error


def test_the_agent_sees_its_budget_and_what_is_left() -> None:
    budget = BUDGET.model_copy(update={"max_cost": {"model_usd": 1.0}})
    small = scripted([SEARCH, ANSWER], logprob=-1.0)
    ep = run(
        small, scripted([], -1.0), FixedRouter("small"), budget, Price(), Price(per_call=0.125)
    )
    seen = TOK.decode(small.prompts[1])
    assert "Budget for this task: $1.0000." in seen
    assert "Budget left: $0.8750." in TOK.decode(ep.turns[0].observation_ids)
    shown_off = budget.model_copy(update={"shown": False})
    small = scripted([SEARCH, ANSWER], logprob=-1.0)
    ep = run(small, scripted([], -1.0), FixedRouter("small"), shown_off, Price())
    # Without `shown`, nothing about the budget reaches the agent.
    assert "Budget" not in TOK.decode(ep.token_ids())


def test_a_router_that_names_an_unknown_model_ends_the_episode_with_an_error() -> None:
    class Lost:
        def choose(self, view: RouteView) -> object:
            return FixedRouter("huge").choose(view)

    ep = run(scripted([], -1.0), scripted([], -1.0), Lost(), BUDGET, Price())  # type: ignore[arg-type]
    assert ep.stop_reason == StopReason.ERROR and "huge" in (ep.error or "")


def test_routing_needs_exactly_one_trained_model() -> None:
    with pytest.raises(ValueError, match="exactly one trained"):
        Routing({"a": RoutedModel("a", Price(), scripted([], -1.0))}, FixedRouter("a"))


def _config(**extra: object) -> dict[str, object]:
    return {
        "models": {
            "small": {"model": {"kind": "trained"}},
            "big": {"model": {"kind": "oracle"}, "price": {"per_call": 0.01}},
        },
        "router": {"kind": "delegate", "to": "big"},
        **extra,
    }


def test_the_run_config_checks_its_routing() -> None:
    config = RunConfig.model_validate(_config())
    assert config.trained_model_name() == "small"
    with pytest.raises(ValidationError, match="a router must pick"):
        RunConfig.model_validate(_config(router=None))
    with pytest.raises(ValidationError, match="'huge' is not one of models"):
        RunConfig.model_validate(_config(router={"kind": "delegate", "to": "huge"}))
    with pytest.raises(ValidationError, match="exactly one must be"):
        RunConfig.model_validate(
            _config(
                models={"a": {"model": {"kind": "trained"}}, "b": {"model": {"kind": "trained"}}}
            )
        )
    with pytest.raises(ValidationError, match="delegating to the trained model"):
        RunConfig.model_validate(_config(router={"kind": "delegate", "to": "small"}))
    with pytest.raises(ValidationError, match="greater than or equal"):
        RunConfig.model_validate(
            _config(
                models={
                    "s": {"model": {"kind": "trained"}},
                    "b": {"price": {"per_call": -1}, "model": {"kind": "oracle"}},
                }
            )
        )
