"""One end-to-end training step on the tiny model: task -> runner -> search tool -> store ->
rewards -> advantages -> learner -> new policy version; then replay from the store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from turnrl.agent.model import load_model, tiny_model_dir
from turnrl.agent.store import RunStore
from turnrl.config import load_config
from turnrl.replay import replay
from turnrl.rl.batch import build_token_batch
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import LearnerConfig
from turnrl.train import run_eval, run_train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    cfg = load_config(
        ROOT / "examples" / "tiny.yaml",
        {"run_dir": str(run_dir), "train.steps": 2, "sampling.temperature": 1.0},
    )
    out = run_train(cfg, Console(width=120, record=True), with_eval=True)
    assert len(out["rows"]) == 2
    return run_dir


def test_run_stores_everything(tiny_run: Path) -> None:
    with RunStore.open_readonly(tiny_run) as store:
        episodes = list(store.episodes())
        metrics = store.metrics()
    train = [e for e in episodes if e.step >= 0]
    evals = [e for e in episodes if e.step < 0]
    # 2 steps x 2 tasks x 2 rollouts, plus 2 eval items before and after.
    assert len(train) == 8 and len(evals) == 4
    assert [m["step"] for m in metrics] == [0.0, 1.0]
    assert all(t.advantage is not None for e in train for t in e.turns)
    assert all(t.advantage is None for e in evals for t in e.turns)
    assert all(set(t.rewards) == {"outcome", "format", "tool_cost"} for e in train for t in e.turns)
    assert (tiny_run / "checkpoints" / "final" / "merged" / "config.json").is_file()
    assert (tiny_run / "config.yaml").is_file()


def test_policy_versions_follow_learner_steps(tiny_run: Path) -> None:
    """Every turn records the weights that sampled it. A random tiny model never writes a valid
    call or answer, so every group's returns are equal, GRPO gives zero advantages, and the
    learner skips the step without bumping the version (regression lock)."""
    with RunStore.open_readonly(tiny_run) as store:
        episodes = list(store.episodes())
        metrics = store.metrics()
    assert [m["skipped"] for m in metrics] == [1.0, 1.0]
    assert {t.policy_version for e in episodes for t in e.turns} == {0}


def test_rollout_logprobs_equal_learner_logprobs(tiny_run: Path) -> None:
    """The PPO ratio starts at 1: the learner scores the stored ids exactly as the batched
    policy sampled them (left padding, KV cache and temperature included)."""
    with RunStore.open_readonly(tiny_run) as store:
        train = [e for e in store.episodes() if e.step == 0]
    learner = Learner(load_model(tiny_model_dir()), LearnerConfig())
    rescored = learner.logprobs(train)
    for e, per_turn in zip(train, rescored, strict=True):
        for t, lps in zip(e.turns, per_turn, strict=True):
            assert torch.allclose(torch.tensor(lps), torch.tensor(t.completion_logprobs), atol=1e-4)


def test_ids_trained_on_are_ids_sampled(tiny_run: Path) -> None:
    """Regression lock: the learner's batch trains exactly the sampled ids, in order."""
    with RunStore.open_readonly(tiny_run) as store:
        train = [e for e in store.episodes() if e.step == 0]
    adv = [[t.advantage or 0.0 for t in e.turns] for e in train]
    batch = build_token_batch(train, adv)
    for b, e in enumerate(train):
        trained = batch.input_ids_B_T[b][batch.loss_mask_B_T[b]].tolist()
        assert trained == [i for t in e.turns for i in t.completion_ids]
        assert batch.input_ids_B_T[b][: len(e.token_ids())].tolist() == e.token_ids()


def test_replay_reproduces_advantages_bit_for_bit(tiny_run: Path) -> None:
    result = replay(tiny_run)
    assert result["turns_compared"] > 0
    assert result["advantages_differing"] == 0 and result["grades_differing"] == 0
    rescored = replay(tiny_run, estimator="dr_grpo")
    assert rescored["turns_compared"] == result["turns_compared"]


def test_second_run_in_same_folder_is_refused(tiny_run: Path) -> None:
    cfg = load_config(ROOT / "examples" / "tiny.yaml", {"run_dir": str(tiny_run)})
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_train(cfg, Console(), with_eval=False)


@pytest.mark.slow
def test_embedded_model_takes_a_real_step(tmp_path: Path) -> None:
    """With the embedded model, rollouts differ, GRPO has signal, the learner steps, the weights
    change and the next rollouts are sampled by the new version."""
    cfg = load_config(
        ROOT / "examples" / "demo.yaml",
        {
            "run_dir": str(tmp_path / "run"),
            "train.steps": 2,
            "train.tasks_per_step": 2,
            "train.group_size": 4,
            "budget.max_new_tokens": 48,
            "learner.lr": 1.0e-5,
            # RL alone, one optimizer step per learner step: the version counts learner steps
            # and the first step's ratio is exactly the rollout's.
            "warm_start": None,
            "learner.minibatches": 1,
        },
    )
    out = run_train(cfg, Console(width=120, record=True), with_eval=False)
    rows = out["rows"]
    with RunStore.open_readonly(cfg.run_dir) as store:
        episodes = list(store.episodes())
    stepped = [r for r in rows if r["skipped"] == 0.0]
    assert stepped, "no step had a learning signal"
    assert rows[-1]["policy_version"] == len(stepped)
    first = rows[0]
    step1_versions = {t.policy_version for e in episodes if e.step == 1 for t in e.turns}
    assert step1_versions == {int(first["policy_version"])}
    if first["skipped"] == 0.0:
        assert first["grad_norm"] > 0 and abs(first["ratio_mean"] - 1.0) < 1e-3


def test_eval_loads_the_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    cfg = load_config(ROOT / "examples" / "tiny.yaml", {"run_dir": str(tmp_path / "eval")})
    summary = run_eval(cfg, Console(), tiny_run / "checkpoints" / "final")
    assert summary["episodes"] == 2.0
    with RunStore.open_readonly(tmp_path / "eval") as store:
        assert all(e.step == -1 for e in store.episodes())
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        run_eval(cfg, Console(), tmp_path)
