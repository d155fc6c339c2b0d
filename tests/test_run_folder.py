"""A run folder holds one run: evaluating into it never replaces the training config that
`turnrl replay` reads, and training into it again is refused unless `--overwrite` says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from turnrl.cli import app
from turnrl.config import load_config
from turnrl.replay import replay
from turnrl.train import run_eval, run_train

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"


def test_eval_into_a_training_run_keeps_its_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_cfg = load_config(TINY, {"run_dir": str(run_dir)})
    run_train(train_cfg, Console(width=120, record=True), with_eval=False)
    trained = (run_dir / "config.yaml").read_text()
    eval_cfg = load_config(TINY, {"run_dir": str(run_dir), "eval.n_items": 1, "seed": 7})
    run_eval(eval_cfg, Console(width=120, record=True), run_dir / "checkpoints" / "final")
    assert (run_dir / "config.yaml").read_text() == trained
    assert (run_dir / "eval.config.yaml").read_text() == eval_cfg.to_yaml()
    assert replay(run_dir)["advantages_differing"] == 0

    # Training again into the same folder is refused, naming the way out.
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_train(train_cfg, Console(width=120, record=True), with_eval=False)
    result = CliRunner().invoke(app, ["train", str(TINY), "--set", f"run_dir={run_dir}"])
    assert result.exit_code == 2
    assert "already holds a run" in result.output and "--overwrite" in result.output
    assert (run_dir / "config.yaml").read_text() == trained


def test_eval_into_a_new_folder_writes_both_configs(tmp_path: Path) -> None:
    run_dir = tmp_path / "eval-only"
    cfg = load_config(TINY, {"run_dir": str(run_dir), "eval.n_items": 1})
    run_eval(cfg, Console(width=120, record=True), None)
    assert (run_dir / "config.yaml").read_text() == cfg.to_yaml()
    assert (run_dir / "eval.config.yaml").read_text() == cfg.to_yaml()
    # An evaluation-only folder is still a run folder: training into it needs --overwrite.
    with pytest.raises(FileExistsError, match=r"config\.yaml"):
        run_train(cfg, Console(width=120, record=True), with_eval=False)
