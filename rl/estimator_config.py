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
GroupStd = Literal["population", "sample"]
"""The std that divides a group's deviations: `population` (squared deviations over n;
turnrl's default) or `sample` (over n - 1, Bessel-corrected: `torch.std`'s default, what verl,
verl-agent's GiGPO and TRL use). A group of one has sample std 0 here (undefined), so it gets
the group-of-one rule (`Singleton`), never a division."""
Singleton = Literal["zero", "return"]
"""The advantage of a group of one episode: 0, no baseline to compare with (`zero`; TRL and
turnrl's default), or its own return unbaselined (`return`; verl, which sets a group of one's
mean to 0 and std to 1, so GRPO gives R / (1 + eps) and Dr. GRPO and RLOO give R)."""
Whiten = Literal["none", "turns", "tokens"]
"""Whitening of GAE advantages over the batch after they are computed: none, each trained turn
one sample, or each trained (sampled) token one sample, i.e. turns weighted by their number
of completion tokens (verl's `masked_whiten` over the response mask: the mean is subtracted
and not added back, the variance is Bessel-corrected, the divisor is sqrt(var + 1e-8))."""


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
    """GRPO: group-normalised episode return on every turn.

    Reproducing a framework: verl is `std="sample", singleton="return"` (eps 1e-6, its
    default); TRL is `std="sample", eps=1e-4` (`scale_rewards="group"`), a group of one 0."""

    kind: Literal["grpo"] = "grpo"
    eps: float = Field(1e-6, ge=0)
    """Added to the group's std before dividing."""
    std: GroupStd = "population"
    """Population or sample (Bessel-corrected) std of the group's returns."""
    singleton: Singleton = "zero"
    """A group of one's advantage: 0, or R / (1 + eps) as verl gives it."""


class DrGrpoConfig(_Config):
    """Dr. GRPO: group-centred episode return on every turn (verl: `grpo` with
    `norm_adv_by_std_in_grpo=False`, and `singleton="return"`)."""

    kind: Literal["dr_grpo"] = "dr_grpo"
    singleton: Singleton = "zero"
    """A group of one's advantage: 0, or its return R (verl)."""


class RlooConfig(_Config):
    """RLOO: episode return minus the mean of the group's other returns, on every turn."""

    kind: Literal["rloo"] = "rloo"
    singleton: Singleton = "zero"
    """A group of one's advantage: 0, or its return R (verl passes it through unchanged)."""


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
    """GiGPO: episode-level GRPO plus a step-level advantage over shared anchor states.

    verl-agent's reference is `std="sample", singleton="return"` (its `mean_std_norm` mode;
    its default `mean_norm` mode is `scale="none"`). It computes the episode-level mean and std
    over the group's turns rather than its episodes (`compute_mean_std_cross_steps`), which
    weighs long episodes more; here each episode counts once."""

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
    std: GroupStd = "population"
    """Population or sample std, at both levels (`scale="std"`)."""
    singleton: Singleton = "zero"
    """Episode level: a group of one's advantage, 0 or its return (as `GrpoConfig`). A
    singleton anchor state's step advantage is always 0 (verl-agent's too)."""


class SaltConfig(_Config):
    """SALT: the mean trajectory advantage of the episodes sharing a turn's graph edge."""

    kind: Literal["salt"] = "salt"
    base: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """The trajectory-level estimator whose advantages are averaged."""
    eps: float = Field(1e-6, ge=0)
    """GRPO's eps, where `base` is `grpo`."""
    std: GroupStd = "population"
    """GRPO's std, where `base` is `grpo`."""
    singleton: Singleton = "zero"
    """The base estimator's advantage for a group of one (as `GrpoConfig`)."""


class TempoConfig(_Config):
    """TEMPO: prefix-tree values from the group's rollouts as per-node baselines."""

    kind: Literal["tempo"] = "tempo"
    form: TempoForm = "td"
    """`td`: GRPO plus the branch-gated TD term Q(s,a) - V(s) (the paper); `node_baseline`:
    the return-to-go minus V of the turn's start node."""
    eps: float = Field(1e-6, ge=0)
    """Added to the group's std before dividing."""


class GaeConfig(_Config):
    """Turn-level GAE with the value head's V(s_t); every episode end is terminal. verl
    whitens its (token-level) GAE advantages over the batch: `whiten="tokens"`."""

    kind: Literal["gae"] = "gae"
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per turn."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE's lambda: 0 is one-step TD, 1 the Monte Carlo return minus V."""
    whiten: Whiten = "none"
    """Whitening of the advantages over the batch's trained turns or tokens (value targets
    are the lambda-returns before it)."""


class TppoConfig(_Config):
    """Turn-level GAE that bootstraps a truncated episode (`TRUNCATIONS`) with V at the cut,
    read from the last turn's `signals["value_after"]`."""

    kind: Literal["tppo"] = "tppo"
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per turn."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE's lambda."""
    whiten: Whiten = "none"
    """Whitening of the advantages over the batch (as `GaeConfig.whiten`)."""


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
