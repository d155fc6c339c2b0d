"""Run configuration: one YAML file, validated by pydantic, naming every choice of a run.

Small configs live next to what they configure (`Budget` in the runner, `RewardConfig` in the
rewards, each suite's config in its suite, each tool's beside its tool); this module composes
them and adds the choices that only a run makes (model, schedule). Variants are discriminated
unions on `kind`. Nothing here imports torch, an HTTP client, a search index or the MCP SDK:
a config loads in well under a second.

Checked at load, from what suites and tools declare (`tasks.suite_config.SuiteConfig`): every
metric a reward reads is one the suite's grader emits; rewards that measure gold answer text
need a suite whose items have it; a run whose suite or tools run code opens a sandbox.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from turnrl.agent.budget import Budget
from turnrl.agent.chat_config import ChatConfig
from turnrl.agent.model_config import (
    EmbeddedModel,
    ModelConfig,
    OracleModel,
    PathModel,
    TinyModel,
)
from turnrl.agent.routing_config import (
    DelegateRouterConfig,
    FixedRouterConfig,
    PricedModel,
)
from turnrl.bopo_config import BoundaryTrainingConfig
from turnrl.rl.bandit_config import LearnedRouterConfig, TaskBanditConfig
from turnrl.rl.estimator_config import EstimatorConfig, GrpoConfig, needs_values
from turnrl.rl.learner_config import LearnerConfig
from turnrl.rl.reward_config import RewardConfig
from turnrl.sandboxes.config import AutoConfig, SandboxConfig
from turnrl.sft_config import WarmStartConfig
from turnrl.tasks.registry import SUITE_KINDS, TaskConfig
from turnrl.tasks.search_qa_config import SearchQAConfig
from turnrl.tools_config import ExtraToolConfig, McpToolConfig, WebToolConfig

__all__ = [
    "SUITE_KINDS",
    "ChatConfig",
    "ConfigError",
    "EmbeddedModel",
    "EvalConfig",
    "ExtraToolConfig",
    "McpToolConfig",
    "ModelConfig",
    "OracleModel",
    "PathModel",
    "PolicyConfig",
    "RunConfig",
    "SamplingConfig",
    "TaskConfig",
    "TinyModel",
    "TrainConfig",
    "WarmStartConfig",
    "WebToolConfig",
    "load_config",
]


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SamplingConfig(_Config):
    """How rollouts are sampled."""

    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature (the learner scores tokens at the same temperature)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus mass."""


class PolicyConfig(_Config):
    """The in-process transformers policy."""

    max_batch_size: int = Field(32, ge=1)
    """Most concurrent requests in one forward batch."""
    torch_threads: int | None = None
    """torch intra-op threads; None keeps torch's default (all cores)."""
    prefix_cache: bool = True
    """Reuse the KV of shared prompts and earlier turns. Off, every prompt is computed whole:
    slower, but a rollout's logprobs then do not depend on what ran before it."""


class TrainConfig(_Config):
    """The RL schedule."""

    steps: int = Field(4, ge=0)
    """Learner steps."""
    tasks_per_step: int = Field(4, ge=1)
    """Task items rolled out per step."""
    group_size: int = Field(4, ge=2)
    """Rollouts per item (the GRPO group, G)."""
    estimator: EstimatorConfig = Field(default_factory=GrpoConfig)
    """Advantage estimator and its parameters (`estimator: gigpo` or
    `estimator: {kind: gigpo, omega: 1.0}`; see `turnrl.rl.advantages`)."""

    @field_validator("estimator", mode="before")
    @classmethod
    def _bare_kind(cls, value: object) -> object:
        return {"kind": value} if isinstance(value, str) else value

    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0: only at the end)."""
    resume_every: int = Field(1, ge=0)
    """Save the state `turnrl train --resume` continues from every N steps (learner weights
    and optimizer, RNG states; `turnrl.resume`); 0: never. Steps after the last saved state
    are re-learned from their stored episodes on resume, so a larger N trades checkpoint
    writes for resume time, never data."""
    mode: Literal["sync", "async"] = "sync"
    """`sync`: rollouts and learning alternate (`turnrl.loop`). `async`: rollouts go on while
    the learner steps, within `max_staleness` (`turnrl.async_loop`)."""
    max_staleness: int = Field(1, ge=0)
    """`async` only: step b's rollouts may start only once the learner has taken b -
    max_staleness steps (admission control; nothing finished is ever discarded), so every
    trained turn was sampled at most this many versions behind the learner (a step moves the
    version by at most one). 0 is the synchronous schedule."""


class EvalConfig(_Config):
    """Held-out evaluation."""

    n_items: int = Field(32, ge=1)
    """Test items evaluated (the first N of the test split)."""
    temperature: float = Field(0.0, ge=0.0)
    """0: greedy, so before/after numbers compare policies, not draws."""
    group_size: int = Field(1, ge=1)
    """Rollouts per item."""


RouterConfig: TypeAlias = Annotated[
    FixedRouterConfig | DelegateRouterConfig | LearnedRouterConfig | TaskBanditConfig,
    Field(discriminator="kind"),
]
"""Which of a run's priced models writes each turn (`turnrl.agent.routing`)."""


class RunConfig(_Config):
    """Everything a `turnrl train` or `turnrl eval` run needs."""

    run_dir: Path = Path("runs/default")
    """Where the episodes, metrics, config copy and checkpoints go."""
    seed: int = 0
    """Seed of sampling, item order and model init."""
    model: ModelConfig = Field(default_factory=EmbeddedModel)
    task: TaskConfig = Field(default_factory=SearchQAConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    chat: ChatConfig = Field(default_factory=ChatConfig)
    """The chat template and tool-call format (`agent.chat_config`); default: turnrl's ChatML
    with `<tool_call>` JSON calls."""
    sandbox: SandboxConfig = Field(default_factory=AutoConfig)
    """Where model-written code runs (opened only when the suite or a tool runs code:
    `needs_sandbox()`)."""
    tools: list[ExtraToolConfig] = Field(default_factory=list)
    """Tools offered in every episode besides the suite's own (web fetch, MCP servers,
    search, python, ask)."""
    budget: Budget = Field(default_factory=Budget)
    concurrency: int = Field(16, ge=1)
    """Episodes in flight at once."""
    rewards: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    warm_start: WarmStartConfig | None = None
    """Supervised fine-tuning on trajectories before RL (`turnrl sft`; `turnrl train` runs it
    first when set); None starts RL from the model as it is."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    models: dict[str, PricedModel] = Field(default_factory=dict)
    """Priced models a router picks among, by name (empty: `model` alone writes every turn).
    Exactly one is `{kind: trained}`: the run's `model`, the only one trained on."""
    router: RouterConfig | None = None
    """Which of `models` writes each turn; needed exactly when `models` is given."""
    boundary: BoundaryTrainingConfig | None = None
    """Boundary-guided training (BoPO, `turnrl.bopo`) of a `delegate`-routed run: boundary
    runs, a routed warm start, then RL on boundary-relative rewards with the reference-guided
    advantage (replacing `rewards` and `train.estimator`); None trains as configured there."""

    @model_validator(mode="after")
    def _boundary_needs_a_delegate_router(self) -> RunConfig:
        if self.boundary is not None and not isinstance(self.router, DelegateRouterConfig):
            raise ValueError(
                "boundary: BoPO trains the policy's own routing decisions: set router "
                "{kind: delegate, to: <the expensive model>}"
            )
        return self

    @model_validator(mode="after")
    def _routing_is_whole(self) -> RunConfig:
        if not self.models and self.router is None:
            return self
        if self.router is None:
            raise ValueError("models: a router must pick among them: set router")
        if len(self.models) < 2:
            raise ValueError(f"router: needs two or more models, got {list(self.models)}")
        trained = [n for n, m in self.models.items() if m.model.kind == "trained"]
        if len(trained) != 1:
            raise ValueError(
                f"models: exactly one must be {{kind: trained}} (the run's model), got {trained}"
            )
        for name in self.models:
            if not name or ":" in name:
                raise ValueError(f"models: name {name!r} must be non-empty, without ':'")
        router = self.router
        where, target = None, None
        if isinstance(router, FixedRouterConfig):
            where, target = "router.model", router.model
        elif isinstance(router, DelegateRouterConfig):
            where, target = "router.to", router.to
            if target == trained[0]:
                raise ValueError("router.to: delegating to the trained model itself does nothing")
        if target is not None and target not in self.models:
            raise ValueError(f"{where}: {target!r} is not one of models ({', '.join(self.models)})")
        return self

    def trained_model_name(self) -> str | None:
        """The name the run's own model has in `models` (None without routing)."""
        return next((n for n, m in self.models.items() if m.model.kind == "trained"), None)

    @model_validator(mode="after")
    def _learner_scores_at_sampling_temperature(self) -> RunConfig:
        if self.learner.temperature != self.sampling.temperature:
            raise ValueError(
                f"learner.temperature ({self.learner.temperature}) must equal "
                f"sampling.temperature ({self.sampling.temperature}): the PPO ratio compares "
                "the learner's logprobs with the rollout's under the same distribution"
            )
        return self

    @model_validator(mode="after")
    def _estimator_has_its_inputs(self) -> RunConfig:
        if needs_values(self.train.estimator) and self.learner.value_head is None:
            raise ValueError(
                f"train.estimator {self.train.estimator.kind!r} needs state values: set "
                "learner.value_head (e.g. `learner: {value_head: {}}`)"
            )
        return self

    @model_validator(mode="after")
    def _rewards_read_metrics_the_suite_emits(self) -> RunConfig:
        # A metric the grader never emits would be read as missing on every episode: refused
        # here, where the field that names it can still be shown.
        emitted = self.task.metrics
        for where, metric in self.rewards.metrics_read():
            if metric not in emitted:
                raise ValueError(
                    f"{where}: {metric!r} is not a metric of task {self.task.kind!r} "
                    f"(it emits: {', '.join(emitted)})"
                )
        return self

    @model_validator(mode="after")
    def _answer_rewards_have_gold_answers(self) -> RunConfig:
        # Suites that grade what the agent did (calls, simulator state) have no gold answer
        # text whose probability or appearance these components measure.
        needs_text = sorted({"info_gain", "saturation"} & set(self.rewards.weights))
        if needs_text and not self.task.gold_answer_text:
            raise ValueError(
                f"rewards {needs_text} need gold answer text, which task {self.task.kind!r} "
                "does not have (it grades the calls made): remove them from rewards"
            )
        return self

    @model_validator(mode="after")
    def _lora_sync_has_adapters_to_send(self) -> RunConfig:
        model = self.model
        if model.kind != "vllm" or model.weight_sync != "lora":
            return self
        if self.learner.adaptation.kind != "lora":
            raise ValueError(
                "model.weight_sync: lora sends the learner's LoRA adapters to the server: set "
                "learner.adaptation: {kind: lora}, or use weight_sync: reload"
            )
        if self.warm_start is not None:
            raise ValueError(
                "model.weight_sync: lora cannot carry a warm start (it changes the base "
                "weights the server holds): use weight_sync: reload"
            )
        return self

    @model_validator(mode="after")
    def _server_logprobs_follow_the_sampling(self) -> RunConfig:
        # The server's logprobs must be what the learner scores (softmax(logits / T)): refused
        # here rather than on the first request of a run.
        model = self.model
        if model.kind != "vllm":
            return self
        temperatures = {
            "sampling.temperature": self.sampling.temperature,
            "eval.temperature": self.eval.temperature,
        }
        if model.logprobs_mode == "raw_logprobs":
            for where, t in temperatures.items():
                if t not in (0, 1):
                    raise ValueError(
                        f"{where} {t:g}: a server returning raw logprobs scores temperature 1 "
                        "(and greedy) only: set model.logprobs_mode: processed_logprobs"
                    )
        elif self.sampling.top_p < 1:
            raise ValueError(
                "model.logprobs_mode processed_logprobs applies top-p truncation to the "
                "logprobs: set sampling.top_p: 1"
            )
        return self

    @model_validator(mode="after")
    def _api_model_turns_are_chatml(self) -> RunConfig:
        # An API model's replies are stored as ChatML text with `<tool_call>` calls
        # (`turnrl.agent.openai_chat`): another template or call format would misread them.
        if self.model.kind == "openai" and (
            self.chat.template.kind != "chatml" or self.chat.tool_format != "hermes"
        ):
            raise ValueError(
                "model.kind openai stores its turns as ChatML with hermes tool calls: leave "
                "chat at its default (template chatml, tool_format hermes)"
            )
        return self

    def needs_sandbox(self) -> bool:
        """Whether the run opens its sandbox: the suite or one of `tools` runs code."""
        return self.task.runs_code or any(t.runs_code for t in self.tools)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(Exception):
    """A config file a person wrote is wrong; the message names the file and the field."""


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load and validate a YAML run config; `overrides` are dotted keys (`train.steps`)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: invalid config"]
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            # A run-level check (a model validator) names its fields in its own message.
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {msg}" if where else f"  {msg}")
        raise ConfigError("\n".join(lines)) from None
