"""`turnrl train --resume` after kill -9 (`turnrl.resume`): real `turnrl train` processes, killed
with SIGKILL while they run, resumed until they finish.

- Bit for bit: killed at several points (during the first evaluation, the warm start, a step's
  rollouts, after a step's metrics row), the resumed run stores the same episodes and ends with
  the same weights, bit for bit, as an uninterrupted run of the same config (sync mode, one
  episode at a time, no prefix cache: rollouts that are functions of their seeds and weights).
- The fault suite: 20 kills at random moments over one run with sandboxed code tools, resuming
  each time: no completed rollout lost or run twice, no episode stored twice, no torn record,
  one metrics row per step, and nothing the killed runs started left on the machine.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_torchrun import weights, write_config

from turnrl.agent.store import RunStore

TURNRL = str(Path(sys.executable).parent / "turnrl")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def journaled(run_dir: Path) -> int:
    return sum(1 for _ in RunStore.open_readonly(run_dir).rollouts()) if run_dir.is_dir() else 0


def rows(run_dir: Path) -> int:
    return len(RunStore.open_readonly(run_dir).metrics()) if run_dir.is_dir() else 0


def run_until(config: Path, resume: bool, kill_when: Callable[[], bool] | None) -> bool:
    """Run `turnrl train` (with `--resume`); SIGKILL it once `kill_when()` holds. True when it
    was killed, False when it finished first (and then it must have succeeded)."""
    args = [TURNRL, "train", str(config), *(["--resume"] if resume else [])]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    try:
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.02)
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert proc.returncode == 0, out[-4000:]
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stored(run_dir: Path) -> list[tuple[str, list[list[int]], list[list[float]], list[int]]]:
    with RunStore.open_readonly(run_dir) as store:
        return sorted(
            (
                e.episode_id,
                [list(t.completion_ids) for t in e.turns],
                [list(t.completion_logprobs) for t in e.turns],
                [t.policy_version for t in e.turns],
            )
            for e in store.episodes()
        )


@pytest.mark.slow
def test_killed_and_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path: Path) -> None:
    assert not run_until(write_config(tmp_path, "whole", 3), False, None)
    config = write_config(tmp_path, "killed", 3)
    run_dir = tmp_path / "killed"
    # Journal: 2 eval-before episodes, then (after the warm start) 2 eval-warm, 4 per step.
    kills: list[Callable[[], bool]] = [
        lambda: journaled(run_dir) >= 1,  # during eval-before
        lambda: (run_dir / "warm_start").exists(),  # the warm start storing its episodes
        lambda: journaled(run_dir) >= 2 + 2 + 1,  # step 0's rollouts: no resume state yet
        lambda: journaled(run_dir) >= 2 + 2 + 4 + 1,  # during step 1's rollouts
        lambda: rows(run_dir) >= 2,  # after step 1's row: before or after its saved state
    ]
    resume = False
    for kill_when in kills:
        assert run_until(config, resume, kill_when), "the run finished before the kill"
        resume = True
    assert not run_until(config, True, None)

    assert stored(run_dir) == stored(tmp_path / "whole")
    whole, killed = weights(tmp_path / "whole"), weights(run_dir)
    assert whole.keys() == killed.keys()
    for name, p in whole.items():
        assert torch.equal(killed[name], p), name
    with RunStore.open_readonly(run_dir) as a, RunStore.open_readonly(tmp_path / "whole") as b:
        assert [_untimed(r) for r in a.metrics()] == [_untimed(r) for r in b.metrics()]


def _untimed(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without its wall times."""
    return {
        k: v for k, v in row.items() if not (k.endswith("_s") or "wall_s" in k or k == "seconds")
    }


def test_resume_refuses_another_config_and_an_empty_folder(tmp_path: Path) -> None:
    from rich.console import Console

    from turnrl.config import load_config
    from turnrl.train import run_train

    console = Console(width=120, record=True)
    cfg = load_config(write_config(tmp_path, "r", 3))
    with pytest.raises(ValueError, match="no run to resume"):
        run_train(cfg, console, resume=True)
    (tmp_path / "r").mkdir()
    RunStore(tmp_path / "r").write_config(cfg.to_yaml())
    other = cfg.model_copy(update={"seed": 1})
    with pytest.raises(ValueError, match="differs from the run's own in seed"):
        run_train(other, console, resume=True)
    with pytest.raises(ValueError, match="pick one"):
        run_train(cfg, console, resume=True, overwrite=True)


def _leftovers(run_dir: Path) -> list[str]:
    """Processes whose command line names the run (the trainer) or a sandbox."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(run_dir) in cmd or "turnrl-sandbox=" in cmd:
            found.append(f"{pid}: {cmd[:120]}")
    return found


@pytest.mark.slow
def test_twenty_kills_lose_nothing_and_leave_nothing(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "faults",
        3,
        task={"kind": "gsm_symbolic", "n_train": 40, "n_test": 4},
        sandbox={"kind": "subprocess", "pool_size": 2, "warm": 1},
        concurrency=4,
        policy={"prefix_cache": True},
        eval={"n_items": 4},
    )
    run_dir = tmp_path / "faults"
    rng = random.Random(0)
    kills = 0
    seen: set[str] = set()
    while kills < 20:
        deadline = time.monotonic() + rng.uniform(0.5, 8.0)
        # A kill before the run wrote its config leaves nothing to resume: start it again.
        resume = (run_dir / "config.yaml").exists()
        if not run_until(config, resume, lambda d=deadline: time.monotonic() > d):
            break  # finished before this kill: the run is shorter than 20 random kills
        kills += 1
        if run_dir.is_dir():
            seen |= {e.episode_id for e in RunStore.open_readonly(run_dir).rollouts()}
    else:
        assert not run_until(config, True, None)
    assert kills >= 10, f"only {kills} kills landed before the run finished"

    with RunStore.open_readonly(run_dir) as store:
        episodes = list(store.episodes())
        journal = [e.episode_id for e in store.rollouts()]
        metrics = store.metrics()
    ids = Counter(e.episode_id for e in episodes)
    assert max(ids.values()) == 1, "an episode stored twice"
    assert max(Counter(journal).values()) == 1, "a finished rollout run again"
    assert seen <= set(ids), "a journaled rollout never stored"
    # Every evaluation and every step's group complete: 3 evaluations of 4, 3 steps of 4.
    assert sum(e.step < 0 for e in episodes) == 12 and sum(e.step >= 0 for e in episodes) == 12
    assert [m["step"] for m in metrics] == [0.0, 1.0, 2.0]
    with RunStore(run_dir) as writer:  # a writer's open would cut a torn tail: there is none
        assert set(writer.dropped_bytes.values()) == {0}
    assert _leftovers(run_dir) == []
    print(f"{kills} kills; {len(journal)} rollouts journaled, {len(episodes)} episodes stored")


@pytest.mark.slow
def test_async_run_killed_at_random_loses_nothing(tmp_path: Path) -> None:
    """Asynchronous mode (staleness 1): the buffered rollouts of later steps are journaled
    too, so a kill loses none of them; episodes in flight run again from their start."""
    config = write_config(
        tmp_path,
        "async",
        concurrency=4,
        policy={"prefix_cache": True},
        eval={"n_items": 2},
        train={
            "steps": 4,
            "tasks_per_step": 2,
            "group_size": 2,
            "estimator": {"kind": "gae"},
            "mode": "async",
            "max_staleness": 1,
        },
    )
    run_dir = tmp_path / "async"
    rng = random.Random(1)
    kills = 0
    seen: set[str] = set()
    for _ in range(6):
        deadline = time.monotonic() + rng.uniform(3.0, 9.0)
        resume = (run_dir / "config.yaml").exists()
        if not run_until(config, resume, lambda d=deadline: time.monotonic() > d):
            break
        kills += 1
        if run_dir.is_dir():
            seen |= {e.episode_id for e in RunStore.open_readonly(run_dir).rollouts()}
    else:
        assert not run_until(config, True, None)
    assert kills >= 3, f"only {kills} kills landed before the run finished"
    with RunStore.open_readonly(run_dir) as store:
        episodes = list(store.episodes())
        journal = [e.episode_id for e in store.rollouts()]
        metrics = store.metrics()
    assert max(Counter(e.episode_id for e in episodes).values()) == 1
    assert max(Counter(journal).values()) == 1
    assert seen <= {e.episode_id for e in episodes}
    assert sum(e.step >= 0 for e in episodes) == 4 * 2 * 2
    assert [m["step"] for m in metrics] == [0.0, 1.0, 2.0, 3.0]
    assert all(m["batch_lag_max"] <= 1 for m in metrics)
    print(f"async: {kills} kills; {len(journal)} rollouts journaled, {len(episodes)} stored")
