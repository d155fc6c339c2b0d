"""Which reward components a run computes, their weights and parameters, and how they combine.

`rewards.components` is a list of typed components (a discriminated union on `kind`), each with
its own weight and parameters; `combine` says how weighted components become one number per
turn. The formulas are in `turnrl.rl.rewards`. `outcome`, `format` and `tool_cost` are always
computed (stored runs and reports read them): one the config does not list is added with
weight 0 and its defaults (the outcome's metric is then `correct`, which every suite emits).

The earlier form, a `weights:` mapping plus flat parameters (`outcome_metric`, `cost_weights`,
`otc_c`, `saturation_threshold`, `eapo_gamma`, `coverage_decay`, `decoupled`), still loads and
means what it meant: `outcome_metric` (default `f1` there) is the metric of `outcome`, `otc`
and `eapo`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ComponentKind = Literal[
    "outcome", "format", "tool_cost", "info_gain", "otc", "saturation", "eapo", "coverage"
]
COMPONENTS: tuple[ComponentKind, ...] = (
    "outcome",
    "format",
    "tool_cost",
    "info_gain",
    "otc",
    "saturation",
    "eapo",
    "coverage",
)
"""Every component kind, in the order turns store them."""
BASE_COMPONENTS: tuple[ComponentKind, ...] = ("outcome", "format", "tool_cost")
"""Computed on every turn, listed or not."""
Combine = Literal["weighted", "gdpo"]


class _Component(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    weight: float = 1.0
    """Weight of the component in the turn's scalar reward; 0 computes and logs it only."""


class OutcomeReward(_Component):
    """The grader's score `outcome[metric]`, on the episode's last turn."""

    kind: Literal["outcome"] = "outcome"
    metric: str = "correct"
    """Which grader metric is the reward (one the task's suite emits)."""


class FormatReward(_Component):
    """-1 on a malformed or void turn (SimpleTIR, arXiv 2509.02479)."""

    kind: Literal["format"] = "format"


class ToolCostReward(_Component):
    """Minus the turn's tool-call cost vectors, priced by kind (ESearch-R1, arXiv 2512.18571)."""

    kind: Literal["tool_cost"] = "tool_cost"
    cost_weights: dict[str, float] = Field(default_factory=lambda: {"calls": 1.0})
    """Price of each cost kind (>= 0: a cost is never a reward)."""

    @model_validator(mode="after")
    def _prices_not_negative(self) -> ToolCostReward:
        negative = sorted(k for k, w in self.cost_weights.items() if w < 0)
        if negative:
            raise ValueError(f"cost weights must be >= 0 (a cost is never a reward): {negative}")
        return self


class InfoGainReward(_Component):
    """IGPO's change in the gold answer's probability per turn (arXiv 2510.14967)."""

    kind: Literal["info_gain"] = "info_gain"


class OtcReward(_Component):
    """OTC-GRPO's tool-efficiency factor of the outcome (arXiv 2504.14870)."""

    kind: Literal["otc"] = "otc"
    metric: str = "correct"
    """The grader metric that is r_phi, the correctness the factor multiplies."""
    c: float = Field(1.0, gt=0)
    """Smoothing constant c in cos(m * pi / (2m + c)), used when the target is 0 calls:
    smaller c punishes each extra call harder."""


class SaturationReward(_Component):
    """-1 per tool call made once the answer was already reachable."""

    kind: Literal["saturation"] = "saturation"
    threshold: float | None = Field(0.5, gt=0, le=1)
    """The answer counts as reachable once the gold probability reached this; None to use
    only whether the gold answer was seen in a tool output."""


class EapoReward(_Component):
    """IterResearch's geometric turn discount of the outcome (arXiv 2511.07327)."""

    kind: Literal["eapo"] = "eapo"
    metric: str = "correct"
    """The grader metric whose score is discounted."""
    gamma: float = Field(0.9, gt=0, le=1)
    """Discount per turn. With a handful of turns a gamma well below 1 is needed for the
    discount to matter."""


class CoverageReward(_Component):
    """decay**k for the k-th distinct passage an episode sees."""

    kind: Literal["coverage"] = "coverage"
    decay: float = Field(0.5, gt=0, le=1)
    """1: every new passage earns 1."""


RewardComponent: TypeAlias = Annotated[
    OutcomeReward
    | FormatReward
    | ToolCostReward
    | InfoGainReward
    | OtcReward
    | SaturationReward
    | EapoReward
    | CoverageReward,
    Field(discriminator="kind"),
]

_LEGACY_KEYS = frozenset(
    {
        "weights",
        "outcome_metric",
        "cost_weights",
        "otc_c",
        "saturation_threshold",
        "eapo_gamma",
        "coverage_decay",
        "decoupled",
    }
)


def _default_components() -> list[RewardComponent]:
    return [OutcomeReward(), FormatReward(weight=0.1), ToolCostReward(weight=0.01)]


class RewardConfig(BaseModel):
    """The components a run computes and how they combine (module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    components: list[RewardComponent] = Field(default_factory=_default_components)
    """The components, each at most once, with weights and parameters (YAML:
    `components: [{kind: outcome, metric: f1}, {kind: format, weight: 0.1}]`)."""
    combine: Combine = "weighted"
    """`weighted`: each turn's scalar is the weighted sum of its components. `gdpo`: each
    weighted component is normalised within its group first (GDPO, arXiv 2601.05242; see
    `turnrl.rl.rewards.decoupled_turn_rewards`)."""
    success_metric: str = "correct"
    """The grader metric that makes an episode correct (when >= 1): `otc`'s target is the
    fewest calls among the group's correct episodes."""

    @model_validator(mode="before")
    @classmethod
    def _from_weights_form(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or not (_LEGACY_KEYS & set(data)):
            return data
        if "components" in data or "combine" in data:
            mixed = sorted(_LEGACY_KEYS & set(data))
            raise ValueError(
                f"rewards: {mixed} belong to the `weights:` form; with `components:` put each "
                "parameter on its component"
            )
        return _legacy(data)

    @field_validator("components")
    @classmethod
    def _each_kind_once_and_base_present(
        cls, components: list[RewardComponent]
    ) -> list[RewardComponent]:
        kinds = [c.kind for c in components]
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        if twice:
            raise ValueError(f"{twice} listed more than once")
        base: dict[str, RewardComponent] = {
            "outcome": OutcomeReward(weight=0.0),
            "format": FormatReward(weight=0.0),
            "tool_cost": ToolCostReward(weight=0.0),
        }
        return [*components, *(base[k] for k in BASE_COMPONENTS if k not in kinds)]

    @property
    def weights(self) -> dict[str, float]:
        """Weight of each component by kind, in the listed order."""
        return {c.kind: c.weight for c in self.components}

    @property
    def decoupled(self) -> bool:
        """Whether components combine GDPO-style."""
        return self.combine == "gdpo"

    def computed(self) -> list[ComponentKind]:
        """The kinds `group_rewards` fills in on every turn, in `COMPONENTS` order."""
        kinds = {c.kind for c in self.components}
        return [k for k in COMPONENTS if k in kinds]

    def get(self, kind: ComponentKind) -> RewardComponent | None:
        """The component of `kind`, or None when the config does not compute it."""
        return next((c for c in self.components if c.kind == kind), None)

    def outcome(self) -> OutcomeReward:
        component = self.get("outcome")
        assert isinstance(component, OutcomeReward)  # always present (validator)
        return component

    def tool_cost(self) -> ToolCostReward:
        component = self.get("tool_cost")
        assert isinstance(component, ToolCostReward)  # always present (validator)
        return component

    def metrics_read(self) -> list[tuple[str, str]]:
        """Every grader metric these rewards read, as `(config field, metric)` pairs, so a run
        config can check them against the metrics its suite emits."""
        out = []
        for i, c in enumerate(self.components):
            if isinstance(c, OutcomeReward | OtcReward | EapoReward):
                out.append((f"rewards.components[{i}] ({c.kind}).metric", c.metric))
        out.append(("rewards.success_metric", self.success_metric))
        return out

    def reweighted(self, weights: Mapping[str, float]) -> RewardConfig:
        """These rewards with exactly the components `weights` names, at those weights; a
        component already configured keeps its parameters, a new one gets its defaults
        (metrics default to the outcome's)."""
        unknown = sorted(set(weights) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown reward components {unknown}; known: {list(COMPONENTS)}")
        metric = self.outcome().metric
        components: list[dict[str, Any]] = []
        for kind, weight in weights.items():
            current = self.get(kind)  # type: ignore[arg-type]
            if current is not None:
                components.append({**current.model_dump(), "weight": weight})
            elif kind in ("otc", "eapo"):
                components.append({"kind": kind, "weight": weight, "metric": metric})
            else:
                components.append({"kind": kind, "weight": weight})
        for kind in BASE_COMPONENTS:
            current = self.get(kind)
            if kind not in weights and current is not None:
                components.append({**current.model_dump(), "weight": 0.0})
        return RewardConfig.model_validate(
            {
                "components": components,
                "combine": self.combine,
                "success_metric": self.success_metric,
            }
        )

    def with_metric(self, metric: str) -> RewardConfig:
        """These rewards with `metric` as the outcome's (and `otc`'s and `eapo`'s) metric."""
        components = [
            {**c.model_dump(), "metric": metric}
            if isinstance(c, OutcomeReward | OtcReward | EapoReward)
            else c.model_dump()
            for c in self.components
        ]
        return RewardConfig.model_validate({**self.model_dump(), "components": components})


def _legacy(data: Mapping[str, Any]) -> dict[str, Any]:
    """The components form of a `weights:`-form reward config, with that form's defaults."""
    rest = {k: v for k, v in data.items() if k not in _LEGACY_KEYS}
    weights = data.get("weights", {"outcome": 1.0, "format": 0.1, "tool_cost": 0.01})
    if not isinstance(weights, Mapping):
        raise ValueError("rewards.weights must map component names to weights")
    unknown = sorted(set(weights) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown reward components {unknown}; known: {list(COMPONENTS)}")
    metric = data.get("outcome_metric", "f1")
    params: dict[str, dict[str, Any]] = {
        "outcome": {"metric": metric},
        "tool_cost": {"cost_weights": data.get("cost_weights", {"calls": 1.0})},
        "otc": {"metric": metric, "c": data.get("otc_c", 1.0)},
        "saturation": {"threshold": data.get("saturation_threshold", 0.5)},
        "eapo": {"metric": metric, "gamma": data.get("eapo_gamma", 0.9)},
        "coverage": {"decay": data.get("coverage_decay", 0.5)},
    }
    components = [
        {"kind": kind, "weight": weight, **params.get(kind, {})} for kind, weight in weights.items()
    ]
    # The weights form computed `outcome` and `tool_cost` with its parameters even when
    # unweighted; they stay at weight 0 with those parameters.
    for kind in ("outcome", "tool_cost"):
        if kind not in weights:
            components.append({"kind": kind, "weight": 0.0, **params[kind]})
    combine = "gdpo" if data.get("decoupled", False) else "weighted"
    return {**rest, "components": components, "combine": combine}


def needs_gold_probs(rewards: RewardConfig) -> bool:
    """Whether a configured component reads gold-answer probabilities (measured with a model:
    `turnrl.rl.credit`)."""
    saturation = rewards.get("saturation")
    return rewards.get("info_gain") is not None or (
        isinstance(saturation, SaturationReward) and saturation.threshold is not None
    )
