"""Boundary-guided training's configs and its difficulty classes (`turnrl.rl.boundary`).

Kept apart from the estimators, which need numpy, so a run config loads without it, as
`turnrl.rl.estimator_config` does for the advantage estimators. `Difficulty` lives here too, so a
config can key a table on it. The reference a BoPO advantage anchors on is one class per rule,
chosen by `kind`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field


class Difficulty(StrEnum):
    """A training task's class, read off the outcomes of the two boundary policies on it
    (always-cheap, always-expensive), each counted as solving the task when its success rate
    reaches `BoundaryConfig.solve_threshold`."""

    EASY = "easy"
    """Both boundary policies solve it: the cheap model alone suffices, so the expensive one
    buys nothing here. Warm-start label: the cheapest successful always-cheap run."""
    HARD = "hard"
    """Only the always-expensive policy solves it: the routing decisions matter here, and the
    paper's extra reward for success (`r_hard`) applies. Warm-start label: the cheapest
    successful run of any routing mix."""
    INTRACTABLE = "intractable"
    """Neither boundary policy solves it: no routing mix is expected to either, so the best
    behaviour is to fail cheaply. Warm-start label: the cheapest always-cheap run."""
    INVERTED = "inverted"
    """The always-cheap policy solves it, the always-expensive one does not (a stronger model
    that over-thinks, or noise across few runs). The paper's taxonomy has three classes and no
    such one; it is kept apart so a run can count it, and is handled as `EASY` everywhere
    downstream: a cheap solution is known to exist."""


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BoundaryConfig(_Config):
    """How the boundary runs classify a task and how warm-start (SFT) data is drawn."""

    solve_threshold: float = Field(0.5, gt=0, le=1)
    """A boundary policy solves a task when its success rate over its runs on the task is at
    least this (equal counts as solved). 0.5 with the paper's K = 5 runs means 3 of 5."""
    hard_rollouts: int = Field(10, ge=1)
    """N, the rollouts drawn on each Hard task to synthesise warm-start data, one per stratum
    P(expensive) = k / N, k = 1..N (the paper uses N = 10 or 20)."""
    tasks_per_difficulty: dict[Difficulty, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict
    )
    """Most tasks of each class kept in the warm-start set, drawn uniformly without
    replacement when there are more; a class absent here keeps every task."""


class BestBoundaryReference(_Config):
    """The reference is the better of the two boundary policies on the task, by the same
    boundary-relative reward the routed trajectories get: always-expensive on Hard tasks,
    always-cheap on the others (at the default weights)."""

    kind: Literal["best_boundary"] = "best_boundary"
    weight: float = Field(1.0, gt=0)
    """How many group members the reference counts as in the group's mean and std."""


class NoReference(_Config):
    """No reference: plain GRPO over the group's own trajectories (the ablation)."""

    kind: Literal["none"] = "none"


ReferenceConfig: TypeAlias = Annotated[
    BestBoundaryReference | NoReference, Field(discriminator="kind")
]
"""What anchors a group's baseline besides its own trajectories."""


class BopoConfig(_Config):
    """BoPO's reward and advantage: R = success + hard_bonus * success * [Hard] - cost_weight *
    C_norm, then a group-normalised advantage whose mean and std include the reference."""

    cost_weight: float = Field(0.5, ge=0)
    """lambda, the weight of the boundary-normalised cost (0 at the cheaper boundary's cost,
    1 at the dearer one's)."""
    hard_bonus: float = Field(0.5, ge=0)
    """The extra reward per unit of success on a Hard task (the paper's `r_hard`)."""
    reference: ReferenceConfig = Field(default_factory=BestBoundaryReference)
    """The trajectory reward that joins each group's baseline."""
    eps: float = Field(1e-6, ge=0)
    """Added to the group's std before dividing."""
