"""Boundary-guided training's run config (`turnrl.bopo`), kept apart so a config loads without
numpy or torch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from turnrl.rl.boundary_config import BopoConfig, BoundaryConfig


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BoundaryTrainingConfig(_Config):
    """Boundary-guided training of a delegate-routed run (BoPO, arXiv 2602.21227): after the
    warm start, run the two boundary policies (the trained model alone, the delegate target
    alone) on the training tasks, classify each task, warm-start again on the cheapest
    successful routed trajectories, then train with boundary-relative rewards and the
    reference-guided advantage in place of `rewards` and `train.estimator`."""

    runs: int = Field(2, ge=1)
    """K, the runs of each boundary policy on each task (the paper's K = 5)."""
    n_items: int = Field(64, ge=0)
    """Train items (a seeded shuffle's first N) to synthesise the routed warm start from,
    besides the RL steps' own items (which always get boundary runs: their rewards need
    them)."""
    taxonomy: BoundaryConfig = Field(default_factory=BoundaryConfig)
    """How a task is classified from its boundary runs."""
    bopo: BopoConfig = Field(default_factory=BopoConfig)
    """The reward's cost weight and hard bonus, and the advantage's reference."""
    sft_epochs: int = Field(1, ge=0)
    """Passes over the routed warm-start trajectories (0: no routed warm start)."""
    sft_lr: float = Field(3e-5, gt=0)
    """Its learning rate."""
    sft_batch_episodes: int = Field(8, ge=1)
    """Episodes per optimizer step of the routed warm start."""
