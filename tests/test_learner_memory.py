"""Freed tensors go back to the system between learner steps (glibc's allocator)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from fakes import with_advantages
from test_learner import make_episode, tiny_model

from turnrl.rl import memory
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import LearnerConfig

glibc = pytest.mark.skipif(
    not memory.release_free_memory() and not memory.serve_large_blocks_by_mmap(),
    reason="needs glibc malloc",
)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _churn() -> None:
    """~400 MB of 4 MB and 64 KB blocks, allocated and freed in another thread (the loop runs
    the learner in worker threads)."""

    def work() -> None:
        blocks = [torch.ones(1 << 20) for _ in range(100)]
        small = [torch.ones(1 << 14) for _ in range(1000)]
        assert sum(b.numel() for b in blocks + small) == (100 << 20) + (1000 << 14)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()


@glibc
def test_blocks_freed_in_a_learner_pass_leave_resident_memory() -> None:
    before = rss_mb()
    with memory.returned_to_system():
        _churn()
    assert rss_mb() - before < 100


@pytest.mark.parametrize("release", [True, False])
def test_steps_run_with_and_without_releasing(release: bool) -> None:
    learner = Learner(tiny_model(), LearnerConfig(release_memory=release, lr=1e-3))
    episodes = with_advantages([make_episode("e", [(4, 3, 2)], seed=1)], [[1.0]])
    assert not learner.step(episodes).skipped
    assert not learner.sft_step(episodes).skipped
    assert learner.version == 2
