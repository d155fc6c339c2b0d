"""`turnrl train CONFIG --resume`: continue a killed run where it stopped, losing nothing that
was completed and training nothing twice.

What a run leaves to resume from:
- The run store (`turnrl.agent.store`): scored episodes, one metrics row per learner step
  (appended after the step), and the rollout journal, each episode as its rollout ended. A
  record is one `write()`: a kill -9 leaves whole records and at most one torn tail, which
  the next writer cuts off.
- `progress.json` (replaced atomically): the stages done (the evaluations before RL, the warm
  start and the version it ended at) and the last resume state.
- Resume states, `checkpoints/resume-{steps:06d}/`: the learner (weights or LoRA adapter,
  value head, optimizer, version, optimizer steps) and the torch RNG state after `steps` RL
  steps, every `train.resume_every` steps and after the last. Written into a temporary
  folder, then renamed into place: a kill mid-write leaves the previous state.

Resuming replays what is known and redoes the rest:
- a stage marked done is skipped (an evaluation's episodes are read back for the
  comparisons); a warm start that did not finish is run again from the base weights, its
  partial folder replaced;
- RL starts from a seed of its own (`seed + RL_SEED_OFFSET`, in `turnrl.train`), so the
  stages skipped on resume (and what they drew from torch's generator) change nothing after;
- the learner is rebuilt on the starting weights (the warm start's, when there was one), then
  loads the last state; the policy is synced to it;
- steps after that state that have a metrics row (learned, but not saved: `resume_every` > 1,
  or a kill between the row and the state) are learned again from their stored episodes: the
  learner is deterministic, so this reaches the weights the killed run had;
- at the first step without a row, the journaled rollouts are kept and only the others are
  rolled out (same seeds); grading, measuring and scoring are redone (functions of the
  episodes and the weights); episodes already stored are not stored again;
- the item order is a seeded sequence, replayed up to the step.

In sync mode the resumed run ends with the killed-and-resumed weights equal, bit for bit, to an
uninterrupted run's whenever a rollout is a function of its seed and the weights: with the
in-process policy, when an episode's forward passes do not depend on what runs beside it
(`concurrency: 1`, `policy.prefix_cache: false`; batched rows can round differently in the last
bits). Nothing is lost or duplicated either way (`tests/test_resume.py`).
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict

from turnrl.agent.records import Episode
from turnrl.agent.store import RunStore, fsync_dir, replace_file
from turnrl.config import RunConfig
from turnrl.loop import Resumed
from turnrl.rl.learner import Learner

PROGRESS = "progress.json"
RESUME_PREFIX = "resume-"
RNG_FILE = "rng.pt"
GROWABLE = {("train", "steps")}
"""Config fields a resumed run may change: more steps extend the run."""


class ResumeError(ValueError):
    """A run that cannot be resumed as asked (no run there, another config): a person's
    input, reported in one line."""


class RunProgress(BaseModel):
    """How far a run got, beyond what its records say (`progress.json`)."""

    model_config = ConfigDict(extra="forbid")

    stages: list[str] = []
    """Stages finished before RL: `eval-before`, `warm-start`, `eval-warm`."""
    warm_start_version: int | None = None
    """The version the warm start ended at (the RL learner continues from it)."""
    resume: str | None = None
    """The last resume state's folder under `checkpoints/`."""
    rl_steps: int = 0
    """RL steps that state holds."""


def read_progress(run_dir: Path) -> RunProgress:
    path = run_dir / PROGRESS
    return RunProgress.model_validate_json(path.read_text()) if path.exists() else RunProgress()


def write_progress(run_dir: Path, progress: RunProgress) -> None:
    """Replace `progress.json` atomically (`agent.store.replace_file`)."""
    replace_file(run_dir / PROGRESS, progress.model_dump_json(indent=2))


def mark(run_dir: Path, progress: RunProgress, stage: str, **update: Any) -> RunProgress:
    """`progress` with `stage` done (and `update`), written."""
    done = progress.model_copy(update={"stages": [*progress.stages, stage], **update})
    write_progress(run_dir, done)
    return done


def save_state(run_dir: Path, learner: Learner, steps: int, progress: RunProgress) -> RunProgress:
    """Write the resume state after `steps` RL steps and point `progress.json` at it; older
    states are removed once the new one is in place."""
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints / f".{RESUME_PREFIX}tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    learner.save_checkpoint(tmp)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()  # type: ignore[assignment]
    torch.save(rng, tmp / RNG_FILE)
    final = checkpoints / f"{RESUME_PREFIX}{steps:06d}"
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    fsync_dir(checkpoints)
    progress = progress.model_copy(update={"resume": final.name, "rl_steps": steps})
    write_progress(run_dir, progress)
    for old in checkpoints.glob(f"{RESUME_PREFIX}*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return progress


def load_state(run_dir: Path, learner: Learner, progress: RunProgress) -> int:
    """Load the last resume state into `learner` and restore the RNG; the RL steps it holds
    (0 when there is none: the learner stays as built)."""
    if progress.resume is None:
        return 0
    folder = run_dir / "checkpoints" / progress.resume
    learner.load_checkpoint(folder)
    rng = torch.load(folder / RNG_FILE, weights_only=False)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return progress.rl_steps


@dataclass
class StoredRun:
    """What a killed run's store holds, read once when it resumes."""

    steps: dict[int, list[Episode]] = field(default_factory=dict)
    """Scored RL episodes by step, in the order they were stored."""
    evaluations: dict[str, list[Episode]] = field(default_factory=dict)
    """Scored evaluation episodes by tag (`eval-before`, ...)."""
    journal: dict[str, Episode] = field(default_factory=dict)
    """Finished rollouts by episode id (the latest, should one id appear twice)."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Metrics rows, one per learned step."""

    @functools.cached_property
    def stored(self) -> set[str]:
        """Every stored episode's id (read once: the run is read before it resumes)."""
        every = [*self.steps.values(), *self.evaluations.values()]
        return {e.episode_id for part in every for e in part}

    def resumed(self, tag: str) -> Resumed:
        """What the run left of the rollouts tagged `tag` (`s{step}` or an evaluation's)."""
        prefix = f"{tag}/"
        mine = {k: e for k, e in self.journal.items() if k.startswith(prefix)}
        return Resumed(mine, {k for k in self.stored if k.startswith(prefix)})


def read_run(store: RunStore) -> StoredRun:
    run = StoredRun()
    for e in store.episodes():
        if e.step >= 0:
            run.steps.setdefault(e.step, []).append(e)
        else:
            run.evaluations.setdefault(e.group_id.split("/", 1)[0], []).append(e)
    run.journal = {e.episode_id: e for e in store.rollouts()}
    run.rows = store.metrics()
    return run


def check_config(stored_yaml: str | None, config: RunConfig, run_dir: Path) -> None:
    """Refuse to resume a run under a different config (only `train.steps` may change), or
    a folder that holds no run."""
    if stored_yaml is None:
        raise ResumeError(f"{run_dir}: no run to resume (no config.yaml)")
    stored = _flat(RunConfig.model_validate(yaml.safe_load(stored_yaml)).model_dump(mode="json"))
    given = _flat(config.model_dump(mode="json"))
    differ = sorted(
        ".".join(k)
        for k in stored.keys() | given.keys()
        if k not in GROWABLE and stored.get(k) != given.get(k)
    )
    if differ:
        raise ResumeError(
            f"{run_dir}: the config differs from the run's own in {', '.join(differ[:8])}: "
            "resume with the run's config (its config.yaml), or start a new run"
        )


def _flat(tree: Mapping[str, Any], at: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= _flat(value, (*at, key))
        else:
            out[(*at, key)] = value
    return out
