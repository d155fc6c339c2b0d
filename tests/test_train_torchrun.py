"""`turnrl train` under a real `torchrun` on the CPU (gloo, two ranks): rank 0 rolls out, grades,
stores and leads; rank 1 follows every learner call (`turnrl.rl.ranks`). The run equals a
one-process run of the same config: the same episodes (rank 0 samples with the weights one
process would have, so the same tokens) and the same final weights, up to the rounding of
summing two ranks' gradients; the follower checks its replica against rank 0's at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from test_learner import tiny_model
from torch.multiprocessing.spawn import ProcessRaisedException, spawn

from turnrl.agent.store import RunStore
from turnrl.rl.distributed import DataParallelGroup
from turnrl.rl.learner_config import LearnerConfig
from turnrl.rl.ranks import Finish, LeadLearner, fingerprint, follow, open_ranks

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def write_config(tmp_path: Path, name: str, steps: int = 2, **extra: Any) -> Path:
    """The tiny model with a LoRA warm start on the oracle's traces (SFT steps, then the
    adapters merged), then `steps` RL steps of two PPO epochs of two minibatches each, with
    GAE over a value head: the tiny model's returns are all equal, so the value baseline is
    what gives its turns nonzero advantages (and the steps value targets). `extra` replaces
    top-level fields. Also the config of `test_resume.py`."""
    cfg: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    cfg |= {
        "run_dir": str(tmp_path / name),
        "budget": {"max_turns": 4, "max_new_tokens": 64, "max_context_tokens": 2048},
        "warm_start": {"sources": [{"kind": "oracle", "n_items": 4}], "batch_episodes": 2},
        "train": {
            "steps": steps,
            "tasks_per_step": 2,
            "group_size": 2,
            "estimator": {"kind": "gae"},
        },
        # One episode at a time, no prefix cache: a rollout is then a function of its seed and
        # the weights (batched rows round differently, and can flip a sampled token).
        "concurrency": 1,
        "policy": {"prefix_cache": False},
    }
    cfg["learner"] |= {"value_head": {}, "ppo_epochs": 2, "minibatches": 2}
    cfg |= extra
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)


def weights(run_dir: Path, checkpoint: str = "final") -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / checkpoint / "merged"
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    assert out, f"no weights in {folder}"
    return out


Sampled = tuple[str, int, list[tuple[int, float]]]


def sampled(run_dir: Path) -> list[Sampled]:
    """Each stored episode's task, step, and (id, logprob) of every sampled token."""
    with RunStore.open_readonly(run_dir) as store:
        return [
            (
                e.task_id,
                e.step,
                [
                    (i, lp)
                    for t in e.turns
                    for i, lp in zip(t.completion_ids, t.completion_logprobs, strict=True)
                ],
            )
            for e in store.episodes()
        ]


def agree(one: list[tuple[int, float]], two: list[tuple[int, float]]) -> bool:
    """Whether two runs sampled the same tokens; asserts that up to the first differing token
    they scored alike (the same weights up to rounding) and that the difference, if any, is a
    draw on the border of two neighbouring ids."""
    n = next((k for k, (a, b) in enumerate(zip(one, two, strict=False)) if a[0] != b[0]), None)
    common = min(len(one), len(two)) if n is None else n
    for (_, a), (_, b) in zip(one[:common], two[:common], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    if n is not None:
        assert abs(one[n][0] - two[n][0]) == 1, (n, one[n], two[n])
    return n is None and len(one) == len(two)


@pytest.mark.slow
def test_torchrun_two_ranks_train_like_one_process(tmp_path: Path) -> None:
    one = run([str(BIN / "turnrl"), "train", str(write_config(tmp_path, "one")), "--no-eval"])
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            "--no-python",
            str(BIN / "turnrl"),
            "train",
            str(write_config(tmp_path, "two")),
            "--no-eval",
        ]
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    # One LoRA learner for the warm start (2 SFT steps over 4 traces), one for RL.
    assert "rank 1: followed 2 learner(s), 2 RL and 2 SFT step(s) to version 4" in two.stdout
    assert "weights equal rank 0's" in two.stdout
    # Rank 0 alone rolled out and stored, sampling with the weights one process has: the same
    # episodes, up to the rounding of two ranks' summed gradients (measured: 3e-8 at most, on
    # weights of ~1e-2). The tiny model's near-uniform distribution over 49k ids can turn that
    # rounding into another id: a draw on the border of two neighbouring ids in the sampler's
    # cumulative distribution, after which the episode goes its own way (measured once in 2048
    # tokens). A policy a step stale would differ in every logprob by far more than 1e-4.
    one_eps, two_eps = sampled(tmp_path / "one"), sampled(tmp_path / "two")
    assert [e[:2] for e in two_eps] == [e[:2] for e in one_eps]
    assert len([e for e in two_eps if e[1] >= 0]) == 8
    same = [agree(a[2], b[2]) for a, b in zip(one_eps, two_eps, strict=True)]
    # A step whose episodes (and all before) agree trained on the same batch: same loss.
    with RunStore.open_readonly(tmp_path / "one") as store:
        m_one = store.metrics()
    with RunStore.open_readonly(tmp_path / "two") as store:
        m_two = store.metrics()
    assert [m["policy_version"] for m in m_two] == [3.0, 4.0]
    for step, (a, b) in enumerate(zip(m_one, m_two, strict=True)):
        assert b["skipped"] == 0.0 and b["n_optimizer_steps"] == 4.0
        if all(ok for ok, e in zip(same, one_eps, strict=True) if e[1] <= step):
            for key in ("loss", "value_loss", "n_tokens", "n_value_targets"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
    w_one, w_two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w_one.keys() == w_two.keys()
    if all(same):
        for name, p in w_one.items():
            torch.testing.assert_close(w_two[name], p, atol=1e-6, rtol=0)
    warm = weights(tmp_path / "two", "warm_start")
    assert any(not torch.equal(warm[k], w_two[k]) for k in warm), "RL moved the weights"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _drift(rank: int, port: int) -> None:
    """Rank 0 leads one learner, then claims weights the follower does not have."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ranks = open_ranks(DataParallelGroup(rank, 2))
        model = tiny_model()
        if rank == 0:
            LeadLearner(model, LearnerConfig(), ranks)
            wrong = [v + 1.0 for v in fingerprint(model)]
            ranks.send(Finish(wrong))
        else:
            follow(ranks, model)
    finally:
        dist.destroy_process_group()


def test_follower_refuses_weights_that_differ_from_rank_0s() -> None:
    with pytest.raises(ProcessRaisedException, match="weights differ from rank 0's"):
        spawn(_drift, args=(_free_port(),), nprocs=2, join=True)
