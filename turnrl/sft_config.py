"""The warm start's config: where its trajectories come from and how they are trained on.

Kept apart from `turnrl.sft`, which needs torch, so that a run config loads without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from turnrl.rl.learner_config import LossWeighting


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OracleSource(_Config):
    """The suite's oracle (`TaskSuite.oracle_turns`) played on **train** items through the
    real runner and tools, so the observations it is cloned with are the tools' own."""

    kind: Literal["oracle"] = "oracle"
    n_items: int | None = Field(None, ge=1)
    """Train items played (the first N of a seeded shuffle); None plays every train item."""


class RejectionSource(_Config):
    """Rejection sampling (expert iteration / RFT: Anthony et al. 2017, arXiv 1705.08439;
    Yuan et al. 2023, arXiv 2308.01825): the policy's own rollouts on train items, of which
    only successes are kept."""

    kind: Literal["rejection"] = "rejection"
    n_items: int | None = Field(None, ge=1)
    """Train items sampled (the first N of a seeded shuffle); None samples every one."""
    samples: int = Field(4, ge=1)
    """Rollouts per item (the n of best-of-n)."""
    keep: Literal["best", "all"] = "best"
    """`best`: one success per item, the cheapest (fewest tool calls, then fewest sampled
    tokens); `all`: every success."""
    temperature: float | None = Field(None, ge=0.0)
    """Sampling temperature; None uses the run's `sampling.temperature`."""


class RunSource(_Config):
    """The episodes of a stored run (any policy, any step), filtered."""

    kind: Literal["run"] = "run"
    path: Path
    """The run folder (`turnrl train`/`eval`'s `run_dir`)."""
    keep: Literal["successes", "cheapest_success"] = "cheapest_success"
    """`successes`: every successful episode; `cheapest_success`: one per item, the success
    with the fewest tool calls, then the fewest sampled tokens."""
    split: Literal["train", "any"] = "train"
    """`train` keeps only episodes of the suite's train items (never clone a test item's
    trajectory into a model that will be evaluated on it); `any` trusts the run."""


WarmStartSource = Annotated[OracleSource | RejectionSource | RunSource, Field(discriminator="kind")]


def _oracle() -> list[WarmStartSource]:
    return [OracleSource()]


class WarmStartConfig(_Config):
    """Supervised fine-tuning on trajectories before RL (`turnrl sft`, or `turnrl train`'s
    warm-start stage). Trained on the stored ids, assistant tokens only (`Learner.sft_step`):
    the system prompt, user messages, few-shot examples and observations are context, never
    targets. Trains what `learner.adaptation` names (LoRA adapters are merged into the weights
    afterwards, so RL starts from the warm-started model)."""

    sources: list[WarmStartSource] = Field(default_factory=lambda: _oracle(), min_length=1)
    """Where the trajectories come from; several are concatenated."""
    evidence: Literal["require", "flag", "off"] = "require"
    """For suites whose answers the tools show (`answer_in_observations`: search, math with
    Python, the embodied house): an episode whose answer no tool output supported (the gold
    answer does not occur in an observation before it) teaches guessing. `require` drops it,
    `flag` keeps it and counts it, `off` skips the check."""
    epochs: int = Field(1, ge=1)
    """Passes over the collected episodes."""
    batch_episodes: int = Field(16, ge=1)
    """Episodes per optimizer step."""
    lr: float = Field(3e-5, gt=0)
    """AdamW learning rate of the warm start (its own optimizer; RL starts a fresh one)."""
    weighting: LossWeighting = "token"
    """`token`: every assistant token weighs the same; `episode`: every episode the same."""
