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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from turnrl.agent.chat import Renderer
from turnrl.agent.hf_policy import HFPolicy
from turnrl.agent.model import load_model, load_tokenizer
from turnrl.agent.model_config import AnyModel
from turnrl.agent.openai_policy import OpenAIPolicy
from turnrl.agent.policy import Policy
from turnrl.agent.routing import (
    DelegateRouter,
    DelegateTool,
    FixedRouter,
    RoutedModel,
    Routing,
    StepRouter,
)
from turnrl.agent.routing_config import DelegateRouterConfig, FixedRouterConfig
from turnrl.agent.runner import EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.config import RunConfig
from turnrl.openai_backend import api_key
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

    def route_spec(self, item: TaskItem, spec: EpisodeSpec) -> EpisodeSpec:
        """`spec` with its item's own routed policies (the oracle's script for `item`)."""
        if not self.oracles:
            return spec
        return replace(spec, models={n: f(item) for n, f in self.oracles.items()})

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
    raise RoutingError(f"router.kind {r.kind!r} is not wired into runs yet")


def _same_vocabulary(name: str, theirs: Any, ours: Any) -> None:
    if theirs.get_vocab() != ours.get_vocab():
        raise RoutingError(
            f"models.{name}: its tokenizer differs from the trained model's; a routed episode's "
            "ids must come from one vocabulary (use an API model, `kind: openai`, for a model "
            "with another tokenizer)"
        )
