"""The advantage estimators' configs: one class per estimator, chosen by `kind`.

Kept apart from the estimators (`turnrl.rl.advantages`), which need numpy and torch, so that a
run config loads without either: `turnrl --help` and config validation stay fast.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

EndedEpisodes = Literal["exclude", "absorbing"]
"""How TRLOO counts a group's episodes that already ended at a later turn index."""
Anchor = Literal["history", "observation"]
"""What makes two turns' states the same for GiGPO: the whole history, or the last observation."""
StepScale = Literal["std", "none"]
"""Normaliser of GiGPO's two levels."""
TempoForm = Literal["td", "node_baseline"]
"""TEMPO's step correction: temporal difference, or the node's mean return as the baseline."""


Estimator = Literal[
    "grpo",
    "dr_grpo",
    "rloo",
    "reinforce_pp",
    "trloo",
    "gigpo",
    "salt",
    "tempo",
    "gae",
    "tppo",
    "empg",
]


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GrpoConfig(_Config):
    """GRPO: group-normalised episode return on every turn."""

    kind: Literal["grpo"] = "grpo"
    eps: float = Field(1e-6, ge=0)
    """Added to the group's std before dividing."""


class DrGrpoConfig(_Config):
    """Dr. GRPO: group-centred episode return on every turn."""

    kind: Literal["dr_grpo"] = "dr_grpo"


class RlooConfig(_Config):
    """RLOO: episode return minus the mean of the group's other returns, on every turn."""

    kind: Literal["rloo"] = "rloo"


class ReinforcePPConfig(_Config):
    """REINFORCE++: each turn's return-to-go, normalised over all turns of the batch."""

    kind: Literal["reinforce_pp"] = "reinforce_pp"
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of the return-to-go, per turn."""
    eps: float = Field(1e-6, ge=0)
    """Added to the batch std before dividing."""


class TrlooConfig(_Config):
    """TRLOO: turn-level return-to-go with a leave-one-out baseline per group and turn index."""

    kind: Literal["trloo"] = "trloo"
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of the return-to-go, per turn."""
    ended: EndedEpisodes = "exclude"
    """How the group's episodes that already ended count at a later turn index: left out
    (`exclude`), or present with return-to-go 0 (`absorbing`)."""


class GigpoConfig(_Config):
    """GiGPO: episode-level GRPO plus a step-level advantage over shared anchor states."""

    kind: Literal["gigpo"] = "gigpo"
    gamma: float = Field(0.95, ge=0, le=1)
    """Discount of the step return-to-go (the paper's 0.95)."""
    omega: float = Field(1.0, ge=0)
    """Weight of the step-level advantage."""
    scale: StepScale = "std"
    """Normaliser of both levels: the group's std (`std`) or none (`none`, Dr. GRPO-style)."""
    anchor: Anchor = "history"
    """What makes two turns' states the same: the whole history, or the last observation."""
    eps: float = Field(1e-6, ge=0)
    """Added to each std before dividing."""


class SaltConfig(_Config):
    """SALT: the mean trajectory advantage of the episodes sharing a turn's graph edge."""

    kind: Literal["salt"] = "salt"
    base: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """The trajectory-level estimator whose advantages are averaged."""
    eps: float = Field(1e-6, ge=0)
    """GRPO's eps, where `base` is `grpo`."""


class TempoConfig(_Config):
    """TEMPO: prefix-tree values from the group's rollouts as per-node baselines."""

    kind: Literal["tempo"] = "tempo"
    form: TempoForm = "td"
    """`td`: GRPO plus the branch-gated TD term Q(s,a) - V(s) (the paper); `node_baseline`:
    the return-to-go minus V of the turn's start node."""
    eps: float = Field(1e-6, ge=0)
    """Added to the group's std before dividing."""


class GaeConfig(_Config):
    """Turn-level GAE with the value head's V(s_t); every episode end is terminal."""

    kind: Literal["gae"] = "gae"
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per turn."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE's lambda: 0 is one-step TD, 1 the Monte Carlo return minus V."""


class TppoConfig(_Config):
    """Turn-level GAE that bootstraps a truncated episode (`TRUNCATIONS`) with V at the cut,
    read from the last turn's `signals["value_after"]`."""

    kind: Literal["tppo"] = "tppo"
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per turn."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE's lambda."""


BaseEstimatorConfig: TypeAlias = Annotated[
    GrpoConfig
    | DrGrpoConfig
    | RlooConfig
    | ReinforcePPConfig
    | TrlooConfig
    | GigpoConfig
    | SaltConfig
    | TempoConfig
    | GaeConfig
    | TppoConfig,
    Field(discriminator="kind"),
]
"""Every estimator except the EMPG wrapper."""


class EmpgConfig(_Config):
    """EMPG: entropy modulation of another estimator's turn advantages."""

    kind: Literal["empg"] = "empg"
    base: BaseEstimatorConfig = Field(default_factory=GrpoConfig)
    """The estimator whose advantages are modulated."""
    k: float = Field(1.0, ge=0)
    """Sharpness of the self-calibrating scale g(H) = exp(-k H_norm) / mean."""
    k_f: float = Field(1.0, ge=0)
    """Sharpness of the future-clarity bonus f(H) = exp(-k_f H_norm)."""
    zeta: float = Field(0.1, ge=0)
    """Weight of the future-clarity bonus."""
    center: bool = True
    """Shift the modulated advantages to zero mean over the batch's turns."""


EstimatorConfig: TypeAlias = Annotated[
    BaseEstimatorConfig | EmpgConfig, Field(discriminator="kind")
]
"""One config class per estimator, chosen by `kind` (YAML: `estimator: {kind: gigpo, ...}`)."""

ESTIMATORS: dict[Estimator, type[BaseModel]] = {
    "grpo": GrpoConfig,
    "dr_grpo": DrGrpoConfig,
    "rloo": RlooConfig,
    "reinforce_pp": ReinforcePPConfig,
    "trloo": TrlooConfig,
    "gigpo": GigpoConfig,
    "salt": SaltConfig,
    "tempo": TempoConfig,
    "gae": GaeConfig,
    "tppo": TppoConfig,
    "empg": EmpgConfig,
}
"""The config class of each estimator kind (its defaults are the estimator's defaults)."""

_ADAPTER: TypeAdapter[EstimatorConfig] = TypeAdapter(EstimatorConfig)


def estimator_config(value: str | dict[str, object] | BaseModel) -> EstimatorConfig:
    """A validated config from a bare kind (`"grpo"`, its defaults), a dict with `kind`, or a
    config."""
    if isinstance(value, str):
        if value not in ESTIMATORS:
            raise ValueError(f"unknown estimator {value!r}; known: {sorted(ESTIMATORS)}")
        value = {"kind": value}
    elif isinstance(value, BaseModel):
        value = value.model_dump()
    return _ADAPTER.validate_python(value)


def needs_values(estimator: EstimatorConfig) -> bool:
    """Whether the estimator reads state values (a value head's: `turnrl.rl.credit`)."""
    inner = estimator.base if isinstance(estimator, EmpgConfig) else estimator
    return isinstance(inner, GaeConfig | TppoConfig)
