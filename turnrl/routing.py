"""A routed run's models and router, built from `models:` and `router:` (`turnrl.agent.routing`
runs them).

Each priced model becomes a `RoutedModel`: the trained policy (`{kind: trained}`: the run's
own `model:`), an oracle (a scripted policy per task item, given to each episode through
`RunRouting.route_spec`), a frozen in-process model (`embedded`, `tiny`, `path`: it samples
but is never trained), or an API model (`openai`: its provider's bill adds to `model_usd`).
Every in-process model must share the trained model's tokenizer (one vocabulary is what keeps
a mixed episode's ids exact); a model with another is refused before the run starts. A vLLM
server as a routed model is not built yet (refused with that message).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from turnrl.agent.chat import Renderer
from turnrl.agent.hf_policy import HFPolicy
from turnrl.agent.model import load_model, load_tokenizer
from turnrl.agent.model_config import AnyModel
from turnrl.agent.openai_policy import OpenAIPolicy
from turnrl.agent.policy import Policy
from turnrl.agent.records import Episode, Route
from turnrl.agent.routing import (
    DelegateRouter,
    DelegateTool,
    FixedRouter,
    RoutedModel,
    RouteView,
    Routing,
    StepRouter,
)
from turnrl.agent.routing_config import DelegateRouterConfig, FixedRouterConfig
from turnrl.agent.runner import EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.config import RunConfig
from turnrl.openai_backend import api_key
from turnrl.rl.bandit import BanditRouter, oscillation
from turnrl.rl.bandit_config import LearnedRouterConfig, TaskBanditConfig
from turnrl.rl.ope import FloatArray, IntArray
from turnrl.rl.step_router import LearnedStepRouter, step_decisions, usd_scale
from turnrl.rl.task_router import TaskRouter, bandit_log
from turnrl.tasks.base import TaskItem
from turnrl.tools.base import AnyTool


class RoutingError(ValueError):
    """A routed model or router this run cannot build (the message names the field)."""


@dataclass
class RunRouting:
    """A routed run's live routing: what the runner, the rollouts and the session need."""

    routing: Routing
    """The models and the run's router."""
    tools: list[AnyTool] = field(default_factory=list)
    """Tools the routing adds to every episode (the delegate router's routing action)."""
    oracles: dict[str, Callable[[TaskItem], Policy]] = field(default_factory=dict)
    """Routed models that are a script per item (an oracle), by name."""
    policies: list[HFPolicy | OpenAIPolicy] = field(default_factory=list)
    """The policies it opened, closed with the session."""
    learned: LearnedRouting | None = None
    """The run's learned router (`router.kind` learned or bandit), trained on each step's
    logged decisions; None for a fixed or delegate router."""

    def route_spec(self, item: TaskItem, spec: EpisodeSpec) -> EpisodeSpec:
        """`spec` with its item's own routed policies (the oracle's script for `item`) and,
        under a task-level router, its pick."""
        if self.oracles:
            spec = replace(spec, models={n: f(item) for n, f in self.oracles.items()})
        if isinstance(self.learned, TaskRouting):
            router, route = self.learned.pick(item.question, spec.step)
            spec = replace(spec, router=router, route=route)
        return spec

    def learn(self, episodes: Sequence[Episode]) -> dict[str, float]:
        """Train the learned router on a step's graded episodes; its metrics (empty without
        one)."""
        return {} if self.learned is None else self.learned.learn(episodes)

    def close(self) -> None:
        for policy in self.policies:
            policy.close()


def open_routing(
    config: RunConfig,
    renderer: Renderer,
    tokenizer: Any,
    weights_dir: Callable[[AnyModel], Path],
    oracle_for: Callable[[], Callable[[TaskItem], Policy]],
) -> RunRouting | None:
    """The run's routing (None when `models:` is empty). `weights_dir` finds a model's folder;
    `oracle_for` builds the suite's per-item oracle scripts."""
    if not config.models:
        return None
    assert config.router is not None  # the config refuses models without a router
    trained = config.trained_model_name()
    assert trained is not None
    models: dict[str, RoutedModel] = {}
    oracles: dict[str, Callable[[TaskItem], Policy]] = {}
    opened: list[HFPolicy | OpenAIPolicy] = []
    try:
        for name, priced in config.models.items():
            m = priced.model
            policy: Policy | None
            if m.kind == "trained":
                policy = None
            elif m.kind == "oracle":
                oracles[name] = oracle_for()
                # Never speaks: each episode gets its item's script (`route_spec`).
                policy = ScriptedPolicy(lambda _: [renderer.end_of_turn_id()], renderer.tokenizer)
            elif m.kind == "openai":
                api = OpenAIPolicy(m, renderer, api_key(m), seed=config.seed)
                opened.append(api)
                policy = api
            elif m.kind == "vllm":
                raise RoutingError(
                    f"models.{name}: a vLLM server as a routed model is not supported yet; "
                    "route to an in-process model, an oracle or an OpenAI-compatible API "
                    "(a vLLM server's `/v1` as `kind: openai`, evaluation only)"
                )
            else:
                folder = weights_dir(m)
                _same_vocabulary(name, load_tokenizer(folder), tokenizer)
                hf = HFPolicy(load_model(folder), tokenizer)
                opened.append(hf)
                policy = hf
            models[name] = RoutedModel(name, priced.price, policy)
        router = _router(config, trained, models)
    except Exception:
        for policy in opened:
            policy.close()
        raise
    out = RunRouting(Routing(models, router), oracles=oracles, policies=opened)
    if isinstance(router, LearnedRouting):
        out.learned = router
    if isinstance(config.router, DelegateRouterConfig):
        r = config.router
        out.tools.append(DelegateTool(r.tool_name, r.to, models[r.to].price))
    return out


def _router(config: RunConfig, trained: str, models: Mapping[str, RoutedModel]) -> StepRouter:
    r = config.router
    assert r is not None
    if isinstance(r, FixedRouterConfig):
        return FixedRouter(r.model)
    if isinstance(r, DelegateRouterConfig):
        return DelegateRouter(trained, r.to, r.tool_name)
    arms = tuple(models)
    limits, metric = config.budget.max_cost, config.rewards.success_metric
    if isinstance(r, LearnedRouterConfig):
        return StepRouting(r, arms, config.seed, limits, metric)
    return TaskRouting(r, arms, config.seed, limits, metric)


class LearnedRouting(ABC):
    """A learned router's current generation: it explores during training, picks greedily in
    evaluation (step -1), and is refitted on each step's logged decisions."""

    def __init__(
        self,
        config: LearnedRouterConfig | TaskBanditConfig,
        bandit: BanditRouter,
        seed: int,
        limits: Mapping[str, float],
        success_metric: str,
    ) -> None:
        self.config = config
        self.success_metric = success_metric
        """The grader's metric a decision's reward counts as success."""
        self.bandit = bandit
        """The current generation (every logged decision so far)."""
        self.generations: list[BanditRouter] = [bandit]
        """Each generation, for the oscillation monitor."""
        self.rng = np.random.default_rng(seed)
        self.scale = usd_scale(limits)
        self.decisions = 0
        self.explore_in_eval = False
        """Explore in evaluation too (a logging pass for off-policy evaluation)."""

    def greedy(self, step: int) -> bool:
        """Whether a decision of an episode of `step` is greedy: in evaluation (step -1),
        unless exploring there for a log."""
        return step < 0 and not self.explore_in_eval

    @abstractmethod
    def _log(self, episodes: Sequence[Episode]) -> tuple[FloatArray, IntArray, FloatArray]:
        """The logged decisions in `episodes`: features, arm indices, rewards."""

    def learn(self, episodes: Sequence[Episode]) -> dict[str, float]:
        """Add `episodes`' decisions to the fit; the step's routing metrics."""
        features, arms, rewards = self._log(episodes)
        if len(arms):
            self.bandit = self.bandit.updated(features, arms, rewards)
            self.generations.append(self.bandit)
        self.decisions += len(arms)
        out = {"router_decisions": float(len(arms))}
        for i, arm in enumerate(self.bandit.arms):
            chose = arms == i
            out[f"router_share/{arm}"] = float(chose.mean()) if len(arms) else 0.0
        if len(self.generations) >= 3 and len(arms):
            # Retraining on its own logs: how often the greedy pick on this step's contexts
            # flips between the last generations, and flips back (A-B-A).
            greedy = np.stack([g.greedy_N(features) for g in self.generations[-3:]])
            report = oscillation(greedy)
            out["router_flip_rate"] = report.flip_rates[-1]
            out["router_return_rate"] = report.return_rates[-1]
        return out


class StepRouting(LearnedRouting):
    """The learned per-step router over turn features (`turnrl.rl.step_router`)."""

    def __init__(
        self,
        config: LearnedRouterConfig,
        arms: tuple[str, ...],
        seed: int,
        limits: Mapping[str, float],
        success_metric: str,
    ) -> None:
        start = LearnedStepRouter.new(config, arms, np.random.default_rng(seed))
        super().__init__(config, start.bandit, seed, limits, success_metric)

    def choose(self, view: RouteView) -> Route:
        router = LearnedStepRouter(self.bandit, self.rng, greedy=self.greedy(view.step))
        return router.choose(view)

    def _log(self, episodes: Sequence[Episode]) -> tuple[FloatArray, IntArray, FloatArray]:
        log = step_decisions(
            episodes, self.bandit.arms, self.config.cost_weight, self.scale, self.success_metric
        )
        return log.features_N_D, log.arms_N, log.rewards_N


class TaskRouting(LearnedRouting):
    """The task-level bandit router (`turnrl.rl.task_router`): one model per episode."""

    def __init__(
        self,
        config: TaskBanditConfig,
        arms: tuple[str, ...],
        seed: int,
        limits: Mapping[str, float],
        success_metric: str,
    ) -> None:
        start = TaskRouter.new(config, arms, np.random.default_rng(seed))
        super().__init__(config, start.bandit, seed, limits, success_metric)

    def choose(self, view: RouteView) -> Route:
        raise RoutingError("a task-level router picks per episode (EpisodeSpec.router)")

    def pick(self, question: str, step: int) -> tuple[FixedRouter, Route]:
        return TaskRouter(self.bandit, self.rng, greedy=self.greedy(step)).pick(question)

    def _log(self, episodes: Sequence[Episode]) -> tuple[FloatArray, IntArray, FloatArray]:
        log = bandit_log(
            episodes, self.bandit.arms, self.config.cost_weight, self.scale, self.success_metric
        )
        return log.features_N_D, log.arms_N, log.rewards_N


def _same_vocabulary(name: str, theirs: Any, ours: Any) -> None:
    if theirs.get_vocab() != ours.get_vocab():
        raise RoutingError(
            f"models.{name}: its tokenizer differs from the trained model's; a routed episode's "
            "ids must come from one vocabulary (use an API model, `kind: openai`, for a model "
            "with another tokenizer)"
        )
